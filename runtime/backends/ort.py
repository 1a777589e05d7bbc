"""ONNX Runtime backend: one session per model per process, reused for every call."""
from __future__ import annotations

import importlib.metadata as _md
import warnings
from pathlib import Path

import numpy as np

from ..engines import ENGINE_DIR
from .base import Backend, BackendError, RunOptions
from .ort_int8 import CpuInt8Model

# Execution providers in order of preference, when the installed onnxruntime has them.
_PREFERRED = {"cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}

# ONNX Runtime's QDQ propagation moves a QuantizeLinear through a Reshape and its S8->U8 pass
# then leaves it with an INT8 output type but a UINT8 zero point: the session fails to load
# ("output_dtype INT8 does not match y_zero_point type UINT8", ORT 1.2x on ModelOpt's INT8
# U-Nets). Without that propagation the INT8 models load, and were measured no slower.
INT8_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


INSTALL_CPU = "pip install 'edgediff[cpu]'"
INSTALL_GPU = "pip install 'edgediff[gpu-cu12]' (CUDA 12 driver) or 'edgediff[gpu-cu13]' (CUDA 13)"


def ort_distributions() -> list[str]:
    """The ONNX Runtime distributions installed: both write the ``onnxruntime`` package."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            _md.version(dist)
            found.append(dist)
        except _md.PackageNotFoundError:
            pass
    return found


def import_onnxruntime(device: str = "cpu", dists=None):
    """``onnxruntime``, or one line with the fix: none installed, or ``onnxruntime`` beside
    ``onnxruntime-gpu`` (the last one installed wins each shared file, and the GPU providers
    are lost: refused for a GPU device, warned about on the CPU, where it still works)."""
    found = (dists or ort_distributions)()
    if len(found) > 1:
        msg = ("both onnxruntime and onnxruntime-gpu are installed and overwrite each other (only the CPU "
               "provider is left): pip uninstall -y onnxruntime onnxruntime-gpu, then " + INSTALL_GPU)
        if device != "cpu":
            raise BackendError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    try:
        import onnxruntime
    except ImportError as exc:
        if (getattr(exc, "name", None) or "").split(".")[0] != "onnxruntime":
            raise
        raise BackendError(f"ONNX Runtime is not installed: {INSTALL_CPU}, or on an NVIDIA GPU {INSTALL_GPU}") from None
    return onnxruntime


def session_options(ort, threads: int | None):
    """The CPU session settings, each chosen by measurement (benchmarks/ort_options.py, 2 cores,
    batch 8, FP32, interleaved rounds; README "Benchmarks"): all graph optimisations (at load,
    for this machine: the NCHWc conv layout, worth 11-26% on the U-Nets, and the MatMul/
    SkipLayerNorm/Gelu fusions; a saved optimised graph loaded no faster, 0.57 s against 0.37 s
    for DiT-S/2, and would tie the bundle to one CPU), one sequential executor (ORT_PARALLEL
    with 2 inter-op threads was 1.56x slower on DiT-S/2), the memory arena and memory-pattern
    planning left on (turning either off was no faster), ORT's own thread spinning (turning it
    off won on some families and lost 2.8x on a small one), and intra-op threads = the caller's
    ``threads`` or ORT's default (the physical cores)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = True
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def tensorrt_provider_options(cache_dir: Path, inputs: dict[str, dict], max_batch: int | None) -> dict:
    """Options of ONNX Runtime's TensorRT provider: engines and timing cache kept under the
    bundle's ``engines/`` (built once, not in every process) and, when only the batch is
    dynamic, one explicit profile 1..``max_batch`` (no rebuild at a new batch size). The
    FP16 flag stays off: edgediff's FP16 models carry their types (strongly typed graphs)."""
    opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir), "trt_fp16_enable": "False"}
    dims = {n: d["shape"][1:] for n, d in inputs.items()}
    if max_batch and all(isinstance(x, int) for shape in dims.values() for x in shape):
        def shapes(b: int) -> str:
            return ",".join(f"{n}:{'x'.join(str(x) for x in (b, *shape))}" for n, shape in dims.items())
        opts.update(trt_profile_min_shapes=shapes(1), trt_profile_opt_shapes=shapes(max_batch),
                    trt_profile_max_shapes=shapes(max_batch))
    return opts


def _session(path: Path, device: str, threads: int | None, trt_options: dict | None = None,
             int8: bool = False, cpu_int8: CpuInt8Model | None = None):
    ort = import_onnxruntime(device)
    available = ort.get_available_providers()
    providers = [p for p in _PREFERRED[device] if p in available]
    if providers[0] != _PREFERRED[device][0]:
        raise BackendError(f"onnxruntime here has no {_PREFERRED[device][0]} (has {', '.join(available)}): "
                           f"pip uninstall -y onnxruntime, then {INSTALL_GPU}")
    opts = session_options(ort, threads)
    for key, value in (cpu_int8.session_config if cpu_int8 else {}).items():
        opts.add_session_config_entry(key, value)
    if device != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()          # CUDA/cuDNN from pip wheels (nvidia-*), when they are installed
    listed = [(p, trt_options) if p == "TensorrtExecutionProvider" and trt_options else p for p in providers]
    try:
        session = ort.InferenceSession(cpu_int8.source if cpu_int8 else str(path), sess_options=opts, providers=listed,
                                       disabled_optimizers=list(INT8_DISABLED_OPTIMIZERS) if int8 else None)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
    check_providers(session.get_providers(), providers[0])
    return session


