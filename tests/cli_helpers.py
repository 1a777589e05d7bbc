"""Helpers of the CLI tests (tests/ is on sys.path through its conftest): running the CLI
in-process, and damaging a bundle's model as a broken export would (hashes recomputed)."""
import onnx
import pytest

from edgediff.cli import main
from edgediff.runtime.bundle import finalize_manifest, read_bundle


def run(args, capsys):
    """(exit code, stdout, stderr) of ``edgediff ARGS``."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def rewrite_model(bundle, precision: str, edit) -> None:
    """``edit(onnx.ModelProto)`` the bundle's ``precision`` model in place, then re-record every
    hash as a writer would (the bundle verifies: what is tested is what the model computes)."""
    path = read_bundle(bundle).model_path(precision)
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    finalize_manifest(bundle, read_bundle(bundle, verify=False).manifest)
