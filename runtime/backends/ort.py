"""ONNX Runtime backend: one session per model per process, reused for every call."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import BackendError, validate_feed

# Execution providers in order of preference, when the installed onnxruntime has them.
_PREFERRED = {"cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def _session(path: Path, device: str, threads: int | None):
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in _PREFERRED[device] if p in available]
    if providers[0] != _PREFERRED[device][0]:
        raise BackendError(f"onnxruntime here has no {_PREFERRED[device][0]} (has {', '.join(available)}); "
                           "install the 'gpu' extra (onnxruntime-gpu) for GPU execution")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


class OrtBackend:
    """``infer(feed) -> outputs`` over an ONNX file, validated against declared inputs."""

    name = "ort"

    def __init__(self, model_path: str | Path, inputs: dict[str, dict], outputs: list[str],
                 device: str = "cpu", threads: int | None = None):
        if device not in _PREFERRED:
            raise BackendError(f"unknown ORT device {device!r}; choose from {', '.join(_PREFERRED)}")
        self.inputs = inputs
        self.outputs = list(outputs)
        self.device = device
        self.session = _session(Path(model_path), device, threads)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_feed(feed, self.inputs)
        if self.device == "cpu":
            return dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        return self._infer_bound(feed)

    def _infer_bound(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """GPU providers: bind inputs once per call and let outputs live on the device until
        one copy back, instead of ORT's per-output staging through pinned host memory."""
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))


def from_bundle(bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None) -> OrtBackend:
    return OrtBackend(bundle.model_path(precision), bundle.manifest["inputs"], bundle.output_names,
                      device=device, threads=threads)
