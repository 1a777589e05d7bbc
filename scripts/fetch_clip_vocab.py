"""Build CLIP's BPE tokenizer files (vocab.json, merges.txt) from the open_clip_torch wheel.

OpenAI publishes CLIP's byte-pair vocabulary only inside its code; the copy that pip can
fetch is ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the ``open_clip_torch`` wheel. This
script takes that one file from the wheel (nothing else is kept) and derives the two files
the ``tokenizers`` library and transformers' ``CLIPTokenizer`` read, in CLIP's own order:

  ids 0..255      the 256 byte symbols (printable bytes first, the rest remapped above 255)
  ids 256..511    the same symbols with the end-of-word marker ``</w>``
  ids 512..49405  one token per merge, in merge order (the first 48 894 merge lines)
  49406, 49407    ``<|startoftext|>``, ``<|endoftext|>``

Usage:  python scripts/fetch_clip_vocab.py OUT_DIR [--wheel open_clip_torch-3.3.0-...whl]
Without --wheel it runs ``pip download --no-deps open_clip_torch==3.3.0``.
The vocabulary is OpenAI CLIP's, MIT licence; OUT_DIR/source.json records where it came from.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgediff.runtime import tokenizer

WHEEL_SPEC = "open_clip_torch==3.3.0"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges so the vocab totals 49 408
LICENCE = "MIT (OpenAI CLIP, Copyright (c) 2021 OpenAI); redistributed in open_clip_torch (MIT)"


def derive(bpe_text: str) -> list[tuple[str, str]]:
    """CLIP's merges (rank order) from the text of bpe_simple_vocab_16e6.txt."""
    lines = bpe_text.split("\n")[1:N_MERGES + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"unexpected vocabulary file: {len(merges)} merge lines")
    return merges


def read_member(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(MEMBER)


def download_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC, "-d", str(dest)],
                   check=True)
    return next(dest.glob("open_clip_torch-*.whl"))


def write_files(out: Path, wheel: Path) -> dict:
    raw = read_member(wheel)
    vocab = tokenizer.write_files(out, derive(gzip.decompress(raw).decode("utf-8")))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    source = {"wheel": wheel.name, "member": MEMBER, "member_sha256": hashlib.sha256(raw).hexdigest(),
              "vocab_sha256": sha(out / "vocab.json"), "merges_sha256": sha(out / "merges.txt"),
              "vocab_size": len(vocab), "licence": LICENCE}
    (out / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return source


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="directory to write vocab.json, merges.txt, source.json")
    ap.add_argument("--wheel", type=Path, help="a local open_clip_torch wheel (default: pip download it)")
    args = ap.parse_args(argv)
    if args.wheel:
        print(json.dumps(write_files(args.out, args.wheel), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(write_files(args.out, download_wheel(Path(tmp))), indent=2))


if __name__ == "__main__":
    main()
