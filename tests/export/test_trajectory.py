"""DESIGN.md rung 5: a whole sampler trajectory through ONNX Runtime matches the same loop
over the PyTorch module from the same noise (final rel-L2 ≤ 1e-4)."""
import numpy as np
import pytest

from edgediff.export.models import FAMILIES
from edgediff.digits.quality import TorchBackend
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import load_backend
from edgediff.runtime.parity import rel_l2
from edgediff.runtime.pipeline import DEFAULT_SAMPLER, generate, resolve_labels
from edgediff.runtime.schedules import Schedule


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trajectory_matches_pytorch(name, fixture_bundle):
    _, module, path, _ = fixture_bundle(name)
    bundle = read_bundle(path)
    sampler = DEFAULT_SAMPLER[Schedule.from_config(bundle["schedule"]).kind]
    kw = dict(sampler=sampler, steps=8, batch=3, seed=3, labels=resolve_labels(bundle.manifest, 3, None),
              guidance=2.0 if bundle["null_label"] is not None else 1.0)
    ort_run = generate(load_backend(bundle, "ort"), bundle.manifest, 3, **kw)
    ref_run = generate(TorchBackend(module, bundle.manifest), bundle.manifest, 3, **kw)
    assert np.isfinite(ort_run.samples).all()
    assert rel_l2(ref_run.samples, ort_run.samples) <= 1e-4
