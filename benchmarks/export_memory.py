"""Export a named configuration in a child process and print wall time and peak RSS.

    .venv/bin/python benchmarks/export_memory.py --family dit --size DiT-XL/2

The issue's target: peak RSS under 3x the FP32 weight size for DiT-XL/2 (external data).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def weight_bytes(family: str, size: str) -> int:
    import torch

    from edgediff.export.models import get_family

    fam = get_family(family)
    with torch.device("meta"):
        module = fam.build(fam.configs[size])
    return sum(t.numel() * 4 for t in module.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="dit")
    parser.add_argument("--size", default="DiT-XL/2")
    args = parser.parse_args()
    weights = weight_bytes(args.family, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "edgediff.cli", "export", "--family", args.family,
               "--size", args.size, "--out", str(Path(tmp) / "bundle")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(proc.stdout.strip() or proc.stderr.strip()[-500:])
    print(f"{args.family} {args.size}: weights {weights / 2**30:.2f} GiB, export+validate {wall:.0f} s, "
          f"peak RSS {peak / 2**30:.2f} GiB = {peak / weights:.2f}x weights (target < 3x)")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
