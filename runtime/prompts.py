"""Prompts and text contexts of text-to-image bundles (U-ViT t2i), before the denoiser sees them.

A t2i denoiser takes ``context`` (N, L, D): CLIP text-encoder states per sample. They come
either from prompts, run through the bundle's tokenizer and text encoder (``--prompt``,
``--prompts-file``), or precomputed (``--context-npz``), as U-ViT's MS-COCO pipeline stores
them (``scripts/extract_mscoco_feature.py``: one context per caption, plus
``empty_context.npy``, the empty prompt's, which guidance uses as its null condition).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInput
from .conditions import read_npz_arrays

CONTEXT_KEY, NULL_KEY, PROMPTS_KEY = "context", "null_context", "prompts"


@dataclass
class TextContexts:
    """Contexts ready for sampling: ``context`` (K, L, D) float32, one row per distinct prompt
    or precomputed entry; ``null`` (1, L, D) float32 or None, guidance's unconditional row;
    ``prompts`` the K texts the rows stand for, or None when unknown."""

    context: np.ndarray
    null: np.ndarray | None = None
    prompts: list[str] | None = None


def read_prompts_file(path) -> list[str]:
    """One prompt per line of a UTF-8 text file (a BOM is allowed), blank lines skipped, each
    trimmed (the tokenizer trims anyway)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise InvalidInput(f"cannot read the prompts file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the prompts file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInput(f"the prompts file {path} holds no prompts (one per line; blank lines are skipped)")
    return prompts


def distinct(prompts: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct prompts in first-seen order and, for each given prompt, its row among them:
    ``distinct(["a", "b", "a"]) == (["a", "b"], [0, 1, 0])``."""
    rows: dict[str, int] = {}
    for p in prompts:
        rows.setdefault(p, len(rows))
    return list(rows), np.array([rows[p] for p in prompts], dtype=np.int64)


def check_context(array, shape: tuple[int, int], what: str, null: bool = False) -> np.ndarray:
    """Precomputed contexts -> contiguous float32 (K, L, D), (L, D) and (1, L, D) nulls ->
    (1, L, D); refuses another shape, a non-float dtype or non-finite values in one line."""
    arr = np.asarray(array)
    tokens, dim = shape
    if null and arr.ndim == 2:
        arr = arr[None]
    want = f"(1, {tokens}, {dim}) or ({tokens}, {dim})" if null else f"(K, {tokens}, {dim}) with K ≥ 1"
    if arr.ndim != 3 or tuple(arr.shape[1:]) != (tokens, dim) or arr.shape[0] < 1 or (null and arr.shape[0] != 1):
        raise InvalidInput(f"{what} must be {want} (the bundle's context: {tokens} tokens of width {dim}), "
                           f"got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise InvalidInput(f"{what} must hold floats (text-encoder states), got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _labels(value, rows: int, what: str) -> list[str]:
    arr = np.asarray(value)
    if arr.dtype.kind == "S":
        try:
            arr = np.char.decode(arr, "utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{what} must be UTF-8 text") from None
    if arr.dtype.kind != "U" or arr.shape != (rows,):
        raise InvalidInput(f"{what} must be ({rows},) strings, one per context row, got {arr.dtype} {arr.shape}")
    return [str(p) for p in arr]


def load_context_npz(path, shape: tuple[int, int]) -> TextContexts:
    """``--context-npz``: an .npz with ``context`` (K, L, D) float, optionally ``null_context``
    ((1, L, D) or (L, D): U-ViT's ``empty_context.npy``) and ``prompts`` (K,) strings (labels)."""
    path = Path(path)
    arrays = read_npz_arrays(path, CONTEXT_KEY, (NULL_KEY, PROMPTS_KEY))
    context = check_context(arrays[CONTEXT_KEY], shape, f"{path}: 'context'")
    null = arrays.get(NULL_KEY)
    null = None if null is None else check_context(null, shape, f"{path}: 'null_context'", null=True)
    prompts = arrays.get(PROMPTS_KEY)
    prompts = None if prompts is None else _labels(prompts, len(context), f"{path}: 'prompts'")
    return TextContexts(context, null, prompts)
