"""Judge digits models: a trained directory through PyTorch, or the shipped weights through
their ONNX bundles on ONNX Runtime (the README's quality table).

The same ``runtime.pipeline.generate`` loop that runs bundles drives a torch module here
(a backend whose ``infer`` calls the export view), so a model can be checked while it
trains, without an ONNX export. Beside the project's judge, an outside check: an RBF
SVM (scikit-learn) trained on the original 8×8 digits classifies 2×2-pooled samples.

    edgediff digits check digits/assets/dit --guidance 3
    edgediff digits quality-table --per-class 100 --long-per-class 20
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgediff.digits import judge as rt_judge
from edgediff.export.reference import TorchBackend, build_reference, manifest_for
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.manifest import Sampling
from edgediff.runtime.samplers import DEFAULT_SAMPLER

from . import data as digits

# The 1000-step reference sampler per schedule kind: ancestral DDPM, or DDM's own (stochastic).
LONG_SAMPLER = {"discrete": "ddpm", "ddm_constant": "ddm"}


def load_trained(path: str | Path):
    """(digits model name, config, export-view module, spec) from a training output directory;
    the name is the family's, or a digits model's such as ``dit_latent`` (family dit)."""

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    name = json.loads((path / "train.json").read_text())["family"]
    family, module = build_reference(digits.model_family(name), config, path / "model.safetensors")
    return name, config, module, family.spec(config)


def trained_decoder(path: str | Path, vae: str | Path | None = None):
    """The PyTorch decoder of a latent training output (``vae.TorchDecoder``): the autoencoder
    ``vae``, else the one its train.json names; refused if its weights are not the ones the
    model learned the latents of. None for a pixel-space model."""
    from edgediff.runtime.errors import InvalidInput
    from edgediff.runtime.files import sha256_file

    from .demo import ASSETS
    from .vae import WEIGHTS, TorchDecoder, load_vae

    record = json.loads((Path(path) / "train.json").read_text())
    if "vae" not in record:
        return None
    learned = record["vae"]
    where = Path(vae) if vae is not None else (
        ASSETS / learned["shipped"] if "shipped" in learned else Path(learned["path"]))
    decoder = TorchDecoder(load_vae(where))
    if sha256_file(where / WEIGHTS) != learned["sha256"]:
        raise InvalidInput(f"{where} is not the autoencoder {path} learned the latents of "
                           f"(weights sha256 {learned['sha256'][:12]}...); pass that one with --vae")
    return decoder


class OutsideClassifier:
    """RBF SVM on the 8×8 train split; classifies 16×16 samples after 2×2 pooling."""

    def __init__(self):
        from sklearn.svm import SVC

        data = digits.load()
        self.svc = SVC().fit(self._features(data.train_x), data.train_y)

    @staticmethod
    def _features(x: np.ndarray) -> np.ndarray:
        small = digits.downsample2x((np.clip(x.reshape(len(x), 16, 16), -1, 1) + 1) / 2)   # (N, 8, 8)
        return small.reshape(len(x), -1)

    def accuracy(self, samples: np.ndarray, labels: np.ndarray | None) -> float:
        """Share classified as ``labels``; unlabelled samples (an unconditional model): the
        share on which the SVM agrees with the judge's class."""
        if labels is None:
            labels = rt_judge.forward(rt_judge.load_judge(), rt_judge.as_images(samples))[1].argmax(axis=1)
        return float(np.mean(self.svc.predict(self._features(samples)) == labels))


def _row(name, sampler, steps, guidance, result, outside, seconds) -> str:
    return (f"| {name} | {sampler} | {steps} | {guidance:g} | {100 * result.accuracy:.1f}% | "
            f"{100 * outside:.1f}% | {result.fd:.1f} | {result.baseline_fd:.1f} | {result.n} | {seconds:.0f} s |")


def _family_rows(fam, pipe, outside, per_class, long_per_class, guidance) -> list[str]:
    """The four rows of one family's bundle, opened as a Pipeline (its decoder decodes latents)."""
    bundle, backend, rows = pipe.bundle, pipe.backend, []
    kind = bundle.manifest.noise_schedule.kind
    default = DEFAULT_SAMPLER[kind]
    long_name = LONG_SAMPLER[kind]
    w = bundle.manifest.sampling.guidance if guidance is None else guidance
    runs = [(default, 20, 1.0, per_class), (default, 20, w, per_class),
            (default, 20, w, long_per_class), (long_name, 1000, w, long_per_class)]
    for sampler, steps, w, n in runs:
        start = time.perf_counter()
        labels = rt_judge.class_order_labels(n) if bundle.manifest.conditional else None
        result, samples = rt_judge.judge_backend(backend, bundle.manifest, n, sampler=sampler, steps=steps,
                                                 guidance=w, batch=200, decoder=pipe.decoder)
        rows.append(_row(fam, sampler, steps, w, result, outside.accuracy(samples, labels),
                         time.perf_counter() - start))
        print(rows[-1], flush=True)
    return rows


def table(families, per_class: int, long_per_class: int, guidance: float | None, cache: Path) -> list[str]:
    """Markdown rows: per family 20 default-sampler steps at w=1 and w=guidance (None: the
    runtime's default for the bundle), and the 1000-step ancestral sampler at w=guidance
    with the same number of samples; then the real held-out digits."""
    from edgediff.runtime.pipeline import Pipeline

    from .demo import ensure_bundle

    outside = OutsideClassifier()
    rows = ["| model | sampler | steps | w | judge accuracy | SVM accuracy | FD | real FD (same n) | n | time |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in families:
        with Pipeline.from_bundle(ensure_bundle(fam, cache / f"digits-{fam}", log=lambda m: None)) as pipe:
            rows.extend(_family_rows(fam, pipe, outside, per_class, long_per_class, guidance))
    held = rt_judge.load_judge()
    real = rt_judge.judge(held["held_images"], held["held_labels"])
    rows.append(_row("real held-out digits", "-", 0, 0, real,
                     outside.accuracy(rt_judge.as_images(held["held_images"]), held["held_labels"]), 0))
    return rows


def trained_manifest(name: str, config: dict, spec):
    """The in-memory manifest of a digits model (``name``: a family or a digits model name),
    with the digits' recommended sampling."""
    return manifest_for(digits.model_family(name), spec, config, Sampling(**digits.DIGITS_SAMPLING.get(name, {})))


def check(path: str | Path, per_class: int, sampler: str | None, steps: int | None, guidance: float | None,
          vae: str | Path | None = None):
    """Judge a training output directory through PyTorch (no ONNX export); a latent model's
    samples are decoded by its autoencoder in PyTorch first."""
    name, config, module, spec = load_trained(path)
    if name in digits.TEXT_CONDITIONED:
        raise InvalidInput(f"{path} is a text-to-image model: export it (edgediff demo --family {name} does) "
                           "and judge the bundle per phrasing with `edgediff evaluate BUNDLE`")
    manifest = trained_manifest(name, config, spec)
    result, _ = rt_judge.judge_backend(TorchBackend.from_spec(module, spec), manifest, per_class,
                                       sampler=sampler, steps=steps, guidance=guidance,
                                       decoder=trained_decoder(path, vae))
    return result
