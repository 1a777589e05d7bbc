"""The typed ``bundle.json``: one :class:`Manifest`, read and validated once by the bundle
reader, written by the exporter. Defaults live here and nowhere else; code outside this
module reads attributes, never raw ``manifest["..."]`` keys.

Schema 2 adds ``sampling`` (the model's recommended sampler, steps and guidance) and names
DiT's variance-interpolation output ``var`` (schema 1 called it ``v``, easily mistaken for
v-prediction); schema-1 bundles are read with that output renamed on the fly. Schema 3 adds
the ``integrity`` record (the manifest's own canonical hash, written and checked by
:mod:`.bundle`); its content is the same as schema 2's.

Every problem is one line naming the key; every path the manifest names is relative,
normalised and free of tricks (:func:`check_relative`), so it cannot leave the bundle.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
INTEGRITY = "integrity"         # the top-level key of the manifest's own hash (see bundle.py)
DTYPES = ("float32", "float16", "int64", "int32")
SPACES = ("pixel", "latent")
LEGACY_OUTPUTS = {1: {"v": "var"}}          # schema -> {name in the graph: name in edgediff}


class ManifestError(InvalidInput):
    """A bundle.json that is malformed."""


@dataclass(frozen=True)
class Sampling:
    """Recommended sampling defaults, used when the user gives none."""

    sampler: str | None = None          # None: the schedule kind's usual sampler
    steps: int = 20
    guidance: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "Sampling":
        d = _mapping(d or {}, "sampling")
        _no_unknown(d, {f.name for f in dataclasses.fields(cls)}, "sampling")
        out = cls(**d)
        if out.sampler is not None and not isinstance(out.sampler, str):
            raise ManifestError(f"sampling.sampler must be a string, got {_short(out.sampler)}")
        _positive_int(out.steps, "sampling.steps")
        _finite(out.guidance, "sampling.guidance")
        return out


class _NamedIO:
    """Input and output names of a model declaration (``inputs``/``outputs`` dicts)."""

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)


@dataclass(frozen=True)
class Component(_NamedIO):
    """A companion model of the denoiser (``decoder``: latents -> image in [-1, 1];
    ``encoder``: image -> latents), with its own I/O, precisions, parity and facts."""

    inputs: dict                        # name -> {"dtype", "shape"}
    outputs: dict
    models: dict                        # precision -> relative ONNX path
    parity: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)     # e.g. scaling_factor, layout, source sha256
    graph_outputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("graph_outputs")
        return d

    @classmethod
    def from_dict(cls, name: str, d) -> "Component":
        d = _mapping(d, f"components.{name}")
        known = {f.name for f in dataclasses.fields(cls)} - {"graph_outputs"}
        _no_unknown(d, known, f"components.{name}")
        missing = [k for k in ("inputs", "outputs", "models") if k not in d]
        if missing:
            raise ManifestError(f"components.{name} lacks {', '.join(missing)}")
        kw = {k: _mapping(v if v is not None else {}, f"components.{name}.{k}") for k, v in d.items()}
        _check_io(kw["inputs"], f"components.{name}.inputs")
        _check_io(kw["outputs"], f"components.{name}.outputs")
        _check_models(kw["models"], f"components.{name}.models")
        _check_extra(name, kw.get("extra", {}))
        return cls(**kw)


# the companions a bundle may carry besides the denoiser: the autoencoder's two halves, and
# the condition encoder of image-conditioned models (ddm_cond), whose outputs are fed, by name,
# to the denoiser inputs of the same names (once per condition, reused at every step), and the
# classifier-guidance gradient (classifier_grad.onnx), and the text encoder of text-to-image
# models (text_encoder.onnx: CLIP ids -> the denoiser's ``context``, tokenizer files beside it)
COMPONENTS = ("decoder", "encoder", "cond_encoder", "classifier", "text_encoder")
FEATURE_COMPONENT = "cond_encoder"
TEXT_CONTEXT = "context"      # text-to-image denoiser input: text-encoder hidden states (N, tokens, dim)
TEXT_COMPONENT = "text_encoder"   # input_ids (N, tokens) -> last_hidden_state, fed to the denoiser as context


@dataclass(frozen=True)
class Manifest(_NamedIO):
    """Everything ``bundle.json`` says about a bundle."""

    family: str
    config: dict
    inputs: dict                        # name -> {"dtype", "shape"} (batch symbolic)
    outputs: dict                       # name -> {"dtype", "shape"}, names as edgediff uses them
    prediction: str
    time: dict
    schedule: dict
    sample_shape: tuple
    models: dict                        # precision -> relative ONNX path
    files: dict = field(default_factory=dict)   # relative path -> sha256
    num_classes: int | None = None
    null_label: int | None = None
    space: str = "pixel"
    extra: dict = field(default_factory=dict)
    sampling: Sampling = field(default_factory=Sampling)
    max_batch: int | None = None
    opset: int | None = None
    source: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    created: str | None = None
    parity: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)      # name -> Component (decoder, encoder)
    schema_version: int = SCHEMA_VERSION
    graph_outputs: dict = field(default_factory=dict)   # edgediff name -> graph name where they differ

    @property
    def conditional(self) -> bool:
        return "y" in self.inputs

    @property
    def guidable(self) -> bool:
        """Can classifier-free guidance run? It needs a null condition: the null label, or for
        a text-to-image model the empty prompt's ``context`` (so guidance doubles the batch)."""
        return self.null_label is not None or TEXT_CONTEXT in self.inputs

    @property
    def source_sha256(self) -> str | None:
        return self.source.get("sha256")

    @functools.cached_property
    def noise_schedule(self):
        """The :class:`~edgediff.runtime.schedules.Schedule` of ``schedule``, built once (the
        reader primes it with the one it built to validate the manifest)."""
        from .schedules import Schedule

        return Schedule.from_config(self.schedule)

    def component(self, name: str = "denoiser") -> Component:
        """The I/O and models of ``name``: the denoiser itself or one of its companions."""
        if name == "denoiser":
            return Component(self.inputs, self.outputs, self.models, self.parity, self.precision,
                             self.extra, self.graph_outputs)
        if name not in self.components:
            have = ", ".join(["denoiser", *self.components])
            raise ManifestError(f"this bundle has no {name} (has: {have})")
        return self.components[name]

    @property
    def all_model_files(self) -> list[str]:
        """Every ONNX file the manifest names, companions included."""
        return [*self.models.values(), *(rel for c in self.components.values() for rel in c.models.values())]

    @property
    def referenced_dirs(self) -> list[str]:
        """Directories the runtime reads files from (a text encoder's tokenizer): each file in
        them must be among ``files``."""
        return [c.extra[TOKENIZER_KEY] for c in self.components.values() if TOKENIZER_KEY in c.extra]

    def option(self, key: str, default=None):
        """A family-specific fact from ``extra`` (variance, clip_sample, cfg_scale ...)."""
        return self.extra.get(key, default)

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("graph_outputs")
        d["sample_shape"] = list(self.sample_shape)
        d["components"] = {k: c.to_dict() for k, c in self.components.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "bundle.json") -> "Manifest":
        try:
            return cls._parse(_mapping(d, "the manifest"))
        except ManifestError as exc:
            raise ManifestError(f"{where}: {exc}") from None

    @classmethod
    def _parse(cls, d: dict) -> "Manifest":
        known = {f.name for f in dataclasses.fields(cls)} - {"graph_outputs"}
        _no_unknown(d, known | {INTEGRITY}, "the manifest")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"lacks required key(s): {', '.join(missing)}")
        version = d.get("schema_version", SCHEMA_VERSION)
        if type(version) is not int or version not in READABLE_SCHEMAS:
            raise ManifestError(f"has schema version {_short(version)}; this edgediff reads {READABLE_SCHEMAS}")
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("config", "inputs", "outputs", "time", "schedule", "models", "files", "extra",
                    "source", "tools", "parity", "precision"):
            if key in kw:
                kw[key] = _mapping(kw[key] if kw[key] is not None else {}, key)
        kw["sampling"] = Sampling.from_dict(d.get("sampling"))
        comps = _mapping(d.get("components") or {}, "components")
        unknown = sorted(set(comps) - set(COMPONENTS))
        if unknown:
            raise ManifestError(f"unknown component(s) {_names(unknown)}; known: {', '.join(COMPONENTS)}")
        kw["components"] = {k: Component.from_dict(k, v) for k, v in comps.items()}
        _check_pairing(kw["components"], kw["inputs"])
        kw["sample_shape"] = _shape(d["sample_shape"])
        _check_io(kw["inputs"], "inputs")
        _check_io(kw["outputs"], "outputs")
        kw["outputs"], kw["graph_outputs"] = _rename_legacy(kw["outputs"], version)
        _check_labels(kw.get("num_classes"), kw.get("null_label"), "y" in kw["inputs"])
        _check_scalars(kw)
        schedule = _check_model(kw)
        if kw.get("space", "pixel") not in SPACES:
            raise ManifestError(f"space must be one of {SPACES}, got {_short(kw['space'])}")
        _check_models(kw["models"], "models")
        _check_files(kw.get("files", {}))
        manifest = cls(**kw)
        manifest.__dict__["noise_schedule"] = schedule      # cached_property's own slot
        return manifest


