"""Per-step cost of everything but the backend call, and the runtime's import time.

    .venv/bin/python benchmarks/step_overhead.py [--bundle DIR] [--batch 8] [--steps 20]

Without --bundle it exports DiT-S/2 (random weights) to a temporary bundle first. Targets
(issue: Runtime): overhead ≤ 1% of step time at batch 8 on CPU; ``import edgediff.runtime``
≤ 0.3 s. Both are measured in this one run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class TimedBackend:
    """Wraps a backend and accumulates the wall time spent inside infer()."""

    def __init__(self, backend):
        self.backend, self.seconds, self.calls = backend, 0.0, 0

    def infer(self, feed):
        start = time.perf_counter()
        out = self.backend.infer(feed)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def import_seconds(repeats: int = 5) -> float:
    code = "import time; s = time.perf_counter(); import edgediff.runtime; print(time.perf_counter() - s)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(repeats)]
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args()
    from edgediff.runtime import read_bundle
    from edgediff.runtime.backends import load_backend
    from edgediff.runtime.pipeline import generate, resolve_labels

    with tempfile.TemporaryDirectory() as tmp:
        path = args.bundle
        if path is None:
            from edgediff.export.bundle import export_bundle
            from edgediff.export.models import FAMILIES

            path = Path(tmp) / "dit-s2"
            export_bundle("dit", FAMILIES["dit"].configs["DiT-S/2"], path, log=lambda m: None)
        bundle = read_bundle(path)
        timed = TimedBackend(load_backend(bundle, "ort"))
        labels = resolve_labels(bundle.manifest, args.batch, None)
        kw = dict(sampler=args.sampler, steps=args.steps, batch=args.batch, labels=labels, guidance=args.guidance)
        generate(timed.backend, bundle.manifest, args.batch, **dict(kw, steps=2))   # warm-up
        start = time.perf_counter()
        generate(timed, bundle.manifest, args.batch, **kw)
        total = time.perf_counter() - start
    overhead = total - timed.seconds
    print(f"{bundle.manifest.family} batch {args.batch}, {args.sampler} {args.steps} steps: {total / args.steps * 1e3:.1f} ms/step, "
          f"backend {timed.seconds / timed.calls * 1e3:.1f} ms/call, overhead {overhead / args.steps * 1e3:.3f} ms/step "
          f"= {100 * overhead / total:.3f}% of step time (target ≤ 1%)")
    print(f"import edgediff.runtime: {import_seconds():.3f} s (target ≤ 0.3 s)")


if __name__ == "__main__":
    main()
