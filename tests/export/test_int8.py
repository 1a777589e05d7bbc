"""INT8 (export/int8.py, export/int8_bundle.py): ModelOpt Q/DQ on trajectory feeds, FP32
islands chosen by measured per-step gain, the per-step gate, the bundle record, and the
failures: a missed gate keeps the bundle as it was and the model aside."""
import json

import numpy as np
import onnx
import pytest

pytest.importorskip("modelopt.onnx.quantization")

from fs_snapshot import snapshot  # noqa: E402

from edgediff.export import int8  # noqa: E402
from edgediff.export.int8 import Group, Int8Error, Search, Trial, candidate_groups  # noqa: E402
from edgediff.digits.precision_gate import judge_applies  # noqa: E402
from edgediff.export.int8_bundle import INT8_FILE, add_int8  # noqa: E402
from edgediff.runtime.bundle import read_bundle  # noqa: E402
from edgediff.runtime.parity import OutputCheck, ParityCase, ParityResult  # noqa: E402
from edgediff.runtime.pipeline import Pipeline  # noqa: E402


def _consumers_of_dq(model: onnx.ModelProto) -> set[str]:
    """Nodes fed by a DequantizeLinear: the ones that run on INT8 inputs."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type != "QuantizeLinear" and dq.intersection(n.input)}


def test_add_int8_installs_a_gated_qdq_model_with_its_record(tmp_path, fixture_bundle, one_thread):
    _, _, bundle, _ = fixture_bundle("dit")
    parity, quality = add_int8(bundle, calib_samples=4, calib_cap=4, log=lambda m: None)
    assert parity.passed and parity.worst_rel_l2 <= 5e-2 and quality is None
    b = read_bundle(bundle)                                  # hashes verified: the install is whole
    rec = b.manifest.precision["int8"]
    assert b.manifest.models["int8"] == INT8_FILE and b.manifest.parity["int8"]["passed"]
    assert rec["calibration"]["method"] == "max" and rec["calibration"]["rows"] > 0
    assert len(rec["gate"]["per_step"]) == rec["gate"]["held_out"]["steps_recorded"]   # every step gated
    model = onnx.load(str(bundle / INT8_FILE))
    assert rec["quantizers"] == sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    int8_inputs = _consumers_of_dq(model)
    for island in rec["fp32_islands"]:                       # what stayed FP32 gets no INT8 input
        assert not int8_inputs.intersection(island["nodes"]), island["name"]
    assert json.loads((bundle / "parity.json").read_text())["int8"]["passed"]
    with Pipeline.from_bundle(bundle, precision="int8") as pipe:
        out = pipe(4, seed=0, steps=4)
    assert np.isfinite(out.samples).all()


def test_a_missed_gate_keeps_the_bundle_and_sets_the_model_aside(tmp_path, fixture_bundle, monkeypatch, one_thread):
    _, _, bundle, _ = fixture_bundle("dit")
    monkeypatch.setattr(int8, "GATE_REL_L2", 1e-9)          # no INT8 model can meet it
    monkeypatch.setattr(int8, "candidate_groups", lambda m: candidate_groups(m)[:2])     # a short search
    before = snapshot(bundle)
    with pytest.raises(Int8Error, match=r"misses the gate even with every candidate island FP32.*int8\.failed"):
        add_int8(bundle, calib_samples=2, calib_cap=2, log=lambda m: None)
    assert snapshot(bundle) == before
    assert (bundle.parent / (bundle.name + ".int8.failed") / INT8_FILE).is_file()


def _trial(islands, worst):
    check = OutputCheck("eps", worst, worst, True)
    return Trial(islands, ParityResult("ref", "int8", 5e-2, None, [ParityCase("step 0", [check])]), 1)


def test_islands_are_added_in_order_of_measured_gain_until_the_gate_holds():
    # alone: b helps most, then c; a barely. The gate needs b and c together.
    worst = {(): 0.2, ("a",): 0.19, ("b",): 0.08, ("c",): 0.1, ("b", "c"): 0.04}
    tried = []

    def trial(islands):
        tried.append(islands)
        return _trial(islands, worst[islands])

    groups = [Group(n, "", (n,)) for n in "abc"]
    final = Search(groups, trial, log=lambda m: None).run()
    assert final.islands == ("b", "c") and final.parity.passed
    assert tried == [(), ("a",), ("b",), ("c",), ("b", "c")]       # each alone once, then cumulative


def test_an_island_that_cures_one_output_counts_while_another_output_is_worst():
    """DDM: FP32 ``o`` cures output c, but eps sets the max until ``d`` is FP32 too; ordered by
    the max, ``o`` (no gain alone) would come after ``x`` (a small gain on eps)."""
    tried = []

    def trial(islands):
        tried.append(islands)
        c = 0.01 if "o" in islands else 0.1
        eps = 0.03 if "d" in islands else 0.19 if "x" in islands else 0.2
        case = ParityCase("step 0", [OutputCheck("c", c, c, True), OutputCheck("eps", eps, eps, True)])
        return Trial(islands, ParityResult("ref", "int8", 5e-2, None, [case]), 1)

    groups = [Group(n, "", (n,)) for n in "xod"]
    assert Search(groups, trial, log=lambda m: None).run().islands == ("d", "o")
    assert tried[-2:] == [("d",), ("d", "o")]          # by the max it would have tried ("d", "x") next


def test_no_islands_when_all_int8_passes():
    final = Search([Group("a", "", ("a",))], lambda i: _trial(i, 0.01), log=lambda m: None).run()
    assert final.islands == ()


def test_candidate_groups_name_the_risky_layers_and_every_module(fixture_bundle):
    _, _, bundle, _ = fixture_bundle("dit")
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    groups = {g.name: g for g in candidate_groups(model)}
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [ops[n] for n in groups["input"].nodes] == ["Conv"]               # the patch embedding on x
    assert "Softmax" in {ops[n] for n in groups["attention"].nodes}
    assert {"module:model.blocks.0", "module:model.final_layer.linear"} <= set(groups)
    assert len({frozenset(g.nodes) for g in groups.values()}) == len(groups)   # no trial twice


def test_u_net_convs_after_group_norms_are_quantized(fixture_bundle, tmp_path, one_thread):
    """ONNX cannot infer GroupNormalization-21's output type; without the declared types
    ORT's quantizer would leave every Conv after the first GroupNorm in FP32."""
    _, _, bundle, _ = fixture_bundle("ddpm")
    with Pipeline.from_bundle(bundle) as pipe:
        from edgediff.calibration.feeds import record_feeds

        feeds = record_feeds(pipe, samples=2, cap=2, seed=0, steps=3)
    int8.quantize(bundle / "model.onnx", tmp_path / "q.onnx", feeds.arrays)
    model = onnx.load(str(tmp_path / "q.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert {n.name for n in convs} <= _consumers_of_dq(model)
    assert not list(tmp_path.glob("tmp*.onnx"))             # ModelOpt's stray temporary files stay in the stage
    # without a Q after each Conv (conv_peaks), ORT fuses only where ModelOpt quantized the reader
    assert _int8_convs(tmp_path / "q.onnx", tmp_path) < len(convs) // 2


def test_conv_outputs_quantized_let_onnx_runtime_run_int8_convolutions(fixture_bundle, tmp_path, one_thread):
    _, _, bundle, _ = fixture_bundle("ddpm")
    with Pipeline.from_bundle(bundle) as pipe:
        from edgediff.calibration.feeds import record_feeds

        feeds = record_feeds(pipe, samples=2, cap=2, seed=0, steps=3)
    peaks = int8.conv_output_peaks(bundle / "model.onnx", feeds)
    assert peaks and min(peaks.values()) > 0
    int8.quantize(bundle / "model.onnx", tmp_path / "q.onnx", feeds.arrays, conv_peaks=peaks)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    as_written = _int8_convs(tmp_path / "q.onnx", tmp_path, unsigned=False)
    # ORT converts only single-reader S8 pairs to U8: convolutions of shared activations stay FP32
    # unless the backend loads the activations as U8 (runtime/backends/ort_int8.py)
    assert as_written < convs - 1
    assert _int8_convs(tmp_path / "q.onnx", tmp_path) == convs - 1      # all but the output conv (no Q after it)


def _int8_convs(path, tmp_path, unsigned=True) -> int:
    """How many convolutions ONNX Runtime's optimized graph runs as QLinearConv, loaded as the
    backend loads INT8 models (``unsigned``) or as written."""
    import onnxruntime as ort

    from edgediff.runtime.backends.ort import INT8_DISABLED_OPTIMIZERS
    from edgediff.runtime.backends.ort_int8 import CpuInt8Model

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    source = CpuInt8Model(path).source if unsigned else str(path)
    ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(INT8_DISABLED_OPTIMIZERS))
    return sum(n.op_type == "QLinearConv" for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_judge_applies_only_to_digit_shaped_label_or_unconditional_models(fixture_bundle):
    _, _, bundle, _ = fixture_bundle("dit")
    assert not judge_applies(read_bundle(bundle).manifest)    # the tiny fixture draws 4x8x8, not 1x16x16


def test_cli_refuses_int8_for_a_component_and_conditioned_bundles_without_feeds(fixture_bundle, t2i_bundle, capsys):
    from cli_helpers import run

    _, _, bundle, _ = fixture_bundle("dit")
    code, _, err = run(["add-precision", str(bundle), "--precision", "int8", "--component", "decoder"], capsys)
    assert code == 2 and "converts the denoiser only" in err
    code, _, err = run(["add-precision", str(t2i_bundle / "b"), "--precision", "int8"], capsys)
    assert code != 0 and "needs prompts" in err and "--calib-data" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_calib_data_holds_a_quarter_of_each_step_out(tmp_path, fixture_bundle, one_thread, capsys):
    from cli_helpers import run

    _, _, bundle, _ = fixture_bundle("dit")
    code, _, err = run(["calibrate", str(bundle), "--out", str(tmp_path / "f.npz"), "--samples", "4", "--cap", "4",
                        "--steps", "3"], capsys)
    assert code == 0, err
    code, out, err = run(["add-precision", str(bundle), "--precision", "int8", "--calib-data", str(tmp_path / "f.npz"),
                          "--no-quality"], capsys)
    assert code == 0, err
    gate = read_bundle(bundle).manifest.precision["int8"]["gate"]
    assert gate["held_out"]["rows"] == 3 and len(gate["per_step"]) == 3       # one row of four per step
    assert "PASS" in out


def test_calib_data_of_real_images_calibrates_and_trajectories_gate(tmp_path, fixture_bundle, one_thread, capsys):
    from cli_helpers import run

    _, _, bundle, _ = fixture_bundle("ddpm")
    m = read_bundle(bundle).manifest
    c, h, w = m.sample_shape
    rng = np.random.default_rng(0)
    labels = rng.integers(0, m.num_classes, 12) if m.conditional else None
    np.savez(tmp_path / "i.npz", images=rng.integers(0, 256, (12, h, w, c), dtype=np.uint8),
             **({"labels": labels} if labels is not None else {}))
    code, out, err = run(["add-precision", str(bundle), "--precision", "int8", "--calib-data", str(tmp_path / "i.npz"),
                          "--calib-samples", "4", "--calib-cap", "4", "--no-quality"], capsys)
    assert code == 0, err
    rec = read_bundle(bundle).manifest.precision["int8"]
    assert rec["calibration"]["source"] == "images" and rec["calibration"]["image_count"] == 12
    assert rec["gate"]["held_out"]["source"] == "trajectories" and "from the images" in out + err


def test_options_of_the_other_precision_are_refused(fixture_bundle, capsys):
    from cli_helpers import run

    _, _, bundle, _ = fixture_bundle("dit")
    code, _, err = run(["add-precision", str(bundle), "--precision", "int8", "--calibration-rows", "4"], capsys)
    assert code == 2 and "--calibration-rows: not used by --precision int8" in err
    code, _, err = run(["add-precision", str(bundle), "--precision", "fp16", "--calib-cap", "4", "--no-quality"], capsys)
    assert code == 2 and "--calib-cap, --quality: not used by --precision fp16" in err


def test_feeds_of_another_model_are_refused_in_one_line(fixture_bundle, tmp_path, one_thread):
    from edgediff.calibration.feeds import CalibrationFeeds
    from edgediff.runtime.errors import InvalidInput

    _, _, bundle, _ = fixture_bundle("dit")
    shape = tuple(read_bundle(bundle).manifest.sample_shape)

    def feeds(rows, x_shape):
        return CalibrationFeeds({"x": np.zeros((rows, *x_shape), np.float32), "t": np.zeros(rows, np.float32),
                                 "y": np.zeros(rows, np.int64)}, np.repeat(np.arange(2), rows // 2))
    feeds(8, (shape[0] + 2, *shape[1:])).save(tmp_path / "w.npz")
    with pytest.raises(InvalidInput, match=r"'x' is float32 \(8, \d+, \d+, \d+\); this denoiser takes float32"):
        add_int8(bundle, calib_data=tmp_path / "w.npz", log=lambda m: None)
    few = feeds(6, shape)
    few.save(tmp_path / "few.npz")
    with pytest.raises(InvalidInput, match=r"3 row\(s\) at step 0: at least 4"):
        add_int8(bundle, calib_data=tmp_path / "few.npz", log=lambda m: None)


def test_a_library_failure_is_one_int8_error(tmp_path):
    """ModelOpt raising its own exception types (KeyError on U-Net concats before passes=[])."""
    with pytest.raises(Int8Error, match=r"^ModelOpt INT8 PTQ failed: KeyError: 'cat_2_ReduceMin'$"):
        with int8._one_line("ModelOpt INT8 PTQ"):
            raise KeyError("cat_2_ReduceMin")
