"""`edgediff parity` on a tiny bundle with an FP16 model: the table, the JSON in BUNDLE/parity/,
the plot, Polygraphy's check (ORT FP32 vs FP16 on the CPU), a bundle that still verifies; and a
deliberately damaged FP16 model (its output head's weights ×1.1, hashes recorded anew) stops
with one line and a non-zero exit."""
from __future__ import annotations

import json
import shutil
from importlib.util import find_spec

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cli_helpers import rewrite_model, run  # (tests/)
from edgediff.runtime.bundle import finalize_manifest, read_bundle

HEAD_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
ARGS = ["-n", "3", "--sampler", "dpm_solver", "--steps", "6", "--threads", "1"]


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    pytest.importorskip("modelopt.onnx.autocast")
    from edgediff.export.bundle import export_bundle
    from edgediff.export.fp16 import add_fp16
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("parity") / "uvit"
    export_bundle("uvit", FAMILIES["uvit"].configs["tiny"], out, log=lambda m: None)
    add_fp16(out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def damaged(fp16_bundle, tmp_path_factory):
    """The FP16 model with its last weighted layer (the output head) scaled by 1.1."""
    out = tmp_path_factory.mktemp("damaged") / "uvit"
    shutil.copytree(fp16_bundle, out, ignore=shutil.ignore_patterns("parity"))

    def scale_head(model):
        weights = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
        head = [n for n in model.graph.node if n.op_type in HEAD_OPS and any(i in weights for i in n.input)][-1]
        init = weights[next(i for i in head.input if i in weights)]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float16(1.1), init.name))

    rewrite_model(out, "fp16", scale_head)
    return out


def test_parity_of_a_good_fp16_model_passes_and_writes_its_report(fp16_bundle, capsys):
    code, out, err = run(["parity", str(fp16_bundle), *ARGS], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split() == ["step", "t", "eps", "fwd", "x0", "fwd", "x_t", "traj"]
    assert "polygraphy: PASS" in out and out.strip().endswith("≤ gate 0.005")
    report = json.loads((fp16_bundle / "parity" / "fp16-ort-denoiser.json").read_text())
    assert report["passed"] and report["failures"] == [] and report["kind"] == "denoiser"
    assert report["gate"]["per_forward_rel_l2"] == 5e-3
    assert report["settings"]["sampler"] == "dpm_solver" and report["settings"]["n"] == 3
    assert 0 < report["worst"]["eps"] < 5e-3 and "x0" in report["worst"]
    forwards = [fw for s in report["steps"] for fw in s["forwards"]]
    assert len(forwards) == 6 and all(fw["outputs"]["eps"]["finite"] for fw in forwards)
    assert all(0 < s["x_t"]["rel_l2"] < 1e-2 for s in report["steps"])
    assert float(report["final"]["images"]["psnr_db"]) > 30        # "inf" when the images agree exactly
    poly = report["checks"]["polygraphy"]
    assert poly["passed"] and poly["feeds"] == 3 and poly["worst_snr_db"]["eps"] > poly["snr_threshold_db"]
    # the Polygraphy figure is the same rel-L2 measured by another tool
    assert poly["worst_rel_l2"]["eps"] <= report["worst"]["eps"] * 1.01
    if find_spec("matplotlib"):
        assert (fp16_bundle / "parity" / "fp16-ort-denoiser.png").read_bytes()[:4] == b"\x89PNG"
    # the report lives in the bundle, unhashed: the bundle verifies, now and after re-sealing
    manifest = read_bundle(fp16_bundle).manifest
    assert not any(f.startswith("parity/") for f in finalize_manifest(fp16_bundle, manifest).files)


def test_a_damaged_fp16_model_fails_in_one_line(damaged, capsys):
    code, out, err = run(["parity", str(damaged), *ARGS], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: parity FAIL (fp16 on ort, denoiser): per-forward rel-L2 ")
    assert "exceeds the gate 0.005" in err and "polygraphy: FAIL" in err
    report = json.loads((damaged / "parity" / "fp16-ort-denoiser.json").read_text())
    assert not report["passed"] and report["worst"]["eps"] > 5e-3
    assert not report["checks"]["polygraphy"]["passed"]


def test_json_only_prints_the_report_and_no_table(fp16_bundle, capsys):
    code, out, err = run(["parity", str(fp16_bundle), *ARGS, "--json-only", "--no-polygraphy"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["checks"] == {}


def test_usage_errors_are_one_line(fp16_bundle, capsys):
    code, _, err = run(["parity", str(fp16_bundle), "--precision", "fp32"], capsys)
    assert code != 0 and "the reference is FP32 on ONNX Runtime" in err
    code, _, err = run(["parity", str(fp16_bundle), "--precision", "int8"], capsys)
    assert code == 1 and err.startswith("error: bundle ") and "has no int8 model" in err
    code, _, err = run(["parity", str(fp16_bundle), "--component", "decoder"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1


@pytest.mark.tensorrt
@pytest.mark.skipif(find_spec("tensorrt") is None, reason="TensorRT is not installed")
def test_an_fp16_engine_is_held_to_its_onnx_through_polygraphy(fp16_bundle, tmp_path, capsys):
    """Rung 4: the engine samples in lockstep with the FP32 ONNX (gated), and Polygraphy's
    TrtRunner is compared against the FP16 ONNX on ONNX Runtime."""
    from edgediff.export.trt_build import BuildOptions, build_engine

    bundle = tmp_path / "uvit"
    shutil.copytree(fp16_bundle, bundle, ignore=shutil.ignore_patterns("parity"))
    build_engine(bundle, BuildOptions(precision="fp16", opt_batch=3, max_batch=3), log=lambda m: None)
    code, out, err = run(["parity", str(bundle), *ARGS, "--backend", "trt"], capsys)
    assert code == 0, err
    report = json.loads((bundle / "parity" / "fp16-trt-denoiser.json").read_text())
    assert report["passed"] and report["checks"]["polygraphy"]["runners"] == ["onnx-fp16 (onnxruntime)", "trt-fp16"]
