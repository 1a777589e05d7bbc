"""Which ONNX Runtime is installed: none, or onnxruntime beside onnxruntime-gpu, is one line
with the fix (the pair overwrites each other's files and leaves only the CPU provider)."""
import subprocess
import sys
from pathlib import Path

import pytest

from edgediff.runtime.backends.base import BackendError
from edgediff.runtime.backends.ort import check_providers, import_onnxruntime, ort_distributions


def test_this_environment_has_exactly_one_onnxruntime_distribution():
    assert len(ort_distributions()) == 1        # `make install` installs the cpu extra only


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_both_distributions_refuse_a_gpu_device_in_one_line(device):
    with pytest.raises(BackendError) as err:
        import_onnxruntime(device, dists=lambda: ["onnxruntime", "onnxruntime-gpu"])
    msg = str(err.value)
    assert "\n" not in msg and "pip uninstall -y onnxruntime onnxruntime-gpu" in msg and "gpu-cu12" in msg


def test_both_distributions_only_warn_on_the_cpu_where_it_still_works():
    with pytest.warns(RuntimeWarning, match="overwrite each other"):
        ort = import_onnxruntime("cpu", dists=lambda: ["onnxruntime", "onnxruntime-gpu"])
    assert "CPUExecutionProvider" in ort.get_available_providers()


def test_no_onnxruntime_names_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)    # `import onnxruntime` raises ImportError
    with pytest.raises(BackendError) as err:
        import_onnxruntime("cpu", dists=lambda: [])
    msg = str(err.value)
    assert "\n" not in msg and "edgediff[cpu]" in msg and "edgediff[gpu-cu13]" in msg


def test_ort_tensorrt_provider_beside_tensorrt_11_says_why():
    """ORT's TensorRT provider links TensorRT 10: beside TensorRT 11 it cannot start."""
    with pytest.raises(BackendError, match="needs TensorRT 10 and this is TensorRT 11: use --backend trt"):
        check_providers(["CUDAExecutionProvider"], "TensorrtExecutionProvider", tensorrt_major=lambda: 11)
    with pytest.raises(BackendError, match="see onnxruntime's warning above"):
        check_providers(["CPUExecutionProvider"], "TensorrtExecutionProvider", tensorrt_major=lambda: 10)


ORT_GPU = Path(__file__).resolve().parents[2] / "build" / "bindings" / "onnxruntime-gpu-1.26.0"
REAL_WHEEL = """
import sys, warnings
from edgediff.runtime.backends import ort as ort_backend, load_backend
from edgediff.runtime.bundle import read_bundle
import onnxruntime
assert "onnxruntime-gpu-1.26.0" in onnxruntime.__file__, onnxruntime.__file__
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()
try:
    ort_backend.import_onnxruntime("cuda")           # beside this venv's onnxruntime: both installed
except ort_backend.BackendError as exc:
    print("BOTH:", exc)
ort_backend.ort_distributions = lambda: ["onnxruntime-gpu"]     # as in a clean gpu-cu12 install
try:
    load_backend(read_bundle(sys.argv[1]), "ort", device="cuda")
except ort_backend.BackendError as exc:
    print("REFUSED:", exc)
"""


@pytest.mark.skipif(not (ORT_GPU / ".complete").is_file(),
                    reason="the real onnxruntime-gpu wheel is opt-in: python scripts/trt_bindings.py --ort-gpu (434 MB)")
def test_the_real_onnxruntime_gpu_wheel_without_cuda_libraries_is_refused_not_run_on_the_cpu(tiny_bundle):
    """onnxruntime-gpu 1.26.0 lists CUDAExecutionProvider, cannot load it without CUDA's
    libraries and runs the session on the CPU after a logged error: edgediff refuses."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ORT_GPU), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", REAL_WHEEL, str(tiny_bundle)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BOTH: both onnxruntime and onnxruntime-gpu are installed" in proc.stdout
    assert ("REFUSED: onnxruntime could not start CUDAExecutionProvider and would run on CPUExecutionProvider"
            in proc.stdout), proc.stdout
