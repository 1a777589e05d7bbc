"""Speed of a bundle's model, side by side: ONNX Runtime (or TensorRT), PyTorch eager and
``torch.compile``, and a square sgemm (NumPy's BLAS and ONNX Runtime's own MatMul) as the
machine's yardstick, all in one run.

Each engine runs in its own process (``python -m edgediff.runtime.bench worker ...`` here,
``python -m edgediff.export.bench_torch ...`` for PyTorch) and is driven over stdin/stdout
one JSON line at a time. The coordinator asks every engine for one call per batch size in
turn, round after round, rotating the order, so all engines share the machine's noise
(another process waking up slows every engine's round alike) and the ratios hold even when
absolute times drift. The runtime side imports no torch: the PyTorch workers are separate
programs started only when ``against`` names them.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .backends.ort_int8 import all_nodes
from .errors import InvalidInput

SGEMM_N = 2048                 # square float32 GEMM: 2·N³ flops per call, the BLAS's best case
COUNTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
TORCH_ENGINES = ("eager", "compile")
# NumPy's BLAS, ORT's MatMul and ORT's INT8 Q/DQ MatMul on the same square GEMM
YARDSTICKS = ("sgemm", "ort_sgemm", "ort_igemm")


# --- measurements -------------------------------------------------------------------------
def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "n": int(a.size)}


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def graph_flops(model_path: str | Path, batch: int) -> dict:
    """Multiply-add flops (2 per MAC) of the graph's MatMul/Gemm/Conv/ConvTranspose nodes at
    ``batch``, from shapes: the batch dimension of every input is fixed, the stored shapes are
    dropped and ONNX shape inference runs again, so every shape is concrete. Other ops
    (softmax, norms, elementwise) are not counted: they are memory-bound and small."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    stored = _stored_shapes(graph, batch)
    del graph.value_info[:]
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = batch
    for vi in graph.output:                  # inferred anew (an empty dim list would mean a scalar)
        vi.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    for name, shape in stored.items():      # where inference stops (e.g. past a data-dependent Reshape)
        if not _known(shapes.get(name)) and _known(shape):
            shapes[name] = shape
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total, uncounted = 0, []
    for node in all_nodes(model.graph):
        if node.op_type in COUNTED_OPS:
            flops = _node_flops(node, shapes)
            if flops is None:
                uncounted.append(node.name or node.op_type)
            else:
                total += flops
    return {"flops": int(total), "uncounted": uncounted}


_BATCH_EXPR = re.compile(r"^[0-9*+ ()]*batch[0-9*+ ()]*$")


def _stored_shapes(graph, batch: int) -> dict:
    """The shapes the export stored (symbolic in ``batch``: "batch", "6*batch"), evaluated at
    ``batch``; other symbols (``unk__3``) stay unknown."""
    def dim(d):
        if d.HasField("dim_value"):
            return d.dim_value
        if _BATCH_EXPR.match(d.dim_param):
            return int(eval(d.dim_param, {"__builtins__": {}}, {"batch": batch}))   # digits, *, +, batch only
        return None
    return {vi.name: [dim(d) for d in vi.type.tensor_type.shape.dim]
            for vi in [*graph.input, *graph.value_info, *graph.output]}


def _known(shape) -> bool:
    return shape is not None and len(shape) > 0 and all(d is not None and d > 0 for d in shape)


def _node_flops(node, shapes: dict) -> int | None:
    a, b = (shapes.get(n) for n in node.input[:2])
    out = shapes.get(node.output[0])
    if not (_known(a) and _known(b) and _known(out)):
        return None
    if node.op_type == "MatMul":
        return 2 * int(np.prod(out)) * a[-1]           # (…, M, K) @ (…, K, N) -> (…, M, N)
    if node.op_type == "Gemm":
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        return 2 * int(np.prod(out)) * (a[0] if trans_a else a[1])
    if node.op_type == "Conv":                          # W: (Cout, Cin/g, *k); every output element is one dot
        return 2 * int(np.prod(out)) * int(np.prod(b[1:]))
    # ConvTranspose: every input element scatters into Cout/g · prod(k) outputs; W: (Cin, Cout/g, *k)
    return 2 * int(np.prod(a)) * int(np.prod(b[1:]))


