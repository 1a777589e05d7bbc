"""An independent, plain-Python transcription of CLIP's BPE tokenizer, for tests.

Source: openai/CLIP ``clip/simple_tokenizer.py`` (the algorithm transformers' slow
``CLIPTokenizer`` also follows): ftfy-repaired, whitespace-cleaned, lower-cased text, split by CLIP's word
pattern, each word's UTF-8 bytes mapped to printable symbols, then greedy lowest-rank pair
merging with ``</w>`` on the last symbol. Written anew; imports nothing from edgediff and not
the ``tokenizers`` library, so a mistake in the product's pipeline cannot cancel here.
As transformers' slow tokenizer (and unlike openai/CLIP) no extra ``html.unescape`` follows ftfy.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import ftfy
import regex

PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def byte_table() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class PlainClipTokenizer:
    def __init__(self, directory: str | Path):
        d = Path(directory)
        self.encoder = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        pairs = [tuple(ln.split()) for ln in (d / "merges.txt").read_text(encoding="utf-8").splitlines()
                 if ln and not ln.startswith("#version")]
        self.ranks = {p: i for i, p in enumerate(pairs)}
        self.table = byte_table()

    def bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            candidates = [(self.ranks.get((a, b), float("inf")), i)
                          for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(candidates)
            if rank == float("inf"):
                break
            best = next(pair for pair in zip(parts, parts[1:]) if self.ranks.get(pair) == rank)
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", ftfy.fix_text(text))
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for word in PATTERN.findall(text):
            if word in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[word])
                continue
            symbols = "".join(self.table[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(symbols))
        return ids

    def __call__(self, text: str, length: int = 77) -> list[int]:
        """<|startoftext|> ids <|endoftext|>, truncated then padded with <|endoftext|> to length."""
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        body = self.encode(text)[:length - 2]
        ids = [sot, *body, eot]
        return ids + [eot] * (length - len(ids))
