"""A tiny CLIP text tower and tokenizer that fit the ``tiny_t2i`` U-ViT (context 5 x 12), shared
by the text-to-image tests (fixtures in tests/export/conftest.py)."""
from __future__ import annotations

from edgediff.runtime.tokenizer import write_files

# a tiny CLIPTextConfig whose width and positions fit tiny_t2i; BOS/EOS are the last two ids, as in CLIP
CONFIG = dict(vocab_size=526, hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=8, bos_token_id=524, eos_token_id=525, pad_token_id=525)


def tokenizer_dir(path):
    """A CLIP-layout vocabulary of 526 tokens (bytes, bytes</w>, 12 merges, the two specials)."""
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "r"), ("w", "or"), ("wor", "d</w>"), ("p", "h"),
              ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>")]
    assert len(write_files(path, merges)) == CONFIG["vocab_size"]
    return path
