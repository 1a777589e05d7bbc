"""Which ONNX Runtime is installed: none, or onnxruntime beside onnxruntime-gpu, is one line
with the fix (the pair overwrites each other's files and leaves only the CPU provider)."""
import sys

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
