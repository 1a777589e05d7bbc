"""Image conditions for conditional bundles (DDM's ``cond_unet.Unet``: super-resolution,
saliency, inpainting, sketch-to-image, depth): read, encoded once, fed at every step.

A conditional bundle carries a ``cond_encoder`` component (input ``cond``: the condition
image in [-1, 1], as DDM-Public's datasets normalise it) whose named outputs are every
tensor of the network that depends on the condition alone. The denoiser takes ``x``, ``t``
and those names. The official forward recomputes the condition backbone at every step;
here each condition goes through the encoder once and its features are reused for every
step, every sample drawn from it and every guidance branch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InvalidInput

COND_COMPONENT = "cond_encoder"
COND_INPUT = "cond"
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"H,W"`` (or one number for a square) -> (H, W)."""
    if not text:
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise InvalidInput(f"--cond-size must be H,W (two positive integers), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise InvalidInput(f"--cond-size must be H,W (two numbers), got {text!r}")
    if min(parts) < 1 or max(parts) > 8192:
        raise InvalidInput(f"--cond-size must be H,W with 1 <= H, W <= 8192, got {text!r}")
    return parts[0], parts[1]


def _image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InvalidInput(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    return [path]


def _read_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image file -> (channels, H, W) float32 in [-1, 1], resized bilinearly to ``size``."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise InvalidInput(f"the model takes {channels}-channel conditions: give them as an .npz array")
    try:
        with Image.open(path) as img:
            if img.mode not in EIGHT_BIT_MODES:      # convert() would clip 16-bit and float pixels
                raise InvalidInput(f"condition image {path} has {img.mode!r} pixels: give 8-bit images "
                                   "(grey, RGB, RGBA, palette) or float arrays in an .npz")
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise InvalidInput(f"cannot read condition image {path}: {exc}") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    return arr.transpose(2, 0, 1) / 127.5 - 1.0                    # (C, H, W) in [-1, 1]


def read_npz_arrays(path: Path, required: str, optional: tuple[str, ...] | None = ()) -> dict[str, np.ndarray]:
    """The arrays ``required`` and those of ``optional`` present in the .npz at ``path``
    (``optional=None``: every array in it), no pickles; one-line InvalidInput for an
    unreadable archive or a missing ``required``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            found = list(data.files)
            arrays = {k: data[k] for k in (found if optional is None else (required, *optional)) if k in found}
    except (OSError, ValueError, EOFError, TypeError):     # TypeError: an .npy (an array, not an archive)
        raise InvalidInput(f"cannot read {path}: not an .npz archive of plain arrays") from None
    if required not in arrays:          # raised out of the try: InvalidInput is a ValueError
        raise InvalidInput(f"{path} has no array {required!r} (found: {', '.join(found) or 'none'})")
    return arrays


def _read_npz(path: Path, shape: tuple) -> np.ndarray:
    """An .npz with ``cond``: float (K, C, H, W) already in [-1, 1], or uint8 (K, H, W, C) images."""
    arr = read_npz_arrays(path, "cond")["cond"]
    given = f"{arr.dtype} {arr.shape}"
    if arr.dtype == np.uint8 and arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    if arr.ndim != 4 or arr.dtype.kind != "f" or tuple(arr.shape[1:]) != tuple(shape):
        raise InvalidInput(f"{path}: 'cond' must be float (K, {', '.join(map(str, shape))}) in [-1, 1] or uint8 "
                           f"(K, {shape[1]}, {shape[2]}, {shape[0]}) images, got {given}")
    return arr.astype(np.float32)


def load_conditions(source, shape: tuple, size: tuple[int, int] | None = None) -> np.ndarray:
    """Condition images from a file, a directory (sorted) or an ``.npz`` -> (K, C, H, W)
    float32 in [-1, 1]. ``shape`` is the encoder's (C, H, W) (None entries: free);
    images are resized to ``size``, else to the encoder's H, W."""
    path = Path(source)
    if not path.exists():
        raise InvalidInput(f"condition {path} does not exist")
    channels, height, width = shape
    if path.suffix.lower() == ".npz":
        conds = _read_npz(path, shape)
    else:
        target = size or (height, width)
        if not all(isinstance(d, int) for d in target):
            raise InvalidInput("this bundle's condition encoder takes any size: give --cond-size H,W")
        conds = np.stack([_read_image(p, channels, target) for p in _image_files(path)])
    check_conditions(conds, f"condition {path}")
    return np.ascontiguousarray(conds, dtype=np.float32)


RANGE_SLACK = 1e-3          # float conditions may overshoot [-1, 1] by rounding, not more


def check_conditions(conds: np.ndarray, what: str = "the conditions") -> None:
    """(K, C, H, W) float conditions, K ≥ 1, finite, in [-1, 1] (the range the model was
    trained on): anything else is refused rather than sampled into garbage."""
    if conds.ndim != 4 or conds.shape[0] < 1:
        raise InvalidInput(f"{what}: expected (K, C, H, W) with K ≥ 1 conditions, got shape {conds.shape}")
    if conds.dtype.kind != "f":
        raise InvalidInput(f"{what}: expected float values in [-1, 1], got {conds.dtype} (scale images first)")
    if not np.isfinite(conds).all():
        raise InvalidInput(f"{what} contains NaN or infinite values")
    low, high = float(conds.min()), float(conds.max())
    if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise InvalidInput(f"{what}: values must lie in [-1, 1] (DDM's normalisation), got {low:g}..{high:g}")


def encode_conditions(encoder, conds: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """(K, C, H, W) conditions -> {feature name: (K, ...)}: one encoder row per condition."""
    chunks = [encoder.infer({COND_INPUT: conds[i:i + batch]}) for i in range(0, len(conds), batch)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


class ConditionFeatures:
    """Encoded conditions and which one each sample uses: ``rows(start, stop)`` gives the
    feature feed of samples ``start..stop-1`` (gathered, never re-encoded). ``null``: one row
    per feature for classifier-free guidance's unconditional branch (a t2i model's empty-prompt
    context), or None."""

    def __init__(self, features: dict[str, np.ndarray], index: np.ndarray, null: dict[str, np.ndarray] | None = None):
        self.features, self.index, self.null = features, np.asarray(index, dtype=np.int64), null

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        idx = self.index[start:stop]
        return {name: np.ascontiguousarray(f[idx]) for name, f in self.features.items()}


def condition_strip(conds: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """(K, C, h, w) conditions in [-1, 1] -> (K, height, width, channels) uint8 for a grid
    beside the results (nearest-neighbour resize; grey <-> RGB as the output needs)."""
    from PIL import Image

    pixels = np.clip((conds + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    out = []
    for img in pixels:
        pic = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img[..., :3])
        pic = pic.convert("L" if channels == 1 else "RGB").resize((width, height), Image.NEAREST)
        arr = np.asarray(pic)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out)


def read_conditions(pipe, source, size_text: str | None = None) -> np.ndarray | None:
    """The CLI's ``--cond``/``--cond-size`` for an open pipeline: (K, C, H, W) or None."""
    if source is None:
        if size_text:
            raise InvalidInput("--cond-size needs --cond")
        return None
    if not pipe.image_conditioned:
        raise InvalidInput("--cond: this bundle's model takes no condition image (it has no cond_encoder)")
    shape = tuple(pipe.cond_encoder.inputs[COND_INPUT]["shape"][1:])
    size = parse_size(size_text)
    fixed = tuple(shape[1:])
    if size is not None and all(isinstance(d, int) for d in fixed) and size != fixed:
        raise InvalidInput(f"--cond-size {size[0]},{size[1]}: this bundle's condition encoder takes "
                           f"{fixed[0]}x{fixed[1]} images only")
    return load_conditions(source, shape, size)
