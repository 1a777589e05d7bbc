"""DiT-XL/2 (675M parameters, 2.7 GB FP32): external data and the parity gate. Slow (~4 min
on 2 cores, ~6 GB RSS); run with `make test-all` or `pytest -m slow`. The peak-memory figure
comes from benchmarks/export_memory.py."""
import pytest

from edgediff.export.bundle import export_bundle
from edgediff.export.models import FAMILIES
from edgediff.runtime import read_bundle


@pytest.mark.slow
def test_dit_xl2_exports_with_external_data(tmp_path):
    result = export_bundle("dit", FAMILIES["dit"].configs["DiT-XL/2"], tmp_path / "xl", log=lambda m: None)
    assert result.parity.passed, result.parity.summary()
    assert result.num_params == 675_129_632
    bundle = read_bundle(tmp_path / "xl")
    assert set(bundle.manifest.files) == {"model.onnx", "model.onnx.data", "parity.json"}
    assert (tmp_path / "xl" / "model.onnx").stat().st_size < 2**31
