"""The PyTorch reference side of every comparison: one place that builds the reference
module, runs it as a backend, and makes the feeds that rung 1 (export validation), rung 2
(the FP16 gate), the rung-5 trajectory test and the digits tooling compare on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgediff.runtime.backends.base import Backend
from edgediff.runtime.bundle import io_spec
from edgediff.runtime.manifest import Manifest, Sampling
from edgediff.runtime.schedules import Schedule

from .models import get_family
from .models.common import load_strict, read_checkpoint
from .models.family import ModelSpec


def build_reference(family_name: str, config: dict, checkpoint: str | Path | None = None):
    """The PyTorch export view of a family, with the checkpoint loaded strictly if given."""
    family = get_family(family_name)
    module = family.build(config)
    if checkpoint is not None:
        load_strict(family.official(module), read_checkpoint(checkpoint), label=family.name)
    return family, module.eval()


class TorchBackend(Backend):
    """The export view of a PyTorch module behind the backend contract (FP32, CPU)."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, inputs, outputs):
        super().__init__(dict(inputs), list(outputs))
        self.module = module.eval()

    @classmethod
    def from_spec(cls, module: torch.nn.Module, spec: ModelSpec) -> "TorchBackend":
        return cls(module, io_spec(spec.inputs, spec.outputs, spec.sample_shape, spec.features)[0], spec.outputs)

    @torch.inference_mode()
    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.module(*(torch.from_numpy(np.array(feed[n])) for n in self.inputs))
        return [o.float().numpy() for o in outs]


def torch_outputs(module: torch.nn.Module, spec: ModelSpec, feed: dict) -> dict[str, np.ndarray]:
    """One reference forward: ``{output name: array}``."""
    return TorchBackend.from_spec(module, spec).infer(feed)


def manifest_for(family_name: str, spec: ModelSpec, config: dict, sampling: Sampling | None = None,
                 **fields) -> Manifest:
    """The manifest a bundle of this model would carry (without files): what the runtime's
    generation loop needs to drive a reference module directly."""
    inputs, outputs = io_spec(spec.inputs, spec.outputs, spec.sample_shape, spec.features)
    return Manifest(family=family_name, config=config, inputs=inputs, outputs=outputs,
                    prediction=spec.prediction, time=spec.time, schedule=spec.schedule,
                    sample_shape=tuple(spec.sample_shape), num_classes=spec.num_classes,
                    null_label=spec.null_label, space=spec.space, extra=spec.extra,
                    sampling=sampling or Sampling(), models={"fp32": "model.onnx"}, **fields)


# --- feeds ---------------------------------------------------------------------------------
# A source of condition features (ddm_cond): (batch, rng) -> {feature name: array}, e.g. the
# condition encoder run on data-like conditions (``encoder_features``).
Features = Callable[[int, np.random.Generator], dict]


def feature_feed(spec: ModelSpec, batch: int, rng: np.random.Generator, features: Features | None) -> dict:
    """The denoiser's feature inputs: from ``features`` when given, else N(0, 1) draws of the
    declared shapes (enough for graph-vs-graph checks; gates on real data pass a source)."""
    if not spec.features:
        return {}
    if features is not None:
        return features(batch, rng)
    return {n: rng.standard_normal((batch, *d["shape"][1:])).astype(np.float32) for n, d in spec.features.items()}


def encoder_features(run: Callable[[dict], dict], cond_inputs: dict) -> Features:
    """Features computed by a condition encoder (``run``: feed -> outputs, PyTorch or ORT) from
    conditions drawn as the runtime feeds them (images in [-1, 1])."""
    return lambda batch, rng: run(component_feed(cond_inputs, batch, rng))


def example_feed(spec: ModelSpec, batch: int, t: float, labels: str, rng: np.random.Generator,
                 features: Features | None = None) -> dict:
    """Inputs in the docs/architecture.md contract; ``labels`` is 'class' (random classes) or 'null'."""
    feed = {"x": rng.standard_normal((batch, *spec.sample_shape)).astype(np.float32),
            "t": np.full((batch,), t, dtype=np.float32), **feature_feed(spec, batch, rng, features)}
    if spec.conditional:
        if labels == "null" and spec.null_label is not None:
            feed["y"] = np.full((batch,), spec.null_label, dtype=np.int64)
        else:
            feed["y"] = rng.integers(0, spec.num_classes, size=batch).astype(np.int64)
    return _self_cond(spec, feed, rng)


def _self_cond(spec: ModelSpec, feed: dict, rng: np.random.Generator) -> dict:
    """A self-conditioned model's extra input: an x0 estimate, data-like (the runtime feeds
    the previous step's clipped x0; zeros at the first step)."""
    if "x_self_cond" in spec.inputs:
        feed["x_self_cond"] = rng.uniform(-1.0, 1.0, feed["x"].shape).astype(np.float32)
    return feed


def component_feed(inputs: dict, batch: int, rng: np.random.Generator) -> dict:
    """Data-like inputs of an autoencoder component: ``latents`` unit-variance (as the
    denoiser samples them, the scale applied), ``image`` uniform in [-1, 1]."""
    draw = {"latents": lambda shape: rng.standard_normal(shape),
            "image": lambda shape: rng.uniform(-1.0, 1.0, shape),
            "cond": lambda shape: rng.uniform(-1.0, 1.0, shape)}
    feed = {}
    for name, decl in inputs.items():
        if name not in draw:
            raise ValueError(f"no data-like feed for component input {name!r}")
        feed[name] = draw[name]((batch, *decl["shape"][1:])).astype(np.float32)
    return feed


def schedule_points(spec: ModelSpec, n: int) -> list[tuple[float, float, float]]:
    """``n`` (model t, signal coeff, noise coeff) triples along the sampler's schedule,
    from the model's smallest to its largest t: x_t = signal·x0 + noise·ε."""
    sched = Schedule.from_config(spec.schedule)
    u = np.linspace(sched.t_min, sched.t_max, n)
    signal, noise = sched.marginal(u)
    t = np.clip(sched.continuous_model_time(u), spec.time["min"], spec.time["max"])
    t[0], t[-1] = spec.time["min"], spec.time["max"]        # the exact ends the model accepts
    return [(float(a), float(b), float(c)) for a, b, c in zip(t, signal, noise)]


def trajectory_feed(spec: ModelSpec, point, batch: int, labels: str, rng: np.random.Generator,
                    features: Features | None = None) -> dict:
    """A feed at one schedule point; x0 is data-like (pixels in [-1, 1], unit-variance latents)."""
    t, signal, noise = point
    shape = (batch, *spec.sample_shape)
    x0 = rng.standard_normal(shape) if spec.space == "latent" else rng.uniform(-1.0, 1.0, shape)
    feed = {"x": (signal * x0 + noise * rng.standard_normal(shape)).astype(np.float32),
            "t": np.full(batch, t, dtype=np.float32), **feature_feed(spec, batch, rng, features)}
    if spec.conditional:
        null = labels == "null" and spec.null_label is not None
        feed["y"] = (np.full(batch, spec.null_label) if null
                     else rng.integers(0, spec.num_classes, batch)).astype(np.int64)
    return _self_cond(spec, feed, rng)


def calibration_feed(spec: ModelSpec, rows: int = 12, seed: int = 0, features: Features | None = None) -> dict:
    """One batch, one row per schedule point, labels alternating class / null."""
    rng = np.random.default_rng(seed)
    kinds = ("class", "null")
    parts = [trajectory_feed(spec, p, 1, kinds[i % 2], rng, features)
             for i, p in enumerate(schedule_points(spec, rows))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


