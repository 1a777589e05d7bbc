"""Sharded generation against one process at equal cores: what do shards, files and Ray cost?

    .venv/bin/python benchmarks/shard_overhead.py --bundle build/digits-dit [-n 512] [--cores 2]

Draws the same ``-n`` samples four ways and checks they are bit-identical:
  single        one Pipeline, ``--cores`` intra-op threads (what ``edgediff generate`` does)
  single-1t     one Pipeline, one thread (reference)
  local shards  ``generate --out-dir`` in-process: one Pipeline, ``--cores`` threads, shards written
  ray shards    ``generate --out-dir --ray``: ``--cores`` actors of one thread each on a local Ray
                of ``--cores`` CPUs (Ray's own start timed apart: a cluster is usually up already)
Prints seconds and the overhead of each against ``single`` (target: ray ≤ 15%).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def single(bundle: str, n: int, threads: int, batch: int, steps: int | None) -> np.ndarray:
    from edgediff.runtime import Pipeline

    with Pipeline.from_bundle(bundle, threads=threads, max_batch=batch) as pipe:
        return pipe(n, seed=0, batch=batch, steps=steps).images


def sharded(spec, out: Path, runner) -> np.ndarray:
    from edgediff.runtime.shards import read_shards, run_shards

    run_shards(spec, out, runner)
    return read_shards(out)["images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="Bundle directory (e.g. build/digits-dit from `make demo`).")
    ap.add_argument("-n", type=int, default=512, help="Samples.")
    ap.add_argument("--cores", type=int, default=2, help="Cores for every variant.")
    ap.add_argument("--batch", type=int, default=16, help="Samples per backend batch.")
    ap.add_argument("--shard-size", type=int, default=64, help="Samples per shard.")
    ap.add_argument("--steps", type=int, help="Sampler steps (default: the bundle's).")
    args = ap.parse_args()

    from edgediff.runtime.shards import WorkerOptions, local_runner, make_spec

    rows, tmp = {}, Path(tempfile.mkdtemp(prefix="shard-overhead-"))
    spec = make_spec(args.bundle, args.n, args.shard_size, seed=0, steps=args.steps)
    rows["single"], ref = timed(lambda: single(args.bundle, args.n, args.cores, args.batch, args.steps))
    rows["single-1t"], one = timed(lambda: single(args.bundle, args.n, 1, args.batch, args.steps))
    opts = WorkerOptions(batch=args.batch, threads=args.cores)
    rows["local shards"], loc = timed(lambda: sharded(spec, tmp / "local", local_runner(spec, opts)))
    import ray

    from edgediff.runtime.distributed import RayRunner

    rows["ray start"], _ = timed(lambda: ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False))
    try:
        def actors_up():
            runner = RayRunner(spec, WorkerOptions(batch=args.batch), args.cores, 1)
            ray.get([a.pid.remote() for a in runner.actors])       # each has opened the bundle
            return runner
        rows["ray actors up"], runner = timed(actors_up)
        rows["ray shards"], got = timed(lambda: sharded(spec, tmp / "ray", runner))
    finally:
        ray.shutdown()
    rows["ray shards + actors"] = rows["ray actors up"] + rows["ray shards"]
    best = min(rows["single"], rows["single-1t"])
    same = all(np.array_equal(ref, x) for x in (one, loc, got))
    report = {"n": args.n, "cores": args.cores, "shard_size": args.shard_size, "bit_identical": same,
              "seconds": {k: round(v, 2) for k, v in rows.items()},
              "overhead_vs_single": {k: f"{100 * (rows[k] / rows['single'] - 1):+.1f}%"
                                     for k in ("single-1t", "local shards", "ray shards", "ray shards + actors")},
              "overhead_vs_best_single": {k: f"{100 * (rows[k] / best - 1):+.1f}%"
                                          for k in ("ray shards", "ray shards + actors")}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
