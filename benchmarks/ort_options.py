"""Which ONNX Runtime settings make a bundle's FP32 model faster without changing its results.

    .venv/bin/python benchmarks/ort_options.py BUNDLE [BUNDLE ...] [--batch 8] [--repeats 15] [--threads 2]
        [--variants base,spin_off,...] [--profile]

Every variant gets its own session over the same graph (weights perturbed first: all-zero and
all-one initialisers, e.g. DiT's adaLN-Zero layers, would make outputs trivially equal), all
sessions live in this one process and are timed in interleaved rounds, so they share the
machine's noise. Per variant: p50/p90 ms at the batch, the ratio to ``base`` (the backend's
settings before issue 17), the session load time, and the rel-L2 of its outputs against
``base`` (rung 1 holds for the variant when this is far below 1e-5: ``base`` itself is the
graph the export validated). ``--profile`` prints ORT's profiler's top ops of ``base``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgediff.runtime.bench import bench_feed, percentiles
from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.parity import rel_l2


def perturbed_copy(model_path: Path, out: Path) -> Path:
    """The graph with every all-zero / all-one float initialiser nudged (N(0, 0.02), seeded)."""
    model = onnx.load(str(model_path))
    rng = np.random.default_rng(0)
    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 1 and (np.all(arr == 0) or np.all(arr == 1)):
            arr = arr + rng.normal(0, 0.02, arr.shape).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(out))
    return out


def fused_copy(model_path: Path, out: Path, model_type: str, config: dict) -> Path:
    """ORT's transformer optimizer, exact fusions only (attention, LayerNorm/SkipLayerNorm,
    exact Gelu, GroupNorm for 'unet'); FastGelu / Gelu approximation stay off."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions(model_type)
    opts.enable_gelu_approximation = False
    opts.enable_gemm_fast_gelu = False
    opts.enable_bias_gelu = False        # BiasGelu is exact, but keep the graph's own order of adds
    opts.enable_skip_layer_norm = False  # ORT's own optimizer fuses SkipLayerNorm at load; this one trips on affine-free LayerNorm
    heads = int(config.get("num_heads") or 0)
    width = int(config.get("hidden_size") or config.get("embed_dim") or 0)
    model = optimize_model(str(model_path), model_type=model_type, num_heads=heads, hidden_size=width,
                           optimization_options=opts, opt_level=0,
                           use_gpu=False, only_onnxruntime=False)
    model.save_model_to_file(str(out))
    return out


def session(path: Path, threads: int, *, level="all", spin=True, arena=True, mem_pattern=True,
            parallel=False, inter=None, denormal_zero=False, optimized_out: Path | None = None,
            profile=False) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    o.intra_op_num_threads = threads
    if inter:
        o.inter_op_num_threads = inter
    o.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    o.enable_cpu_mem_arena = arena
    o.enable_mem_pattern = mem_pattern
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if denormal_zero:
        o.add_session_config_entry("session.set_denormal_as_zero", "1")
    if optimized_out:
        o.optimized_model_filepath = str(optimized_out)
    o.enable_profiling = profile
    return ort.InferenceSession(str(path), sess_options=o, providers=["CPUExecutionProvider"])


FUSION_TYPE = {"dit": "vit", "uvit": "vit", "ddpm": "unet", "adm": "unet", "ddm": "unet", "lucid": "unet",
               "ddm_cond": "unet"}


def variants(path: Path, family: str, config: dict, threads: int, tmp: Path) -> dict:
    """name -> (a no-argument session factory, an optional note)."""
    v = {"base": lambda: session(path, threads),
         "spin_off": lambda: session(path, threads, spin=False),
         "extended": lambda: session(path, threads, level="extended"),
         "no_arena": lambda: session(path, threads, arena=False),
         "no_mem_pattern": lambda: session(path, threads, mem_pattern=False),
         "parallel_inter2": lambda: session(path, threads, parallel=True, inter=2),
         "denormal_zero": lambda: session(path, threads, denormal_zero=True),
         "threads1": lambda: session(path, 1)}

    def saved():
        opt = tmp / "saved_opt.onnx"
        if not opt.exists():
            session(path, threads, optimized_out=opt)
        return session(opt, threads, level="basic")
    v["saved_optimized"] = saved

    def fused():
        out = tmp / "fused.onnx"
        if not out.exists():
            fused_copy(path, out, FUSION_TYPE.get(family, "bert"), config)
        return session(out, threads)
    v["fused"] = fused
    return v


