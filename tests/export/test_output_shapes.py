"""ONNX export refuses outputs whose shape is not (batch, *sample_shape) as bundle.json says."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgediff.export import onnx_export  # noqa: E402
from edgediff.export.models import FAMILIES  # noqa: E402
from edgediff.export.onnx_export import ExportError, validate  # noqa: E402

SPEC = FAMILIES["ddpm"].spec(FAMILIES["ddpm"].configs["tiny"])       # (1, 8, 8), conditional


class Cropping(torch.nn.Module):
    """Returns a 6x6 image for an 8x8 sample, like a DiT whose patch size does not divide."""

    def forward(self, x, t, y):
        return (x[:, :, :6, :6] * 1.0,)


class Exact(torch.nn.Module):
    def forward(self, x, t, y):
        return (x * 2.0,)


class FakeOrt:
    """Stands in for ONNX Runtime: ``fn(feed) -> eps``, no ONNX file needed."""

    fn = staticmethod(lambda feed: feed["x"] * 2.0)

    def __init__(self, path, inputs, outputs):
        pass

    def infer(self, feed):
        return {"eps": FakeOrt.fn(feed)}


@pytest.fixture
def fake_ort(monkeypatch):
    monkeypatch.setattr(onnx_export, "OrtBackend", FakeOrt)
    monkeypatch.setattr(FakeOrt, "fn", staticmethod(lambda feed: feed["x"] * 2.0))
    return FakeOrt


def test_reference_of_the_wrong_shape_fails_the_export(fake_ort, tmp_path):
    with pytest.raises(ExportError, match=r"PyTorch reference returns 'eps' of shape \(1, 1, 6, 6\).*\(1, 1, 8, 8\)"):
        validate(Cropping(), SPEC, tmp_path / "m.onnx", (1e-5, 1e-4))


def test_candidate_of_the_wrong_shape_fails_the_gate(fake_ort, tmp_path):
    fake_ort.fn = staticmethod(lambda feed: np.ones((len(feed["x"]), 1, 6, 6), np.float32))
    result = validate(Exact(), SPEC, tmp_path / "m.onnx", (1e-5, 1e-4))
    assert not result.passed and "shape (1, 1, 6, 6) differs from the reference's (1, 1, 8, 8)" in result.summary()


def test_matching_shapes_pass(fake_ort, tmp_path):
    assert validate(Exact(), SPEC, tmp_path / "m.onnx", (1e-5, 1e-4)).passed
