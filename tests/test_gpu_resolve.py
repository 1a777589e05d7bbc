"""The CI check of the GPU extras' resolution (scripts/gpu_resolve.py) on canned pip reports."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_resolve", Path(__file__).parents[1] / "scripts" / "gpu_resolve.py")
gpu_resolve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_resolve)


def report(*dists):
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in dists]}


CU12 = [("onnxruntime-gpu", "1.26.0"), ("nvidia-cuda-runtime-cu12", "12.9.79"), ("tensorrt-cu12", "10.16.1.11"),
        ("tensorrt_cu12_bindings", "10.16.1.11"), ("tensorrt-cu12-libs", "10.16.1.11"), ("cuda-python", "12.9.10"),
        ("cuda-bindings", "12.9.10"), ("numpy", "2.4.6")]


def test_a_consistent_cuda12_stack_passes_with_its_versions_listed():
    summary, problems = gpu_resolve.check_report(report(*CU12))
    assert problems == []
    assert "onnxruntime-gpu 1.26.0" in summary and "tensorrt-cu12 10.16.1.11" in summary
    assert "cuda-python 12.9.10" in summary and summary.endswith("CUDA 12") and "numpy" not in summary


def test_onnxruntime_beside_onnxruntime_gpu_fails():
    _, problems = gpu_resolve.check_report(report(*CU12, ("onnxruntime", "1.31.1")))
    assert any("onnxruntime and onnxruntime-gpu both resolve" in p for p in problems)


@pytest.mark.parametrize("odd", [("cuda-python", "13.4.4"), ("nvidia-cuda-runtime", "13.5.37"),
                                 ("tensorrt-cu13-bindings", "11.4.0.106")])
def test_a_component_of_another_cuda_major_fails(odd):
    dists = [d for d in CU12 if d[0] != odd[0]] + [odd]
    _, problems = gpu_resolve.check_report(report(*dists))
    assert len(problems) == 1 and problems[0].startswith("CUDA major versions disagree") and "13" in problems[0]


def test_a_missing_gpu_component_fails():
    _, problems = gpu_resolve.check_report(report(("onnxruntime", "1.31.1"), ("numpy", "2.4.6")))
    assert {p.split(" in ")[0] for p in problems} == {"no onnxruntime-gpu", "no TensorRT", "no cuda-python"}


def test_every_gpu_extra_of_pyproject_is_checked_and_none_mixes_in_onnxruntime():
    extras = gpu_resolve.gpu_extras()
    assert {"gpu-cu12", "gpu-cu13"} <= set(extras)
    import tomllib
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("onnxruntime") for d in declared["dependencies"])   # core: no ORT of either kind


def test_the_placeholder_is_an_installable_wheel_of_that_exact_version(tmp_path):
    import zipfile
    gpu_resolve._placeholder(tmp_path, "tensorrt-cu12-libs", "10.16.1.11")
    (whl,) = tmp_path.iterdir()
    assert whl.name == "tensorrt_cu12_libs-10.16.1.11-py3-none-any.whl"
    meta = zipfile.ZipFile(whl).read("tensorrt_cu12_libs-10.16.1.11.dist-info/METADATA").decode()
    assert "Version: 10.16.1.11" in meta and "Requires-Dist" not in meta
