"""Peak RSS of decoding many latents in bounded batches (issue: large runs must stay flat).

Decodes N latents through a bundle's decoder exactly as ``Pipeline`` does
(``decode_images``, ``--decode-batch`` at a time), in a fresh process per N, and prints the
peak RSS of each run: it should grow only by the latents and the uint8 images kept, not by N
float images or decoder activations.

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
from edgediff.runtime.pipeline import decode_images
bundle = read_bundle(sys.argv[1])
decoder = load_backend(bundle, "ort", component="decoder", threads=2)
shape = bundle.manifest.component("decoder").inputs["latents"]["shape"][1:]
n, batch = int(sys.argv[2]), int(sys.argv[3])
images = []
start = time.perf_counter()
z = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)   # all N latents, as Pipeline holds them
images = [decode_images(decoder, z, batch)]     # what Pipeline.__call__ does with them
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
