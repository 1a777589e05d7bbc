"""The digits judge: torch-free, accurate on held-out real digits, and its Fréchet distance
separates real digits from noise."""
import json
import subprocess
import sys

import numpy as np
import pytest

from edgediff.digits import judge as J


@pytest.fixture(scope="module")
def weights():
    return J.load_judge()


def test_judge_runs_without_torch():
    code = ("import sys; from edgediff.digits import judge as J; w = J.load_judge(); "
            "r = J.judge(w['held_images'], w['held_labels']); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'sklearn', 'scipy'))]; "
            "print(bad); sys.exit(1 if bad or r.accuracy < 0.97 else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-500:]


def test_held_out_real_digits_score_high(weights):
    result = J.judge(weights["held_images"], weights["held_labels"])
    assert result.accuracy >= 0.97
    assert result.baseline_accuracy == pytest.approx(result.accuracy)
    assert result.fd == pytest.approx(result.baseline_fd)    # n = all held-out: the same set
    assert min(result.per_class) >= 0.9


def test_shuffled_labels_score_low(weights, rng):
    result = J.judge(weights["held_images"], rng.permutation(weights["held_labels"]))
    assert result.accuracy < 0.3


def test_fd_small_for_real_large_for_noise(weights, rng):
    real = J.judge(weights["held_images"], weights["held_labels"]).fd
    noise = rng.uniform(-1, 1, (300, 16, 16)).astype(np.float32)
    fake = J.judge(noise, np.arange(300) % 10)
    assert real < 10 and fake.fd > 20 * real
    assert fake.baseline_fd < 10                              # held-out at n = 300 stays small


def test_frechet_distance_matches_closed_forms(rng):
    a = rng.standard_normal((5, 5))
    cov = a @ a.T + np.eye(5)
    mu = rng.standard_normal(5)
    assert J.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    # commuting covariances: tr(C1 + C2 - 2 sqrt(C1 C2)) = sum (sqrt(d1) - sqrt(d2))²
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2) + 4.0
    got = J.frechet_distance(np.zeros(5), np.diag(d1), np.full(5, 2 / np.sqrt(5)), np.diag(d2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_agrees_with_scipy(rng):
    linalg = pytest.importorskip("scipy.linalg")
    a, b = rng.standard_normal((2, 6, 6))
    c1, c2 = a @ a.T, b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal((2, 6))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert J.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)


def test_image_layouts_agree(weights):
    u8 = weights["held_images"][:20]                                   # (N, 16, 16) uint8
    f = u8.astype(np.float32)[:, None] / 127.5 - 1.0                    # (N, 1, 16, 16) in [-1, 1]
    np.testing.assert_allclose(J.as_images(u8[..., None]), J.as_images(f), atol=1e-6)
    with pytest.raises(ValueError, match="16×16"):
        J.as_images(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        J.judge(u8, np.zeros(3))


def test_evaluate_command_reads_a_samples_archive(tmp_path, weights):
    from click.testing import CliRunner

    from edgediff.cli_digits import evaluate
    from edgediff.runtime.images import save_npz

    path = tmp_path / "samples.npz"
    save_npz(path, images=weights["held_images"][..., None], labels=weights["held_labels"])
    out = CliRunner().invoke(evaluate, [str(path), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["accuracy"] >= 0.97


@pytest.mark.parametrize("content", [b"", b"# not numpy\n", "npy"])
def test_evaluate_refuses_what_is_not_a_samples_archive(tmp_path, capsys, content):
    from edgediff.cli import main

    path = tmp_path / "bad.npz"
    if content == "npy":
        np.save(tmp_path / "bad.npy", np.zeros(3))
        path = tmp_path / "bad.npy"
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and err.startswith("error: ") and "\n" not in err and "archive" in err


def test_evaluate_judges_an_unlabelled_archive_and_refuses_a_conditioned_one(tmp_path, weights, capsys):
    from edgediff.cli import main
    from edgediff.digits.judge import evaluate
    from edgediff.runtime.images import save_npz

    save_npz(tmp_path / "u.npz", images=weights["held_images"][..., None])       # an unconditional model's
    result = evaluate(tmp_path / "u.npz")
    assert result.accuracy >= 0.9                     # the share the judge recognises as some digit
    save_npz(tmp_path / "c.npz", images=weights["held_images"][..., None], cond_index=np.zeros(len(weights["held_images"])))
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(tmp_path / "c.npz")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "digits inpaint" in err and "\n" not in err
