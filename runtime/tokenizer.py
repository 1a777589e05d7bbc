"""CLIP's text tokenizer without torch or transformers, served by the ``tokenizers`` library.

U-ViT's text-to-image models read prompts through transformers' ``CLIPTokenizer`` with
``max_length=77, padding="max_length", truncation=True``. This module rebuilds that pipeline
from the two files a bundle stores (``vocab.json``, ``merges.txt``; see
scripts/fetch_clip_vocab.py for how they are derived from CLIP's published BPE table):

  repair     ftfy.fix_text (html entities, curly quotes, ligatures, full-width forms, mojibake,
             control characters), as the slow CLIPTokenizer does when ftfy is installed (U-ViT
             installs ftfy 6.1.1 beside transformers 4.23.1)
  clean      NFC, every whitespace run -> one space, trimmed, lower-cased
  split      CLIP's word pattern (contractions, letter runs, single digits, punctuation runs)
  bytes      each word's UTF-8 bytes as CLIP's 256 printable byte symbols
  BPE        merges in rank order, ``</w>`` on a word's last symbol
  frame      <|startoftext|> ... <|endoftext|>, cut to 77 ids, padded with <|endoftext|>

The ids agree with ``CLIPTokenizer`` (tests/runtime/test_tokenizer.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InvalidInput

MAX_LENGTH = 77  # CLIP's context length: ids per prompt, specials included
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
FILES = ("vocab.json", "merges.txt")
# CLIP's word pattern (its tokenizer compiles it case-insensitively; text is lower-cased first).
WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP/GPT-2 order (the first 256 vocabulary ids)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # bytes that print badly (space, controls) take the code points above U+00FF, in byte order
    spare = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(spare))]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: the byte symbols, the same with ``</w>``, one token per merge in rank
    order, then <|startoftext|> and <|endoftext|> (the last two ids)."""
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InvalidInput("duplicate tokens in the vocabulary (a merge repeats a token)")
    return vocab


def write_files(directory: str | Path, merges: list[tuple[str, str]]) -> dict[str, int]:
    """Write ``vocab.json`` + ``merges.txt`` (CLIP's layout, from ``merges``) into ``directory``."""
    d = Path(directory)
    vocab = clip_vocab(merges)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


def _build(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab, merges, unk_token=EOS, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    bos, eos = vocab[BOS], vocab[EOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    tok.add_special_tokens([BOS, EOS])
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=eos, pad_token=EOS)
    return tok


class ClipTokenizer:
    """Prompts -> int64 ids (B, max_length), as U-ViT's FrozenCLIPEmbedder tokenizes them."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = MAX_LENGTH):
        for special in (BOS, EOS):
            if special not in vocab:
                raise InvalidInput(f"tokenizer vocabulary lacks {special}")
        self.max_length = max_length
        self.vocab_size = len(vocab)
        self._vocab = vocab
        self._tok = _build(vocab, merges, max_length)

    def id(self, token: str) -> int:
        return self._vocab[token]

    @classmethod
    def from_dir(cls, directory: str | Path, max_length: int = MAX_LENGTH) -> "ClipTokenizer":
        """Load vocab.json + merges.txt (the merges file's ``#version`` header is skipped)."""
        d = Path(directory)
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise InvalidInput(f"{d}: tokenizer files missing: {', '.join(missing)}")
        try:
            vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
            lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{d}: unreadable tokenizer files ({exc})") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
            raise InvalidInput(f"{d}: vocab.json must map tokens to ids and merges.txt hold pairs")
        return cls(vocab, merges, max_length)

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise InvalidInput("prompts must be text")
        import ftfy

        encodings = self._tok.encode_batch([ftfy.fix_text(p) for p in prompts])
        return np.array([e.ids for e in encodings], dtype=np.int64)  # (B, max_length)
