"""docs/architecture.md rung 5: a whole sampler trajectory through ONNX Runtime matches the same loop
over the PyTorch module from the same noise (final rel-L2 ≤ 1e-4)."""
import numpy as np
import pytest

from edgediff.export.models import FAMILIES
from edgediff.export.reference import TorchBackend
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import load_backend
from edgediff.runtime.parity import rel_l2
from edgediff.runtime.pipeline import generate, resolve_labels

from conditioned import check_conditioned_trajectory


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trajectory_matches_pytorch(name, fixture_bundle):
    _, module, path, _ = fixture_bundle(name)
    if FAMILIES[name].companions:
        # condition features: the runtime's path (encoder once, features cached) against the
        # official unsplit forward recomputing the condition at every step
        return check_conditioned_trajectory(module, path)
    bundle = read_bundle(path)
    kw = dict(steps=8, batch=3, seed=3, labels=resolve_labels(bundle.manifest, 3, None),
              guidance=2.0 if bundle.manifest.null_label is not None else 1.0)
    ort_run = generate(load_backend(bundle, "ort"), bundle.manifest, 3, **kw)
    torch_backend = TorchBackend(module, bundle.manifest.inputs, bundle.manifest.output_names)
    ref_run = generate(torch_backend, bundle.manifest, 3, **kw)
    assert np.isfinite(ort_run.samples).all()
    assert rel_l2(ref_run.samples, ort_run.samples) <= 1e-4
