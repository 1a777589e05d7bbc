"""FP16 mixed-precision ONNX with NVIDIA ModelOpt AutoCast, gated against FP32 (docs/architecture.md rung 2).

TensorRT's strongly typed networks take precision from the graph, so FP16 is decided here,
on a CPU, and checked with ONNX Runtime. AutoCast keeps a node in FP32 when its FP32
activations on the calibration feeds exceed ``DATA_MAX``; the feeds therefore walk the whole
noise schedule (t at both ends and between, x scaled as real trajectories are), otherwise the
timestep embedding's sin/cos arguments (t·freq up to ~1000, where an FP16 ulp is 0.5 rad) are
cast to FP16 and late-t predictions are wrong. Further FP32 islands are added only when the
measured gate fails, and only the candidate that helps most each round.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgediff.runtime.backends.ort import OrtBackend
from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.drift import forward_cases
from edgediff.runtime.files import sha256_file, staged_dir
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.interrupts import deferred
from edgediff.runtime.parity import ParityResult

from .fp16_targets import (Target, as_target, classifier_target, component_target, denoiser_target,
                           text_encoder_target)
from .models import get_family
from .models.family import ModelSpec
from .onnx_export import EXTERNAL_DATA_BYTES
from .reference import build_reference, torch_outputs

GATE_REL_L2 = 5e-3
DATA_MAX = 512.0   # ModelOpt's default: above it an FP16 ulp is ≥ 0.5 (too coarse for sin/cos args)
MISSING_MODELOPT = ("FP16 conversion needs NVIDIA ModelOpt AutoCast: pip install 'edgediff[fp16]' "
                    "(nvidia-modelopt onnxslim lief onnx-graphsurgeon polygraphy)")
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean",
            "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt", "Reciprocal")
Reference = Callable[[dict], dict]


class FP16Error(EdgediffError, RuntimeError):
    """FP16 conversion is unavailable or cannot meet the gate."""


# --- calibration and gate inputs ---------------------------------------------------------

def measure(reference: Reference, ref_name: str, spec: ModelSpec | Target, path: Path, points: int = 7,
            seed: int = 1) -> ParityResult:
    """Rung 2: FP16 ONNX on ORT vs the FP32 reference; for the denoiser at t across the
    schedule with both labels, for a component on fresh data-like draws."""
    target = as_target(spec)
    backend = OrtBackend(path, target.inputs, list(target.outputs))
    report = forward_cases(reference, backend, target.gate(points, seed), gate=GATE_REL_L2,
                           names=(ref_name, "onnx-fp16 (onnxruntime CPU)"))     # as `edgediff parity` measures
    return report.to_parity()


# --- FP32 islands ------------------------------------------------------------------------

@dataclass(frozen=True)
class Island:
    """A candidate FP32 region: ``select(model)`` gives its node names."""
    name: str
    why: str
    select: Callable[[onnx.ModelProto], list[str]]


def conditioning_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes fed by t/y but not by x: timestep embedding, its MLP, label embedding and the
    adaLN / scale-shift projections. Per-sample vectors, so FP32 there costs almost nothing."""
    from_x, from_cond, names = {"x"}, {"t", "y"}, []
    for node in model.graph.node:                   # ONNX graphs are topologically sorted
        if any(i in from_x for i in node.input):
            from_x.update(node.output)
        elif any(i in from_cond for i in node.input):
            from_cond.update(node.output)
            names.append(node.name)
    return names


def op_nodes(*op_types: str) -> Callable[[onnx.ModelProto], list[str]]:
    return lambda model: [n.name for n in model.graph.node if n.op_type in op_types]

CANDIDATES = (
    Island("conditioning", "t/y-only path (timestep sin/cos embedding and MLP, label embedding, "
           "adaLN / scale-shift modulation): errors there scale every token", conditioning_nodes),
    Island("softmax", "attention softmax: exp of large logits and long sums", op_nodes("Softmax")),
    Island("normalization", "LayerNorm/GroupNorm statistics: sums of squares overflow FP16 "
           "once activations pass ~256", op_nodes(*NORM_OPS)),
)
BY_NAME = {c.name: c for c in CANDIDATES}


