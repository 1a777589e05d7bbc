"""Native TensorRT backend: a bundle's engine run through the TensorRT 10+/11 name-based API.

No torch and no CuPy: device memory, copies, the stream and CUDA graphs go through
cuda-python (``cuda.bindings.runtime``). Buffers are allocated once, for the largest batch of
the engine's optimisation profile, and bound to the context once: device buffers and, beside
each, a pinned (page-locked) host buffer to stage through, since a copy from pageable memory
makes ``cudaMemcpyAsync`` synchronous. Output shapes, every dynamic dimension of them, come
from the context after the input shapes are set. Each call only sets the input shapes (when
the batch changes), copies inputs in, enqueues and copies outputs out. With
``cuda_graph=True`` the enqueue for each batch size is captured once and replayed.

The engine is checked against this GPU, this TensorRT and the bundle's ONNX hash
(``edgediff.runtime.engines``) before its bytes reach TensorRT.
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import numpy as np

from ..engines import EngineError, EngineKey, model_digest, select_engine
from .base import Backend, BackendError, RunOptions
from .ort import INSTALL_GPU

MIN_TENSORRT = (10, 12)
MISSING_TENSORRT = f"TensorRT is not installed: {INSTALL_GPU}, on a machine with an NVIDIA GPU (TensorRT ≥ 10.12)"
MISSING_CUDA = f"cuda-python is not installed: {INSTALL_GPU}"


def import_tensorrt():
    """``tensorrt``, or one clear line naming the extra; refuses pre-10.12 (no strong typing API)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(MISSING_TENSORRT) from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TENSORRT:
        raise BackendError(f"TensorRT {trt.__version__} is too old: edgediff needs ≥ 10.12 "
                           "(strongly typed networks, name-based I/O)")
    return trt


def cudart():
    try:
        from cuda.bindings import runtime               # cuda-python ≥ 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime          # older cuda-python layout
        except ImportError:
            raise BackendError(MISSING_CUDA) from None
    return runtime


