"""Calibration feeds from real images: the data forward-diffused to every sampler step.

Trajectory feeds (:mod:`.feeds`) show the denoiser what it will see when it samples; real
images show it the data distribution itself, which matters most where the model's own
samples are poor or few (Q-Diffusion, Li et al. 2023, Sec. 4: calibration data drawn at the
timesteps the sampler visits). For each step of the bundle's recommended sampler (its model
times taken from one short dry run, so the feeds match exactly what the sampler calls), up
to ``cap`` images are chosen (seeded) and diffused with that step's marginal,
x_t = signal(t)·x0 + noise(t)·ε. Latent bundles first encode the images with their
``encoder`` component (an autoencoder added by ``edgediff add-vae``). Labels come from the
file; a guided bundle gets each row a second time with the null label, as guidance's
[conditional | null] halves. A self-conditioned model's ``x_self_cond`` is zeros at the
first step and the clean x0 after it (the estimate a perfect previous step would feed).

Torch-free. Text- and image-conditioned bundles need what the images alone cannot give
(prompts, condition images): they are refused, with the command that records trajectories.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgediff.runtime.conditions import COND_COMPONENT, read_npz_arrays
from edgediff.runtime.drift import model_time_marginal
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.manifest import TEXT_CONTEXT
from edgediff.runtime.self_cond import INPUT as SELF_COND

from .feeds import CalibrationFeeds, record_feeds


def is_image_file(path: str | Path) -> bool:
    """An .npz of images (``images``, no ``step``) rather than recorded feeds."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return "images" in data.files and "step" not in data.files
    except (OSError, ValueError, EOFError, TypeError):      # TypeError: an .npy array, not an archive
        return False


