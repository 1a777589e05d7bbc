"""Peak RSS of decoding many latents in bounded batches (issue: large runs must stay flat).

Decodes N latents through a bundle's decoder with ``--decode-batch`` at a time, in a fresh
process per N, and prints the peak RSS of each run: with bounded batches it should grow only
by the uint8 images kept (N·H·W·C bytes), not by N decoder activations.

    python benchmarks/decode_memory.py BUNDLE [--counts 100,1000] [--decode-batch 16]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

PROBE = """
import resource, sys, time
import numpy as np
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import load_backend
from edgediff.runtime.images import to_uint8
from edgediff.runtime.pipeline import decode
bundle = read_bundle(sys.argv[1])
decoder = load_backend(bundle, "ort", component="decoder", threads=2)
shape = bundle.manifest.component("decoder").inputs["latents"]["shape"][1:]
n, batch = int(sys.argv[2]), int(sys.argv[3])
images = []
start = time.perf_counter()
for i in range(0, n, 256):      # latents arrive in sampler batches; only uint8 images are kept
    z = np.random.default_rng(i).standard_normal((min(256, n - i), *shape)).astype(np.float32)
    images.append(to_uint8(decode(decoder, z, batch)))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{n} {sum(x.nbytes for x in images) / 2**20:.1f} {peak:.1f} {seconds:.1f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--decode-batch", type=int, default=16)
    args = parser.parse_args()
    print(f"decode-batch {args.decode_batch}: n, images MiB, peak RSS MiB, seconds")
    for n in (int(c) for c in args.counts.split(",")):
        out = subprocess.run([sys.executable, "-c", PROBE, args.bundle, str(n), str(args.decode_batch)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