def cuda_call(result):
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        msg = cudart().cudaGetErrorString(err)[1]
        raise BackendError(f"CUDA error {int(err)}: {msg.decode() if isinstance(msg, bytes) else msg}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def device_info(device: int = 0) -> dict:
    """Compute capability ("9.0") and name of CUDA device ``device``; selects it."""
    rt = cudart()
    cuda_call(rt.cudaSetDevice(device))
    props = cuda_call(rt.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"compute_capability": f"{props.major}.{props.minor}", "name": name.rstrip("\x00")}


class TrtBackend(Backend):
    """A deserialised TensorRT engine with one execution context."""

    name = "trt"

    def __init__(self, engine_path, sidecar: dict, inputs: dict[str, dict], outputs: list[str],
                 device: int = 0, cuda_graph: bool = False, graph_outputs: dict | None = None):
        super().__init__(inputs, outputs, graph_outputs)
        trt = import_tensorrt()
        self.engine_path = Path(engine_path)          # Polygraphy's rung-4 check reloads it (runtime/drift)
        self.rt = cudart()
        self.min_batch, self.max_batch = sidecar["profile"]["min"], sidecar["profile"]["max"]
        self.buffers, self.host, self.graphs, self.batch = {}, {}, ({} if cuda_graph else None), None
        cuda_call(self.rt.cudaSetDevice(device))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialise {engine_path} (see its log above)")
        self.context = self.engine.create_execution_context()
        self.tensors = self._io_tensors(trt)
        self.stream = cuda_call(self.rt.cudaStreamCreate())
        self._allocate()

    def _io_tensors(self, trt) -> dict[str, tuple[np.dtype, tuple[int, ...], bool]]:
        """name -> (numpy dtype, per-row shape, is_input); checked against the bundle's I/O."""
        tensors = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            tensors[name] = (dtype, tuple(self.engine.get_tensor_shape(name))[1:], is_input)
        want_in, want_out = set(self.inputs), set(self.graph_names)
        got_in = {n for n, (_, _, is_in) in tensors.items() if is_in}
        if got_in != want_in or set(tensors) - got_in != want_out:
            raise BackendError(f"engine I/O {sorted(tensors)} does not match the bundle's "
                               f"{sorted(want_in | want_out)}")
        for name, decl in self.inputs.items():
            if tensors[name][0] != np.dtype(decl["dtype"]):
                raise BackendError(f"engine input {name!r} is {tensors[name][0]}, the bundle says {decl['dtype']}")
            if any(d < 0 for d in tensors[name][1]):
                raise BackendError(f"engine input {name!r} has dynamic dimensions besides the batch "
                                   f"{tensors[name][1]}; edgediff builds engines with only the batch dynamic")
        return tensors

    def _allocate(self) -> None:
        """Device and pinned host buffers, once, each for the largest shape the profile allows:
        the inputs at the largest batch and the outputs at the shapes the context then reports."""
        self._set_shapes(self.max_batch)
        self.batch, self.capacity = self.max_batch, {}
        for name, shape in self.shapes.items():
            nbytes = max(self._nbytes(name, shape), 1)
            self.buffers[name] = cuda_call(self.rt.cudaMalloc(nbytes))
            self.host[name] = cuda_call(self.rt.cudaMallocHost(nbytes))
            self.capacity[name] = nbytes
            if not self.context.set_tensor_address(name, int(self.buffers[name])):
                raise BackendError(f"TensorRT refused the device address of {name!r}")

    def _nbytes(self, name: str, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape, dtype=np.int64)) * self.tensors[name][0].itemsize

    def _set_shapes(self, batch: int) -> None:
        """Input shapes at ``batch``; every tensor's shape as the context now infers it."""
        for name in self.inputs:
            if not self.context.set_input_shape(name, (batch, *self.tensors[name][1])):
                raise BackendError(f"TensorRT refused shape batch={batch} for {name!r}")
        self.shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.tensors}
        unknown = {n: s for n, s in self.shapes.items() if any(d < 0 for d in s)}
        if unknown:
            raise BackendError(f"TensorRT cannot tell the shapes {unknown} at batch {batch} "
                               "(an output that depends on input values is not supported)")

    def _set_batch(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise BackendError(f"batch {batch} is outside the engine's profile {self.min_batch}..{self.max_batch}; "
                               "rebuild with a wider --min-batch/--max-batch")
        if batch != self.batch:
            self._set_shapes(batch)
            over = [n for n, s in self.shapes.items() if self._nbytes(n, s) > self.capacity[n]]
            if over:
                raise BackendError(f"at batch {batch} the engine's {over} outgrow the buffers sized at the "
                                   f"largest batch {self.max_batch}")
            self.batch = batch

    def _staging(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The pinned host buffer of ``name`` as an array of ``shape``."""
        count = int(np.prod(shape, dtype=np.int64))
        dtype = self.tensors[name][0]
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(int(self.host[name]))
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError("TensorRT execute_async_v3 failed (see its log above)")

    def _enqueue(self, batch: int) -> None:
        if self.graphs is None:
            return self._execute()
        if batch not in self.graphs:
            graph = self._capture()
            if graph is None:                   # cannot be captured: eager from now on, as trtexec does
                self._release_graphs()
                return self._execute()
            self.graphs[batch] = graph
        cuda_call(self.rt.cudaGraphLaunch(self.graphs[batch], self.stream))

    def _capture(self):
        """Capture one enqueue at the current shapes (addresses are fixed, so it stays valid);
        None, with one warning, when it cannot be: the capture is always ended, what it made
        destroyed and the sticky error cleared, so the stream is usable eagerly."""
        rt = self.rt
        # The first enqueue after a shape change may do setup work that must not be captured.
        self._execute()
        cuda_call(rt.cudaStreamSynchronize(self.stream))
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(rt.cudaStreamBeginCapture(self.stream, mode))
        try:
            ok = self.context.execute_async_v3(int(self.stream))
        finally:
            err, graph = rt.cudaStreamEndCapture(self.stream)       # never leave the stream capturing
        try:
            if not ok or int(err) != 0:
                raise BackendError("TensorRT's enqueue could not be captured"
                                   + (f" (CUDA error {int(err)})" if int(err) else ""))
            return cuda_call(rt.cudaGraphInstantiate(graph, 0))
        except BackendError as exc:
            rt.cudaGetLastError()                                  # clear the capture's sticky error
            warnings.warn(f"CUDA graph capture failed, running without graphs: {exc}", RuntimeWarning, stacklevel=2)
            return None
        finally:
            if graph is not None and int(err) == 0:
                rt.cudaGraphDestroy(graph)                          # the executable graph keeps what it needs

    def _release_graphs(self) -> None:
        for exe in (self.graphs or {}).values():
            self.rt.cudaGraphExecDestroy(exe)
        self.graphs = None

    @classmethod
    def from_bundle(cls, bundle, precision: str, options: RunOptions) -> "TrtBackend":
        """The engine of ``precision`` built for this GPU and TensorRT whose profile covers
        ``options.max_batch`` (the engine batch: 2× the sample batch under guidance)."""
        trt = import_tensorrt()
        info = device_info(options.gpu)
        want = EngineKey(precision, info["compute_capability"], trt.__version__,
                         model_digest(bundle.manifest, precision, options.component))
        try:
            path, sidecar = select_engine(bundle.path, want, options.max_batch)
        except EngineError as exc:
            raise BackendError(str(exc)) from None
        c = bundle.manifest.component(options.component)
        return cls(path, sidecar, c.inputs, c.output_names, options.gpu, options.cuda_graph, c.graph_outputs)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = next(iter(feed.values())).shape[0]        # validated: one batch for all inputs
        self._set_batch(batch)
        rt, h2d = self.rt, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name in self.inputs:
            staged = self._staging(name, self.shapes[name])
            staged[...] = feed[name]                      # into pinned memory: the copy is truly async
            cuda_call(rt.cudaMemcpyAsync(self.buffers[name], int(self.host[name]), staged.nbytes, h2d, self.stream))
        self._enqueue(batch)
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.graph_names:
            nbytes = self._nbytes(name, self.shapes[name])
            cuda_call(rt.cudaMemcpyAsync(int(self.host[name]), self.buffers[name], nbytes, d2h, self.stream))
        cuda_call(rt.cudaStreamSynchronize(self.stream))
        # Copied out of the staging buffers (the next call reuses them), as float32.
        return [self._staging(n, self.shapes[n]).astype(np.float32) for n in self.graph_names]

    def close(self) -> None:
        """Free graphs, buffers and the stream (also on garbage collection)."""
        rt = getattr(self, "rt", None)
        if rt is None:
            return
        self._release_graphs()
        for ptr in self.buffers.values():
            rt.cudaFree(ptr)
        for ptr in getattr(self, "host", {}).values():
            rt.cudaFreeHost(ptr)
        if getattr(self, "stream", None) is not None:
            rt.cudaStreamDestroy(self.stream)
        self.graphs, self.buffers, self.host, self.stream, self.rt = {}, {}, {}, None, None

    def __del__(self):
        try:
            self.close()
        except Exception:          # interpreter shutdown: CUDA may already be gone
            pass
