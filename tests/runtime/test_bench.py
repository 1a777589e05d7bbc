"""runtime/bench.py: the flop count from shapes, the feeds, the worker protocol and one real
interleaved run on a tiny bundle (no timing assertions: numbers are the benchmarks' job)."""
import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgediff.runtime.bench import bench_feed, format_report, graph_flops, percentiles, run_bench, serve


def _tiny_graph(path):
    """x (B, 3, 8, 8) -> Conv 3->4 k3 pad1 -> reshape (B, 4*64) -> Gemm 256->5 -> MatMul (5, 7)."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = numpy_helper.from_array(np.ones((256, 5), np.float32), "g")
    m = numpy_helper.from_array(np.ones((5, 7), np.float32), "m")
    shape = numpy_helper.from_array(np.array([-1, 256], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "g"], ["h"]),
             helper.make_node("MatMul", ["h", "m"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7])], [w, g, m, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


@pytest.mark.parametrize("batch", [1, 8])
def test_graph_flops_counts_conv_gemm_matmul_from_shapes(tmp_path, batch):
    _tiny_graph(tmp_path / "m.onnx")
    got = graph_flops(tmp_path / "m.onnx", batch)
    conv = 2 * batch * 4 * 8 * 8 * (3 * 3 * 3)
    gemm = 2 * batch * 5 * 256
    matmul = 2 * batch * 7 * 5
    assert got == {"flops": conv + gemm + matmul, "uncounted": []}


def test_bench_feed_follows_declared_inputs():
    inputs = {"x": {"dtype": "float32", "shape": ["batch", 2, 4, 4]}, "t": {"dtype": "float32", "shape": ["batch"]},
              "y": {"dtype": "int64", "shape": ["batch"]}}
    feed = bench_feed(inputs, {"min": 0, "max": 999}, 10, 3)
    assert feed["x"].shape == (3, 2, 4, 4) and feed["x"].dtype == np.float32
    assert feed["t"].shape == (3,) and 0 <= feed["t"].min() and feed["t"].max() <= 999
    assert feed["y"].dtype == np.int64 and 0 <= feed["y"].min() and feed["y"].max() < 10


def test_serve_answers_one_call_per_request():
    calls = []
    out = io.StringIO()
    inp = io.StringIO('{"batch": 2}\n{"batch": 4}\n{"quit": true}\n')
    serve(lambda: calls.append, [2, 4], warmup=1, out=out, inp=inp, extra={"weights": "w"})
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert calls == [2, 2, 4, 4, 2, 4]           # first + warm-up per batch, then the two requests
    assert set(replies[0]["first_ms"]) == {"2", "4"} and replies[0]["weights"] == "w"
    assert all("ms" in r for r in replies[1:3]) and replies[3]["peak_rss_mb"] > 0


def test_percentiles():
    p = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50"] == 3.0 and p["min"] == 1.0 and p["n"] == 5 and 4.0 < p["p90"] < 100.0


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("bench") / "dit"
    export_bundle("dit", FAMILIES["dit"].configs["tiny"], out, log=lambda m: None)
    return out


def test_run_bench_times_every_engine_and_batch(tiny_bundle):
    r = run_bench(tiny_bundle, batches=[1, 2], repeats=3, warmup=0, threads=1, sgemm_size=64)
    assert r["family"] == "dit" and r["threads"] == 1
    ort = r["engines"]["ort"]
    # a guided bundle (DiT: null label, guidance 4) also times 2·B: one guided step is one call at 2·B
    assert r["guided"] and set(ort["batches"]) == {"1", "2", "4"}
    assert all(s["n"] == 3 and s["p50"] > 0 and s["model_gflop"] > 0 for s in ort["batches"].values())
    assert ort["batches"]["2"]["model_gflop"] == pytest.approx(2 * ort["batches"]["1"]["model_gflop"])
    assert r["per_step"]["2"]["call_batch"] == 4
    assert r["sgemm"]["gflops_per_s"] > 0 and r["ort_sgemm"]["gflops_per_s"] > 0 and r["ort_sgemm"]["size"] == 64
    assert ort["load_s"] > 0 and ort["peak_rss_mb"] > 0
    text = format_report(r)
    assert "per step (one call at batch 4" in text and "sgemm 64³: NumPy" in text
    json.dumps(r)                                 # the JSON report is serialisable as is


def test_int8_bench_times_fp32_and_the_machines_int8_gemm_in_the_same_run(tiny_bundle, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization")
    import shutil

    from edgediff.export.int8_bundle import add_int8

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    add_int8(bundle, calib_samples=2, calib_cap=2, log=lambda m: None)
    r = run_bench(bundle, precision="int8", batches=[2], repeats=2, warmup=0, threads=1, sgemm_size=64)
    assert set(r["engines"]) == {"ort", "ort-fp32"} and r["ort_igemm"]["p50"] > 0
    i8 = r["int8"]
    assert i8["machine_ratio"] == pytest.approx(r["ort_sgemm"]["p50"] / r["ort_igemm"]["p50"])
    # guided: a step is one call at 2·B, so INT8 is compared at batch 4
    assert i8["call_batch"]["2"] == 4 and i8["model_ratio"]["2"] == pytest.approx(
        r["engines"]["ort-fp32"]["batches"]["4"]["p50"] / r["engines"]["ort"]["batches"]["4"]["p50"])
    assert i8["of_machine"]["2"] == pytest.approx(i8["model_ratio"]["2"] / i8["machine_ratio"])
    assert "int8 over fp32 (same run): batch 2 (calls at 4):" in format_report(r)


@pytest.mark.parametrize("mod", ["edgediff.runtime.bench", "edgediff.cli_bench"])
def test_bench_modules_import_no_torch(mod):
    """The coordinator and the ORT worker run on a core install; only the PyTorch workers
    (edgediff.export.bench_torch, their own processes) load torch."""
    import subprocess
    import sys

    code = (f"import sys, importlib; importlib.import_module({mod!r}); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('edgediff.export')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-300:]


def test_graph_flops_falls_back_to_stored_symbolic_shapes(tmp_path):
    """A Reshape whose target shape is data (not constant) stops re-inference; the export's
    stored shapes, symbolic in batch ("2*batch"), fill the gap."""
    m = numpy_helper.from_array(np.ones((128, 5), np.float32), "m")
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("MatMul", ["r", "m"], ["y"])]
    graph = helper.make_graph(
        nodes, "stored",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["2*batch", 5])], [m],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, ["2*batch", 128])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "m.onnx"))
    assert graph_flops(tmp_path / "m.onnx", 3) == {"flops": 2 * (2 * 3) * 5 * 128, "uncounted": []}


def test_a_worker_that_logs_past_a_pipe_buffer_does_not_block_the_coordinator():
    """ONNX Runtime logs a line per dropped initializer on stderr: 64 KB of it once hung a bench."""
    import sys

    from edgediff.runtime.bench import Worker

    import threading

    code = "import sys; sys.stderr.write('w' * 300_000); print('{\"ready\": 1}', flush=True); sys.stdin.readline()"
    worker, got = Worker("noisy", [sys.executable, "-c", code], threads=1), []
    reader = threading.Thread(target=lambda: got.append(worker.read()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    worker.kill()                   # unblocks a reader stuck on a pipe, so a regression fails, not hangs
    assert got == [{"ready": 1}]
