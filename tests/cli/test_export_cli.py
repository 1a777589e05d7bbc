"""`edgediff export` through click's CliRunner: success, bad input, atomic output."""
import json

import pytest
from click.testing import CliRunner

from edgediff.cli import cli, main


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def test_export_named_size(tmp_path):
    res = run(["export", "--family", "dit", "--size", "tiny", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert manifest["family"] == "dit" and manifest["models"] == {"fp32": "model.onnx"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_export_config_and_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from edgediff.export.models import dit

    cfg = dict(dit.CONFIGS["tiny"], learn_sigma=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(dit.DiT(**cfg).state_dict(), tmp_path / "w.safetensors")
    res = run(["export", "--family", "dit", "--config", str(tmp_path / "cfg.json"),
               "--checkpoint", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert list(manifest["outputs"]) == ["eps"]
    assert manifest["source"]["checkpoint"] == "w.safetensors" and len(manifest["source"]["sha256"]) == 64


def _main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def test_bad_size_is_one_line_error(tmp_path, capsys):
    code, err = _main(["export", "--family", "dit", "--size", "DiT-Q/2", "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and "unknown dit size 'DiT-Q/2'" in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert not (tmp_path / "b").exists()


def test_mismatched_checkpoint_is_one_line_error(tmp_path, capsys):
    import torch

    torch.save({"ema": {"w": torch.zeros(2)}}, tmp_path / "w.pt")
    code, err = _main(["export", "--family", "dit", "--size", "tiny", "--checkpoint", str(tmp_path / "w.pt"),
                       "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "checkpoint does not fit the dit config" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_config_and_size_are_exclusive(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{}")
    code, err = _main(["export", "--family", "dit", "--size", "tiny", "--config", str(tmp_path / "c.json"),
                       "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "exactly one of" in err


def test_refuses_to_overwrite_non_bundle(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep")
    code, err = _main(["export", "--family", "dit", "--size", "tiny", "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "not a bundle" in err
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep"


def test_families_lists_sizes():
    res = run(["families"])
    assert res.exit_code == 0 and "DiT-XL/2" in res.output
