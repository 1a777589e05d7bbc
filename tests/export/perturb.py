"""Redraw the tensors an official initialisation leaves constant, so parity tests see every layer.

Official inits zero whole layers (DiT's adaLN-Zero modulation and final layer, U-ViT's Linear
biases, zero-initialised output projections) and set norm scales to one. With such weights a
wrong residual path, attention scale, skip or shift/scale order changes nothing measurable, and
a parity test passes for the wrong reason. ``perturb_`` replaces exactly those tensors:

- all zeros -> N(0, 1/fan_in) for tensors of rank >= 2 (fan_in as torch.nn.init computes it:
  in_features, or in_channels * kernel area), N(0, 0.1^2) for vectors and scalars;
- all ones  -> 1 + N(0, 0.1^2).

Which tensors are candidates (decided per kind, not per family):
- trainable parameters: yes;
- parameters with ``requires_grad=False``: no. They are fixed, computed tables (DiT's sin-cos
  ``pos_embed``); redrawing them would test a table the checkpoints never hold;
- persistent floating-point buffers (in the state dict, e.g. BatchNorm running statistics):
  yes, they are learned statistics that a checkpoint carries;
- non-persistent buffers (``freqs`` of the timestep embeddings, recomputed by the official
  code on every call): no;
- integer/bool tensors (step counters, masks): no.
Tensors that are neither all-zero nor all-one are left alone (a trained-looking random init
already exercises them). Draws come from one generator seeded with ``seed``, in name order, so
the result depends only on the module's names and shapes.
"""
from __future__ import annotations

import torch
from torch import nn

ZERO_STD_VECTOR = 0.1
ONE_STD = 0.1


def _candidates(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = {name: p for name, p in module.named_parameters() if p.requires_grad}
    persistent = set(module.state_dict(keep_vars=True))
    found.update((name, b) for name, b in module.named_buffers() if name in persistent)
    return sorted((n, t) for n, t in found.items() if t.is_floating_point() and t.numel() > 0)


def _fan_in(tensor: torch.Tensor) -> int:
    return nn.init._calculate_fan_in_and_fan_out(tensor)[0]


@torch.no_grad()
def perturb_(module: nn.Module, seed: int = 0) -> list[str]:
    """Redraw all-zero and all-one tensors of ``module`` in place; return their names, sorted."""
    gen = torch.Generator().manual_seed(seed)
    changed = []
    for name, tensor in _candidates(module):
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
        if bool((tensor == 0).all()):
            std = _fan_in(tensor) ** -0.5 if tensor.dim() >= 2 else ZERO_STD_VECTOR
            tensor.copy_(noise * std)
        elif bool((tensor == 1).all()):
            tensor.copy_(1 + ONE_STD * noise)
        else:
            continue
        changed.append(name)
    return changed


# --- shared checks for the perturbed-weight parity tests --------------------------------------

def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖₂ / ‖ref‖₂ in float64."""
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm()).item()


class Rung1:
    """Rung 1 on (perturbed) modules, once per key: export to FP32 ONNX, then ONNX Runtime vs
    PyTorch over both ends of t, batch 1 and 3, class and null labels (``validate``). The rung-2
    test converts the same file instead of exporting again. Make one per test module with a
    module-scoped fixture over ``tmp_path_factory``."""

    def __init__(self, tmp_path_factory, tolerance=(1e-5, 1e-4)):
        self.factory, self.tolerance, self.done = tmp_path_factory, tolerance, {}

    def __call__(self, key: str, module: nn.Module, spec):
        """-> (directory holding model.onnx, ParityResult)."""
        from edgediff.export.onnx_export import export_onnx, validate

        if key not in self.done:
            directory = self.factory.mktemp("rung1")
            export_onnx(module, spec, directory / "model.onnx")
            self.done[key] = directory, validate(module, spec, directory / "model.onnx", self.tolerance)
        return self.done[key]


def fp16_rung2(module: nn.Module, spec, directory):
    """Rung 2: ``directory``/model.onnx (from ``Rung1``) converted by ``convert_fp16`` (ModelOpt
    AutoCast, FP32 islands added as measurement demands) and gated against PyTorch FP32.
    Returns (ParityResult, record)."""
    from edgediff.export import fp16
    from edgediff.export.reference import torch_outputs

    return fp16.convert_fp16(directory / "model.onnx", directory / "fp16.onnx", spec,
                             lambda feed: torch_outputs(module, spec, feed), "pytorch-fp32", log=lambda m: None)


def assert_rung1(rung1: Rung1, label: str, name: str, module: nn.Module, spec) -> None:
    """Rung 1 on a perturbed module: ONNX Runtime vs PyTorch, rel-L2 ≤ 1e-5, max-abs ≤ 1e-4."""
    _, parity = rung1(name, module, spec)
    assert parity.passed and parity.worst_rel_l2 <= 1e-5 and parity.worst_max_abs <= 1e-4, parity.summary()
    print(f"{label} {name} rung 1: {parity.summary()}")


def assert_rung2(rung1: Rung1, label: str, name: str, module: nn.Module, spec) -> None:
    """Rung 2 on the same perturbed module: FP16 ONNX vs PyTorch FP32, rel-L2 ≤ 5e-3."""
    import pytest

    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (the fp16 extra) is not installed")
    parity, record = fp16_rung2(module, spec, rung1(name, module, spec)[0])
    assert parity.passed and parity.worst_rel_l2 <= 5e-3, parity.summary()
    print(f"{label} {name} rung 2: {parity.summary()}; FP32 islands {record['trials'][-1]['islands']}")


@torch.no_grad()
def assert_matches_learned_sigma_reference(label: str, ours: nn.Module, ref: nn.Module, spec,
                                           label_sets, tol: float = 1e-5) -> None:
    """Eager parity of an export view (outputs eps[, var]) against an official-layout module
    returning the channel concatenation eps|var (DiT, ADM), at t ∈ {0, 500, 999}."""
    c = spec.sample_shape[0]
    gen = torch.Generator().manual_seed(2)
    worst = {}
    for t in (0.0, 500.0, 999.0):
        for labels in label_sets:
            x = torch.randn(3, *spec.sample_shape, generator=gen)
            tt, y = torch.full((3,), t), (None if labels is None else torch.tensor(labels))
            full = ref(x, tt, y)                                  # (N, C_out, H, W): eps then the variance value
            want = {"eps": full[:, :c], "var": full[:, c:]}
            for out_name, got in zip(spec.outputs, ours(x, tt, y)):
                err = rel_l2(got, want[out_name])
                worst[out_name] = max(worst.get(out_name, 0.0), err)
                assert err <= tol, f"{out_name} at t={t:g} y={labels}: rel-L2 {err:.3e}"
    assert set(worst) == set(spec.outputs)
    print(f"{label} eager vs official: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
