"""`make gpu-check` (scripts/gpu_check.py): all skipped with reasons on a CPU machine, and the
per-stack rows it builds (the ONNX Runtime row run for real on the CPU provider, the native
TensorRT row from the outputs of the edgediff commands it runs)."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check          # its dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_without_a_gpu_it_runs_end_to_end_as_all_skipped_with_reasons(tmp_path):
    if gpu_check.detect_gpu()[1] is None:
        pytest.skip("a GPU is visible here")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "r.json")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 60
    out = proc.stdout
    assert out.startswith("gpu-check on no GPU seen through cuda-python (") and "(nothing ran: all skipped)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows"] == [] and set(report["stacks"]) == set(gpu_check.STACKS)
    assert all(report["stacks"].values())                     # every stack has its reason
    for stack, why in report["stacks"].items():
        assert f"  {stack}: {why}" in out
    assert "no stack that runs models is usable here" in out


def test_the_onnx_runtime_row_runs_the_drift_check_and_times_it(tiny_bundle, one_thread):
    """The same code as the ort-cuda/ort-tensorrt rows, on the CPU provider (FP32 vs itself)."""
    row = gpu_check.run_ort(tiny_bundle, "ddpm", "fp32", "ort-cpu")
    assert row.verdict == "PASS", row
    assert row.parity.endswith("≤ 0.001") and float(row.parity.split()[0]) < 1e-6
    assert all(row.ms[b] > 0 for b in gpu_check.BATCHES)


class FakeCli:
    """What `edgediff build/parity/bench` print, by command."""

    def __init__(self, passed=True, build_rc=0):
        self.passed, self.build_rc, self.calls = passed, build_rc, []

    def __call__(self, *args, timeout):
        self.calls.append(args)
        if args[0] == "build":
            return subprocess.CompletedProcess(args, self.build_rc, "", "error: TensorRT could not build")
        if args[0] == "parity":
            report = {"passed": self.passed, "worst": {"eps": 2e-4 if self.passed else 9e-3},
                      "gate": {"per_forward_rel_l2": 5e-3},
                      "failures": [] if self.passed else
                      ["per-forward rel-L2 9.00e-03 (eps at t = 999) exceeds the gate 0.005"],
                      "checks": {"polygraphy": {"passed": True, "summary": "PASS: eps SNR 60.1 dB"}}}
            return subprocess.CompletedProcess(args, 0 if self.passed else 1, json.dumps(report), "")
        out = Path(args[args.index("--json") + 1])
        out.write_text(json.dumps({"engines": {"trt": {"batches": {"1": {"p50": 0.4}, "8": {"p50": 0.9},
                                                                   "16": {"p50": 1.5}}}}}))
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.mark.parametrize("cli, verdict", [(FakeCli(), "PASS"), (FakeCli(passed=False), "FAIL"),
                                          (FakeCli(build_rc=1), "ERROR")], ids=["pass", "fail", "build-error"])
def test_the_native_row_comes_from_build_parity_and_bench(monkeypatch, tmp_path, cli, verdict):
    monkeypatch.setattr(gpu_check, "_cli", cli)
    row = gpu_check.run_native(tmp_path, "dit", "fp16", gpu_check.Check(out=tmp_path / "out"))
    assert row.verdict == verdict
    if verdict == "ERROR":
        assert "edgediff build exited 1: error: TensorRT could not build" in row.note and len(cli.calls) == 1
        return
    assert [c[0] for c in cli.calls] == ["build", "parity", "bench"]
    assert ("--backend", "trt") == cli.calls[1][4:6] and "--json-only" in cli.calls[1]
    if verdict == "PASS":
        assert row.parity == "2.0e-04 ≤ 0.005" and row.ms == {1: 0.4, 8: 0.9} and "SNR 60.1 dB" in row.note
    else:
        assert row.parity.startswith("per-forward rel-L2 9.00e-03")
    assert "(nothing ran" not in gpu_check.table(gpu_check.Check(gpu="H200", rows=[row]))


def test_the_run_goes_through_each_usable_stack_and_lists_the_rest(monkeypatch, tiny_bundle, one_thread):
    """Detection says only ONNX Runtime's CUDA provider is usable (run here on the CPU provider):
    one row per family and precision on it, every other stack and the missing precisions
    listed with their reasons; a spent budget skips what is left, saying so."""
    real_run_ort = gpu_check.run_ort
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: ("", "cuda-python is not installed"))
    monkeypatch.setattr(gpu_check, "detect", lambda why: {"trt": "TensorRT is not installed", "ort-cuda": None,
                                                          "ort-tensorrt": "no TensorrtExecutionProvider",
                                                          "cupy": "CuPy is not installed"})

    def bundle_for(family, check):
        check.skip(f"{family} int8", "the bundle has no INT8 model")
        return tiny_bundle, ["fp32"]

    monkeypatch.setattr(gpu_check, "bundle_for", bundle_for)
    monkeypatch.setattr(gpu_check, "run_ort", lambda p, f, prec, stack: real_run_ort(p, f, prec, "ort-cpu"))
    check = gpu_check.run(gpu_check.Check(), ["ddpm"])
    assert [(r.family, r.precision, r.verdict) for r in check.rows] == [("ddpm", "fp32", "PASS")]
    assert check.skipped == ["trt: TensorRT is not installed", "ort-tensorrt: no TensorrtExecutionProvider",
                             "cupy: CuPy is not installed", "ddpm int8: the bundle has no INT8 model"]
    out = gpu_check.table(check)
    assert "ddpm         fp32  ort-cpu" in out and "skipped (4):" in out
    spent = gpu_check.run(gpu_check.Check(budget=0), ["ddpm", "dit"])
    assert spent.rows == [] and spent.skipped[-2:] == ["ddpm: the time budget (0 s) was spent",
                                                       "dit: the time budget (0 s) was spent"]