def bench_feed(inputs: dict, time_range: dict, num_classes: int | None, batch: int, seed: int = 0) -> dict:
    """Inputs of the declared dtypes and shapes at ``batch``: N(0, 1) floats, t inside the
    model's time range, labels inside its class table (timing does not depend on values)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, decl in inputs.items():
        shape = [batch if isinstance(d, str) else int(d) for d in decl["shape"]]
        if name == "t":
            lo, hi = float(time_range.get("min", 0.0)), float(time_range.get("max", 1.0))
            feed[name] = rng.uniform(lo, hi, size=shape).astype(decl["dtype"])
        elif np.dtype(decl["dtype"]).kind in "iu":
            feed[name] = rng.integers(0, max(1, num_classes or 1), size=shape).astype(decl["dtype"])
        else:
            feed[name] = rng.standard_normal(shape).astype(decl["dtype"])
    return feed


# --- workers: one engine per process, one JSON line per request ---------------------------
def serve(load: Callable[[], Callable[[int], object]], batches: list[int], warmup: int,
          out=None, inp=None, extra: dict | None = None) -> None:
    """Load the engine (timed), make its first call per batch (timed: lazy allocation,
    compilation), ``warmup`` more, then answer ``{"batch": B}`` with the ms of one call and
    ``{"quit": true}`` with the peak RSS. ``load()`` returns ``call(batch)``."""
    out, inp = out or sys.stdout, inp or sys.stdin
    start = time.perf_counter()
    call = load()
    load_s = time.perf_counter() - start
    first = {}
    for batch in batches:
        t0 = time.perf_counter()
        call(batch)
        first[batch] = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup):
            call(batch)
    _reply(out, {"load_s": load_s, "first_ms": first, **(extra or {})})
    for line in inp:
        req = json.loads(line)
        if req.get("quit"):
            _reply(out, {"peak_rss_mb": peak_rss_mb()})
            return
        t0 = time.perf_counter()
        call(int(req["batch"]))
        _reply(out, {"ms": (time.perf_counter() - t0) * 1e3})


def _reply(out, msg: dict) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def ort_loader(bundle_path: str, backend: str, precision: str, threads: int | None, component: str = "denoiser"):
    """The runtime's own path: ``load_backend`` + ``infer`` (feed checks and finite check included)."""
    def load():
        from .backends import load_backend
        from .bundle import read_bundle

        bundle = read_bundle(bundle_path, verify=False)    # run_bench verified it before starting workers
        engine = load_backend(bundle, backend, precision, threads=threads, component=component)
        c = bundle.manifest.component(component)
        m = bundle.manifest
        feeds = {}

        def call(batch: int):
            if batch not in feeds:
                feeds[batch] = bench_feed(c.inputs, m.time, m.num_classes, batch)
            return engine.infer(feeds[batch])
        return call
    return load


def sgemm_loader(size: int = SGEMM_N):
    """The yardstick: one size×size float32 GEMM per call (the BLAS's thread count is fixed by
    the environment the coordinator started this process with)."""
    def load():
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        c = np.empty_like(a)
        return lambda batch: np.matmul(a, b, out=c)
    return load


