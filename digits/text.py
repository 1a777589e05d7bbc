"""Prompts for the digits: what the text-to-image digits model (``uvit_t2i``) reads.

U-ViT's t2i models take CLIP's frozen text tower (``FrozenCLIPEmbedder``: the
``last_hidden_state`` of 77 padded token ids). The digits model does the same at a small
size, so the whole text path of a deployed bundle (tokenizer files, ``text_encoder.onnx``,
``context`` input) is exercised end to end:

- **phrasings**: each digit named in several ways ("seven", "the digit 7", "a handwritten
  seven", ...); ``CHECK_PHRASINGS`` are the three the model is judged on.
- **vocabulary**: CLIP's BPE layout (byte symbols, ``</w>`` forms, merges, the two specials)
  with merges that spell each word of the phrasings left to right, so every word is one token;
  read by the same torch-free tokenizer as CLIP's full vocabulary.
- **text encoder**: a transformers ``CLIPTextModel`` at ``TEXT_CONFIG``, randomly initialised
  from a seed (token embeddings at unit scale) and frozen (U-ViT freezes its encoder too; the denoiser learns to read it).
  ``MAX_LENGTH`` ids per prompt: the longest phrasing with its start and end tokens fits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import InvalidInput

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the digit's name, {digit}: its numeral. Training draws one phrasing per sample.
PHRASINGS = ("{word}", "{digit}", "the digit {digit}", "the digit {word}", "a handwritten {word}",
             "a handwritten {digit}", "the number {word}", "number {digit}", "a {word}", "digit {word}")
CHECK_PHRASINGS = ("{word}", "the digit {digit}", "a handwritten {word}")
MAX_LENGTH = 8              # ids per prompt: <|startoftext|>, up to 6 words, <|endoftext|>
WIDTH = 32                  # the text encoder's hidden size: the denoiser's clip_dim
TEXT_CONFIG = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=MAX_LENGTH)
TOKEN_STD = 1.0            # the frozen encoder's token embedding scale (see frozen_text_encoder)
TEXT_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"   # inside a t2i training output / asset
TEXT_WEIGHTS = "model.safetensors"


def prompt(phrasing: str, digit: int) -> str:
    return phrasing.format(word=WORDS[digit], digit=digit)


def prompts(phrasings=PHRASINGS) -> list[str]:
    """Every phrasing of every digit, phrasing-major: index p·10 + k is phrasing p of digit k."""
    return [prompt(p, k) for p in phrasings for k in range(len(WORDS))]


def merges() -> list[tuple[str, str]]:
    """BPE merges spelling each word of the phrasings left to right (first-seen order)."""
    words = dict.fromkeys(w for text in prompts() for w in text.split() if not w.isdigit())
    out: dict[tuple[str, str], None] = {}
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        acc = symbols[0]
        for s in symbols[1:]:
            out[(acc, s)] = None
            acc += s
    return list(out)


def write_tokenizer(directory: str | Path) -> dict[str, int]:
    """The digits vocabulary as CLIP tokenizer files (vocab.json, merges.txt) in ``directory``."""
    from edgediff.runtime.tokenizer import write_files

    return write_files(directory, merges())


def text_config(vocab: dict[str, int]) -> dict:
    """CLIPTextConfig keywords for ``vocab`` (its last two ids are the specials, as in CLIP)."""
    from edgediff.runtime.tokenizer import BOS, EOS

    return {**TEXT_CONFIG, "vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS]}


def frozen_text_encoder(seed: int):
    """(CLIPTextModel at ``TEXT_CONFIG``, randomly initialised from ``seed`` and frozen; its
    tokenizer; its config)."""
    import torch

    from edgediff.export.text_encoder import build
    from edgediff.runtime.tokenizer import ClipTokenizer, clip_vocab

    pairs = merges()
    vocab = clip_vocab(pairs)
    config = text_config(vocab)
    torch.manual_seed(seed)
    model = build(config).requires_grad_(False)
    # CLIP's init draws token embeddings with std 0.02, small beside what the layers add: every
    # prompt's states are then about 75% one shared vector and the digit a faint residue, which a
    # small denoiser barely learns to read (41-56% right at w = 2). Unit-variance embeddings keep
    # the word: 90% of the state at its position is the digit's (a trained CLIP separates words too).
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=TOKEN_STD)
    return model, ClipTokenizer(vocab, pairs, MAX_LENGTH), config


def save_text_encoder(out: str | Path, model, config: dict) -> None:
    """Write ``TEXT_DIR/`` (weights under published CLIP's ``text_model.*`` keys + config.json)
    and ``TOKENIZER_DIR/`` (vocab.json, merges.txt) under ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    write_tokenizer(out / TOKENIZER_DIR)
    (out / TEXT_DIR).mkdir()
    state = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    save_file(state, str(out / TEXT_DIR / TEXT_WEIGHTS))
    (out / TEXT_DIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")


class PromptContexts:
    """Training's text conditions: every phrasing of every digit (and the empty prompt)
    encoded once by the frozen encoder; ``draw(labels, gen, dropout)`` gives each sample a
    random phrasing of its digit, or the empty prompt with probability ``dropout`` (what
    classifier-free guidance's null branch learns, as U-ViT trains its t2i models)."""

    def __init__(self, model, tokenizer):
        import torch

        with torch.no_grad():
            ids = torch.from_numpy(tokenizer([*prompts(), ""]))                 # (P·10 + 1, L)
            self.table = model(input_ids=ids).last_hidden_state               # (P·10 + 1, L, D)

    def draw(self, labels, gen, dropout: float):
        import torch

        n, k = labels.shape[0], len(WORDS)
        phrasing = torch.randint(0, len(PHRASINGS), (n,), generator=gen)      # (B,)
        index = phrasing * k + labels
        drop = torch.rand(n, generator=gen) < dropout
        index = torch.where(drop, torch.full_like(index, self.table.shape[0] - 1), index)
        return self.table[index]                                              # (B, L, D)


def judge_prompts(pipe, per_class: int = 100, phrasings=CHECK_PHRASINGS, seed: int = 0, batch: int = 250,
                  **sampling) -> dict[str, object]:
    """Draw ``per_class`` samples for each phrasing of each digit through ``pipe`` (a t2i
    bundle's Pipeline: its tokenizer and text encoder) and judge them:
    {phrasing: (JudgeResult, images)}; images as the judge read them, a row of each digit."""
    from .judge import class_order_labels, judge

    labels = class_order_labels(per_class, len(WORDS))
    results = {}
    for phrasing in map(check_phrasing, phrasings):
        texts = [prompt(phrasing, k) for k in range(len(WORDS))]
        out = pipe(per_class, prompt=texts, seed=seed, batch=batch, **sampling)
        images = out.images if out.latent else out.samples           # decoded, or floats in [-1, 1]
        results[phrasing] = judge(images, labels), images
    return results


def check_phrasing(phrasing: str) -> str:
    """A phrasing names the digit through ``{word}`` or ``{digit}`` and nothing else in braces."""
    try:
        named = prompt(phrasing, 0) != phrasing.replace("{{", "{").replace("}}", "}")
    except (KeyError, IndexError, ValueError):
        named = False
    if not named:
        raise InvalidInput(f"phrasing {phrasing!r} must name the digit with {{word}} or {{digit}} "
                           "(e.g. 'a handwritten {word}')")
    return phrasing


def is_text_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle whose denoiser reads a text context."""
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.manifest import TEXT_CONTEXT

    return Path(path).is_dir() and TEXT_CONTEXT in read_bundle(path, verify=False).manifest.inputs


def evaluate(bundle: str | Path, phrasings=CHECK_PHRASINGS, per_class: int = 100, precision: str = "fp32",
             seed: int = 0, **sampling) -> dict:
    """Judge a text-to-image digits bundle, phrasing by phrasing: {phrasing: JudgeResult}."""
    from edgediff.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle, precision=precision, max_batch=250) as pipe:
        found = judge_prompts(pipe, per_class, phrasings, seed=seed, **sampling)
    return {p: result for p, (result, _) in found.items()}
