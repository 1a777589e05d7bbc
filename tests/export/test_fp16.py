"""FP16 mixed precision (docs/architecture.md rung 2) on ONNX Runtime CPU, for every registered family."""
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgediff.export import fp16
from edgediff.export.models import FAMILIES
from edgediff.export.onnx_export import export_onnx
from edgediff.export.reference import calibration_feed, torch_outputs
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import load_backend
from edgediff.runtime.parity import ParityResult

pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (the fp16 extra) is not installed")


def _fixture(name, tmp_path):
    family = FAMILIES[name]
    config = family.configs[family.fixture]
    torch.manual_seed(0)
    module = family.build(config).eval()
    spec = family.spec(config)
    export_onnx(module, spec, tmp_path / "model.onnx")
    return module, spec, (lambda feed: torch_outputs(module, spec, feed))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ddm_cond" else n
                                  for n in FAMILIES])   # ddm_cond: minutes of AutoCast trials on 2 cores
def test_fp16_meets_the_gate_across_the_schedule(name, tmp_path):
    _, spec, reference = _fixture(name, tmp_path)
    parity, record = fp16.convert_fp16(tmp_path / "model.onnx", tmp_path / "fp16.onnx", spec, reference,
                                       "pytorch-fp32", log=lambda m: None)
    assert parity.passed, parity.summary()
    labels = [case.label for case in parity.cases]
    for end in (spec.time["min"], spec.time["max"]):                 # both extremes are gated
        assert any(lb.startswith(f"t={end:g}") for lb in labels)
    assert all(c.finite for case in parity.cases for c in case.checks)
    assert record["gate"]["passed"] and record["trials"][-1]["worst_rel_l2"] == parity.worst_rel_l2
    json.dumps(record)                                           # goes into bundle.json as is


def test_schedule_calibration_keeps_the_timestep_embedding_fp32(tmp_path):
    """Calibrated on t across the schedule, sin/cos of t·freq (up to 999) stay FP32; cast
    naively, late-t predictions lose an order of magnitude of accuracy."""
    module, spec, reference = _fixture("dit", tmp_path)
    parity, record = fp16.convert_fp16(tmp_path / "model.onnx", tmp_path / "fp16.onnx", spec, reference, "pt",
                                       log=lambda m: None)
    ranged = record["fp32_islands"][0]
    assert ranged["name"] == "activation-range" and {"Sin", "Cos"} <= set(ranged["op_types"])
    assert ranged["scopes"] == ["model.t_embedder"] and ranged["peak"] == 999
    fp16.autocast(tmp_path / "model.onnx", tmp_path / "naive.onnx", [])
    naive = fp16.measure(reference, "pt", spec, tmp_path / "naive.onnx")

    def late(result):
        return max(c.rel_l2 for case in result.cases if case.label.startswith("t=999") for c in case.checks)
    assert late(naive) > 4 * late(parity)


def test_calibration_feed_walks_the_schedule():
    spec = FAMILIES["dit"].spec(FAMILIES["dit"].configs["tiny"])
    feed = calibration_feed(spec, rows=12)
    assert feed["t"][0] == 0 and feed["t"][-1] == 999 and np.all(np.diff(feed["t"]) > 0)
    assert set(feed["y"][1::2]) == {spec.null_label}                     # the null label is calibrated too
    std = feed["x"].reshape(12, -1).std(axis=1)
    assert std[0] < 0.7 and 0.75 < std[-1] < 1.25                        # data-like early, noise-like late


def test_conditioning_island_is_the_t_and_y_path_only(tmp_path):
    import onnx

    _fixture("dit", tmp_path)
    model = onnx.load(tmp_path / "model.onnx")
    nodes = set(fp16.conditioning_nodes(model))
    ops = {n.op_type for n in model.graph.node if n.name in nodes}
    assert {"Sin", "Cos", "Gather", "Gemm"} <= ops                        # embeddings and adaLN projections
    scopes = fp16.module_scopes(model, nodes)
    assert any("adaLN_modulation" in s for s in scopes) and "model.t_embedder.mlp.0" in scopes
    assert not any(s.endswith((".attn", ".qkv", ".fc1", ".norm1")) for s in scopes)       # token path stays FP16


def _result(worst, finite=True):
    res = ParityResult("ref", "cand", fp16.GATE_REL_L2, None)
    res.add("t=0", {"eps": np.ones(4)}, {"eps": np.ones(4) + (worst if finite else np.inf)})
    return res


def test_islands_are_added_only_as_measurement_demands():
    # softmax fixes it, normalization does nothing: only softmax is kept
    def trial(islands):
        return _result(0.5 if "softmax" not in islands else 1e-4)
    trials = fp16.choose_islands(trial, ("conditioning", "softmax", "normalization"), log=lambda m: None)
    assert trials[0].islands == () and trials[-1].islands == ("softmax",) and trials[-1].parity.passed
    assert fp16.choose_islands(lambda i: _result(1e-4), ("softmax",))[-1].islands == ()
    with pytest.raises(fp16.FP16Error, match="even with FP32 islands"):
        fp16.choose_islands(lambda i: _result(0, finite=False), ("softmax",), log=lambda m: None)


def test_add_fp16_to_a_bundle(tmp_path, fixture_bundle):
    family, module, _, _ = fixture_bundle("ddpm")
    with pytest.raises(fp16.FP16Error, match="pass that checkpoint"):
        fp16.add_fp16(tmp_path / "b", log=lambda m: None)
    parity = fp16.add_fp16(tmp_path / "b", checkpoint=tmp_path / "w.safetensors", log=lambda m: None)
    bundle = read_bundle(tmp_path / "b")                          # every hash verified, fp16 included
    assert parity.passed and parity.reference == "pytorch-fp32"
    assert bundle.manifest.models["fp16"] == "model_fp16.onnx" and "model_fp16.onnx" in bundle.manifest.files
    assert bundle.manifest.precision["fp16"]["fp32_islands"][0]["reason"]
    assert json.loads((tmp_path / "b" / "parity.json").read_text())["fp16"]["passed"]
    feed = {"x": np.zeros((2, 1, 8, 8), np.float32), "t": np.array([0, 999], np.float32),
            "y": np.array([0, 10], np.int64)}
    assert np.isfinite(load_backend(bundle, "ort", "fp16").infer(feed)["eps"]).all()
    save_file({k: v + 1 for k, v in family.official(module).state_dict().items()}, tmp_path / "other.safetensors")
    with pytest.raises(fp16.FP16Error, match="not the checkpoint"):
        fp16.add_fp16(tmp_path / "b", checkpoint=tmp_path / "other.safetensors", log=lambda m: None)


def test_missing_modelopt_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.onnx.autocast", None)
    with pytest.raises(fp16.FP16Error) as err:
        fp16.autocast(tmp_path / "model.onnx", tmp_path / "out.onnx")
    assert "edgediff[fp16]" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_official_size_dit_b2_meets_the_gate(tmp_path):
    """DiT-B/2 (130M parameters, 256 tokens): 2-4 min and ~6 GB on 2 cores."""
    family = FAMILIES["dit"]
    torch.manual_seed(0)
    module = family.build(family.configs["DiT-B/2"]).eval()
    spec = family.spec(family.configs["DiT-B/2"])
    export_onnx(module, spec, tmp_path / "model.onnx")
    parity, _ = fp16.convert_fp16(tmp_path / "model.onnx", tmp_path / "fp16.onnx", spec,
                                  lambda f: torch_outputs(module, spec, f), "pytorch-fp32", log=lambda m: None)
    assert parity.passed, parity.summary()
