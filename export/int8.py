"""INT8 explicit Q/DQ with NVIDIA ModelOpt's ONNX PTQ, calibrated on timestep-aware sampling
trajectories (calibration/feeds.py), FP32 islands chosen by measurement, gated per forward
against FP32 at every sampler step and, where the digits judge applies, on sample quality.

Why ModelOpt's ONNX PTQ and not ONNX Runtime's ``quantize_static``: measured on the digits
DiT with the same trajectory feeds, ORT's QDQ quantizer (every op, MinMax) broke the model
(per-forward rel-L2 0.97); even with the conditioning path kept FP32 it reached median 0.055 /
worst 0.17, where ModelOpt's TensorRT-oriented placement (Q/DQ only before Conv/Gemm/MatMul
inputs and residual adds; per-channel symmetric INT8 weights, per-tensor symmetric INT8
activations) reached median 0.024 / worst 0.108. "max" calibration beat "entropy"
(median 0.074, 7x slower) on the same feeds. The graph is what TensorRT's strongly typed
mode executes (explicit Q/DQ) and what ONNX Runtime's CPU provider runs with INT8 kernels.

Diffusion models lose most at small t: x_t there carries the noise to be predicted as a
perturbation below one INT8 step of x's range, so the error of every quantized layer adds up
at the last steps. Islands are therefore measured at every step of held-out trajectories.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgediff.calibration.feeds import CalibrationFeeds
from edgediff.runtime.backends.ort import INT8_DISABLED_OPTIMIZERS, OrtBackend
from edgediff.runtime.drift import GATES, forward_cases
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.interrupts import deferred
from edgediff.runtime.parity import ParityResult

from . import fp16
from .fp16 import activation_peaks, conditioning_nodes, module_scopes

GATE_REL_L2 = GATES["int8"]           # 5e-2 per forward, every step
WEIGHTED = ("Conv", "Gemm", "MatMul")
MISSING_MODELOPT = ("INT8 conversion needs NVIDIA ModelOpt's ONNX PTQ: pip install 'edgediff[fp16]' "
                    "(nvidia-modelopt onnxslim lief onnx-graphsurgeon polygraphy)")


class Int8Error(EdgediffError, RuntimeError):
    """INT8 conversion is unavailable or cannot meet its gates."""


# --- candidate FP32 islands ----------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """A candidate FP32 island: node names and why it may matter."""
    name: str
    why: str
    nodes: tuple[str, ...]


def _constant(model: onnx.ModelProto):
    """``is_const(tensor)``: an initializer, or a Constant seen through layout-only ops."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def is_const(name: str) -> bool:
        node = producer.get(name)
        if name in inits or (node is not None and node.op_type == "Constant"):
            return True
        return node is not None and node.op_type in ("Transpose", "Reshape", "Cast") and is_const(node.input[0])
    return is_const


def input_layer(model: onnx.ModelProto) -> list[str]:
    """The first Conv/Gemm/MatMul fed (through any ops) by x: its INT8 input step is coarser
    than the noise that x_t carries at small t."""
    from_x = {"x"}
    for node in model.graph.node:
        if any(i in from_x for i in node.input):
            if node.op_type in WEIGHTED:
                return [node.name]
            from_x.update(node.output)
    return []


