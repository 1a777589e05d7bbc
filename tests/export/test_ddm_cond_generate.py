"""`edgediff generate --cond` on an image-conditioned (ddm_cond) bundle: per-condition
outputs, or one-line errors and no output file. (The runtime path against the official
unsplit forward is in test_trajectory.)"""
import numpy as np
from click.testing import CliRunner

from edgediff.cli import cli, main
from edgediff.digits.inpaint import held_conditions


def test_generate_cond_cli_and_its_errors(fixture_bundle, tmp_path, capsys):
    _, _, path, _ = fixture_bundle("ddm_cond")
    np.savez(tmp_path / "c.npz", cond=held_conditions()[0][:2])
    np.savez(tmp_path / "bad.npz", cond=np.zeros((1, 3, 16, 16), np.float32))
    run = CliRunner().invoke(cli, ["generate", str(path), "--cond", str(tmp_path / "c.npz"), "-n", "3", "--steps", "2",
                                   "--npz", str(tmp_path / "o.npz"), "--out", str(tmp_path / "o.png")])
    assert run.exit_code == 0, run.output
    with np.load(tmp_path / "o.npz") as d:
        assert d["images"].shape == (6, 16, 16, 1) and d["conditions"].shape == (2, 1, 16, 16)
        np.testing.assert_array_equal(d["cond_index"], [0, 0, 0, 1, 1, 1])
    assert (tmp_path / "o.png").is_file()
    cases = [([], "image-conditioned: give condition images"),
             (["--cond", str(tmp_path / "c.npz"), "--cond-size", "8,8"], "takes 16x16 images only"),
             (["--cond", str(tmp_path / "bad.npz")], "'cond' must be float"),
             (["--cond", str(tmp_path / "c.npz"), "--classes", "1,2"], "image-conditioned, not class-conditional")]
    for extra, expected in cases:
        try:
            main(["generate", str(path), "--steps", "1", "--npz", str(tmp_path / "e.npz"), *extra])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err.strip()
        assert code != 0 and expected in err and err.count("\n") == 0, err
        assert not (tmp_path / "e.npz").exists()
