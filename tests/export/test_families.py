"""Every registered family: has a fixture and a test module, exports, and passes rung 1."""
from pathlib import Path

import pytest

from edgediff.export.bundle import export_bundle
from edgediff.export.models import FAMILIES, get_family
from edgediff.runtime.bundle import read_bundle

HERE = Path(__file__).parent
# Fixture exports that take over a minute on 2 cores (ddm_cond: three U-Net paths, ~3400 traced
# ops, plus its condition encoder and the pair check) run with the slow tests.
SLOW = {"ddm_cond"}


def _params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_complete(name):
    family = FAMILIES[name]
    assert family.name == name
    assert family.fixture in family.configs, f"{name}: fixture config {family.fixture!r} not registered"
    assert (HERE / f"test_{name}.py").is_file(), f"{name}: no tests/export/test_{name}.py"
    spec = family.spec(family.configs[family.fixture])
    assert spec.outputs and spec.time["min"] < spec.time["max"]


@pytest.mark.parametrize("name", _params())
def test_fixture_exports_with_parity(name, tmp_path):
    family = FAMILIES[name]
    result = export_bundle(name, family.configs[family.fixture], tmp_path / "b", log=lambda m: None)
    assert result.parity.passed, result.parity.summary()
    bundle = read_bundle(tmp_path / "b")
    spec = family.spec(family.configs[family.fixture])
    assert bundle.input_names == list(spec.inputs)
    assert bundle.output_names == list(spec.outputs)
    assert bundle.manifest.parity["fp32"]["passed"] is True
    # batch 1 and 3, both ends of t, labels and null labels (where a null label exists)
    labels = 2 if spec.null_label is not None else 1
    assert len(result.parity.cases) == 2 * 2 * labels


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown family"):
        get_family("nope")
