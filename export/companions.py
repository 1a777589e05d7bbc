"""Companion graphs exported with the denoiser from the same weights (``Family.companions``):
today ddm_cond's ``cond_encoder``, which turns a condition image into the x/t-independent
features the denoiser takes as inputs (computed once per condition, reused at every step).

Each companion is checked on its own (rung 1, batch 1 and 3, conditions ~ U(-1, 1)), and the
pair is checked end to end: ORT(cond_encoder) feeding ORT(model) against the family's unsplit
PyTorch forward ``official(x, t, cond)`` (rung 1's tolerance), so a mis-wired feature name or
order cannot pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgediff.runtime.backends.ort import OrtBackend
from edgediff.runtime.manifest import Component
from edgediff.runtime.parity import ParityResult

from .onnx_export import export_graph
from .reference import TorchBackend, component_feed, encoder_features, example_feed


def feature_source(companions: dict):
    """The PyTorch condition encoder as the denoiser's feature source (None without one)."""
    if "cond_encoder" not in companions:
        return None
    module, inputs, outputs = companions["cond_encoder"]
    return encoder_features(TorchBackend(module, inputs, list(outputs)).infer, inputs)


def export_companions(companions: dict, directory: Path, opset: int, max_batch: int | None, log=print) -> dict:
    """Export and validate each companion into ``directory``: name -> ParityResult."""
    from .vae import validate_component

    results = {}
    for name, (module, inputs, outputs) in companions.items():
        example = {n: torch.from_numpy(v) for n, v in component_feed(inputs, 2, np.random.default_rng(0)).items()}
        log(f"exporting the {name} to ONNX opset {opset} and validating it against PyTorch ...")
        export_graph(module, example, list(outputs), directory / f"{name}.onnx", opset=opset, max_batch=max_batch)
        results[name] = validate_component(module, inputs, outputs, directory / f"{name}.onnx")
    return results


def validate_pair(official: torch.nn.Module, spec, companions: dict, directory: Path, tolerance,
                  seed: int = 0) -> ParityResult:
    """ORT cond_encoder -> ORT model vs the unsplit ``official(x, t, cond)`` -> (c, eps), at
    batch 1 and 3 and both ends of t (plus the middle, where neither output is trivial)."""
    _, enc_in, enc_out = companions["cond_encoder"]
    (cond_name,) = enc_in
    result = ParityResult("pytorch-fp32 unsplit forward", "onnx-fp32 cond_encoder -> model", *tolerance)
    denoiser_inputs = {n: d for n, d in _denoiser_inputs(spec).items()}
    rng = np.random.default_rng(seed)
    with OrtBackend(directory / "cond_encoder.onnx", enc_in, list(enc_out)) as enc, \
            OrtBackend(directory / "model.onnx", denoiser_inputs, list(spec.outputs)) as den:
        for batch in (1, 3):
            for t in (spec.time["min"], 0.5, spec.time["max"]):
                cond = component_feed(enc_in, batch, rng)[cond_name]
                feed = example_feed(spec, batch, float(t), "class", rng, lambda b, r: {})
                got = den.infer({**feed, **enc.infer({cond_name: cond})})
                with torch.inference_mode():
                    ref = official(*(torch.from_numpy(feed[n]) for n in ("x", "t")), torch.from_numpy(cond))
                result.add(f"batch={batch} t={t:g}", {n: r.float().numpy() for n, r in zip(spec.outputs, ref)}, got)
    return result


def _denoiser_inputs(spec) -> dict:
    from edgediff.runtime.bundle import io_spec

    return io_spec(spec.inputs, spec.outputs, spec.sample_shape, spec.features)[0]


def component_records(companions: dict, results: dict, pair: ParityResult | None, source: dict) -> dict:
    """The manifest's ``components`` entries; ``source`` (the checkpoint's name and sha256)
    lets the FP16 gate rebuild the PyTorch reference."""
    out = {}
    for name, (_, inputs, outputs) in companions.items():
        r = results[name]
        extra = {"source": source, "feeds": "denoiser inputs of the same names, in this order"}
        if pair is not None:
            extra["pair"] = {"passed": pair.passed, "worst_rel_l2": pair.worst_rel_l2}
        out[name] = Component(inputs=inputs, outputs=outputs, models={"fp32": f"{name}.onnx"},
                              parity={"fp32": {"passed": r.passed, "worst_rel_l2": r.worst_rel_l2}}, extra=extra)
    return out