def module_scopes(model: onnx.ModelProto, names) -> list[str]:
    """The PyTorch modules (from the dynamo exporter's metadata) that ``names`` belong to."""
    wanted, scopes = set(names), set()
    for node in model.graph.node:
        if node.name in wanted:
            raw = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
            path = ast.literal_eval(raw) if raw.startswith("[") else []
            scopes.add(path[-2] if len(path) >= 2 else node.op_type)
    return sorted(scopes)


def activation_peaks(fp32_path: Path, feed: dict, names: list[str] | None = None, rows: int = 1) -> dict[str, float]:
    """max |value| of every float tensor of the FP32 graph (or of the tensors ``names``) over
    the rows of ``feed``, run ``rows`` rows at a time so memory stays at that many rows'
    activations. Shared by the FP16 range pass and INT8's Conv-output calibration."""
    from edgediff.runtime.backends.ort import import_onnxruntime

    ort = import_onnxruntime("cpu")
    model = onnx.load(str(fp32_path), load_external_data=False)
    have = {o.name for o in model.graph.output}
    if names is None:
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.output.extend(v for v in inferred.graph.value_info
                                  if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name not in have)
    else:
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    wanted = [o.name for o in model.graph.output]
    # Beside the original, so that relative external-data locations still resolve.
    tmp = None
    try:
        with deferred():                   # a signal cannot strand the file in the bundle
            fd, tmp = tempfile.mkstemp(dir=fp32_path.parent, prefix=".calib-", suffix=".onnx")
            os.close(fd)
        onnx.save_model(model, tmp)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # unfused values
        session = ort.InferenceSession(tmp, sess_options=opts, providers=["CPUExecutionProvider"])
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    peaks = {k: float(np.abs(v).max()) for k, v in feed.items() if v.dtype == np.float32} if names is None else {}
    for row in range(0, len(next(iter(feed.values()))), rows):
        outs = session.run(wanted, {k: v[row:row + rows] for k, v in feed.items()})
        for name, value in zip(wanted, outs):
            if value.size:
                peaks[name] = max(peaks.get(name, 0.0), float(np.abs(value).max()))
    return peaks if names is None else {n: peaks.get(n, 0.0) for n in names}


def range_nodes(model: onnx.ModelProto, peaks: dict[str, float], limit: float = DATA_MAX) -> dict[str, float]:
    """Nodes with an input or output beyond ±``limit`` (AutoCast's I/O range rule), with the peak."""
    found = {n.name: max((peaks.get(v, 0.0) for v in (*n.input, *n.output)), default=0.0)
             for n in model.graph.node if n.op_type != "Constant"}
    return {name: peak for name, peak in found.items() if peak > limit}


# --- conversion --------------------------------------------------------------------------

class _SkipLog(logging.Handler):
    """Collects AutoCast's "Skipping node NAME: reason" decisions; keeps its console quiet."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.skipped, self.logger = {}, logging.getLogger("modelopt.onnx.autocast")

    def emit(self, record):
        if m := re.match(r"Skipping node (\S+): (.*)", record.getMessage()):
            self.skipped[m.group(1)] = m.group(2)

    def __enter__(self):
        self.saved = [(h, h.level) for name in ("modelopt.onnx", "modelopt.onnx.autocast")
                      for h in logging.getLogger(name).handlers]
        for h, _ in self.saved:
            h.setLevel(max(h.level, logging.ERROR))   # its warnings are not actionable for users
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        for h, level in self.saved:
            h.setLevel(level)


def autocast(fp32_path: Path, out_path: Path, exclude_nodes=()) -> dict[str, str]:
    """AutoCast to FP16 with FP32 I/O, ``exclude_nodes`` kept FP32; return what its own rules
    (initializers beyond FP16 range) also kept, with the reason. Its range rule is off: its
    reference runner holds every activation of every calibration row at once (12 GB for DiT-B/2
    at 12 rows), so the streamed ``activation_peaks`` pass decides those nodes instead."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise FP16Error(f"{MISSING_MODELOPT}; missing: {exc.name or exc}") from None
    with _SkipLog() as skips:
        model = convert_to_mixed_precision(
            str(fp32_path), low_precision_type="fp16", keep_io_types=True, data_max=np.inf,
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude_nodes], providers=["cpu"])
    model.ir_version = min(model.ir_version, 10)     # ORT 1.31 rejects IR 14 (docs/architecture.md, facts)
    for stale in list(model.graph.value_info):        # AutoCast leaves some with wrong shapes
        model.graph.value_info.remove(stale)
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(out_path), save_as_external_data=external,
                    location=out_path.name + ".data" if external else None)
    _check(out_path)
    excluded = set(exclude_nodes)
    return {k: v for k, v in skips.skipped.items() if k not in excluded}


