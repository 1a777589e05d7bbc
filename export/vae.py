"""Autoencoder companions of latent bundles: ``decoder.onnx`` (latents -> image) and
``encoder.onnx`` (image -> latents), exported from diffusers' ``AutoencoderKL`` and checked
against it (docs/architecture.md rung 1) before they join the bundle.

The graphs speak the denoiser's language: ``latents`` are the scaled, unit-variance latents
the sampler produces, so the 1/scaling_factor (decoder) and scaling_factor (encoder) live
inside the graphs and the runtime never needs to know the factor. Images are in [-1, 1]; the
decoder's output is not clamped (the runtime's ``to_uint8`` clips).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.files import sha256_file, staged_dir
from edgediff.runtime.manifest import Component
from edgediff.runtime.parity import ParityResult

from .onnx_export import export_graph, gate
from .reference import TorchBackend, component_feed
from .vae_layouts import DEFAULT_SCALING_FACTOR, VAESource, build_vae, load_vae, read_vae

TOLERANCE = (1e-5, 1e-4)            # rung 1, as for the denoisers
FILES = {"decoder": "decoder.onnx", "encoder": "encoder.onnx"}
# The latent scale a family's bundle records (the one its denoiser was trained with).
BUNDLE_SCALE_KEYS = ("latent_scale", "latent_scale_factor")


class DecoderView(torch.nn.Module):
    """latents (as the denoiser samples them) -> image in [-1, 1], unclamped."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)

    def forward(self, latents):
        return (self.vae.decode(latents / self.scaling_factor, return_dict=False)[0],)    # outputs are tuples


