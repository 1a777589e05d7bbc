"""The digits judge: does a sample of class k look like a k, and how far is the set of
samples from the real digits? Torch-free: a small NumPy MLP whose weights ship in
``assets/judge.npz`` (trained by ``edgediff.digits.judge_train`` on the train split of
scikit-learn's digits at 16×16, the data the digits models learn).

Two figures, each with the same figure for held-out real digits as the baseline:
- accuracy: the share of samples the judge classifies as their requested label; for an
  unconditional model (lucid), which requests none, the share the judge recognises as some
  digit with probability ≥ 0.9 (``recognised``), per class the share of samples judged that digit;
- Fréchet distance (FD) between Gaussians fitted to the judge's penultimate features of
  the samples and of the real train split (FID's formula in a digits feature space).
FD shrinks as n grows, so the baseline is computed at the same n (held-out subsets).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from edgediff.runtime.errors import InvalidInput

JUDGE_PATH = Path(__file__).parent / "assets" / "judge.npz"
SIZE = 16
_BASELINE_DRAWS = 5     # held-out subsets averaged for a baseline FD at a smaller n
CONFIDENT = 0.9         # unconditional samples: "recognised" when the judge is this sure of a class


@dataclass(frozen=True)
class JudgeResult:
    n: int
    accuracy: float                 # share of samples classified as their label
    fd: float                       # Fréchet distance to the real train digits' features
    baseline_accuracy: float        # the same figures for n held-out real digits
    baseline_fd: float
    per_class: tuple[float, ...]    # accuracy of each class (nan where a class has no sample)
    conditional: bool = True        # False: accuracy is the recognised share, per_class the class shares

    def summary(self) -> str:
        what = "class accuracy" if self.conditional else f"recognised (p ≥ {CONFIDENT:g})"
        return (f"judge: {what} {100 * self.accuracy:.1f}% (real held-out "
                f"{100 * self.baseline_accuracy:.1f}%), FD {self.fd:.2f} (real held-out "
                f"{self.baseline_fd:.2f}), n={self.n}")

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def load_judge(path: str | Path = JUDGE_PATH) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found: {path}")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def as_images(images: np.ndarray) -> np.ndarray:
    """uint8 (0..255) or float (in [-1, 1]) digits in NCHW, NHWC or NHW -> (N, 256) float32
    in [-1, 1]."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE):
        raise InvalidInput(f"the digits judge takes one-channel {SIZE}×{SIZE} images, got shape {np.shape(images)}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise InvalidInput(f"images must be uint8 or floating, got {x.dtype}")
    return np.clip(x.astype(np.float32), -1.0, 1.0).reshape(len(x), SIZE * SIZE)


def forward(weights: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256) -> (features (N, F), logits (N, 10)): ReLU MLP, features = last hidden layer."""
    h = x.astype(np.float32)
    layers = int(weights["layers"])
    for i in range(layers - 1):
        h = np.maximum(h @ weights[f"w{i}"] + weights[f"b{i}"], 0.0)      # (N, H_i)
    return h, h @ weights[f"w{layers - 1}"] + weights[f"b{layers - 1}"]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of judge features, the Gaussian the FD compares."""
    f = features.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|² + tr(C1 + C2 - 2 (C1^½ C2 C1^½)^½), float64, via symmetric eigh only
    (tr (C1 C2)^½ equals tr of the square root of the symmetric C1^½ C2 C1^½)."""
    s1 = _sqrt_psd(np.asarray(cov1, dtype=np.float64))
    inner = s1 @ np.asarray(cov2, dtype=np.float64) @ s1
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    cross = np.sqrt(np.clip(vals, 0.0, None)).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)


def recognised(logits: np.ndarray) -> np.ndarray:
    """Samples the judge assigns to some class with softmax probability ≥ CONFIDENT."""
    z = logits - logits.max(axis=1, keepdims=True)
    return (1.0 / np.exp(z).sum(axis=1)) >= CONFIDENT                  # the top class's probability


def _baseline(weights: dict, n: int, conditional: bool = True) -> tuple[float, float]:
    """Accuracy (or the recognised share) on all held-out digits; FD of held-out subsets of
    size n (averaged)."""
    feats, logits = forward(weights, as_images(weights["held_images"]))
    accuracy = float(np.mean(logits.argmax(axis=1) == weights["held_labels"] if conditional
                             else recognised(logits)))
    mu, cov = weights["ref_mu"], weights["ref_cov"]
    if n >= len(feats):
        return accuracy, frechet_distance(*feature_stats(feats), mu, cov)
    rng = np.random.default_rng(0)
    fds = [frechet_distance(*feature_stats(feats[rng.choice(len(feats), n, replace=False)]), mu, cov)
           for _ in range(_BASELINE_DRAWS)]
    return accuracy, float(np.mean(fds))


def judge(images: np.ndarray, labels: np.ndarray | None, weights: dict | None = None) -> JudgeResult:
    """Judge samples of requested ``labels`` (see :func:`as_images` for image layouts);
    ``labels=None``: samples of an unconditional model (recognised share, class shares)."""
    weights = load_judge() if weights is None else weights
    x = as_images(images)
    if x.shape[0] < 2:
        raise InvalidInput("the judge needs at least 2 images (the FD needs a covariance)")
    if not np.isfinite(x).all():
        raise InvalidInput(f"{np.count_nonzero(~np.isfinite(x))} image values are NaN/inf: nothing to judge")
    feats, logits = forward(weights, x)
    if labels is None:
        hit, guess = recognised(logits), logits.argmax(axis=1)
        per_class = tuple(float(np.mean(guess == k)) for k in range(logits.shape[1]))
    else:
        labels = np.asarray(labels).reshape(-1)
        if labels.dtype.kind not in "iu":
            raise InvalidInput(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
        if labels.shape[0] != x.shape[0]:
            raise InvalidInput(f"{x.shape[0]} images but {labels.shape[0]} labels")
        classes = logits.shape[1]
        if labels.size and not (0 <= labels.min() and labels.max() < classes):
            raise InvalidInput(f"labels must be digits 0..{classes - 1}, got values from {labels.min()} to {labels.max()}")
        hit = logits.argmax(axis=1) == labels
        per_class = tuple(float(hit[labels == k].mean()) if np.any(labels == k) else float("nan")
                          for k in range(logits.shape[1]))
    fd = frechet_distance(*feature_stats(feats), weights["ref_mu"], weights["ref_cov"])
    base_acc, base_fd = _baseline(weights, x.shape[0], labels is not None)
    return JudgeResult(int(x.shape[0]), float(hit.mean()), fd, base_acc, base_fd, per_class, labels is not None)


# --- judging a bundle or an archive of samples ---------------------------------------------
def class_order_labels(per_class: int, classes: int = 10) -> np.ndarray:
    """0,0,...,1,1,...: ``per_class`` of each class in class order (one grid row per class)."""
    return np.repeat(np.arange(classes, dtype=np.int64), per_class)


_BATCH = 250            # samples per generation batch


def unjudgeable(manifest) -> str | None:
    """Why the judge cannot read this bundle's samples (image-conditioned, or not 1×16×16
    digits once decoded), or None."""
    from edgediff.runtime.conditions import COND_COMPONENT

    if COND_COMPONENT in manifest.components:
        return "this bundle's model is image-conditioned: judge it with `edgediff digits inpaint BUNDLE`"
    out_shape = (manifest.component("decoder").outputs["image"]["shape"][1:] if manifest.space == "latent"
                 and "decoder" in manifest.components else list(manifest.sample_shape))
    if (manifest.space != "latent" or "decoder" in manifest.components) and out_shape != [1, SIZE, SIZE]:
        return f"the digits judge reads 1×{SIZE}×{SIZE} digits; this model makes {out_shape}"
    return None


def judge_backend(backend, manifest, per_class: int = 100, *, sampler: str | None = None,
                  steps: int | None = None, guidance: float | None = None, seed: int = 0, batch: int = _BATCH,
                  decoder=None, **options):
    """Generate ``per_class`` samples of every class (an unconditional model: 10·per_class
    samples) and judge them: (JudgeResult, images),
    images (N, C, H, W) float in [-1, 1]. A latent model's samples are decoded first by
    ``decoder`` (a bundle's decoder backend, e.g. ``Pipeline.decoder``, or anything with its
    ``infer({"latents"}) -> {"image"}`` contract). Unset sampler/steps/guidance: the bundle's
    recommended ones. ``options`` go to the sampler."""
    from edgediff.runtime.pipeline import decode, generate

    if (why := unjudgeable(manifest)) is not None:
        raise InvalidInput(why)
    if manifest.space == "latent" and decoder is None:
        raise InvalidInput("a latent model's samples must be decoded before judging: the bundle has no decoder")
    # an unconditional model draws as many samples, unlabelled
    labels = class_order_labels(per_class, manifest.num_classes) if manifest.conditional else None
    n = len(labels) if manifest.conditional else 10 * per_class
    gen = generate(backend, manifest, n, sampler=sampler, steps=steps, batch=batch,
                   labels=labels, guidance=guidance, seed=seed, **options)
    images = decode(decoder, gen.samples, batch) if gen.latent else gen.samples
    return judge(images, labels), images


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` and ``labels`` from an .npz written by ``edgediff generate --npz``; labels
    None for an unconditional model's archive (judged as such)."""
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError):    # empty, truncated, pickled or not numpy at all
        raise InvalidInput(f"{path} is not a samples archive (an .npz from `edgediff generate --npz`)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidInput(f"{path} is a single .npy array, not a samples archive (an .npz with images and labels)")
    with archive as data:
        if "images" not in data.files:
            raise InvalidInput(f"{path} lacks images (expected an `edgediff generate --npz` archive)")
        if "cond_index" in data.files:
            raise InvalidInput(f"{path} holds samples of an image-conditioned model: judge that model with "
                               "`edgediff digits inpaint BUNDLE`")
        return data["images"], (data["labels"] if "labels" in data.files else None)


def evaluate(source: str | Path, *, per_class: int = 100, sampler: str | None = None, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, backend: str = "ort",
             precision: str = "fp32", classifier_scale: float = 0.0) -> JudgeResult:
    """Judge a samples archive (.npz), or a bundle's samples generated here (unset sampling
    choices: the bundle's recommended ones; ``classifier_scale`` guides with its classifier)."""
    source = Path(source)
    if source.is_file():
        return judge(*read_samples(source))
    from edgediff.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(source, backend=backend, precision=precision, max_batch=_BATCH) as pipe:
        return judge_backend(pipe.backend, pipe.manifest, per_class, sampler=sampler, steps=steps,
                             guidance=guidance, seed=seed, batch=_BATCH, decoder=pipe.decoder,
                             classifier=pipe.classifier, classifier_scale=classifier_scale)[0]