def _check(path: Path) -> None:
    """The full checker, without ``check_onnx``'s strict inference pass: ONNX 1.23 cannot infer
    GroupNormalization-21's output type from FP16 inputs, which ORT and TensorRT run fine."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise FP16Error(f"the ONNX checker rejected {path.name}: {str(exc).strip().splitlines()[0]}") from None


@dataclass
class Trial:
    islands: tuple[str, ...]
    parity: ParityResult

    @property
    def score(self) -> float:
        finite = all(c.finite for case in self.parity.cases for c in case.checks)
        return self.parity.worst_rel_l2 if finite else float("inf")


def choose_islands(trial: Callable[[tuple[str, ...]], ParityResult], candidates: tuple[str, ...],
                   log=print) -> list[Trial]:
    """Greedy by measurement: start with none; while the gate fails, add the candidate whose
    addition gives the lowest worst rel-L2. Returns every trial, the accepted one last."""
    chosen: tuple[str, ...] = ()
    trials = [Trial(chosen, trial(chosen))]
    while not trials[-1].parity.passed:
        left = [c for c in candidates if c not in chosen]
        if not left:
            raise FP16Error(f"FP16 misses the gate even with FP32 islands {list(chosen)}: "
                            f"{trials[-1].parity.summary()}")
        round_ = [Trial(chosen + (c,), trial(chosen + (c,))) for c in left]
        best = min(round_, key=lambda tr: tr.score)
        log(f"  FP32 island {best.islands[-1]!r}: worst rel-L2 {trials[-1].score:.2e} -> {best.score:.2e}")
        trials.extend(tr for tr in round_ if tr is not best)
        trials.append(best)
        chosen = best.islands
    return trials


def _range_island(model: onnx.ModelProto, ranged: dict[str, float]) -> dict | None:
    """The nodes kept in FP32 because calibration activations leave the FP16-safe range."""
    if not ranged:
        return None
    ops = sorted({n.op_type for n in model.graph.node if n.name in ranged})
    return {"name": "activation-range", "nodes": sorted(ranged), "scopes": module_scopes(model, ranged),
            "op_types": ops, "peak": max(ranged.values()),
            "reason": f"FP32 activations on the schedule-spanning calibration feeds reach "
                      f"{max(ranged.values()):g}, beyond ±{DATA_MAX:g} where an FP16 ulp is ≥ 0.5"}


def _record(model, trials: list[Trial], ranged: dict, skipped: dict, calibration: dict, target: Target) -> dict:
    """bundle.json's ``precision.fp16``: what stayed FP32 and the measurement behind it."""
    from importlib.metadata import version

    final = trials[-1]
    rules = {"name": "autocast-rules", "nodes": sorted(skipped),
             "reason": "kept by AutoCast's own rules: " + "; ".join(sorted(set(skipped.values())))}
    islands = [i for i in (_range_island(model, ranged), rules if skipped else None) if i]
    before = {tr.islands: tr.score for tr in trials}
    for k, name in enumerate(final.islands):
        nodes = BY_NAME[name].select(model)
        islands.append({"name": name, "nodes": nodes, "scopes": module_scopes(model, nodes),
                        "reason": f"{BY_NAME[name].why}; measured worst rel-L2 "
                                  f"{before[final.islands[:k]]:.2e} without, "
                                  f"{before[final.islands[:k + 1]]:.2e} with"})
    return {"tool": f"nvidia-modelopt {version('nvidia-modelopt')} AutoCast", "data_max": DATA_MAX,
            "keep_io_types": True, "fp32_islands": islands,
            "calibration": {"rows": int(next(iter(calibration.values())).shape[0]),
                            **({"t": [round(float(t), 6) for t in calibration["t"]]} if "t" in calibration else {}),
                            ("x" if target.component == "denoiser" else "inputs"): target.drawn},
            "trials": [{"islands": list(tr.islands), "finite": tr.score != float("inf"),
                        "worst_rel_l2": tr.score if tr.score != float("inf") else None} for tr in trials],
            "gate": {"rel_l2": GATE_REL_L2, "worst_rel_l2": final.parity.worst_rel_l2,
                     "passed": final.parity.passed}}