class EncoderView(torch.nn.Module):
    """image in [-1, 1] -> latents: the posterior's mean (its mode), scaled as the denoiser's."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)

    def forward(self, image):
        return (self.vae.encode(image, return_dict=False)[0].mean * self.scaling_factor,)


VIEWS = {"decoder": DecoderView, "encoder": EncoderView}


def component_io(source: VAESource, sample_shape) -> dict[str, dict]:
    """name -> (inputs, outputs) declarations for bundle.json, batch symbolic."""
    c, h, w = sample_shape
    f, cfg = source.downsample, source.config
    latents = {"dtype": "float32", "shape": ["batch", c, h, w]}
    image_in = {"dtype": "float32", "shape": ["batch", cfg["in_channels"], h * f, w * f]}
    image_out = {"dtype": "float32", "shape": ["batch", cfg["out_channels"], h * f, w * f]}
    return {"decoder": ({"latents": latents}, {"image": image_out}),
            "encoder": ({"image": image_in}, {"latents": latents})}


def check_latent_shape(source: VAESource, sample_shape) -> None:
    """The autoencoder must produce and take the denoiser's latents. It is fully convolutional,
    so the image size follows from the latent size (× 2^(levels-1)); channels must agree."""
    c, h, w = sample_shape
    width = source.config["latent_channels"]
    if width != c:
        raise InvalidInput(f"the autoencoder's latents have {width} channels, the denoiser's sample_shape "
                           f"{list(sample_shape)} has {c}: not this bundle's autoencoder")
    if source.config["out_channels"] not in (1, 3):
        raise InvalidInput(f"the decoder gives {source.config['out_channels']} channels; images need 1 or 3")


def resolve_scaling(source: VAESource, manifest, explicit: float | None) -> tuple[float, str]:
    """The latent scale and where it came from: the argument, else the files (diffusers
    config, LDM checkpoint buffer), else the bundle's record, else diffusers' default. The
    bundle's record is only its family's usual autoencoder (DiT: sd-vae's 0.18215), a guess,
    so the autoencoder's own file wins over it; the choice is recorded in the manifest."""
    if explicit is not None:
        if not (np.isfinite(explicit) and explicit > 0):
            raise InvalidInput(f"the scaling factor must be a positive number, got {explicit!r}")
        return float(explicit), "argument"
    recorded = next((manifest.extra[k] for k in BUNDLE_SCALE_KEYS if k in manifest.extra), None)
    if source.scaling_factor is not None:
        return float(source.scaling_factor), source.scaling_from
    if recorded is not None:
        return float(recorded), "bundle"
    return DEFAULT_SCALING_FACTOR, "default"


# --- rung 1 ------------------------------------------------------------------------------
def validate_component(module: torch.nn.Module, inputs: dict, outputs: dict, path: Path, seed: int = 0,
                       candidate: str = "onnx-fp32 (onnxruntime CPU)") -> ParityResult:
    """ORT vs PyTorch on batch 1 and 3 of data-like inputs (unit-variance latents, images
    uniform in [-1, 1]); the reference's shapes must be the declared ones."""
    from edgediff.runtime.backends.ort import OrtBackend

    rng = np.random.default_rng(seed)
    cases = [(f"batch={batch} draw={draw}", component_feed(inputs, batch, rng)) for batch in (1, 3) for draw in range(2)]
    with OrtBackend(path, inputs, list(outputs)) as backend:
        return gate(TorchBackend(module, inputs, list(outputs)), backend, cases,
                    {n: tuple(d["shape"][1:]) for n, d in outputs.items()}, TOLERANCE, candidate)


# --- adding to a bundle ------------------------------------------------------------------
def add_vae(bundle_dir, checkpoint, config=None, layout: str | None = None, prefix: str | None = None,
            scaling_factor: float | None = None, log=print) -> dict[str, ParityResult]:
    """Add ``decoder.onnx`` and ``encoder.onnx`` to a latent bundle, each validated (rung 1)
    in a staged directory; the bundle is changed only when both pass."""
    from .bundle import ParityError

    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    if m.space != "latent":
        raise InvalidInput(f"{bundle.path} holds a {m.space}-space model: only latent bundles take an autoencoder")
    have = [n for n in m.components if n in VIEWS]
    if have:
        raise InvalidInput(f"{bundle.path} already has {', '.join(have)}: export the bundle again "
                           "to change its autoencoder")
    source = read_vae(checkpoint, config, layout, prefix)
    check_latent_shape(source, m.sample_shape)
    scale, scale_from = resolve_scaling(source, m, scaling_factor)
    vae = build_vae(source.config, source.state)
    log(f"autoencoder: {source.layout} layout, {sum(p.numel() for p in vae.parameters()) / 1e6:.3g}M parameters, "
        f"scaling factor {scale:g} ({scale_from})")
    io = component_io(source, m.sample_shape)
    with staged_dir(bundle.path, "vae") as stage:
        results = {}
        for name, view in VIEWS.items():
            inputs, outputs = io[name]
            module = view(vae, scale).eval()
            example = {n: torch.from_numpy(v) for n, v in component_feed(inputs, 2, np.random.default_rng(0)).items()}
            log(f"exporting the {name} to ONNX opset {m.opset or 21} and validating it against PyTorch ...")
            export_graph(module, example, list(outputs), stage.path / FILES[name], opset=m.opset or 21,
                         max_batch=m.max_batch)
            results[name] = validate_component(module, inputs, outputs, stage.path / FILES[name])
        bad = [f"{n}: {r.summary()}" for n, r in results.items() if not r.passed]
        if bad:
            failed = stage.keep_failed(".vae.failed")
            raise ParityError(f"{'; '.join(bad)}; the graphs were left in {failed} for inspection")
        extra = {"scaling_factor": scale, "scaling_factor_from": scale_from, "layout": source.layout,
                 "prefix": source.prefix, "downsample": source.downsample, "config": _jsonable(source.config),
                 "source": {"checkpoint": source.weights.name, "sha256": sha256_file(source.weights)}}
        _install(bundle, stage.path, io, results, extra)
    return results


def _jsonable(config: dict) -> dict:
    return json.loads(json.dumps(config, default=list))


def _install(bundle, tmp: Path, io: dict, results: dict, extra: dict) -> None:
    """Move the graphs in and record them as the bundle's components (see install_into_bundle)."""
    from .bundle import install_into_bundle

    components = {n: Component(inputs=io[n][0], outputs=io[n][1], models={"fp32": FILES[n]},
                               parity={"fp32": {"passed": r.passed, "worst_rel_l2": r.worst_rel_l2}},
                               extra=extra) for n, r in results.items()}
    install_into_bundle(bundle, tmp, {f"{n}.fp32": r.to_dict() for n, r in results.items()},
                        bundle.manifest.replace(components={**bundle.manifest.components, **components}))


# --- the reference again (FP16 gate) -------------------------------------------------------
def component_module(component, name: str, weights: Path) -> torch.nn.Module:
    """The PyTorch view of component ``name`` rebuilt from its bundle record (layout,
    AutoencoderKL config, key prefix, scale) and ``weights``, whose sha256 the caller checked."""
    extra = component.extra
    vae = load_vae(weights, extra["layout"], extra["config"], extra.get("prefix", ""))
    return VIEWS[name](vae, extra["scaling_factor"]).eval()
