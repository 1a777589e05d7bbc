"""Soak: many images in one process, resident memory printed at the start, middle and end.

    .venv/bin/python benchmarks/soak.py [BUNDLE] [-n 2000] [--rounds 20] [--steps 10]

A long-lived generator (a server, a dataset job) must not grow: the run draws ``-n`` images
in ``--rounds`` calls of one Pipeline (each call a fresh ``generate``: noise streams,
guidance halves, the PNG/npz encoders' buffers), then reports RSS after the first round
(warm: sessions and arenas allocated), half-way and at the end. Passes when the end is within
10% of the warm figure. Default bundle: the embedded digits DiT, exported on first use to
build/digits-dit.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    """Current resident set size (Linux /proc), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: the embedded digits DiT)")
    ap.add_argument("-n", type=int, default=2000, help="images in all")
    ap.add_argument("--rounds", type=int, default=20, help="generate calls the images are split into")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps")
    ap.add_argument("--out", default="build/soak", help="directory for the last round's PNG/npz")
    args = ap.parse_args(argv)

    from edgediff.runtime.images import save_outputs
    from edgediff.runtime.pipeline import Pipeline

    bundle = args.bundle
    if bundle is None:
        from edgediff.digits.demo import ensure_bundle

        bundle = ensure_bundle("dit", "build/digits-dit", log=lambda m: None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-args.n // args.rounds)
    start, figures, done = time.perf_counter(), {"start": rss_mb()}, 0
    with Pipeline.from_bundle(bundle) as pipe:
        for r in range(args.rounds):
            gen = pipe(min(per, args.n - done), steps=args.steps, seed=0, first=done, batch=50)
            done += len(gen.samples)
            save_outputs(pipe.manifest, gen, png=out / "soak.png", npz=out / "soak.npz")
            if r == 0:
                figures["warm"] = rss_mb()
            if r == args.rounds // 2 - 1:
                figures["middle"] = rss_mb()
    figures["end"] = rss_mb()
    growth = figures["end"] / figures["warm"] - 1
    print(f"{done} images in {args.rounds} rounds, {time.perf_counter() - start:.1f} s")
    print("RSS MB: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()) + f"; end vs warm {growth:+.1%}")
    ok = abs(growth) <= 0.10
    print("PASS: flat within 10%" if ok else "FAIL: memory grew more than 10%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