def convert_fp16(fp32_path: Path, out_path: Path, spec: ModelSpec | Target, reference: Reference, ref_name: str,
                 candidates: tuple[str, ...] | None = None,
                 calibration_rows: int = 12, log=print) -> tuple[ParityResult, dict]:
    """Convert, measure, add FP32 islands until the gate holds; return (parity, record).
    ``spec`` is a denoiser's ModelSpec or a :class:`Target` (e.g. an autoencoder component)."""
    target = as_target(spec)
    candidates = target.candidates if candidates is None else candidates
    model = onnx.load(str(fp32_path), load_external_data=False)
    calibration = target.calibration(calibration_rows)
    ranged = range_nodes(model, activation_peaks(fp32_path, calibration))
    skipped: dict[str, str] = {}
    written: list[tuple[str, ...]] = [()]

    def trial(islands: tuple[str, ...]) -> ParityResult:
        nodes = set(ranged).union(*(BY_NAME[name].select(model) for name in islands))
        skipped.clear()
        skipped.update(autocast(fp32_path, out_path, sorted(nodes)))
        written[0] = islands
        return measure(reference, ref_name, target, out_path)

    trials = choose_islands(trial, candidates, log=log)
    if written[0] != trials[-1].islands:   # the last file written was a rejected alternative
        trial(trials[-1].islands)
    return trials[-1].parity, _record(model, trials, ranged, skipped, calibration, target)


def _reference(bundle, target: Target, checkpoint) -> tuple[Reference, str]:
    """PyTorch FP32 with the source weights of the bundle (or of its component); for a model
    exported without a checkpoint (random weights that cannot be re-created) the
    rung-1-validated FP32 ONNX."""
    m, name = bundle.manifest, target.component
    c = m.component(name)
    source = m.source if name == "denoiser" else c.extra.get("source", {})
    what = str(bundle.path) if name == "denoiser" else f"the {name} of {bundle.path}"
    if source.get("sha256") is None:
        backend = OrtBackend(bundle.model_path("fp32", name), c.inputs, c.output_names, graph_outputs=c.graph_outputs)
        return backend.infer, "onnx-fp32 (rung-1 validated; no source checkpoint)"
    if checkpoint is None:
        raise FP16Error(f"{what} was exported from {source.get('checkpoint')}: pass that checkpoint "
                        "so the FP16 gate compares against PyTorch with the same weights")
    weights = Path(checkpoint)
    if weights.is_dir() and name != "denoiser":
        from .vae_layouts import weights_file
        weights = weights_file(weights)
    if not weights.is_file():
        raise FP16Error(f"{checkpoint} is not a checkpoint file")
    if sha256_file(weights) != source["sha256"]:
        raise FP16Error(f"{checkpoint} is not the checkpoint {what} was exported from (sha256 differs)")
    if name == "denoiser":
        spec = get_family(m.family).spec(m.config)
        _, module = build_reference(m.family, m.config, weights)
        return (lambda feed: torch_outputs(module, spec, feed)), "pytorch-fp32"
    if name == "classifier":        # autograd must run: no inference mode
        from .classifier import GradBackend, component_module as classifier_module

        return GradBackend(classifier_module(c, weights), c.inputs, c.output_names).infer, "pytorch-fp32 (autograd)"
    from .reference import TorchBackend

    if name == "text_encoder":
        from .text_encoder import component_module as text_module

        return TorchBackend(text_module(c, weights), c.inputs, c.output_names).infer, "pytorch-fp32 (transformers)"
    from .vae import VIEWS, component_module

    if name not in VIEWS:      # a companion of the denoiser (cond_encoder): same weights, same config
        family, module = build_reference(m.family, m.config, weights)
        module = family.companions(module, m.config)[name][0]
    else:
        module = component_module(c, name, weights)
    return TorchBackend(module, c.inputs, c.output_names).infer, "pytorch-fp32"


