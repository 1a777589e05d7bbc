"""The PyTorch engines of ``edgediff bench`` (eager and ``torch.compile``): one process each,
driven by :func:`edgediff.runtime.bench.serve` over stdin/stdout.

    python -m edgediff.export.bench_torch eager|compile OPTIONS_JSON

The model is the bundle's family at the bundle's config: with ``checkpoint`` its weights
(loaded strictly), else the family's random initialisation, which times the same shapes
(dense kernels take as long on random weights as on trained ones).
"""
from __future__ import annotations

import json
import sys

import torch

from edgediff.runtime.bench import bench_feed, serve
from edgediff.runtime.bundle import read_bundle

from .reference import build_reference


def torch_loader(engine: str, opts: dict):
    def load():
        torch.set_num_threads(int(opts["threads"]))
        m = read_bundle(opts["bundle"], verify=False).manifest     # run_bench verified it
        _, module = build_reference(m.family, m.config, opts.get("checkpoint"))
        run = torch.compile(module) if engine == "compile" else module
        tensors = {}

        @torch.inference_mode()
        def call(batch: int):
            if batch not in tensors:
                feed = bench_feed(m.inputs, m.time, m.num_classes, batch)
                tensors[batch] = [torch.from_numpy(feed[n]) for n in m.inputs]
            return run(*tensors[batch])
        return call
    return load


def main(argv: list[str]) -> None:
    engine, opts = argv[0], json.loads(argv[1])
    if engine not in ("eager", "compile"):
        raise SystemExit(f"unknown engine {engine!r}; choose eager or compile")
    weights = "checkpoint " + opts["checkpoint"] if opts.get("checkpoint") else \
        "random init at the bundle's config (shape-identical timing)"
    serve(torch_loader(engine, opts), opts["batches"], opts["warmup"], extra={"weights": weights})


if __name__ == "__main__":
    main(sys.argv[1:])
