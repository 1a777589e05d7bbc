"""Bundle reading: validation, hashes, schema version."""
import json

import pytest

from edgediff.export.bundle import export_bundle
from edgediff.export.models import dit
from edgediff.runtime.bundle import BundleError, read_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "dit"
    export_bundle("dit", dit.CONFIGS["tiny"], out, log=lambda m: None)
    return out


def test_reads_valid_bundle(bundle_dir):
    b = read_bundle(bundle_dir)
    assert b.input_names == ["x", "t", "y"] and b.output_names == ["eps", "var"]
    assert b.model_path().is_file()
    assert set(b.manifest.files) == {"model.onnx", "parity.json"}
    with pytest.raises(BundleError, match="no int8 model"):
        b.model_path("int8")


def test_altered_file_is_detected(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="altered"):
        read_bundle(copy)
    read_bundle(copy, verify=False)


def test_schema_version_and_missing_manifest(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(bundle_dir, copy)
    m = json.loads((copy / "bundle.json").read_text())
    m["schema_version"] = 99
    (copy / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99"):
        read_bundle(copy)
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(tmp_path)
