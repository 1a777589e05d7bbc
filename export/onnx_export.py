"""FP32 ONNX export of a family's export view (or any module with named I/O: the autoencoder
components), with dynamic batch, checks and parity."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edgediff.runtime.backends.ort import OrtBackend
from edgediff.runtime.bundle import io_spec
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.parity import ParityResult

from .models.family import ModelSpec
from .reference import TorchBackend, example_feed

# Protobuf cannot hold more than 2 GiB; above ~1.8 GiB of weights the initializers go to a
# side file (model.onnx.data) so the graph stays loadable.
EXTERNAL_DATA_BYTES = int(1.8 * 2**30)


class ExportError(EdgediffError, RuntimeError):
    """The exporter could not produce a valid ONNX graph."""


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_onnx(module: torch.nn.Module, spec: ModelSpec, path: Path, opset: int = 21,
                max_batch: int | None = None, features=None) -> list[Path]:
    """Trace a family's export view into ``path`` (docs/architecture.md I/O contract)."""
    feed = example_feed(spec, 2, float(spec.time["max"]), "class", np.random.default_rng(0), features)
    args = {n: torch.from_numpy(feed[n]) for n in spec.inputs}
    return export_graph(module, args, list(spec.outputs), path, opset=opset, max_batch=max_batch)


def export_graph(module: torch.nn.Module, example_args: dict[str, torch.Tensor], output_names: list[str],
                 path: Path, opset: int = 21, max_batch: int | None = None) -> list[Path]:
    """Trace ``module(*example_args.values())`` with the dynamo exporter into ``path``, inputs
    and outputs named, batch (axis 0 of every input) the only dynamic axis; check the graph
    and return the files written."""
    if opset < 18:
        raise ExportError("opset must be ≥ 18 (the dynamo exporter's Split is invalid at 17)")
    args = tuple(example_args.values())
    batch = torch.export.Dim("batch", min=1, max=max_batch or 2**20)
    external = weight_bytes(module) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), input_names=list(example_args),
                              output_names=list(output_names), opset_version=opset, dynamo=True,
                              dynamic_shapes=tuple({0: batch} for _ in args), external_data=external,
                              optimize=True, verbose=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
    check_onnx(path)
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def check_onnx(path: Path) -> None:
    """Store inferred shapes (strict), then a full checker pass; both path-based so models
    over 2 GB (external data) work."""
    try:
        onnx.shape_inference.infer_shapes_path(str(path), strict_mode=True, data_prop=True)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"ONNX checker rejected {path.name}: {str(exc).strip().splitlines()[0]}") from None


def validate(module: torch.nn.Module, spec: ModelSpec, path: Path, tolerance: tuple[float, float],
             seed: int = 0, candidate: str = "onnx-fp32 (onnxruntime CPU)", features=None) -> ParityResult:
    """docs/architecture.md rung 1: ORT vs PyTorch on fresh inputs at both ends of the time range,
    batch 1 and 3, with class labels and with the null label (``features``: the condition
    features' source for a denoiser that takes them, see reference.encoder_features)."""
    inputs, _ = io_spec(spec.inputs, spec.outputs, spec.sample_shape, spec.features)
    rng = np.random.default_rng(seed)
    label_kinds = ("class", "null") if spec.null_label is not None else ("class",)
    cases = [(f"batch={batch} t={t:g}" + (f" labels={labels}" if spec.conditional else ""),
              example_feed(spec, batch, float(t), labels, rng, features))
             for batch in (1, 3) for t in (spec.time["min"], spec.time["max"]) for labels in label_kinds]
    return gate(TorchBackend.from_spec(module, spec), OrtBackend(path, inputs, list(spec.outputs)), cases,
                {n: tuple(spec.sample_shape) for n in spec.outputs}, tolerance, candidate)


def gate(reference, candidate, cases, row_shapes: dict[str, tuple], tolerance: tuple[float, float | None],
         candidate_name: str) -> ParityResult:
    """Rung 1's loop, shared by the denoiser and its companions: each ``(tag, feed)`` through
    both backends; a reference whose outputs are not (batch, *row_shape) as the bundle
    declares fails the export, and the candidate is gated against the reference."""
    result = ParityResult("pytorch-fp32", candidate_name, *tolerance)
    for tag, feed in cases:
        reference_out = reference.infer(feed)
        batch = next(iter(feed.values())).shape[0]
        check_shapes(reference_out, {n: (batch, *shape) for n, shape in row_shapes.items()}, "the PyTorch reference")
        # the candidate is held to the reference's (now known good) shapes by the gate
        result.add(tag, reference_out, candidate.infer(feed))
    return result


def check_shapes(outputs: dict[str, np.ndarray], expected: dict[str, tuple], who: str) -> None:
    """Every output must have the shape bundle.json declares: a model that returns another
    shape (e.g. a patch size that crops the image) must not be exported."""
    missing = [n for n in expected if n not in outputs]
    if missing:
        raise ExportError(f"{who} returns no {', '.join(map(repr, missing))} output (expected {tuple(expected)})")
    for name, want in expected.items():
        if tuple(outputs[name].shape) != want:
            raise ExportError(f"{who} returns {name!r} of shape {tuple(outputs[name].shape)}, but the bundle "
                              f"declares {want}")


class _quiet_exporter:
    """The dynamo exporter logs progress at INFO/WARNING; keep the CLI's output readable."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
