"""The embedded default: the shipped digits weights, exported once to a cached bundle,
sampled on ONNX Runtime into a 10×10 grid (a row per class) and judged.

The bundle under ``build/digits-<family>`` is re-exported only when it is missing,
unreadable, or was exported from other weights (bundle.json's source sha256). A latent
model's bundle (``dit_latent``) also carries the shipped autoencoder as its ``decoder`` and
``encoder`` components (``edgediff.export.vae.add_vae``), and is redone when it lacks them
or they came from other autoencoder weights.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgediff.digits import judge as rt_judge
from edgediff.runtime.bundle import BundleError, read_bundle
from edgediff.runtime.files import sha256_file
from edgediff.runtime.manifest import Sampling

from . import text as digits_text
from .data import AUTOENCODER, AUTOENCODER_WEIGHTS as VAE_WEIGHTS, DIGITS_SAMPLING, TEXT_CONDITIONED, model_family
from edgediff.runtime.errors import InvalidInput

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_FAMILY = "dit"       # clean samples, the fastest export and sampling of the pixel models


def shipped(family: str) -> Path:
    """The directory of the shipped weights of ``family`` (model.safetensors, config.json)."""
    path = ASSETS / family
    if not (path / "model.safetensors").is_file():
        have = sorted(p.parent.name for p in ASSETS.glob("*/model.safetensors"))
        raise InvalidInput(f"no shipped digits weights for {family!r}; available: {', '.join(have) or 'none'}")
    return path


def _mentions(obj, text: str) -> bool:
    """Whether ``text`` is one of the (nested) values of ``obj``."""
    if isinstance(obj, dict):
        return any(_mentions(v, text) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_mentions(v, text) for v in obj)
    return obj == text


def _autoencoder_fresh(manifest, vae_weights: Path) -> bool:
    """The bundle carries a decoder made from these autoencoder weights (their sha256 is
    among the component's recorded facts)."""
    if "decoder" not in manifest.components:
        return False
    return _mentions(manifest.component("decoder").extra, sha256_file(vae_weights))


def _text_encoder_fresh(manifest, weights: Path) -> bool:
    """The bundle carries a text encoder exported from these weights."""
    if digits_text.TEXT_DIR not in manifest.components:
        return False
    return _mentions(manifest.component(digits_text.TEXT_DIR).extra, sha256_file(weights))


def ensure_bundle(family: str, out: str | Path, log=print) -> Path:
    """A bundle of the shipped ``family`` weights at ``out``, exported only if stale; a latent
    model's bundle gets the shipped autoencoder as its decoder/encoder, a text model's its
    text encoder and tokenizer."""
    from edgediff.export.bundle import export_bundle

    src, out = shipped(family), Path(out)
    weights = src / "model.safetensors"
    vae = ASSETS / AUTOENCODER[family] if family in AUTOENCODER else None
    text = src / digits_text.TEXT_DIR / digits_text.TEXT_WEIGHTS if family in TEXT_CONDITIONED else None
    try:
        m = read_bundle(out).manifest
        if (m.source_sha256 == sha256_file(weights) and m.sampling == Sampling(**DIGITS_SAMPLING[family])
                and (vae is None or _autoencoder_fresh(m, vae / VAE_WEIGHTS))
                and (text is None or _text_encoder_fresh(m, text))):
            return out
    except (BundleError, FileNotFoundError, KeyError, OSError):
        pass                    # missing, partial or foreign: export afresh
    config = json.loads((src / "config.json").read_text())
    export_bundle(model_family(family), config, out, checkpoint=weights, sampling=DIGITS_SAMPLING[family], log=log)
    if vae is not None:
        from edgediff.export.vae import add_vae

        # decoder.onnx (scaled latents -> image in [-1, 1]; 1/scaling_factor inside the graph)
        # and encoder.onnx, recorded as the bundle's components
        add_vae(out, checkpoint=vae / VAE_WEIGHTS, config=vae / "config.json", layout="diffusers", log=log)
    if text is not None:
        from edgediff.export.text_encoder import add_text_encoder

        config = json.loads((text.parent / "config.json").read_text())
        add_text_encoder(out, text, config, tokenizer=src / digits_text.TOKENIZER_DIR, log=log)
    return out


@dataclass
class DemoResult:
    bundle: Path
    png: Path
    judge: rt_judge.JudgeResult
    seconds: float


def run_demo(family: str = DEFAULT_FAMILY, cache: str | Path = "build", png: str | Path = "demo.png",
             steps: int | None = None, guidance: float | None = None, seed: int = 0, log=print) -> DemoResult:
    """Export (if needed), sample ten of each class with the bundle's recommended sampling
    (or the given steps/guidance), write the grid."""
    from edgediff.runtime.images import save_outputs
    from edgediff.runtime.pipeline import Generation, Pipeline

    start = time.perf_counter()
    path = ensure_bundle(family, Path(cache) / f"digits-{family}", log=log)
    with Pipeline.from_bundle(path, max_batch=100) as pipe:      # latent bundles: with their decoder
        if family in TEXT_CONDITIONED:       # a row per digit, each drawn from the prompt "the digit k"
            phrasing = digits_text.CHECK_PHRASINGS[1]
            found = digits_text.judge_prompts(pipe, 10, (phrasing,), seed=seed, batch=100, steps=steps,
                                              guidance=guidance)
            result, images = found[phrasing]
        else:
            result, images = rt_judge.judge_backend(pipe.backend, pipe.manifest, per_class=10, steps=steps,
                                                    guidance=guidance, seed=seed, batch=100, decoder=pipe.decoder)
    labels = rt_judge.class_order_labels(10, pipe.manifest.num_classes) if pipe.manifest.conditional else None
    save_outputs(pipe.manifest, Generation(images, labels), png=png)     # images: pixels or decoded latents
    return DemoResult(pipe.bundle.path, Path(png), result, time.perf_counter() - start)
