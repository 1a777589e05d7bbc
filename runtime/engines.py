"""TensorRT engine identity: names, sidecars and the compatibility check.

Pure logic shared by the builder (``edgediff.export.trt_build``) and the native backend
(``edgediff.runtime.backends.trt``); it imports neither TensorRT nor CUDA, so every rule
here is tested on machines without a GPU.

An engine is valid only for the GPU architecture (compute capability) and the exact
TensorRT build it was made with, for the ONNX file it was parsed from and for the batch
range of its optimisation profile. All of that goes into the file name (so engines for
several GPUs can sit side by side in ``engines/``) and into a JSON sidecar that is checked
before the engine bytes are ever handed to TensorRT.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import sha256_file
from .errors import EdgediffError, InvalidInput

ENGINE_DIR = "engines"
SIDECAR_SUFFIX = ".json"
SIDECAR_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


class EngineError(EdgediffError, RuntimeError):
    """No engine, or one that must not run here; the message says what to do."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile over the batch axis, in engine rows (guidance included)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise InvalidInput(f"batch profile needs 1 ≤ min ≤ opt ≤ max, got {self.min}/{self.opt}/{self.max}")

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def tag(self) -> str:
        return f"b{self.min}-{self.opt}-{self.max}"


def engine_batch(batch: int, guided: bool) -> int:
    """The batch the model sees for ``batch`` samples: classifier-free guidance runs the
    conditional and null halves in one call (the one place this rule is written)."""
    return batch * (2 if guided else 1)


def batch_profile(min_batch: int = 1, opt_batch: int = 8, max_batch: int | None = None,
                  guidance: bool = True) -> BatchProfile:
    """Engine batch profile from sample batch sizes (what ``generate --batch`` takes).

    Classifier-free guidance runs the conditional and null halves in one call, so with
    ``guidance`` the engine sees twice the sample batch: opt and max are doubled. min stays
    as given, so the same engine also serves unguided calls of ``min_batch`` samples.
    """
    max_batch = opt_batch if max_batch is None else max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InvalidInput("need 1 ≤ --min-batch ≤ --opt-batch ≤ --max-batch, "
                         f"got {min_batch}/{opt_batch}/{max_batch}")
    return BatchProfile(min_batch, engine_batch(opt_batch, guidance), engine_batch(max_batch, guidance))


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    precision: str
    compute_capability: str          # "8.6", "9.0": the SM the kernels were chosen for
    tensorrt_version: str            # full version string, e.g. "10.12.0.36"
    onnx_sha256: str
    profile: BatchProfile | None = None   # None when selecting: any profile covering the batch

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def name(self) -> str:
        if self.profile is None:
            raise InvalidInput("an engine name needs a batch profile")
        sm = "sm" + self.compute_capability.replace(".", "")
        return f"{self.precision}_{sm}_trt{self.tensorrt_version}_{self.profile.tag()}_{self.onnx_sha256[:12]}.engine"


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def make_sidecar(key: EngineKey, engine_sha256: str, onnx_file: str, **extra) -> dict:
    """The sidecar written next to an engine; ``extra`` holds informative fields (GPU name...)."""
    if key.profile is None:
        raise InvalidInput("a sidecar needs the engine's batch profile")
    return {"sidecar_version": SIDECAR_VERSION, "precision": key.precision,
            "compute_capability": key.compute_capability, "tensorrt_version": key.tensorrt_version,
            "profile": asdict(key.profile), "onnx_file": onnx_file, "onnx_sha256": key.onnx_sha256,
            "engine_sha256": engine_sha256, "strongly_typed": True, **extra}


def read_sidecar(engine: str | Path) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineError(f"{Path(engine).name} has no sidecar {path.name}: its origin is unknown, rebuild it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path} is not valid JSON ({exc}); rebuild the engine") from None


