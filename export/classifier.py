"""The classifier-guidance companion: ``classifier_grad.onnx`` (x, t, y -> grad), the input
gradient ∇x log p(y | x_t, t) of an ADM noisy-image classifier (guided-diffusion's
``EncoderUNetModel``), added to a bundle so that the torch-free runtime can guide with it
(``runtime/guidance.py``; Dhariwal & Nichol 2021, Alg. 1 and 2).

The graph holds the classifier's forward and its autograd backward (``classifier_grad.py``);
rung 1 holds it to ``torch.autograd.grad`` of the same classifier on noised data-like inputs
(rel-L2 ≤ 1e-4). ``t`` is the classifier's own time: the integer training step of the
bundle's discrete schedule (respaced samplers hand it the original step, as guided-diffusion's
``_WrappedModel`` does).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.files import sha256_file, staged_dir
from edgediff.runtime.parity import ParityResult

from .classifier_grad import trace_gradient
from .models import adm_classifier
from .models.common import load_strict, read_checkpoint
from .onnx_export import export_graph, gate
from .reference import TorchBackend

NAME, FILE = "classifier", "classifier_grad.onnx"
TOLERANCE = (1e-4, None)      # a gradient through a whole network: rel-L2 only (issue 14)
CASE_STEPS = (0, 300, 999)


class GradBackend(TorchBackend):
    """The PyTorch reference of the gradient view: autograd must run, so no inference mode."""

    name = "torch-autograd"

    def infer_impl(self, feed):
        outs = self.module(*(torch.from_numpy(np.array(feed[n])) for n in self.inputs))
        return [o.detach().float().numpy() for o in outs]


def component_io(config: dict) -> tuple[dict, dict]:
    c, size = config["in_channels"], config["image_size"]
    x = {"dtype": "float32", "shape": ["batch", c, size, size]}
    return ({"x": x, "t": {"dtype": "float32", "shape": ["batch"]}, "y": {"dtype": "int64", "shape": ["batch"]}},
            {"grad": dict(x)})


def noised_feed(config: dict, schedule, batch: int, step: int, rng: np.random.Generator) -> dict:
    """x_t = sqrt(abar)·x0 + sqrt(1 - abar)·ε with x0 ~ U(-1, 1), at training step ``step``."""
    abar = float(schedule.alphas_cumprod[step])
    c, size = config["in_channels"], config["image_size"]
    x0 = rng.uniform(-1.0, 1.0, (batch, c, size, size))
    x = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * rng.standard_normal(x0.shape)
    return {"x": x.astype(np.float32), "t": np.full(batch, float(step), np.float32),
            "y": rng.integers(0, config["out_channels"], batch).astype(np.int64)}


def check_fits(config: dict, manifest) -> None:
    """The classifier must see the denoiser's samples and the steps of its discrete schedule."""
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    if tuple(manifest.sample_shape) != shape:
        raise InvalidInput(f"the classifier takes {list(shape)} images, the bundle samples "
                           f"{list(manifest.sample_shape)}: not this bundle's classifier")
    if "eps" not in manifest.outputs:          # guided-diffusion's corrections act on an ε prediction
        raise InvalidInput(f"classifier guidance needs a model that predicts eps; this one gives "
                           f"{list(manifest.outputs)} ({manifest.prediction})")
    if manifest.noise_schedule.kind != "discrete":
        raise InvalidInput(f"classifier guidance needs a discrete-step schedule (the classifier's t is the "
                           f"training step); this bundle's is {manifest.noise_schedule.kind}")
    if manifest.conditional and manifest.num_classes != config["out_channels"]:
        raise InvalidInput(f"the classifier has {config['out_channels']} classes, the model "
                           f"{manifest.num_classes}: labels would mean different things")


def load_classifier(config: dict, checkpoint) -> adm_classifier.EncoderUNetModel:
    model = adm_classifier.build(config)
    load_strict(model, read_checkpoint(checkpoint), label="adm classifier")
    return model


def validate_grad(view, config: dict, schedule, path: Path, seed: int = 0) -> ParityResult:
    """Rung 1: ORT vs torch.autograd.grad at batch 1 and 3, t at both ends and between."""
    from edgediff.runtime.backends.ort import OrtBackend

    inputs, outputs = component_io(config)
    rng = np.random.default_rng(seed)
    cases = [(f"batch={b} t={s}", noised_feed(config, schedule, b, s, rng)) for b in (1, 3) for s in CASE_STEPS]
    shape = tuple(outputs["grad"]["shape"][1:])
    with OrtBackend(path, inputs, ["grad"]) as backend:
        return gate(GradBackend(view, inputs, ["grad"]), backend, cases, {"grad": shape}, TOLERANCE,
                    "onnx-fp32 (onnxruntime CPU)")


def export_grad(view, config: dict, schedule, path: Path, opset: int = 21, max_batch: int | None = None) -> None:
    example = noised_feed(config, schedule, 2, 500, np.random.default_rng(0))
    example = {k: torch.from_numpy(v) for k, v in example.items()}
    export_graph(trace_gradient(view, example), example, ["grad"], path, opset=opset, max_batch=max_batch)


def add_classifier(bundle_dir, checkpoint, config: dict, log=print) -> ParityResult:
    """Add ``classifier_grad.onnx`` (validated, rung 1) to a bundle; the bundle changes only if it passes."""
    from .bundle import ParityError, install_component

    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    cfg = adm_classifier.check_config(config)
    check_fits(cfg, m)
    if NAME in m.components:
        raise InvalidInput(f"{bundle.path} already has a classifier: export the bundle again to change it")
    view = adm_classifier.ClassifierGrad(load_classifier(config, checkpoint)).eval()
    log(f"classifier: EncoderUNetModel pool={cfg['pool']}, {cfg['out_channels']} classes, "
        f"{sum(p.numel() for p in view.parameters()) / 1e6:.3g}M parameters")
    schedule = m.noise_schedule
    with staged_dir(bundle.path, "classifier") as stage:
        log(f"tracing its input gradient into ONNX opset {m.opset or 21} and validating it against torch.autograd ...")
        export_grad(view, cfg, schedule, stage.path / FILE, opset=m.opset or 21, max_batch=m.max_batch)
        parity = validate_grad(view, cfg, schedule, stage.path / FILE)
        if not parity.passed:
            failed = stage.keep_failed(".classifier.failed")
            raise ParityError(f"classifier: {parity.summary()}; the graph was left in {failed} for inspection")
        extra = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                 "num_classes": cfg["out_channels"], "time": "training step of the bundle's schedule",
                 "source": {"checkpoint": Path(checkpoint).name, "sha256": sha256_file(checkpoint)}}
        install_component(bundle, stage.path, NAME, FILE, parity, component_io(cfg), extra)
    return parity


def component_module(component, weights: Path) -> torch.nn.Module:
    """The PyTorch gradient view rebuilt from the bundle record and ``weights`` (FP16 gate)."""
    return adm_classifier.ClassifierGrad(load_classifier(component.extra["config"], weights)).eval()