def read_images(path: str | Path, shape: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    """``images``: uint8 (N, H, W, C) as ``generate --npz`` writes, or float (N, C, H, W) in
    [-1, 1]; optional ``labels`` (N,). -> float32 (N, C, H, W) in [-1, 1] and the labels."""
    arrays = read_npz_arrays(Path(path), "images", ("labels",))
    arr, labels = arrays["images"], arrays.get("labels")
    given = f"{arr.dtype} {arr.shape}"
    if arr.dtype == np.uint8 and arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    fits = arr.ndim == 4 and arr.dtype.kind == "f" and len(arr) > 0 and all(
        not isinstance(want, int) or want == got for want, got in zip(shape, arr.shape[1:]))
    if not fits:
        c, h, w = (d if isinstance(d, int) else "?" for d in shape)
        raise InvalidInput(f"{path}: 'images' must be uint8 (N, {h}, {w}, {c}) or float (N, {c}, {h}, {w}) "
                           f"in [-1, 1] for this bundle, got {given}")
    if not np.isfinite(arr).all() or np.abs(arr).max() > 1.0 + 1e-3:
        raise InvalidInput(f"{path}: float 'images' must lie in [-1, 1] (found {np.nanmin(arr):.3g}..{np.nanmax(arr):.3g}"
                           "; NaN/inf refused): scale them, or pass uint8 images")
    if labels is not None and (labels.shape != (len(arr),) or labels.dtype.kind not in "iu"):
        raise InvalidInput(f"{path}: 'labels' must be integers, one per image ({len(arr)}), got "
                           f"{labels.dtype} {labels.shape}")
    return np.ascontiguousarray(arr, np.float32), labels


def clean_samples(pipe, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """x0 in the denoiser's space: the images themselves, or their latents (the encoder)."""
    m = pipe.manifest
    if m.space != "latent":
        return images
    from edgediff.runtime.backends import load_backend

    with load_backend(pipe.bundle, "ort", "fp32", component="encoder", max_batch=batch) as encoder:
        latents = np.concatenate([encoder.infer({"image": images[i:i + batch]})["latents"]
                                  for i in range(0, len(images), batch)])
    if tuple(latents.shape[1:]) != tuple(m.sample_shape):
        raise InvalidInput(f"the encoder makes latents {tuple(latents.shape[1:])} of these images; the denoiser "
                           f"samples {tuple(m.sample_shape)}: resize the images")
    return latents


def _labels(m, labels: np.ndarray | None) -> np.ndarray | None:
    if not m.conditional:
        return None
    if labels is None:
        raise InvalidInput("this class-conditional bundle needs 'labels' (one per image) in the images file")
    if labels.min() < 0 or labels.max() >= m.num_classes:
        raise InvalidInput(f"'labels' must lie in 0..{m.num_classes - 1}, found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _check_bundle(m) -> tuple:
    """The image shape the bundle takes (its encoder's for a latent bundle), or one line why not."""
    if TEXT_CONTEXT in m.inputs or COND_COMPONENT in m.components:
        what = "--prompt" if TEXT_CONTEXT in m.inputs else "--cond"
        raise InvalidInput(f"images alone cannot calibrate this bundle's conditioning: record trajectories with "
                           f"`edgediff calibrate BUNDLE {what} ... --out feeds.npz`")
    if m.space == "latent" and "encoder" not in m.components:
        raise InvalidInput("this latent bundle has no encoder to turn images into latents: add its autoencoder "
                           "with `edgediff add-vae`, or calibrate on sampling trajectories")
    return tuple(m.component("encoder").inputs["image"]["shape"][1:] if m.space == "latent" else m.sample_shape)


def _step_rows(m, k: int, t: float, x0: np.ndarray, labels, guided: bool, rng) -> dict[str, np.ndarray]:
    """One step's feeds: the chosen clean samples ``x0`` diffused to model time ``t``."""
    signal, noise = model_time_marginal(m.noise_schedule, t)
    x = (signal * x0 + noise * rng.standard_normal(x0.shape)).astype(np.float32)
    part = {"x": x, "t": np.full(len(x), t, np.float32)}
    if SELF_COND in m.inputs:       # the previous step's x0 estimate, clipped as the runtime clips it
        clip = m.option("clip_sample", m.space == "pixel")
        part[SELF_COND] = np.zeros_like(x) if k == 0 else (np.clip(x0, -1, 1) if clip else x0).astype(np.float32)
    if labels is not None:
        part["y"] = labels
        if guided:                  # guidance's [conditional | null] halves of one call
            part = {name: np.concatenate([v, v]) for name, v in part.items()}
            part["y"][len(x):] = m.null_label
    return part


def image_feeds(pipe, path: str | Path, cap: int = 16, seed: int = 0, sampler: str | None = None,
                steps: int | None = None, guidance: float | None = None, batch: int = 16) -> CalibrationFeeds:
    """Feeds of the images in ``path`` forward-diffused to every model time of the sampler
    (``pipe``: an FP32 Pipeline): ``cap`` images per step, or ``cap // 2`` (at least one),
    each twice, for a guided bundle."""
    m = pipe.manifest
    images, labels = read_images(path, _check_bundle(m))
    labels = _labels(m, labels)
    dry = record_feeds(pipe, samples=1, cap=1, seed=seed, sampler=sampler, steps=steps, guidance=guidance, batch=1)
    guided = m.conditional and dry.meta["guidance"] != 1.0
    rng = np.random.default_rng(seed)
    per_step = min(max(1, cap // 2) if guided else cap, len(images))
    chosen = [(k, float(feed["t"][0]), rng.choice(len(images), per_step, replace=False)) for k, feed in dry.by_step()]
    used = np.unique(np.concatenate([rows for _, _, rows in chosen]))     # encode only the images used
    x0 = dict(zip(used.tolist(), clean_samples(pipe, images[used], batch).astype(np.float64)))
    parts = [_step_rows(m, k, t, np.stack([x0[i] for i in rows]), None if labels is None else labels[rows], guided,
                        rng) for k, t, rows in chosen]
    step = np.concatenate([np.full(len(p["x"]), k, np.int64) for p, (k, _, _) in zip(parts, chosen)])
    meta = {k: v for k, v in dry.meta.items() if k != "samples"} | {
        "source": "images", "images": str(path), "image_count": len(images), "cap": cap, "rows": len(step)}
    return CalibrationFeeds({name: np.concatenate([p[name] for p in parts]) for name in parts[0]}, step, meta)