def _bundle_features(bundle):
    """Condition features for the denoiser's calibration and gate: the bundle's own FP32
    condition encoder (rung-1 validated) on conditions ~ U(-1, 1); None without one."""
    from edgediff.runtime.manifest import FEATURE_COMPONENT

    from .reference import encoder_features

    if FEATURE_COMPONENT not in bundle.manifest.components:
        return None
    c = bundle.manifest.components[FEATURE_COMPONENT]
    backend = OrtBackend(bundle.model_path("fp32", FEATURE_COMPONENT), c.inputs, c.output_names)
    return encoder_features(backend.infer, c.inputs)


def add_fp16(bundle_dir: str | Path, checkpoint: str | Path | None = None, calibration_rows: int = 12,
             log=print, component: str = "denoiser") -> ParityResult:
    """Add an FP16 model of the denoiser (``model_fp16.onnx``) or of an autoencoder component
    (``decoder_fp16.onnx`` ...) to a bundle, gated; on failure leave it at BUNDLE.fp16.failed."""
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    target = (denoiser_target(get_family(m.family).spec(m.config), _bundle_features(bundle)) if component == "denoiser"
              else classifier_target(m.component(component), m.noise_schedule) if component == "classifier"
              else text_encoder_target(m.component(component)) if component == "text_encoder"
              else component_target(component, m.component(component)))
    reference, ref_name = _reference(bundle, target, checkpoint)
    path = Path(bundle_dir)
    with staged_dir(path, "fp16") as stage:
        tmp, out = stage.path, stage.path / target.fp16_file
        what = "" if component == "denoiser" else f"the {component} "
        log(f"converting {what}to mixed FP16/FP32 with ModelOpt AutoCast and checking against FP32 ...")
        try:
            parity, record = convert_fp16(bundle.model_path("fp32", component), out, target, reference, ref_name,
                                          calibration_rows=calibration_rows, log=log)
        except FP16Error as exc:
            if not out.exists():
                raise
            failed = stage.keep_failed(".fp16.failed")
            raise FP16Error(f"{exc}; the last FP16 model tried is in {failed}") from None
        _install_fp16(bundle, tmp, parity, record, target)
    return parity


def _install_fp16(bundle, tmp: Path, parity: ParityResult, record: dict, target: Target) -> None:
    """Move the FP16 files in and record them in the manifest (see install_into_bundle)."""
    from .bundle import install_into_bundle

    name = target.component
    m, c = bundle.manifest, bundle.manifest.component(name)
    changes = dict(models={**c.models, "fp16": target.fp16_file}, precision={**c.precision, "fp16": record},
                   parity={**c.parity, "fp16": {"passed": parity.passed, "worst_rel_l2": parity.worst_rel_l2}})
    if name == "denoiser":
        m = m.replace(**changes)
    else:
        m = m.replace(components={**m.components, name: dataclasses.replace(c, **changes)})
    install_into_bundle(bundle, tmp, {("fp16" if name == "denoiser" else f"{name}.fp16"): parity.to_dict()}, m)