def run_bundle(bundle_dir: str, batch: int, repeats: int, threads: int, names: list[str] | None,
               iobinding: bool, profile: bool) -> dict:
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    feed = bench_feed(m.inputs, m.time, m.num_classes, batch)
    out_names = [m.graph_outputs.get(n, n) for n in m.outputs]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        path = perturbed_copy(bundle.model_path("fp32"), tmp / "model.onnx")
        factories = variants(path, m.family, m.config, threads, tmp)
        sessions, load_s, errors = {}, {}, {}
        for name, make in factories.items():
            if names and name not in names and name != "base":
                continue
            start = time.perf_counter()
            try:
                sessions[name] = make()
            except (Exception, SystemExit) as exc:  # a fusion or option this ORT build cannot run
                errors[name] = str(exc).strip().splitlines()[0][:160]
                continue
            load_s[name] = time.perf_counter() - start
        ref = dict(zip(out_names, sessions["base"].run(out_names, feed)))
        drift = {}
        for name, s in sessions.items():
            got = dict(zip(out_names, s.run(out_names, feed)))
            drift[name] = max(rel_l2(ref[n], got[n]) for n in out_names)
            s.run(out_names, feed)
        timers = {name: (lambda s=s: s.run(out_names, feed)) for name, s in sessions.items()}
        if iobinding:
            timers["iobinding"] = bound_runner(sessions["base"], feed, out_names)
            load_s["iobinding"] = load_s["base"]
            drift["iobinding"] = 0.0
        ms = defaultdict(list)
        keys = list(timers)
        for r in range(repeats):
            for name in keys[r % len(keys):] + keys[:r % len(keys)]:
                start = time.perf_counter()
                timers[name]()
                ms[name].append((time.perf_counter() - start) * 1e3)
        top = profile_top(path, threads, feed, out_names) if profile else None
    stats = {name: percentiles(v) for name, v in ms.items()}
    rows = {name: {**st, "speedup": stats["base"]["p50"] / st["p50"], "load_s": load_s[name],
                   "rel_l2_vs_base": drift[name]} for name, st in stats.items()}
    return {"bundle": bundle_dir, "family": m.family, "batch": batch, "threads": threads, "rows": rows,
            "errors": errors, "profile_top": top}


def bound_runner(sess, feed: dict, out_names: list[str]):
    """IOBinding with inputs bound once and outputs preallocated (what a caller reusing
    buffers could do)."""
    binding = sess.io_binding()
    for name, arr in feed.items():
        binding.bind_cpu_input(name, arr)
    outs = {o.name: o for o in sess.get_outputs()}
    bufs = [np.empty_like(arr) for arr in sess.run(out_names, feed)]     # kept alive by the closure
    for name, buf in zip(out_names, bufs):
        binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
    assert set(out_names) <= set(outs)
    return lambda: (sess.run_with_iobinding(binding), bufs)


def profile_top(path: Path, threads: int, feed: dict, out_names: list[str], k: int = 8) -> list:
    s = session(path, threads, profile=True)
    for _ in range(3):
        s.run(out_names, feed)
    trace_path = Path(s.end_profiling())          # ORT writes it into the current directory
    trace = json.loads(trace_path.read_text())
    trace_path.unlink()                           # read once; never left in the user's tree
    by_op = defaultdict(float)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            by_op[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0) / 1e3
    total = sum(by_op.values()) or 1.0
    return [(op, round(100 * t / total, 1)) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:k]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--variants", help="comma-separated subset (base is always run)")
    p.add_argument("--iobinding", action="store_true", help="also time IOBinding with preallocated outputs")
    p.add_argument("--profile", action="store_true", help="print the profiler's top ops of base")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args()
    results = []
    for b in args.bundles:
        before = os.getloadavg()
        r = run_bundle(b, args.batch, args.repeats, args.threads, args.variants and args.variants.split(","),
                       args.iobinding, args.profile)
        r["loadavg"] = [round(x, 2) for x in (*before, *os.getloadavg())]
        results.append(r)
        print(f"\n{r['family']} ({Path(b).name}) batch {r['batch']}, {r['threads']} threads, "
              f"load average before/after {r['loadavg'][:3]} / {r['loadavg'][3:]}")
        print(f"{'variant':<16} {'p50 ms':>9} {'p90 ms':>9} {'speedup':>8} {'load s':>7} {'rel-L2 vs base':>15}")
        for name, row in r["rows"].items():
            print(f"{name:<16} {row['p50']:>9.2f} {row['p90']:>9.2f} {row['speedup']:>7.3f}x {row['load_s']:>7.2f} "
                  f"{row['rel_l2_vs_base']:>15.2e}")
        for name, err in r["errors"].items():
            print(f"{name:<16} failed: {err}")
        if r["profile_top"]:
            print("top ops (base): " + ", ".join(f"{op} {pct}%" for op, pct in r["profile_top"]))
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