# --- validation helpers --------------------------------------------------------------------
def _mapping(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _no_unknown(d: dict, known: set, what: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(f"{what} has unknown key(s): {_names(unknown)}")


def _positive_int(value, what: str, limit: int = 1 << 20) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ManifestError(f"{what} must be an integer in 1..{limit}, got {_short(value)}")
    return value


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{what} must be a finite number, got {_short(value)}")
    return float(value)


def _shape(value) -> tuple:
    if not isinstance(value, list) or len(value) != 3:
        raise ManifestError(f"sample_shape must be a list [C, H, W], got {_short(value)}")
    shape = tuple(_positive_int(v, "sample_shape entries", 1 << 14) for v in value)
    if shape[0] * shape[1] * shape[2] > 1 << 26:
        raise ManifestError(f"sample_shape {list(shape)} is implausibly large")
    return shape


def _check_io(io: dict, what: str) -> None:
    for name, decl in io.items():
        if not isinstance(decl, dict) or decl.get("dtype") not in DTYPES or not isinstance(decl.get("shape"), list):
            raise ManifestError(f"bad {what} declaration for {_short(name)}: {_short(decl)}")
        for dim in decl["shape"]:       # a static size, or a symbolic name (the batch axis)
            if not (isinstance(dim, str) and dim) and not (type(dim) is int and 0 < dim <= 1 << 20):
                raise ManifestError(f"{what}.{_name(name)}.shape entries must be positive integers or axis names, "
                                    f"got {_short(dim)}")


def _short(value, limit: int = 80) -> str:
    """repr(value), cut short: a one-line message must stay one line of sane length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _name(key) -> str:
    """A key as written in a message: plain when it is a plain name, else its repr (a key
    may hold newlines or control characters)."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 40 else _short(key, 40)


def _names(keys) -> str:
    keys = list(keys)
    return ", ".join(_name(k) for k in keys[:8]) + (" ..." if len(keys) > 8 else "")


_OPTIONAL = {"family": str, "prediction": str, "created": (str, type(None)), "space": str}
_OPTIONAL_INTS = {"max_batch": 1 << 20, "opset": 100}


def _check_scalars(kw: dict) -> None:
    """The plain fields: strings where strings belong, bounded integers or null."""
    for key, kind in _OPTIONAL.items():
        if key in kw and not isinstance(kw[key], kind):
            raise ManifestError(f"{key} must be a string, got {_short(kw[key])}")
    for key, limit in _OPTIONAL_INTS.items():
        if kw.get(key) is not None:
            _positive_int(kw[key], key, limit)
    if kw.get("num_classes") is not None:
        _positive_int(kw["num_classes"], "num_classes")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_files(files: dict) -> None:
    for rel, digest in files.items():
        check_relative(rel, "files")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ManifestError(f"files[{_short(rel)}] must be a sha256 hex digest, got {_short(digest)}")


def _check_models(models: dict, what: str) -> None:
    if not models:
        raise ManifestError(f"{what} names no model file")
    for precision, rel in models.items():
        check_relative(rel, f"{what}.{_name(precision)}")


TOKENIZER_KEY = "tokenizer"     # components.text_encoder.extra.tokenizer: the tokenizer's directory


def _check_extra(name: str, extra: dict) -> None:
    """The component facts the runtime reads: the classifier's class count, the text
    encoder's token length and tokenizer directory."""
    if name == "classifier":
        _positive_int(extra.get("num_classes"), "components.classifier.extra.num_classes")
    if name == TEXT_COMPONENT and TOKENIZER_KEY in extra:
        check_relative(extra[TOKENIZER_KEY], f"components.{name}.extra.{TOKENIZER_KEY}")
        _positive_int(extra.get("max_length"), f"components.{name}.extra.max_length", 1 << 16)


def _rename_legacy(outputs: dict, version: int) -> tuple[dict, dict]:
    renames = {old: new for old, new in LEGACY_OUTPUTS.get(version, {}).items() if old in outputs}
    return ({renames.get(k, k): v for k, v in outputs.items()},
            {new: old for old, new in renames.items()})


# prediction -> the outputs the samplers read, and the schedule kinds that produce it. The
# names are diffusers' prediction_type (lucidrains: pred_noise, pred_x0, pred_v); the output
# of a v_prediction model is ``v`` (schema 2 on; schema 1's ``v`` was DiT's variance, ``var``).
_VP_KINDS = ("discrete", "vp_continuous")
PREDICTIONS = {"epsilon": (("eps",), _VP_KINDS), "sample": (("x0",), _VP_KINDS),
               "v_prediction": (("v",), _VP_KINDS), "ddm_c_eps": (("c", "eps"), ("ddm_constant",))}
LEGACY_PREDICTIONS = {1: ("epsilon", "ddm_c_eps")}      # schema -> the predictions it knew


def _check_model(kw: dict):
    """What the samplers rely on: a known prediction with its outputs and schedule kind, an
    x input of the sample shape, and a schedule that builds (bounded sizes, finite numbers)."""
    from .schedules import Schedule

    prediction = kw["prediction"]
    known = LEGACY_PREDICTIONS.get(kw.get("schema_version", SCHEMA_VERSION), tuple(PREDICTIONS))
    if prediction not in known:
        raise ManifestError(f"prediction must be one of {', '.join(known)}, got {_short(prediction)}")
    stated = kw["schedule"].get("prediction_type", prediction)
    if stated != prediction:
        raise ManifestError(f"schedule.prediction_type {_short(stated)} contradicts prediction {prediction!r}")
    needs, kinds = PREDICTIONS[prediction]
    missing = [n for n in needs if n not in kw["outputs"]]
    if missing:
        raise ManifestError(f"a {prediction} model needs output(s) {', '.join(missing)}")
    x = kw["inputs"].get("x")
    if x is None or x["shape"][1:] != list(kw["sample_shape"]):
        raise ManifestError(f"inputs.x must have shape [batch, {', '.join(map(str, kw['sample_shape']))}]")
    n = kw["schedule"].get("num_train_timesteps", 1000)
    if type(n) is not int or not 2 <= n <= 100_000:
        raise ManifestError(f"schedule.num_train_timesteps must be an integer in 2..100000, got {_short(n)}")
    try:
        schedule = Schedule.from_config(kw["schedule"])
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:     # numbers NumPy cannot use
        raise ManifestError(f"schedule: {' '.join(str(exc).split())[:200]}") from None
    if schedule.kind not in kinds:
        raise ManifestError(f"a {prediction} model cannot use a {schedule.kind} schedule")
    return schedule


def _check_pairing(components: dict, inputs: dict) -> None:
    """A condition encoder's outputs are exactly the denoiser's inputs after x and t, same
    names, same order, same declarations; without one, the denoiser takes no such inputs."""
    # fed by the runtime, not by a cond_encoder: self-conditioning's x0 estimate, and the text
    # context of text-to-image models (U-ViT t2i; from the text_encoder component or given by the caller)
    extra = [n for n in inputs if n not in ("x", "t", "y", "x_self_cond", TEXT_CONTEXT)]
    enc = components.get(FEATURE_COMPONENT)
    if enc is None:
        if extra:
            raise ManifestError(f"inputs {_names(extra)} need a {FEATURE_COMPONENT} component to compute them")
        return
    if extra != list(enc.outputs):
        raise ManifestError(f"components.{FEATURE_COMPONENT}.outputs {list(enc.outputs)} must be the denoiser's "
                            f"inputs after x and t, in order; they are {_short(extra)}")
    bad = [n for n in extra if enc.outputs[n] != inputs[n]]
    if bad:
        raise ManifestError(f"components.{FEATURE_COMPONENT} declares {_names(bad)} unlike the denoiser's inputs")


def _check_labels(num_classes, null_label, conditional: bool) -> None:
    if not conditional:
        return
    k = _positive_int(num_classes, "num_classes")
    if null_label is not None and (isinstance(null_label, bool) or not isinstance(null_label, int)
                                   or not 0 <= null_label <= k):
        raise ManifestError(f"null_label must be an integer in 0..{k}, got {_short(null_label)}")


def check_relative(rel, what: str = "path") -> str:
    """Every path the manifest names stays inside the bundle: a non-empty relative POSIX path
    in normal form (no ``..``, ``.``, empty or trailing parts), without backslashes, drive
    colons or control characters, encodable as UTF-8, of sane length. Symlinks are the
    reader's to resolve (bundle.py); this is the syntax."""
    from pathlib import PurePosixPath

    ok = isinstance(rel, str) and 0 < len(rel) <= 1024 and not any(c in rel for c in "\\:") \
        and all(ord(c) >= 32 and c != "\x7f" for c in rel)
    if ok:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:              # lone surrogates: no file can have that name
            ok = False
    if ok:
        parts = rel.split("/")
        ok = all(p and p not in (".", "..") for p in parts) and str(PurePosixPath(rel)) == rel
    if not ok:
        raise ManifestError(f"{what}: path {_short(rel)} must be relative, normalised and inside the bundle")
    return rel
