"""A tiny CLIP text tower and tokenizer that fit the ``tiny_t2i`` U-ViT (context 5 x 12), shared
by the text-to-image tests (fixtures in tests/export/conftest.py)."""
from __future__ import annotations

import json

# a tiny CLIPTextConfig whose width and positions fit tiny_t2i; BOS/EOS are the last two ids, as in CLIP
CONFIG = dict(vocab_size=526, hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=8, bos_token_id=524, eos_token_id=525, pad_token_id=525)


def _byte_symbols() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def tokenizer_dir(path):
    """A CLIP-layout vocabulary of 526 tokens (bytes, bytes</w>, 12 merges, the two specials)."""
    path.mkdir()
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "r"), ("w", "or"), ("wor", "d</w>"), ("p", "h"),
              ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>")]
    base = _byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    return path
