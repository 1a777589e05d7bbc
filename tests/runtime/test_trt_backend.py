"""The native TensorRT backend's data flow, through stand-ins for tensorrt and cuda-python.

"Device" memory here is host memory, so copies, shape changes, profile limits and CUDA-graph
capture/replay are exercised without a GPU; the real engine test is marked and skips.
"""
import ctypes
import importlib.util
import types

import numpy as np
import pytest

from edgediff.runtime.backends import trt as trt_backend
from edgediff.runtime.backends.base import BackendError
from edgediff.runtime.backends import load_backend
from edgediff.runtime.bundle import Bundle
from edgediff.runtime.manifest import Manifest
from edgediff.runtime.files import sha256_file, write_json_atomic
from edgediff.runtime.engines import BatchProfile, EngineKey, make_sidecar, sidecar_path

OK = (0,)
IO = [("x", "in", np.float32, (-1, 1, 4, 4)), ("t", "in", np.float32, (-1,)), ("y", "in", np.int64, (-1,)),
      ("eps", "out", np.float32, (-1, 1, 4, 4))]


class FakeCuda:
    """cuda.bindings.runtime with host memory as device memory."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self):
        self.keep, self.capturing, self.launches, self.freed = [], None, 0, 0
        self.pinned, self.freed_host, self.copies = [], 0, []

    def cudaSetDevice(self, d): return OK
    def cudaGetDeviceProperties(self, d): return 0, types.SimpleNamespace(major=9, minor=0, name=b"Fake GPU\0")
    def cudaStreamCreate(self): return 0, 5
    def cudaStreamSynchronize(self, s): return OK
    def cudaStreamDestroy(self, s): return OK
    def cudaGraphDestroy(self, g): return OK
    def cudaGraphExecDestroy(self, g): return OK
    def cudaGetErrorString(self, e): return 0, b"fake error"

    def cudaMalloc(self, n):
        self.keep.append(np.zeros(n, np.uint8))
        return 0, self.keep[-1].ctypes.data

    def cudaFree(self, p):
        self.freed += 1
        return OK

    def cudaMallocHost(self, n):
        self.pinned.append(np.zeros(n, np.uint8))
        return 0, self.pinned[-1].ctypes.data

    def cudaFreeHost(self, p):
        self.freed_host += 1
        return OK

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.copies.append((kind, dst, src, n))
        ctypes.memmove(dst, src, n)
        return OK

    def is_pinned(self, ptr, n):
        return any(a.ctypes.data <= ptr and ptr + n <= a.ctypes.data + a.nbytes for a in self.pinned)

    def cudaStreamBeginCapture(self, s, mode):
        self.capturing = []
        return OK

    def cudaStreamEndCapture(self, s):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags): return 0, list(graph)

    def cudaGraphLaunch(self, exe, s):
        self.launches += 1
        for fn in exe:
            fn()
        return OK


class FakeContext:
    def __init__(self, cuda):
        self.cuda, self.shapes, self.addr, self.runs = cuda, {}, {}, 0

    def set_input_shape(self, name, shape): self.shapes[name] = shape; return True
    def set_tensor_address(self, name, ptr): self.addr[name] = ptr; return True

    def get_tensor_shape(self, name):
        """As TensorRT infers it from the input shapes set (eps is shaped like x)."""
        return self.shapes["x" if name == "eps" else name]

    def _view(self, name, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(self.addr[name]), dtype=dtype).reshape(shape)

    def _run(self):
        self.runs += 1
        b = self.shapes["x"][0]
        x, t, y = (self._view(n, d, self.shapes[n]) for n, d in (("x", np.float32), ("t", np.float32), ("y", np.int64)))
        self._view("eps", np.float32, x.shape)[:] = 2 * x + (t + y.astype(np.float32))[:, None, None, None]
        assert b == x.shape[0]

    def execute_async_v3(self, stream):
        (self.cuda.capturing.append if self.cuda.capturing is not None else lambda f: f())(self._run)
        return True


def fake_tensorrt(cuda, io=IO):
    class Engine:
        num_io_tensors = len(io)
        def get_tensor_name(self, i): return io[i][0]
        def get_tensor_mode(self, n): return next(m for name, m, _, _ in io if name == n)
        def get_tensor_dtype(self, n): return next(d for name, _, d, _ in io if name == n)
        def get_tensor_shape(self, n): return next(s for name, _, _, s in io if name == n)
        def create_execution_context(self): return FakeContext(cuda)

    class Runtime:
        def __init__(self, logger): pass
        def deserialize_cuda_engine(self, data): return Engine() if data == b"ENGINE" else None

    class Logger:
        WARNING = 2
        def __init__(self, level): pass

    return types.SimpleNamespace(__version__="10.12.0.36", Logger=Logger, Runtime=Runtime,
                                 TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"), nptype=lambda d: d)


@pytest.fixture
def fakes(monkeypatch):
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    monkeypatch.setattr(trt_backend, "cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    return cuda


def _bundle(tmp_path, cc="9.0", payload=b"ENGINE"):
    manifest = Manifest(
        family="dit", config={}, prediction="epsilon", time={}, schedule={}, sample_shape=(1, 4, 4),
        num_classes=10, null_label=10,
        models={"fp16": "model_fp16.onnx"}, files={"model_fp16.onnx": "ab" * 32},
        inputs={"x": {"dtype": "float32", "shape": ["batch", 1, 4, 4]},
                "t": {"dtype": "float32", "shape": ["batch"]}, "y": {"dtype": "int64", "shape": ["batch"]}},
        outputs={"eps": {"dtype": "float32", "shape": ["batch", 1, 4, 4]}})
    key = EngineKey("fp16", cc, "10.12.0.36", "ab" * 32, BatchProfile(1, 4, 8))
    (tmp_path / "engines").mkdir()
    path = tmp_path / "engines" / key.name
    path.write_bytes(payload)
    write_json_atomic(sidecar_path(path), make_sidecar(key, sha256_file(path), "model_fp16.onnx"))
    return Bundle(tmp_path, manifest)


def _feed(b, rng):
    return {"x": rng.standard_normal((b, 1, 4, 4)).astype(np.float32), "t": np.arange(b, dtype=np.float32),
            "y": np.arange(b, dtype=np.int64)}


def _expected(feed):
    return 2 * feed["x"] + (feed["t"] + feed["y"].astype(np.float32))[:, None, None, None]


@pytest.mark.parametrize("graph", [False, True])
def test_infer_round_trips_through_device_buffers(tmp_path, fakes, rng, graph):
    backend = load_backend(_bundle(tmp_path), "trt", "fp16", cuda_graph=graph)
    for b in (3, 3, 8, 1, 3):                                   # shape changes and repeats
        feed = _feed(b, rng)
        np.testing.assert_array_equal(backend.infer(feed)["eps"], _expected(feed))
    if graph:
        assert fakes.launches == 5 and len(backend.graphs) == 3  # one capture per batch size, then replays
    assert len(fakes.keep) == 4                                  # buffers allocated once, for max batch
    backend.close()
    assert fakes.freed == 4


def test_batch_beyond_the_profile_is_refused(tmp_path, fakes, rng):
    backend = load_backend(_bundle(tmp_path), "trt", "fp16")
    with pytest.raises(BackendError, match="outside the engine's profile 1..8"):
        backend.infer(_feed(9, rng))


def test_engine_for_another_gpu_is_never_deserialised(tmp_path, fakes):
    with pytest.raises(BackendError, match="compute capability 8.6 GPU, this GPU is 9.0"):
        load_backend(_bundle(tmp_path, cc="8.6"), "trt", "fp16")


def test_engine_whose_profile_is_too_small_is_refused(tmp_path, fakes):
    with pytest.raises(BackendError, match="does not cover batch 16"):
        load_backend(_bundle(tmp_path), "trt", "fp16", max_batch=16)


def test_undeserialisable_engine_is_a_clear_error(tmp_path, fakes):
    with pytest.raises(BackendError, match="could not deserialise"):
        load_backend(_bundle(tmp_path, payload=b"garbage"), "trt", "fp16")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line():
    with pytest.raises(BackendError) as err:
        trt_backend.import_tensorrt()
    assert "edgediff[gpu-cu12]" in str(err.value) and "\n" not in str(err.value)


def test_failed_graph_capture_falls_back_to_eager_and_cleans_up(tmp_path, fakes, rng):
    """A capture that CUDA refuses (error 901, cudaErrorStreamCaptureInvalidated, as in the
    field): one warning, the capture ended, its graph destroyed, the error cleared, eager from
    then on, results unchanged."""
    destroyed, cleared = [], []
    fakes.cudaStreamEndCapture = lambda s: (fakes.__dict__.update(capturing=None), (901, None))[1]
    fakes.cudaGraphDestroy = lambda g: destroyed.append(g) or OK
    fakes.cudaGetLastError = lambda: cleared.append(1) or OK
    backend = load_backend(_bundle(tmp_path), "trt", "fp16", cuda_graph=True)
    feed = _feed(3, rng)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed, running without graphs.*CUDA error 901"):
        out = backend.infer(feed)["eps"]
    np.testing.assert_array_equal(out, _expected(feed))
    assert backend.graphs is None and cleared == [1] and destroyed == [] and fakes.capturing is None
    feed = _feed(8, rng)
    np.testing.assert_array_equal(backend.infer(feed)["eps"], _expected(feed))                   # eager
    assert fakes.launches == 0
    backend.close()


def test_inputs_and_outputs_are_staged_through_pinned_host_buffers(tmp_path, fakes, rng):
    """Pageable host memory would make cudaMemcpyAsync synchronous: every copy's host side is
    a page-locked buffer from cudaMallocHost, allocated once and freed on close."""
    backend = load_backend(_bundle(tmp_path), "trt", "fp16")
    for b in (3, 8):
        feed = _feed(b, rng)
        np.testing.assert_array_equal(backend.infer(feed)["eps"], _expected(feed))
    h2d = [(src, n) for kind, _, src, n in fakes.copies if kind == 1]
    d2h = [(dst, n) for kind, dst, _, n in fakes.copies if kind == 2]
    assert len(h2d) == 6 and len(d2h) == 2
    assert all(fakes.is_pinned(ptr, n) for ptr, n in h2d + d2h)
    assert len(fakes.pinned) == 4                                # one per tensor, for the largest batch
    backend.close()
    assert fakes.freed_host == 4


def test_outputs_are_sized_by_the_context_for_every_dynamic_dimension(tmp_path, monkeypatch, rng):
    """An engine output dynamic beyond the batch (-1, -1, 4, 4): its buffers and results take
    the shape the context infers, not the engine's -1s (once sized to a single byte)."""
    cuda = FakeCuda()
    io = IO[:3] + [("eps", "out", np.float32, (-1, -1, 4, 4))]
    monkeypatch.setattr(trt_backend, "cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_tensorrt(cuda, io))
    backend = load_backend(_bundle(tmp_path), "trt", "fp16")
    assert backend.capacity["eps"] == 8 * 1 * 4 * 4 * 4          # max batch 8, (1, 4, 4), float32
    for b in (5, 2):
        feed = _feed(b, rng)
        np.testing.assert_array_equal(backend.infer(feed)["eps"], _expected(feed))


def test_an_input_dynamic_beyond_the_batch_is_refused(tmp_path, monkeypatch):
    cuda = FakeCuda()
    io = [("x", "in", np.float32, (-1, 1, -1, 4))] + IO[1:]
    monkeypatch.setattr(trt_backend, "cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_tensorrt(cuda, io))
    with pytest.raises(BackendError, match="'x' has dynamic dimensions besides the batch"):
        load_backend(_bundle(tmp_path), "trt", "fp16")
