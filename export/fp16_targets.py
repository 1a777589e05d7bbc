"""What an FP16 conversion calibrates and gates on (docs/architecture.md rung 2): the
denoiser, fed along its noise schedule, or an autoencoder component, fed data as the runtime
feeds it (unit-variance latents, images in [-1, 1])."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgediff.runtime.bundle import io_spec

from .models.family import ModelSpec
from .reference import Features, calibration_feed, component_feed, schedule_points, trajectory_feed

FP16_FILE = "model_fp16.onnx"
# FP32 island candidates (export/fp16.py CANDIDATES): an autoencoder has no t/y conditioning path.
DENOISER_ISLANDS = ("conditioning", "softmax", "normalization")
COMPONENT_ISLANDS = ("softmax", "normalization")


@dataclass(frozen=True)
class Target:
    """What a conversion calibrates and gates on: the denoiser (feeds along its noise
    schedule) or an autoencoder component (feeds of its data: unit-variance latents, images
    in [-1, 1]). ``calibration(rows)`` is one feed whose rows are run one at a time;
    ``gate(points, seed)`` gives the rung-2 cases as (label, feed)."""

    component: str
    inputs: dict                                   # name -> {"dtype", "shape"}, batch symbolic
    outputs: tuple[str, ...]
    calibration: Callable[[int], dict]
    gate: Callable[[int, int], list]
    candidates: tuple[str, ...]
    drawn: str                                     # how calibration inputs were drawn (the record)

    @property
    def fp16_file(self) -> str:
        return FP16_FILE if self.component == "denoiser" else f"{self.component}_fp16.onnx"


def denoiser_target(spec: ModelSpec, features: Features | None = None) -> Target:
    """``features``: where condition features come from (ddm_cond: the bundle's condition
    encoder on conditions in [-1, 1]); N(0, 1) draws when None."""
    def gate(points: int, seed: int) -> list:
        rng = np.random.default_rng(seed)
        kinds = ("class", "null") if spec.null_label is not None else ("class",)
        return [(f"t={p[0]:g}" + (f" labels={labels}" if spec.conditional else ""),
                 trajectory_feed(spec, p, 2, labels, rng, features))
                for p in schedule_points(spec, points) for labels in kinds]

    inputs, _ = io_spec(spec.inputs, spec.outputs, spec.sample_shape, spec.features)
    drawn = "signal(t)·x0 + noise(t)·ε along the bundle's schedule"
    if spec.features:
        drawn += ("; condition features from the condition encoder on conditions ~ U(-1, 1)" if features
                  else "; condition features ~ N(0, 1)")
    return Target("denoiser", inputs, tuple(spec.outputs), lambda rows: calibration_feed(spec, rows, features=features),
                  gate, DENOISER_ISLANDS, drawn)


def component_target(name: str, component) -> Target:
    """An autoencoder component: no t or labels, so no conditioning island; its activations
    depend only on the data, drawn as the runtime feeds it."""
    def gate(points: int, seed: int) -> list:
        rng = np.random.default_rng(seed)
        return [(f"draw={i}", component_feed(component.inputs, 2, rng)) for i in range(points)]

    drawn = {"latents": "latents ~ N(0, 1) (scaled, as the denoiser samples them)",
             "image": "images ~ U(-1, 1)", "cond": "conditions ~ U(-1, 1)"}
    return Target(name, component.inputs, tuple(component.output_names),
                  lambda rows: component_feed(component.inputs, rows, np.random.default_rng(0)), gate,
                  COMPONENT_ISLANDS, "; ".join(drawn.get(n, n) for n in component.inputs))


def classifier_target(component, schedule) -> Target:
    """The classifier-guidance gradient (``classifier_grad.onnx``): noised data-like x at
    training steps across the schedule, random labels, as the runtime feeds it."""
    from .classifier import noised_feed

    config = component.extra["config"]
    steps = lambda n: np.linspace(0, schedule.num_train_timesteps - 1, n).round().astype(int)   # noqa: E731

    def calibration(rows: int) -> dict:
        rng = np.random.default_rng(0)
        parts = [noised_feed(config, schedule, 1, int(s), rng) for s in steps(rows)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def gate(points: int, seed: int) -> list:
        rng = np.random.default_rng(seed)
        return [(f"t={s}", noised_feed(config, schedule, 2, int(s), rng)) for s in steps(points)]

    return Target("classifier", component.inputs, tuple(component.output_names), calibration, gate,
                  DENOISER_ISLANDS, "sqrt(abar)·x0 + sqrt(1 - abar)·ε, x0 ~ U(-1, 1), at steps across the schedule")


def text_encoder_target(component) -> Target:
    """The text encoder: CLIP-shaped id rows (start, random words, end, end-padding), the
    vocabulary's last two ids being the specials as in CLIP; no t, so no conditioning island."""
    from .text_encoder import id_feed

    length = component.inputs["input_ids"]["shape"][1]
    vocab = component.extra["config"].get("vocab_size", 49408)

    def gate(points: int, seed: int) -> list:
        rng = np.random.default_rng(seed)
        return [(f"draw={i}", id_feed(2, length, vocab, rng)) for i in range(points)]

    return Target("text_encoder", component.inputs, tuple(component.output_names),
                  lambda rows: id_feed(rows, length, vocab, np.random.default_rng(0)), gate, COMPONENT_ISLANDS,
                  "token ids: <|startoftext|>, uniform random word ids, <|endoftext|> padding")


def as_target(what: ModelSpec | Target) -> Target:
    return what if isinstance(what, Target) else denoiser_target(what)
