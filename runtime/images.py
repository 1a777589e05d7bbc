"""Turning samples into pictures and archives, written atomically."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np

from .files import check_regular_target, write_atomic_all
from .errors import InvalidInput


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """(N, C, H, W) data in [-1, 1] -> (N, H, W, C) uint8; NaN (only ever written under
    ``--allow-nonfinite``) shows as black."""
    pixels = np.clip((samples.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return np.nan_to_num(pixels, nan=0.0).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) picture, row-major."""
    n, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return out


def _make_parents(path: Path) -> list[Path]:
    """Create the missing directories above ``path``; return those made, top first."""
    made = [d for d in reversed(path.absolute().parents) if not d.exists()]
    try:
        for d in made:
            d.mkdir()
    except OSError as exc:
        raise InvalidInput(f"cannot create the directory of {path}: {exc.strerror or exc}") from None
    return made


def png_writer(picture: np.ndarray, upscale: int = 1):
    """``write(target)``: ``picture`` (H, W, C) uint8 as PNG to a path or a binary file object."""
    from PIL import Image

    if upscale > 1:
        picture = picture.repeat(upscale, axis=0).repeat(upscale, axis=1)
    img = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    return lambda tmp: img.save(tmp, format="PNG")


def _npz_writer(arrays: dict):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return write


def _save_all(writers: dict) -> None:
    """Write ``{path: write}`` as one (see :func:`write_atomic_all`)."""
    made = []
    try:
        for path in writers:
            made += _make_parents(Path(path))
        write_atomic_all({Path(p): w for p, w in writers.items()})
    except BaseException:
        for d in reversed(made):            # only the directories made here, and only if empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def save_png(path: str | Path, picture: np.ndarray, upscale: int = 1) -> None:
    _save_all({path: png_writer(picture, upscale)})


def save_npz(path: str | Path, **arrays) -> None:
    _save_all({path: _npz_writer(arrays)})


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output that cannot be written: an existing directory,
    symbolic link or other non-regular file, or a directory that cannot be made or written
    (the nearest existing ancestor is a file, or not writable). Nothing is created here."""
    path = check_regular_target(path)
    ancestor = path.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidInput(f"cannot write {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidInput(f"cannot write {path}: {ancestor} is not writable")


def check_outputs(bundle_path, manifest, has_decoder: bool, png=None, npz=None) -> None:
    """Refuse, before any sampling, outputs that cannot be written as asked: a PNG of latents
    without a decoder, the same path twice (also through a link), a path inside the bundle
    (it would alter a hashed file or leave a stray one), or one :func:`check_writable` refuses."""
    if png and manifest.space == "latent" and not has_decoder:
        raise InvalidInput("this latent bundle has no decoder: add one with `edgediff add-vae BUNDLE "
                           "--checkpoint VAE` to get images, or write only --npz latents")
    paths = [Path(p).resolve() for p in (png, npz) if p]
    if len(set(paths)) < len(paths):
        raise InvalidInput("--out and --npz name the same file")
    inside = [p for p in paths if Path(bundle_path).resolve() in p.parents]
    if inside:
        raise InvalidInput(f"{inside[0]} is inside the bundle; write outputs elsewhere")
    for p in (png, npz):
        if p:
            check_writable(p)


def _grid_rows(manifest, generation, images: np.ndarray) -> tuple[np.ndarray, int | None]:
    """The pictures of a grid and its row length: one row per condition image (the condition
    first, then its samples), one per prompt or context row, one column per class for few
    classes, else a square."""
    if generation.conditions is not None:
        from .conditions import condition_strip

        n, h, w, c = images.shape
        per = n // len(generation.conditions)
        shown = condition_strip(generation.conditions, h, w, c)
        rows = [np.concatenate([shown[k:k + 1], images[k * per:(k + 1) * per]]) for k in range(len(shown))]
        return np.concatenate(rows), per + 1
    if generation.prompt_index is not None:
        runs = 1 + int(np.count_nonzero(np.diff(generation.prompt_index)))     # samples come per prompt, in order
        return images, max(1, len(images) // runs)
    classes = manifest.num_classes
    nrow = min(classes, len(images)) if generation.labels is not None and classes and classes <= 16 else None
    return images, nrow


def save_outputs(manifest, generation, png=None, npz=None) -> list[str]:
    """Write the grid and/or archive of a :class:`~edgediff.runtime.pipeline.Generation`:
    uint8 ``images`` (pixel models, or decoded latents), float32 ``latents`` for latent
    models, ``labels`` where conditional, ``conditions``/``cond_index`` for image conditions,
    ``prompts`` (K,) where known and ``prompt_index`` (N,) for text-to-image runs. Both are
    written to temporary files first and renamed together, so a failure (or an interrupt)
    leaves neither."""
    writers, images = {}, generation.images
    if png and npz and Path(png).resolve() == Path(npz).resolve():
        raise InvalidInput("--out and --npz name the same file")
    if png:
        if images is None:
            raise InvalidInput("this latent bundle has no decoder: add one with `edgediff add-vae BUNDLE "
                               "--checkpoint VAE` to get images, or write only --npz latents")
        shown, nrow = _grid_rows(manifest, generation, images)
        writers[png] = png_writer(grid(shown, nrow=nrow), upscale=max(1, 128 // images.shape[1]))
    if npz:
        arrays = {} if images is None else {"images": images}
        if generation.latent:
            arrays["latents"] = generation.samples.astype(np.float32)
        if generation.labels is not None:
            arrays["labels"] = generation.labels
        if generation.conditions is not None:
            arrays["conditions"] = generation.conditions
            arrays["cond_index"] = generation.cond_index
        if generation.prompts is not None:
            arrays["prompts"] = generation.prompts
        if generation.prompt_index is not None:
            arrays["prompt_index"] = generation.prompt_index
        writers[npz] = _npz_writer(arrays)
    _save_all(writers)
    return [f"wrote {p}" for p in writers]