def _gemm_model(size: int, int8: bool):
    """x @ W as ONNX, W a constant (prepacked like a model's weights); ``int8``: W per-column
    symmetric INT8 and x quantized per tensor, as ModelOpt's Q/DQ graphs are (ORT runs it as
    MatMulIntegerToFloat)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((size, size)).astype(np.float32)
    if int8:
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        inits = [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "wq"),
                 numpy_helper.from_array(scale, "ws"), numpy_helper.from_array(np.zeros(size, np.int8), "wz"),
                 numpy_helper.from_array(np.array(4 / 127, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    else:
        inits, nodes = [numpy_helper.from_array(w, "w")], [helper.make_node("MatMul", ["x", "w"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "gemm", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def ort_gemm_loader(size: int = SGEMM_N, threads: int | None = None, int8: bool = False):
    """The same GEMM as one ONNX MatMul on ONNX Runtime's CPU kernels (MLAS): the best a
    MatMul-bound graph can do under ORT on this machine, beside NumPy's BLAS; ``int8``: its
    INT8 kernel, whose speed-up over FP32 is this machine's ceiling for INT8 models."""
    def load():
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        model = _gemm_model(size, int8).SerializeToString()
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        feed = {"x": np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)}
        return lambda batch: sess.run(None, feed)
    return load


def worker_main(argv: list[str]) -> None:
    """``python -m edgediff.runtime.bench worker ort|sgemm|ort_sgemm|ort_igemm JSON``: JSON holds the options."""
    kind, opts = argv[0], json.loads(argv[1])
    if kind == "ort":
        load = ort_loader(opts["bundle"], opts["backend"], opts["precision"], opts["threads"])
    elif kind == "sgemm":
        load = sgemm_loader(opts["size"])
    elif kind in ("ort_sgemm", "ort_igemm"):
        load = ort_gemm_loader(opts["size"], opts["threads"], int8=kind == "ort_igemm")
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    serve(load, opts["batches"], opts["warmup"])


# --- coordinator ----------------------------------------------------------------------------
class Worker:
    """One engine's process: start, handshake, one call per request."""

    def __init__(self, name: str, argv: list[str], threads: int | None):
        env = dict(os.environ)
        if threads:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(threads)
        self.name = name
        # stderr to a file, not a pipe: a worker whose libraries warn past the pipe's 64 KB
        # (ONNX Runtime logs a line per initializer it drops) would block while we wait for stdout
        self.stderr = tempfile.TemporaryFile(mode="w+", errors="replace")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                         text=True, env=env)
        except BaseException:
            self.stderr.close()
            raise
        self.ms: dict[int, list[float]] = {}

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()
            why = next((ln for ln in reversed(err) if ln.strip()), "no output")
            raise InvalidInput(f"the {self.name} engine stopped: {why}")
        return json.loads(line)

    def close(self) -> dict:
        try:
            return self.ask({"quit": True})
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _argv_ort(kind: str, opts: dict) -> list[str]:
    return [sys.executable, "-m", "edgediff.runtime.bench", "worker", kind, json.dumps(opts)]


def _argv_torch(engine: str, opts: dict) -> list[str]:
    # the PyTorch side lives in the export wing (torch); this module only names it
    return [sys.executable, "-m", "edgediff.export.bench_torch", engine, json.dumps(opts)]


