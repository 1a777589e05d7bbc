"""Calibration feeds (calibration/feeds.py): the denoiser's real inputs along sampling
trajectories, at most ``cap`` rows per step, guidance's null halves included, deterministic
from the seed, stored and read back; the `calibrate` command; torch-free (test_dependency_rules)."""
import numpy as np
import pytest

from edgediff.calibration.feeds import CalibrationFeeds, Recorder, record_feeds
from edgediff.cli import main
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.noise import SampleNoise
from edgediff.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("calib") / "ddpm"       # class-conditional with a null label
    export_bundle("ddpm", FAMILIES["ddpm"].configs["tiny"], out, sampling={"guidance": 2.0}, log=lambda m: None)
    return out


def test_feeds_are_the_trajectory_inputs_capped_per_step(bundle):
    with Pipeline.from_bundle(bundle) as pipe:
        feeds = record_feeds(pipe, samples=6, cap=5, seed=3, steps=4, batch=4)
        m = pipe.manifest
    assert sorted(feeds.arrays) == ["t", "x", "y"] and np.bincount(feeds.step).tolist() == [5, 5, 5, 5]
    t = feeds.arrays["t"]
    per_step = [np.unique(t[feeds.step == k]) for k in range(4)]
    assert all(len(u) == 1 for u in per_step) and [u[0] for u in per_step] == sorted((u[0] for u in per_step), reverse=True)
    # step 0 feeds x_T itself: each kept row is the initial noise of one of the 6 draws
    x_T = SampleNoise(3, range(6)).initial(m.sample_shape)
    for row in feeds.arrays["x"][feeds.step == 0]:
        assert min(np.abs(row - x).max() for x in x_T) == 0.0
    assert m.null_label in feeds.arrays["y"]                          # guided: the null half is calibrated too
    assert feeds.meta["guidance"] == 2.0 and feeds.meta["steps_recorded"] == 4


def test_feeds_are_deterministic_and_round_trip(bundle, tmp_path):
    with Pipeline.from_bundle(bundle) as pipe:
        a, b = (record_feeds(pipe, samples=5, cap=3, seed=1, steps=3) for _ in range(2))
        c = record_feeds(pipe, samples=5, cap=3, seed=2, steps=3)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert not np.array_equal(a.arrays["x"], c.arrays["x"])
    back = CalibrationFeeds.load(a.save(tmp_path / "f.npz"), ["x", "t", "y"])
    assert back.meta == a.meta and len(back) == len(a)
    np.testing.assert_array_equal(back.arrays["x"], a.arrays["x"])
    assert sum(len(f["x"]) for f in back.batches(4)) == len(a)
    with pytest.raises(InvalidInput, match=r"lacks calibration input\(s\) \['context'\]"):
        CalibrationFeeds.load(tmp_path / "f.npz", ["x", "t", "context"])


def test_reservoir_keeps_a_uniform_choice():
    """Algorithm R: over many draws each of 10 rows of one step is kept about cap/10 of the time."""
    class Echo:
        def infer(self, feed):
            return feed

    counts = np.zeros(10)
    for seed in range(400):
        rec = Recorder(Echo(), cap=3, seed=seed)
        for i in range(10):
            rec.infer({"x": np.array([[float(i)]]), "t": np.array([5.0])})
        counts[rec.feeds()[0]["x"][:, 0].astype(int)] += 1
    assert np.all(np.abs(counts / 400 - 0.3) < 0.08), counts


def test_bad_requests_are_one_line(bundle, tmp_path, capsys):
    with Pipeline.from_bundle(bundle) as pipe:
        with pytest.raises(InvalidInput, match="cap must be a positive integer"):
            record_feeds(pipe, samples=2, cap=0)
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(InvalidInput, match="not an .npz archive"):
        CalibrationFeeds.load(tmp_path / "bad.npz")
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(bundle), "--out", str(tmp_path / "f.npz"), "--samples", "3", "--cap", "2",
              "--steps", "2", "--prompt", "a cat"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "takes no text" in err and err.count("\n") == 1
    assert not (tmp_path / "f.npz").exists()


def test_calibrate_command_writes_the_feeds(bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(bundle), "--out", str(tmp_path / "f.npz"), "--samples", "4", "--cap", "2",
              "--steps", "3"])
    assert exc.value.code == 0
    assert "6 rows over 3 steps" in capsys.readouterr().out
    assert CalibrationFeeds.load(tmp_path / "f.npz", ["x", "t", "y"]).meta["cap"] == 2