def check_providers(used: list[str], wanted: str, tensorrt_major=None) -> None:
    """ONNX Runtime falls back to the CPU with only a printed warning when a GPU provider
    cannot start (CUDA/cuDNN libraries missing or mismatched): refuse to run anywhere but on
    the provider asked for."""
    if not used or used[0] != wanted:
        hint = "see onnxruntime's warning above, or run on --device cpu"
        major = (tensorrt_major or _tensorrt_major)()
        if wanted == "TensorrtExecutionProvider" and major is not None and major >= 11:
            hint = (f"ONNX Runtime's TensorRT provider needs TensorRT 10 and this is TensorRT {major}: "
                    "use --backend trt (edgediff build) or --device cuda, or install 'edgediff[gpu-cu13]'")
        raise BackendError(f"onnxruntime could not start {wanted} and would run on {', '.join(used) or 'nothing'}: "
                           f"its CUDA/cuDNN (or TensorRT) libraries are missing or do not match this onnxruntime "
                           f"build; {hint}")


def _tensorrt_major() -> int | None:
    """The installed TensorRT's major version (from the distribution, without importing it)."""
    for dist in ("tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt"):
        try:
            return int(_md.version(dist).split(".")[0])
        except (_md.PackageNotFoundError, ValueError):
            pass
    return None


def _check_shapes(session, inputs: dict[str, dict], name: str) -> None:
    """The manifest's declared input shapes must agree with the graph's fixed dimensions, so a
    bundle.json that misdescribes its model fails at load in one line, not at the first call."""
    for i in session.get_inputs():
        declared = inputs[i.name].get("shape", [])
        fixed = [(k, d, g) for k, (d, g) in enumerate(zip(declared, i.shape)) if isinstance(d, int) and isinstance(g, int)]
        if len(declared) != len(i.shape) or any(d != g for _, d, g in fixed):
            raise BackendError(f"bundle.json declares {i.name!r} as {declared} but {name} takes {list(i.shape)}")


def _cpu_int8_model(path: Path) -> CpuInt8Model:
    from google.protobuf.message import DecodeError

    try:
        return CpuInt8Model(path)
    except (OSError, ValueError, DecodeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"cannot read the INT8 model {path}: {why}") from None


class OrtBackend(Backend):
    """ONNX Runtime over an ONNX file: one session, reused for every call."""

    name = "ort"

    def __init__(self, model_path: str | Path, inputs: dict[str, dict], outputs: list[str],
                 device: str = "cpu", threads: int | None = None, graph_outputs: dict | None = None,
                 trt_options: dict | None = None, int8: bool = False):
        super().__init__(inputs, outputs, graph_outputs)
        if device not in _PREFERRED:
            raise BackendError(f"unknown ORT device {device!r}; choose from {', '.join(_PREFERRED)}")
        self.device = device
        # INT8 on the CPU provider: activations rewritten to U8, exactly (see ort_int8.py)
        cpu_int8 = _cpu_int8_model(Path(model_path)) if int8 and device == "cpu" else None
        self.session = _session(Path(model_path), device, threads, trt_options, int8, cpu_int8)
        self.int8_rewritten = cpu_int8.rewritten if cpu_int8 else None
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = {o.name for o in self.session.get_outputs()}
        if graph_in != set(inputs) or not set(self.graph_names) <= graph_out:
            raise BackendError(f"{Path(model_path).name} has inputs {sorted(graph_in)} and outputs "
                               f"{sorted(graph_out)}; the manifest declares {sorted(inputs)} -> {self.graph_names}")
        _check_shapes(self.session, inputs, Path(model_path).name)

    @classmethod
    def from_bundle(cls, bundle, precision: str, options: RunOptions) -> "OrtBackend":
        c = bundle.manifest.component(options.component)
        trt = None
        if options.device == "tensorrt":
            cache = bundle.path / ENGINE_DIR / f"ort-trt-{options.component}-{precision}"
            trt = tensorrt_provider_options(cache, c.inputs, options.max_batch)
        return cls(bundle.model_path(precision, options.component), c.inputs, c.output_names,
                   device=options.device, threads=options.threads, graph_outputs=c.graph_outputs, trt_options=trt,
                   int8=precision == "int8")

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            if self.device == "cpu":
                return self.session.run(self.graph_names, feed)
            return self._infer_bound(feed)
        except Exception as exc:  # onnxruntime's own exception types: e.g. a label past the table
            raise BackendError(f"onnxruntime failed: {str(exc).strip().splitlines()[0]}") from None

    def _infer_bound(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """GPU providers: bind inputs once per call and let outputs live on the device until
        one copy back, instead of ORT's per-output staging through pinned host memory."""
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.graph_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        self.session = None