def run_bench(bundle_path: str | Path, precision: str = "fp32", backend: str = "ort", batches=(1, 8),
              against=(), repeats: int = 20, warmup: int = 2, threads: int | None = None,
              checkpoint: str | None = None, sgemm_size: int = SGEMM_N, log=lambda m: None) -> dict:
    """Time the bundle's denoiser and the ``against`` engines in interleaved rounds; return the
    report (JSON-ready). Guided bundles also time ONNX at 2·B: a guided step is one call at 2·B."""
    from .bundle import read_bundle

    bundle = read_bundle(bundle_path)
    bundle.model_path(precision)             # a precision the bundle lacks: one line, before any process starts
    m = bundle.manifest
    threads = threads or os.cpu_count() or 1
    batches = sorted(set(int(b) for b in batches))
    guided = m.guidable and m.sampling.guidance != 1.0
    ort_batches = sorted(set(batches) | ({2 * b for b in batches} if guided else set()))
    base = {"bundle": str(bundle.path), "threads": threads, "warmup": warmup}
    specs = {backend: _argv_ort("ort", {**base, "backend": backend, "precision": precision, "batches": ort_batches}),
             **{name: _argv_ort(name, {**base, "batches": [1], "size": sgemm_size}) for name in YARDSTICKS}}
    if precision != "fp32" and backend == "ort":    # FP32 in the same run: the precision's own speed-up
        specs[f"{backend}-fp32"] = _argv_ort("ort", {**base, "backend": backend, "precision": "fp32",
                                                      "batches": ort_batches})
    for engine in against:
        specs[engine] = _argv_torch(engine, {**base, "batches": batches, "checkpoint": checkpoint})
    workers: dict[str, Worker] = {}
    load = {"uptime_before": _loadavg()}
    try:
        for name, argv in specs.items():     # loaded one after another: load times do not overlap
            log(f"loading {name} ...")
            workers[name] = Worker(name, argv, threads)
            workers[name].ready = workers[name].read()
        names = list(workers)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                w = workers[name]
                for batch in (ort_batches if name in (backend, f"{backend}-fp32") else [1] if name in YARDSTICKS else batches):
                    w.ms.setdefault(batch, []).append(w.ask({"batch": batch})["ms"])
            log(f"round {r + 1}/{repeats}")
        finals = {name: w.close() for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()
    load["uptime_after"] = _loadavg()
    report = _report(bundle, m, precision, backend, batches, guided, workers, finals, load, checkpoint, sgemm_size)
    return {**report, "threads": threads}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _report(bundle, m, precision, backend, batches, guided, workers, finals, load, checkpoint, size) -> dict:
    yard = {}
    for name in YARDSTICKS:
        stats = percentiles(workers.pop(name).ms[1])
        yard[name] = {**stats, "size": size, "gflops_per_s": 2 * size ** 3 / (stats["p50"] * 1e-3) / 1e9}
    model_path = bundle.model_path(precision)
    flops_at = {b: graph_flops(model_path, b)["flops"] for b in {b for w in workers.values() for b in w.ms}}
    engines = {}
    for name, w in workers.items():
        per_batch = {}
        for batch, ms in sorted(w.ms.items()):
            stats = percentiles(ms)
            flops = flops_at[batch]
            per_batch[str(batch)] = {**stats, "first_ms": w.ready["first_ms"][str(batch)],
                                     "gflops_per_s": flops / (stats["p50"] * 1e-3) / 1e9,
                                     "model_gflop": flops / 1e9}
        engines[name] = {"load_s": w.ready["load_s"], "peak_rss_mb": finals[name]["peak_rss_mb"],
                         "batches": per_batch, **{k: v for k, v in w.ready.items() if k in ("weights", "note")}}
    steps = m.sampling.steps
    per_step = {}
    for b in batches:
        call = engines[backend]["batches"].get(str(2 * b if guided else b))
        if call:
            per_step[str(b)] = {"call_batch": 2 * b if guided else b, "step_ms": call["p50"],
                                "image_ms": call["p50"] * steps / b}
    ratios = {name: {str(b): e["batches"][str(b)]["p50"] / engines[backend]["batches"][str(b)]["p50"]
                     for b in batches} for name, e in engines.items() if name != backend}
    int8 = _int8_summary(engines, backend, yard, per_step) if precision == "int8" and backend == "ort" else None
    return {"bundle": str(bundle.path), "family": m.family, "precision": precision, "backend": backend,
            "batches": batches, "guided": guided,
            "steps": steps, **yard,
            "engines": engines, "per_step": per_step, "speedup_vs": ratios, "loadavg": load,
            "checkpoint": checkpoint, "int8": int8, "cpu_flags": cpu_flags()}


def _int8_summary(engines: dict, backend: str, yard: dict, per_step: dict) -> dict:
    """INT8 over FP32 at each sampler step's call batch (2·B when guided), and that ratio as a
    share of the machine's own INT8-over-FP32 GEMM ratio, all from this run."""
    machine = yard["ort_sgemm"]["p50"] / yard["ort_igemm"]["p50"]
    fp32, int8 = engines[f"{backend}-fp32"]["batches"], engines[backend]["batches"]
    model = {b: fp32[str(s["call_batch"])]["p50"] / int8[str(s["call_batch"])]["p50"] for b, s in per_step.items()}
    return {"machine_ratio": machine, "model_ratio": model, "of_machine": {b: r / machine for b, r in model.items()},
            "call_batch": {b: s["call_batch"] for b, s in per_step.items()}}


def cpu_flags() -> list[str]:
    """The x86 vector extensions that decide INT8 speed (VNNI: 8-bit dot products)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "fma")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = re.search(r"^flags\s*:(.*)$", text, re.M)
    found = set(line.group(1).split()) if line else set()
    return [f for f in wanted if f in found]


def format_report(r: dict) -> str:
    """One screen: per engine and batch the p50/p90 ms, first call, GFLOP/s, ratio vs the backend."""
    be = r["backend"]
    lines = [f"{r['family']} {r['precision']} · {Path(r['bundle']).name} · load average "
             f"{r['loadavg']['uptime_before']} -> {r['loadavg']['uptime_after']}",
             f"sgemm {r['sgemm']['size']}³: NumPy {r['sgemm']['gflops_per_s']:.1f} GFLOP/s (p50 {r['sgemm']['p50']:.1f} ms), "
             f"ONNX Runtime MatMul {r['ort_sgemm']['gflops_per_s']:.1f} GFLOP/s (p50 {r['ort_sgemm']['p50']:.1f} ms), "
             f"INT8 {r['ort_igemm']['p50']:.1f} ms ({r['ort_sgemm']['p50'] / r['ort_igemm']['p50']:.2f}x FP32); "
             f"CPU: {' '.join(r.get('cpu_flags') or ['?'])}",
             f"{'engine':<8} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'first ms':>9} {'GFLOP/s':>8} "
             f"{'%np':>5} {'%ortmm':>6} {'vs ' + be:>8}"]
    for name, e in r["engines"].items():
        for b, s in e["batches"].items():
            ratio = r["speedup_vs"].get(name, {}).get(b)
            lines.append(f"{name:<8} {b:>5} {s['p50']:>9.2f} {s['p90']:>9.2f} {s['first_ms']:>9.1f} "
                         f"{s['gflops_per_s']:>8.1f} {100 * s['gflops_per_s'] / r['sgemm']['gflops_per_s']:>4.0f}% "
                         f"{100 * s['gflops_per_s'] / r['ort_sgemm']['gflops_per_s']:>5.0f}% "
                         f"{(f'{ratio:.2f}x' if ratio else '–'):>8}")
    for name, e in r["engines"].items():
        note = f" ({e['weights']})" if e.get("weights") else ""
        lines.append(f"{name}: load {e['load_s']:.2f} s, peak RSS {e['peak_rss_mb']:.0f} MB{note}")
    for b, s in r["per_step"].items():
        what = f"one call at batch {s['call_batch']} (guidance doubles the batch)" if r["guided"] else "one call"
        lines.append(f"batch {b}: {s['step_ms']:.1f} ms per step ({what}), {s['image_ms']:.1f} ms per image "
                     f"over {r['steps']} steps")
    if r.get("int8"):
        i8 = r["int8"]
        lines.append("int8 over fp32 (same run): " + ", ".join(
            f"batch {b} (calls at {i8['call_batch'][b]}): {x:.2f}x = {100 * i8['of_machine'][b]:.0f}% of the machine's "
            f"INT8 GEMM ratio "
            f"{i8['machine_ratio']:.2f}x" for b, x in i8["model_ratio"].items()))
    lines.append(f"ratios: the engine's p50 over {be}'s at the same batch (> 1: {be} is faster); GFLOP/s: the "
                 "graph's MatMul/Gemm/Conv flops at the batch over the p50, as % of each sgemm")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m edgediff.runtime.bench worker ort|sgemm OPTIONS_JSON (use `edgediff bench`)")
