"""The INT8 speed ceiling of a model on ONNX Runtime CPU: every layer INT8, no FP32 island.

`edgediff add-precision --precision int8` installs only gated models (islands chosen by
measured error, quality judged), and its search takes minutes per trial on large models.
This benchmark answers the other question — how fast can INT8 be on this CPU for this
architecture — on any bundle, random weights included: it copies the bundle, quantizes the
denoiser exactly as add-precision does (ModelOpt PTQ on trajectory feeds, Conv outputs
quantized) but with no island and no gate, records it in the copy as ``gate: not run``, and
runs `edgediff bench --precision int8` there: INT8, FP32 and PyTorch eager in one interleaved
run, beside the machine's own INT8-over-FP32 GEMM ratio.

    python benchmarks/int8_speed.py BUNDLE [--batch 8] [--samples 4] [--against eager] [--keep DIR]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def quantize_copy(bundle: Path, work: Path, samples: int) -> Path:
    from edgediff.calibration.feeds import record_feeds
    from edgediff.export.int8 import conv_output_peaks, quantize
    from edgediff.runtime.bundle import finalize_manifest, read_bundle
    from edgediff.runtime.pipeline import Pipeline

    copy = work / bundle.name
    shutil.copytree(bundle, copy)
    with Pipeline.from_bundle(copy) as pipe:
        feeds = record_feeds(pipe, samples=samples, cap=4, seed=0)
    fp32 = copy / "model.onnx"
    count = quantize(fp32, copy / "model_int8.onnx", feeds.arrays, conv_peaks=conv_output_peaks(fp32, feeds))
    m = read_bundle(copy).manifest
    record = {"tool": "benchmarks/int8_speed.py: every layer INT8, no island", "quantizers": count,
              "gate": {"passed": None, "note": "not run: a speed ceiling, not a deployable model"}}
    finalize_manifest(copy, m.replace(models={**m.models, "int8": "model_int8.onnx"},
                                      precision={**m.precision, "int8": record}))
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", default="8", help="batch sizes for `edgediff bench`")
    ap.add_argument("--samples", type=int, default=4, help="calibration trajectories")
    ap.add_argument("--against", default="eager", help="PyTorch engines timed in the same run ('' for none)")
    ap.add_argument("--repeats", default="10")
    ap.add_argument("--keep", type=Path, help="keep the quantized copy here instead of a temporary directory")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="int8-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        copy = quantize_copy(args.bundle, work, args.samples)
        cmd = [str(Path(sys.executable).with_name("edgediff")), "bench", str(copy), "--precision", "int8", "--batch", args.batch,
               "--repeats", args.repeats] + (["--against", args.against] if args.against else [])
        subprocess.run(cmd, check=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