def output_layer(model: onnx.ModelProto) -> list[str]:
    """The last weighted op: it writes the prediction itself."""
    names = [n.name for n in model.graph.node if n.op_type in WEIGHTED]
    return names[-1:]


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Activation×activation MatMuls (q·kᵀ, softmax·v) and the softmax between them."""
    is_const = _constant(model)
    return [n.name for n in model.graph.node
            if n.op_type == "Softmax" or (n.op_type == "MatMul" and not any(is_const(i) for i in n.input))]


def _scope(node: onnx.NodeProto) -> str | None:
    """The module a node belongs to, cut after its first numbered part (``model.blocks.3``,
    ``model.unet.down_blocks.1``, ``net.model.enc.16x16_block0``; else three parts: ``model.x_embedder.proj``), from the
    dynamo exporter's name-scope metadata (modules from the root, then the op's own name)."""
    raw = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
    path = ast.literal_eval(raw) if raw.startswith("[") else []
    if len(path) < 3:
        return None
    parts = path[-2].split(".")
    cut = next((k for k, p in enumerate(parts) if _NUMBERED.search(p)), None)
    return ".".join(parts[:cut + 1]) if cut is not None else ".".join(parts[:3])


_NUMBERED = re.compile(r"^\d+$|\d+x\d+")     # blocks.3, or EDM/ADM's resolution-keyed enc["16x16_block0"]


def candidate_groups(model: onnx.ModelProto) -> list[Group]:
    """Named candidates first, then one per module (every node of it, in graph order)."""
    named = [Group("input", "the first layer on x: x_t's noise at small t is below one INT8 step of x's range",
                   tuple(input_layer(model))),
             Group("output", "the last layer writes the prediction itself", tuple(output_layer(model))),
             Group("conditioning", "t/y-only path (timestep embedding, label embedding, modulation)",
                   tuple(conditioning_nodes(model))),
             Group("attention", "activation×activation MatMuls and softmax of attention", tuple(attention_nodes(model)))]
    scopes: dict[str, list[str]] = {}
    for node in model.graph.node:
        if (key := _scope(node)) is not None:
            scopes.setdefault(key, []).append(node.name)
    weighted = {n.name for n in model.graph.node if n.op_type in WEIGHTED}
    by_module = [Group(f"module:{key}", f"every node of {key}", tuple(names))
                 for key, names in scopes.items() if weighted.intersection(names)]
    groups, seen = [], set()
    for g in named + by_module:              # one trial per distinct node set
        if g.nodes and frozenset(g.nodes) not in seen:
            seen.add(frozenset(g.nodes))
            groups.append(g)
    return groups


# --- quantization ------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_modelopt():
    """ModelOpt logs at INFO/WARNING on its own handlers (GPU count, fallbacks): not actionable."""
    loggers = [logging.getLogger(n) for n in ("modelopt", "modelopt.onnx")]
    saved = [(lg, lg.level, [(h, h.level) for h in lg.handlers]) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
        for h in lg.handlers:
            h.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level, handlers in saved:
            lg.setLevel(level)
            for h, hl in handlers:
                h.setLevel(hl)


def _declare_group_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare every GroupNormalization output FLOAT (its input's type in an FP32 graph)."""
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
        for n in model.graph.node if n.op_type == "GroupNormalization" and n.output[0] not in known)
    return model


@contextlib.contextmanager
def _typed_group_norms():
    """ONNX 1.23 cannot infer the output type of GroupNormalization-21, so ONNX Runtime's
    quantizer (under ModelOpt, which first clears every value_info) skips each tensor
    downstream of a U-Net's first GroupNorm ("failed to infer the type ... Skip to quantize
    it"): the model would stay FP32 after its first block. While quantizing, ONNX's shape
    inference is given the GroupNorm outputs' type, from which it infers the rest."""
    si = onnx.shape_inference
    plain, by_path = si.infer_shapes, si.infer_shapes_path

    def infer_shapes(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto):
            model = _declare_group_norms(model)
        return plain(model, *args, **kwargs)

    def infer_shapes_path(src, dst="", *args, **kwargs):
        declared = Path(f"{src}.typed.onnx")          # beside it: relative external data still resolves
        try:
            with deferred():                           # a signal cannot leave it behind
                onnx.save_model(_declare_group_norms(onnx.load(str(src), load_external_data=False)), str(declared))
            return by_path(str(declared), dst or str(src), *args, **kwargs)
        finally:
            declared.unlink(missing_ok=True)

    si.infer_shapes, si.infer_shapes_path = infer_shapes, infer_shapes_path
    try:
        yield
    finally:
        si.infer_shapes, si.infer_shapes_path = plain, by_path


@contextlib.contextmanager
def _temp_dir(where: Path):
    """ModelOpt writes temporary .onnx files through ``tempfile`` (and a failed run leaves them):
    a private directory beside ``where``, removed afterwards, so nothing strays into /tmp or
    into the stage that becomes the bundle."""
    import shutil
    import tempfile

    saved, private = tempfile.tempdir, None
    try:
        with deferred():
            private = tempfile.tempdir = tempfile.mkdtemp(dir=where, prefix=".modelopt-")
        yield
    finally:
        tempfile.tempdir = saved
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def _one_line(what: str):
    """A library failure (ModelOpt or ONNX Runtime inside it) becomes one Int8Error line."""
    try:
        yield
    except (Int8Error, KeyboardInterrupt):
        raise
    except Exception as exc:  # their own exception types: KeyError, AssertionError, ORT's Fail ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Int8Error(f"{what} failed: {type(exc).__name__}: {first}") from None


