"""runtime/tokenizer.py: CLIP ids without torch or transformers, checked against an independent
plain-Python BPE (official_clip_tokenizer.py) and transformers' CLIPTokenizer built from the
same files (transformers 5's is tokenizers-backed and has no ftfy step, so it is fed
ftfy-repaired text; transformers 4.57.6's slow CLIPTokenizer with ftfy 6.3.1, U-ViT's path,
gave identical ids on these prompts and 20 more in development, 40/40, but 4.57 cannot share
an environment with diffusers 0.42). The full CLIP vocabulary comes from scripts/fetch_clip_vocab.py (the open_clip_torch
wheel); a small vocabulary derived in the test runs everywhere."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.tokenizer import ClipTokenizer

from official_clip_tokenizer import PlainClipTokenizer, byte_table  # tests/runtime is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "", "a photo of a cat", "A Photo OF a  CAT!!!", "hello, world... (ok?) [yes] {no} ~`@#$%^&*",
    "don't we'll they've I'm she's it'd", "café naïve résumé Ångström", "Über straße",
    "東京タワー の 夜景", "emoji 🐱🚀 test", "numbers 1234567 3.14159 -42 1e10",
    "  leading\tand\ntrailing  ", "<|endoftext|> inside <|startoftext|>", "x-ray x_ray x/ray",
    "Ελληνικά Кириллица العربية", "tab\u00a0nbsp", "e\u0301 combining", "A " * 100, "word" * 50,
    "an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation, "
    "by greg rutkowski, cinematic lighting, volumetric fog, sharp focus, octane render, "
    "concept art, matte painting, golden hour, wide angle, masterpiece, award winning photo",
    # ftfy's repairs: html entity, curly quotes, ligature, full width, mojibake, control character
    "Tom &amp; Jerry", "“curly quotes” and ‘single’", "ﬁne ligature", "ＦＵＬＬ width", "cafÃ© mojibake",
    "ctrl\x07char",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("fetch_clip_vocab", ROOT / "scripts" / "fetch_clip_vocab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A CLIP-layout vocabulary with a few dozen merges learnt from the test prompts' letters."""
    d = tmp_path_factory.mktemp("small_vocab")
    base = list(byte_table().values())
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "r"), ("w", "or"), ("wor", "d</w>"), ("p", "h"),
              ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>")]
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    return d


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
    """The real CLIP vocabulary, from $EDGEDIFF_OPEN_CLIP_WHEEL or pip; skipped when neither is at hand."""
    out = tmp_path_factory.mktemp("clip_vocab")
    wheel = os.environ.get("EDGEDIFF_OPEN_CLIP_WHEEL")
    args = [sys.executable, str(ROOT / "scripts" / "fetch_clip_vocab.py"), str(out)]
    args += ["--wheel", wheel] if wheel else []
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.skip("open_clip_torch wheel not available: pip download timed out")
    if proc.returncode != 0:
        pytest.skip(f"open_clip_torch wheel not available: {proc.stderr.strip()[-200:]}")
    return out


def _reference_ids(directory: Path, prompts: list[str]) -> list[list[int]]:
    import ftfy

    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    if getattr(ref, "fix_text", None) is None:     # transformers 5: no ftfy step of its own
        prompts = [ftfy.fix_text(p) for p in prompts]
    return ref(prompts, max_length=77, padding="max_length", truncation=True)["input_ids"]


def test_small_vocab_matches_plain_bpe(small_vocab):
    ids = ClipTokenizer.from_dir(small_vocab)(PROMPTS)
    plain = PlainClipTokenizer(small_vocab)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int64
    assert [list(row) for row in ids] == [plain(p) for p in PROMPTS]


def test_small_vocab_matches_transformers(small_vocab):
    ids = ClipTokenizer.from_dir(small_vocab)(PROMPTS)
    assert [list(row) for row in ids] == _reference_ids(small_vocab, PROMPTS)


def test_clip_vocab_derivation(clip_vocab):
    vocab = json.loads((clip_vocab / "vocab.json").read_text("utf-8"))
    source = json.loads((clip_vocab / "source.json").read_text("utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert source["member_sha256"] == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert "MIT" in source["licence"]


def test_clip_ids_match_transformers_and_plain_bpe(clip_vocab):
    ids = ClipTokenizer.from_dir(clip_vocab)(PROMPTS)
    ours = [list(row) for row in ids]
    assert ours == [PlainClipTokenizer(clip_vocab)(p) for p in PROMPTS]
    assert ours == _reference_ids(clip_vocab, PROMPTS)
    assert ours[1][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", CLIP's known ids
    long = ours[PROMPTS.index("A " * 100)]  # 100 words: cut to 75 + the two specials, no padding
    assert long[0] == 49406 and long[-1] == 49407 and set(long[1:-1]) == {320}


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(InvalidInput, match="missing"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json", "utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    with pytest.raises(InvalidInput, match="unreadable"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}', "utf-8")
    with pytest.raises(InvalidInput, match="lacks"):
        ClipTokenizer.from_dir(tmp_path)
