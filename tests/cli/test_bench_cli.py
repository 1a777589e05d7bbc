"""`edgediff bench`: the table and JSON on a tiny bundle, PyTorch eager in the same run, and
bad options as one line (no timing assertions)."""
import json

import pytest

from edgediff.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("bench-cli") / "uvit"
    export_bundle("uvit", FAMILIES["uvit"].configs["tiny"], out, log=lambda m: None)
    return out


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_bench_against_eager_writes_table_and_json(bundle, tmp_path, capsys):
    code, out, err = run(["bench", str(bundle), "--batch", "2", "--against", "eager", "--repeats", "2",
                          "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["engines"]) == {"ort", "eager"}
    assert report["engines"]["eager"]["weights"].startswith("random init")
    assert report["speedup_vs"]["eager"]["2"] > 0
    assert "eager" in out and "vs ort" in out and "GFLOP/s" in out and "peak RSS" in out


@pytest.mark.parametrize("args, needle", [
    (["--batch", "0"], "batch sizes must be integers"),
    (["--batch", "x"], "not a comma-separated list"),
    (["--against", "jit"], "unknown engine(s) jit"),
    (["--backend", "nope"], "nope"),
])
def test_bad_options_are_one_line(bundle, capsys, args, needle):
    code, out, err = run(["bench", str(bundle), *args], capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_precision_the_bundle_lacks_is_one_line(bundle, capsys):
    code, out, err = run(["bench", str(bundle), "--precision", "fp16", "--repeats", "1"], capsys)
    assert code == 1 and err.strip() == f"error: bundle {bundle} has no fp16 model (has: fp32)"


def test_an_engine_that_dies_is_one_line(bundle, capsys):
    """A PyTorch engine without its checkpoint's layout fails inside its own process; the
    coordinator reports that process's last line."""
    bad = bundle.parent / "bad.safetensors"
    from safetensors.numpy import save_file
    import numpy as np
    save_file({"nope": np.zeros(1, np.float32)}, str(bad))
    code, out, err = run(["bench", str(bundle), "--against", "eager", "--checkpoint", str(bad), "--repeats", "1",
                          "--threads", "1"], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: the eager engine stopped:")
