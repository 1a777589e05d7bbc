"""DESIGN.md rung 5: a whole sampler trajectory through ONNX Runtime matches the same loop
over the PyTorch module from the same noise (final rel-L2 ≤ 1e-4)."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgediff.export.bundle import build_reference, export_bundle
from edgediff.export.models import FAMILIES
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import load_backend
from edgediff.runtime.parity import rel_l2
from edgediff.runtime.pipeline import DEFAULT_SAMPLER, generate, resolve_labels
from edgediff.runtime.schedules import Schedule


class TorchBackend:
    """The PyTorch reference behind the same infer() contract."""

    def __init__(self, module, manifest):
        self.module, self.inputs, self.outputs = module, list(manifest["inputs"]), list(manifest["outputs"])

    def infer(self, feed):
        with torch.inference_mode():
            outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.inputs))
        return {n: o.numpy() for n, o in zip(self.outputs, outs)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trajectory_matches_pytorch(name, tmp_path):
    family = FAMILIES[name]
    config = family.configs[family.fixture]
    torch.manual_seed(0)
    _, module = build_reference(name, config)
    save_file(family.official(module).state_dict(), tmp_path / "w.safetensors")
    export_bundle(name, config, tmp_path / "b", checkpoint=tmp_path / "w.safetensors", log=lambda m: None)
    bundle = read_bundle(tmp_path / "b")
    sampler = DEFAULT_SAMPLER[Schedule.from_config(bundle["schedule"]).kind]
    kw = dict(sampler=sampler, steps=8, batch=3, seed=3, labels=resolve_labels(bundle.manifest, 3, None),
              guidance=2.0 if bundle["null_label"] is not None else 1.0)
    ort_run = generate(load_backend(bundle, "ort"), bundle.manifest, 3, **kw)
    ref_run = generate(TorchBackend(module, bundle.manifest), bundle.manifest, 3, **kw)
    assert np.isfinite(ort_run.samples).all()
    assert rel_l2(ref_run.samples, ort_run.samples) <= 1e-4
