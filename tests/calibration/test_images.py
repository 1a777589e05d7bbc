"""Calibration feeds from real images (calibration/images.py): each image diffused with the
marginal of every model time the sampler calls, guidance's null rows, latents through the
bundle's encoder, one-line refusals; `calibrate --images` and `add-precision --calib-data`."""
import numpy as np
import pytest

from edgediff.calibration.feeds import CalibrationFeeds, record_feeds
from edgediff.calibration.images import image_feeds, is_image_file
from edgediff.cli import main
from edgediff.runtime.drift import model_time_marginal
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("calib-images") / "ddpm"       # pixel space, class-conditional, null label
    export_bundle("ddpm", FAMILIES["ddpm"].configs["tiny"], out, sampling={"guidance": 2.0}, log=lambda m: None)
    return out


def _images(pipe, n=6, seed=0):
    c, h, w = pipe.manifest.sample_shape
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), rng.integers(0, pipe.manifest.num_classes, n)


def test_each_step_holds_the_images_diffused_to_the_sampler_s_model_time(bundle, tmp_path):
    with Pipeline.from_bundle(bundle) as pipe:
        images, labels = _images(pipe)
        np.savez(tmp_path / "i.npz", images=images, labels=labels)
        feeds = image_feeds(pipe, tmp_path / "i.npz", cap=4, seed=1, steps=3)
        dry = record_feeds(pipe, samples=1, cap=1, seed=1, steps=3, batch=1)
        m = pipe.manifest
    assert is_image_file(tmp_path / "i.npz") and sorted(feeds.arrays) == ["t", "x", "y"]
    assert np.bincount(feeds.step).tolist() == [4, 4, 4]                  # 2 images + their 2 null rows
    x0 = images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    for k, feed in feeds.by_step():
        t = float(dry.arrays["t"][dry.step == k][0])
        assert np.all(feed["t"] == np.float32(t))
        y, x = feed["y"], feed["x"].astype(np.float64)
        assert list(y[2:]) == [m.null_label] * 2 and np.array_equal(x[:2], x[2:])   # [conditional | null]
        signal, noise = model_time_marginal(m.noise_schedule, t)
        # each row is one of the images (with its own label) plus noise of the step's size
        for row, label in zip(x[:2], y[:2]):
            i = int(np.argmin([np.linalg.norm(row - signal * a) for a in x0]))
            eps = (row - signal * x0[i]) / noise
            assert 0.7 < eps.std() < 1.3 and abs(eps.mean()) < 0.3
            if signal > 2 * noise:                 # the image is unmistakable at the quiet steps
                assert labels[i] == label


def test_a_latent_bundle_encodes_its_images(latent_bundle, tmp_path):
    with Pipeline.from_bundle(latent_bundle) as pipe:
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "i.npz", images=rng.uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32),
                 labels=rng.integers(0, 10, 5))
        feeds = image_feeds(pipe, tmp_path / "i.npz", cap=2, seed=0, steps=2, guidance=1.0)
    assert feeds.arrays["x"].shape == (4, 4, 8, 8) and feeds.meta["source"] == "images"


def test_a_latent_bundle_without_an_encoder_is_refused(latent_bundle, tmp_path):
    import json
    import shutil

    shutil.copytree(latent_bundle, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    manifest["components"].pop("encoder")
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(manifest))
    (tmp_path / "b" / "encoder.onnx").unlink()
    np.savez(tmp_path / "i.npz", images=np.zeros((2, 16, 16, 3), np.uint8), labels=np.zeros(2, np.int64))
    with Pipeline.from_bundle(tmp_path / "b", verify=False) as pipe:
        with pytest.raises(InvalidInput, match="no encoder to turn images into latents"):
            image_feeds(pipe, tmp_path / "i.npz")


def test_refusals_are_one_line(bundle, tmp_path, capsys):
    with Pipeline.from_bundle(bundle) as pipe:
        images, labels = _images(pipe)
        np.savez(tmp_path / "nolabels.npz", images=images)
        with pytest.raises(InvalidInput, match="needs 'labels'"):
            image_feeds(pipe, tmp_path / "nolabels.npz")
        np.savez(tmp_path / "size.npz", images=images[:, :4], labels=labels)
        with pytest.raises(InvalidInput, match="'images' must be uint8"):
            image_feeds(pipe, tmp_path / "size.npz")
        np.savez(tmp_path / "range.npz", images=images, labels=labels + 100)
        with pytest.raises(InvalidInput, match="'labels' must lie in"):
            image_feeds(pipe, tmp_path / "range.npz")
        np.savez(tmp_path / "255.npz", images=images.transpose(0, 3, 1, 2).astype(np.float32), labels=labels)
        with pytest.raises(InvalidInput, match=r"must lie in \[-1, 1\] \(found 0..255"):
            image_feeds(pipe, tmp_path / "255.npz")
    np.save(tmp_path / "a.npy", images)
    assert not is_image_file(tmp_path / "a.npy")
    with pytest.raises(InvalidInput, match="not an .npz archive"):
        CalibrationFeeds.load(tmp_path / "a.npy")
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(bundle), "--out", str(tmp_path / "f.npz"), "--images", str(tmp_path / "size.npz")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "'images' must be uint8" in err and err.count("\n") == 1
    assert not (tmp_path / "f.npz").exists()


def test_calibrate_images_command_writes_reusable_feeds(bundle, tmp_path, capsys):
    with Pipeline.from_bundle(bundle) as pipe:
        images, labels = _images(pipe, n=3)
    np.savez(tmp_path / "i.npz", images=images, labels=labels)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(bundle), "--out", str(tmp_path / "f.npz"), "--images", str(tmp_path / "i.npz"),
              "--cap", "8", "--steps", "2"])
    assert exc.value.code == 0 and "12 rows over 2 steps from 3 images" in capsys.readouterr().out
    feeds = CalibrationFeeds.load(tmp_path / "f.npz", ["x", "t", "y"])
    assert feeds.meta["source"] == "images" and not is_image_file(tmp_path / "f.npz")