def incompatibility(sidecar: dict, want: EngineKey, batch: int | None = None) -> str | None:
    """Why an engine described by ``sidecar`` must not run for ``want``; None if it may.

    ``batch`` is the largest engine batch the caller will feed (guidance included).
    """
    if sidecar.get("sidecar_version") != SIDECAR_VERSION:
        return f"sidecar version {sidecar.get('sidecar_version')!r}, this edgediff reads {SIDECAR_VERSION}"
    if sidecar.get("precision") != want.precision:
        return f"built for {sidecar.get('precision')}, {want.precision} was asked for"
    if sidecar.get("compute_capability") != want.compute_capability:
        return (f"built for a compute capability {sidecar.get('compute_capability')} GPU, "
                f"this GPU is {want.compute_capability}")
    if sidecar.get("tensorrt_version") != want.tensorrt_version:
        return (f"built with TensorRT {sidecar.get('tensorrt_version')}, "
                f"this is TensorRT {want.tensorrt_version}")
    if sidecar.get("onnx_sha256") != want.onnx_sha256:
        return "built from a different ONNX file than the bundle's (sha256 differs)"
    try:
        prof = BatchProfile(**sidecar["profile"])
    except (KeyError, TypeError, ValueError):
        return f"sidecar has no valid batch profile ({sidecar.get('profile')!r})"
    if batch is not None and not prof.covers(batch):
        return f"its batch profile {prof.min}..{prof.max} does not cover batch {batch}"
    return None


def check_engine(path: Path, want: EngineKey, batch: int | None = None,
                 check_bytes: bool = True) -> tuple[dict | None, str | None]:
    """(sidecar, None) when the engine at ``path`` may run for ``want``, else (sidecar or
    None, why not)."""
    try:
        side = read_sidecar(path)
    except EngineError as exc:
        return None, str(exc)
    reason = incompatibility(side, want, batch)
    if reason is None and check_bytes and sha256_file(path) != side.get("engine_sha256"):
        reason = "file does not match its sidecar's sha256 (partial copy or altered)"
    return side, None if reason is None else f"{path.name}: {reason}"


def engine_candidates(bundle_dir: str | Path, precision: str) -> list[Path]:
    folder = Path(bundle_dir) / ENGINE_DIR
    return sorted(folder.glob(f"{precision}_*.engine")) if folder.is_dir() else []


def select_engine(bundle_dir: str | Path, want: EngineKey, batch: int | None = None,
                  check_bytes: bool = True) -> tuple[Path, dict]:
    """The engine under ``engines/`` that may run for ``want``, with its sidecar.

    A profile covering ``batch`` is enough (the exact build-time profile need not match).
    Raises EngineError listing every candidate and why it was refused, and the command that
    builds a fitting one.
    """
    refusals = []
    exact = Path(bundle_dir) / ENGINE_DIR / want.name if want.profile else None
    candidates = engine_candidates(bundle_dir, want.precision)
    for path in sorted(candidates, key=lambda p: p != exact):          # the exact name first
        side, reason = check_engine(path, want, batch, check_bytes)
        if reason is None:
            return path, side
        refusals.append(reason)
    hint = f"build one with: edgediff build {bundle_dir} --precision {want.precision}"
    if batch:
        hint += f" and a --max-batch whose profile covers {batch} engine rows (guidance doubles the batch)"
    detail = "; ".join(refusals) if refusals else "none built yet"
    raise EngineError(f"no usable {want.precision} TensorRT engine for this GPU "
                      f"(sm {want.compute_capability}, TensorRT {want.tensorrt_version}) in "
                      f"{Path(bundle_dir) / ENGINE_DIR}: {detail}; {hint}")


def timing_cache_name(compute_capability: str, tensorrt_version: str) -> str:
    """Timing caches are only meaningful on the GPU and TensorRT that measured them."""
    return f"timing_sm{compute_capability.replace('.', '')}_trt{tensorrt_version}.cache"


def model_digest(manifest, precision: str, component: str = "denoiser") -> str:
    """sha256 identifying a bundle's ONNX model of ``precision``, external data included.

    Taken from the manifest's file hashes, which ``read_bundle`` verified against the disk.
    """
    import hashlib

    models = manifest.component(component).models if component != "denoiser" else manifest.models
    if precision not in models:
        raise EngineError(f"the bundle has no {precision} model (has: {', '.join(models)})")
    files, rel = manifest.files, models[precision]
    data = files.get(rel + ".data")
    return files[rel] if data is None else hashlib.sha256(f"{files[rel]}:{data}".encode()).hexdigest()
