"""What a model family declares: the data the exporter, the bundle and the CLI need.

A family is one module in this package exposing ``FAMILY = Family(...)`` and one line in
the registry (``edgediff.export.models.FAMILIES``). Everything about I/O is data here, in
the spirit of Optimum's export configs, without their class hierarchy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the registry must list families without importing torch
    import torch


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one configured denoiser, written into ``bundle.json``.

    ``time`` describes the ``t`` input: ``{"convention": ..., "min": ..., "max": ...}`` where
    convention is ``"discrete"`` (integer steps 0..999 passed as float), ``"continuous"``
    or ``"ddm"`` (t in (0, 1]). ``schedule`` uses diffusers-style keys.
    """

    sample_shape: tuple[int, int, int]                 # (C, H, W)
    outputs: tuple[str, ...]                           # e.g. ("eps",) or ("eps", "var")
    prediction: str                                    # "epsilon", "sample", "v_prediction" or "ddm_c_eps"
    time: dict
    schedule: dict
    num_classes: int | None = None                     # None: unconditional
    null_label: int | None = None                      # label meaning "no class" (guidance)
    space: str = "pixel"                               # "pixel" or "latent"
    extra: dict = field(default_factory=dict)
    # x/t-independent inputs computed by a companion graph (ddm_cond's condition features):
    # name -> {"dtype", "shape"} (batch symbolic), in graph order after x and t
    features: dict = field(default_factory=dict)
    extra_inputs: tuple[str, ...] = ()                 # after x, t[, y]: "x_self_cond" (lucid)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def inputs(self) -> tuple[str, ...]:
        head = ("x", "t", "y") if self.conditional else ("x", "t")
        return head + tuple(self.features) + tuple(self.extra_inputs)


@dataclass(frozen=True)
class Family:
    """A registered model family.

    build(config) -> nn.Module whose ``forward(x, t[, y])`` returns a tuple of tensors in
        the order of ``spec(config).outputs`` (the export view of the official module).
    official(module) -> the official-layout module inside (whose state_dict keys match the
        official checkpoints); identity when build() returns it directly.
    spec(config) -> ModelSpec.
    configs: named official keyword-argument dicts (the CLI's ``--size`` choices).
    tolerance: (rel_l2, max_abs) parity gate for FP32 ONNX vs PyTorch (docs/architecture.md rung 1).
    fixture: name of a small config used by the registry-completeness tests.
    companions(module, config) -> {component name: (module, inputs, outputs)}: graphs exported
        beside the denoiser from the same weights (ddm_cond's ``cond_encoder``, whose outputs
        are the denoiser's ``spec.features`` inputs); None for single-graph families.
    """

    name: str
    build: Callable[[dict], "torch.nn.Module"]
    spec: Callable[[dict], ModelSpec]
    configs: dict[str, dict]
    fixture: str
    official: Callable[["torch.nn.Module"], "torch.nn.Module"] = lambda m: m
    tolerance: tuple[float, float] = (1e-5, 1e-4)
    description: str = ""
    companions: Callable[["torch.nn.Module", dict], dict] | None = None