# Only the GEMM-like layers get INT8 inputs. ModelOpt's default also quantizes Add, Mul,
# Sigmoid, Concat ... (residual streams, SiLU: fusions TensorRT makes); on ONNX Runtime's CPU
# provider those are Q -> DQ -> float op, pure overhead and extra error. Measured, all-INT8,
# same feeds: digits DiT worst/median step rel-L2 0.100/0.057 -> 0.068/0.030, digits ddpm
# 0.046/0.020 -> 0.046/0.019; DiT-S/2 batch 8 230-238 -> 221-227 ms, ddpm-cifar10-32 184 -> 181 ms.
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


def quantize(fp32_path: Path, out_path: Path, calibration: dict[str, np.ndarray], exclude=(),
             conv_peaks: dict[str, float] | None = None) -> int:
    """ModelOpt INT8 PTQ of ``fp32_path`` to ``out_path``, ``exclude`` kept FP32, then (with
    ``conv_peaks``) INT8 Conv outputs; returns the number of quantizers. ``passes=[]``:
    ModelOpt 0.47's concat-elimination pass (shared scales across a Concat, a TensorRT
    speed-up) raises KeyError on U-Net skip concatenations whose output it did not calibrate."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError as exc:
        raise Int8Error(f"{MISSING_MODELOPT}; missing: {exc.name or exc}") from None
    with _quiet_modelopt(), _typed_group_norms(), _temp_dir(out_path.parent), _one_line("ModelOpt INT8 PTQ"):
        mo_quantize(str(fp32_path), quantize_mode="int8", calibration_data=dict(calibration),
                    calibration_method="max", calibration_eps=["cpu"], output_path=str(out_path),
                    high_precision_dtype="fp32", passes=[], log_level="CRITICAL", op_types_to_quantize=QUANTIZED_OPS,
                    nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude] or None)
    model = onnx.load(str(out_path))
    model.ir_version = min(model.ir_version, 10)      # ORT 1.31 rejects IR > 10 (as for FP16)
    if conv_peaks:
        quantize_conv_outputs(model, conv_peaks)
    onnx.save_model(model, str(out_path))
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node)


def conv_output_peaks(fp32_path: Path, calibration: CalibrationFeeds) -> dict[str, float]:
    """max |output| of every Conv of the FP32 graph over the calibration feeds ("max"
    calibration, as ModelOpt's for the inputs); the graph's own outputs are never quantized."""
    model = onnx.load(str(fp32_path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.output[0] not in outputs]
    return activation_peaks(fp32_path, calibration.arrays, names, rows=16) if names else {}


def quantize_conv_outputs(model: onnx.ModelProto, peaks: dict[str, float]) -> int:
    """Q/DQ (per tensor, symmetric, scale = max/127) on the output of every Conv whose input
    ModelOpt quantized. ModelOpt places Q/DQ for TensorRT, which fuses a Conv with the next
    layer's input quantizer itself; ONNX Runtime's CPU provider runs a Conv in INT8
    (QLinearConv) only when DQ -> Conv -> Q is explicit, else it dequantizes and convolves in
    FP32. Measured on ddpm-cifar10-32 (batch 8, 2 threads): INT8 1.38x FP32 without, 2.7x with."""
    graph = model.graph
    dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes, added = [], 0
    for n in list(graph.node):
        nodes.append(n)
        y = n.output[0]
        if n.op_type != "Conv" or n.input[0] not in dq_out or y not in peaks or \
                any(c.op_type == "QuantizeLinear" for c in consumers.get(y, [])):
            continue
        scale = np.float32(max(peaks[y], 1e-8) / 127)
        graph.initializer.extend([onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{y}_out_scale"),
                                  onnx.numpy_helper.from_array(np.array(0, np.int8), f"{y}_out_zero")])
        for c in consumers.get(y, []):
            c.input[:] = [f"{y}_out_dq" if i == y else i for i in c.input]
        q_args = [f"{y}_out_scale", f"{y}_out_zero"]
        nodes += [onnx.helper.make_node("QuantizeLinear", [y, *q_args], [f"{y}_out_q"], name=f"{y}_out_QuantizeLinear"),
                  onnx.helper.make_node("DequantizeLinear", [f"{y}_out_q", *q_args], [f"{y}_out_dq"],
                                        name=f"{y}_out_DequantizeLinear")]
        added += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return added


# --- measurement and islands -------------------------------------------------------------

def step_cases(feeds: CalibrationFeeds) -> list[tuple[str, dict]]:
    """One gate case per sampler step of held-out trajectories: all its rows."""
    return [(f"step {k}, t={float(feed['t'][0]):g}", feed) for k, feed in feeds.by_step()]


def split_denoise_call(cases, time: dict) -> tuple[list, list]:
    """(gated, reported): DDM's sampler ends with a denoising call at t = t_min (1e-4), off
    its N-step grid, whose ε enters the sample scaled by sqrt(t_min) (1%) while its own
    rel-L2 is ill-conditioned there (x_t holds almost no noise to infer). That call is
    reported, not gated; the sample-quality gate covers its effect."""
    if time.get("convention") != "ddm":
        return list(cases), []
    last = time["min"] * (1 + 1e-6)
    reported = [c for c in cases if float(np.max(c[1]["t"])) <= last]
    return [c for c in cases if c not in reported], reported


def measure(reference, component, path: Path, cases) -> ParityResult:
    """Per-forward rel-L2 of the INT8 model on ONNX Runtime against the FP32 reference;
    ``component``: the manifest's record of the model (inputs, outputs)."""
    with OrtBackend(path, component.inputs, component.output_names, graph_outputs=component.graph_outputs,
                    int8=True) as backend:
        report = forward_cases(reference, backend, cases, gate=GATE_REL_L2,
                               names=("onnx-fp32", "onnx-int8 (onnxruntime CPU)"))
    return report.to_parity()


@dataclass
class Trial(fp16.Trial):
    """FP16's trial (islands, parity, score: worst rel-L2, inf when not finite) and the
    number of quantizers the model has."""
    quantizers: int = 0

    @property
    def total(self) -> float:
        """The sum over outputs of each output's worst rel-L2 (inf when not finite): the search's
        order, so an island that cures one output shows its gain while another output is still
        the worst (digits DDM: FP32 ``out_conv`` cures ``c`` but ``eps`` set the max; ordered by
        the max it came 35th, 0.094 -> 0.015)."""
        if not np.isfinite(self.score):
            return float("inf")
        worst: dict[str, float] = {}
        for case in self.parity.cases:
            for c in case.checks:
                worst[c.name] = max(worst.get(c.name, 0.0), c.rel_l2)
        return sum(worst.values())


@dataclass
class Search:
    """Islands by measurement: every candidate's gain alone (its group FP32, the rest INT8;
    the error summed over outputs), then the candidates added in order of that gain until the
    gate holds."""
    groups: list[Group]
    trial: Callable[[tuple[str, ...]], Trial]
    log: Callable[[str], None] = print
    trials: list[Trial] = field(default_factory=list)

    def run(self) -> Trial:
        base = self._try(())
        if base.parity.passed:
            return base
        if not self.groups:
            raise Int8Error(f"INT8 misses the gate and the model offers no FP32 island: {base.parity.summary()}")
        self.log(f"  all INT8: worst rel-L2 {base.score:.3g} > {GATE_REL_L2:g}; measuring each candidate island")
        alone = {g.name: self._try((g.name,)).total for g in self.groups}
        order = sorted(alone, key=alone.get)
        chosen: tuple[str, ...] = ()
        for name in order:
            chosen += (name,)
            tr = self._try(chosen)
            self.log(f"  FP32 island {name!r}: worst rel-L2 -> {tr.score:.3g}")
            if tr.parity.passed:
                return tr
        raise Int8Error(f"INT8 misses the gate even with every candidate island FP32: {tr.parity.summary()}")

    def _try(self, islands: tuple[str, ...]) -> Trial:
        for tr in self.trials:
            if tr.islands == islands:
                return tr
        tr = self.trial(islands)
        self.trials.append(tr)
        return tr


def nodes_of(groups: list[Group], islands) -> list[str]:
    by_name = {g.name: g for g in groups}
    return sorted(set().union(*(by_name[i].nodes for i in islands))) if islands else []


def convert_int8(fp32_path: Path, out_path: Path, component, reference, calibration: CalibrationFeeds,
                 held_out: CalibrationFeeds, time: dict | None = None,
                 log=print) -> tuple[Trial, list[Trial], list[Group], ParityResult | None]:
    """Quantize, measure on ``held_out`` at every step, add FP32 islands until the gate holds.
    The file at ``out_path`` is the accepted model. Returns (final, trials, groups, the
    reported-only calls' result or None); ``time``: the manifest's time convention."""
    model = onnx.load(str(fp32_path), load_external_data=False)
    groups = candidate_groups(model)
    cases, reported = split_denoise_call(step_cases(held_out), time or {})
    peaks = conv_output_peaks(fp32_path, calibration)
    written: list[tuple[str, ...] | None] = [None]

    def trial(islands: tuple[str, ...]) -> Trial:
        count = quantize(fp32_path, out_path, calibration.arrays, nodes_of(groups, islands), peaks)
        written[0] = islands
        return Trial(islands, measure(reference, component, out_path, cases), count)

    search = Search(groups, trial, log)
    final = search.run()
    if written[0] != final.islands:       # the last file written was another trial
        trial(final.islands)
    return final, search.trials, groups, measure(reference, component, out_path, reported) if reported else None


def record(model: onnx.ModelProto, final: Trial, trials: list[Trial], groups: list[Group],
           calibration: CalibrationFeeds, held_out: CalibrationFeeds, reported: ParityResult | None = None) -> dict:
    """bundle.json's ``precision.int8``: how it was quantized, what stayed FP32 and why."""
    from importlib.metadata import version

    score = {tr.islands: tr.score for tr in trials}
    by_name = {g.name: g for g in groups}
    islands = []
    for k, name in enumerate(final.islands):
        nodes = list(by_name[name].nodes)
        islands.append({"name": name, "nodes": nodes, "scopes": module_scopes(model, nodes),
                        "reason": f"{by_name[name].why}; measured worst rel-L2 {score[final.islands[:k]]:.3g} "
                                  f"without, {score[final.islands[:k + 1]]:.3g} with"})
    per_step = _worst_per_case(final.parity)
    return {"tool": f"nvidia-modelopt {version('nvidia-modelopt')} ONNX PTQ (int8)",
            "weights": "INT8 symmetric, per output channel", "activations": "INT8 symmetric, per tensor",
            "quantized_ops": QUANTIZED_OPS,
            "calibration": {"method": "max", **_feeds_meta(calibration)},
            "quantizers": final.quantizers, "fp32_islands": islands,
            "onnxruntime_cpu": {"disabled_optimizers": list(INT8_DISABLED_OPTIMIZERS),
                                "activations": "loaded as UINT8 with zero point 128 (exact; runtime/backends/ort_int8.py)"},
            "trials": [{"islands": list(tr.islands), "worst_rel_l2": tr.score if np.isfinite(tr.score) else None}
                       for tr in trials],
            "gate": {"rel_l2": GATE_REL_L2, "worst_rel_l2": final.parity.worst_rel_l2, "passed": final.parity.passed,
                     "held_out": _feeds_meta(held_out), "per_step": per_step,
                     **({"not_gated": _worst_per_case(reported),
                         "not_gated_why": "DDM's final denoising call at t_min: its eps enters the sample "
                                          "scaled by sqrt(t_min); judged by the sample-quality gate"}
                        if reported else {})}}


def _worst_per_case(parity: ParityResult) -> dict[str, float]:
    return {case.label: max(c.rel_l2 for c in case.checks) for case in parity.cases}


def _feeds_meta(feeds: CalibrationFeeds) -> dict:
    keep = ("source", "images", "image_count", "samples", "cap", "seed", "sampler", "steps", "guidance", "steps_recorded")
    return {"source": "trajectories"} | {k: feeds.meta[k] for k in keep if k in feeds.meta} | {"rows": len(feeds)}


def replace_record(manifest, record_: dict, parity: ParityResult, file: str):
    """The manifest with the INT8 model, its record and its gate result."""
    return manifest.replace(models={**manifest.models, "int8": file},
                            precision={**manifest.precision, "int8": record_},
                            parity={**manifest.parity, "int8": {"passed": parity.passed,
                                                                "worst_rel_l2": parity.worst_rel_l2}})


