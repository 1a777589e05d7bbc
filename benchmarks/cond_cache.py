"""Speed-up of encoding each condition once over recomputing it at every step.

    .venv/bin/python benchmarks/cond_cache.py BUNDLE [--conditions 4] [-n 2] [--steps 10]

DDM-Public's ``cond_unet.Unet`` runs its condition backbone inside every forward, so the
official sampler pays for it at every step. edgediff's bundle splits the backbone out
(``cond_encoder.onnx``) and the runtime feeds its features to every step. Both ways are
timed here in one run, on the same bundle, backend, samples and noise; the outputs must be
identical (the recomputed features are the same numbers).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


class EncodeEveryCall:
    """A denoiser backend that recomputes the condition features at each call, as the
    official forward does: the feed carries the raw condition rows instead of features."""

    def __init__(self, pipe, conds: np.ndarray):
        self.pipe, self.conds = pipe, conds

    def infer(self, feed):
        rows = feed.pop("__cond_rows__")
        feats = self.pipe.cond_encoder.infer({"cond": np.ascontiguousarray(self.conds[rows])})
        return self.pipe.backend.infer({**feed, **feats})


class RowsOnly:
    """``ConditionFeatures`` stand-in that hands out condition indices, not features."""

    def __init__(self, index: np.ndarray):
        self.index = index

    def rows(self, start, stop):
        return {"__cond_rows__": self.index[start:stop]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--conditions", type=int, default=4, help="Condition images (random).")
    parser.add_argument("-n", type=int, default=2, help="Samples per condition.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    from edgediff.runtime.conditions import ConditionFeatures
    from edgediff.runtime.pipeline import Pipeline, generate

    with Pipeline.from_bundle(args.bundle, threads=args.threads) as pipe:
        shape = pipe.cond_encoder.inputs["cond"]["shape"][1:]
        conds = np.random.default_rng(0).uniform(-1, 1, (args.conditions, *shape)).astype(np.float32)
        index = np.repeat(np.arange(args.conditions), args.n)
        total = len(index)
        start = time.perf_counter()
        feats = ConditionFeatures(pipe.encode_conditions(conds), index)
        cached = generate(pipe.backend, pipe.manifest, total, steps=args.steps, batch=total, conditions=feats)
        t_cached = time.perf_counter() - start
        start = time.perf_counter()
        every = generate(EncodeEveryCall(pipe, conds), pipe.manifest, total, steps=args.steps, batch=total,
                         conditions=RowsOnly(index))
        t_every = time.perf_counter() - start
    same = np.array_equal(cached.samples, every.samples)
    print(f"{args.conditions} conditions x {args.n} samples, {args.steps} steps, batch {total}")
    print(f"encoder once per condition: {t_cached:.2f} s")
    print(f"encoder at every step:      {t_every:.2f} s")
    print(f"speed-up of caching: {t_every / t_cached:.2f}x  (identical samples: {same})")


if __name__ == "__main__":
    main()
