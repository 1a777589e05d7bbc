"""The latent digits model: the shipped KL autoencoder (diffusers AutoencoderKL, 16×16×1 <->
4×4×4) and the class-conditional DiT on its scaled latents, judged on decoded images."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from edgediff.digits import data as digits, quality, train, vae as dvae  # noqa: E402
from edgediff.digits import judge as rt_judge  # noqa: E402
from edgediff.digits.demo import ASSETS, shipped  # noqa: E402
from edgediff.export.models import get_family  # noqa: E402
from edgediff.export.models.common import load_strict, read_checkpoint  # noqa: E402
from edgediff.runtime.errors import InvalidInput  # noqa: E402
from edgediff.runtime.files import sha256_file  # noqa: E402

VAE_DIR = ASSETS / "vae"


@pytest.fixture(scope="module")
def shipped_vae():
    return dvae.load_vae(VAE_DIR)


def test_shipped_vae_loads_strictly_with_its_scaling_factor(shipped_vae):
    config = json.loads((VAE_DIR / "config.json").read_text())
    record = json.loads((VAE_DIR / "train.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    assert config["in_channels"] == config["out_channels"] == 1
    assert config["scaling_factor"] == record["scaling_factor"] > 0
    assert math.isfinite(record["final_loss"]) and len(record["loss_curve"]) == 20
    # strict: the keys and shapes of a freshly built AutoencoderKL of this config, no more, no less
    from safetensors.torch import load_file

    fresh = dvae.build_vae(config)
    fresh.load_state_dict(load_file(str(VAE_DIR / dvae.WEIGHTS)), strict=True)
    z = dvae.encode(shipped_vae, digits.load().train_x)
    assert z.shape[1:] == (4, digits.LATENT_SIZE, digits.LATENT_SIZE)
    assert z.std() == pytest.approx(1.0, rel=1e-3)          # 1/std of the training latents


def test_shipped_vae_reconstructs_held_out_digits(shipped_vae, one_thread):
    data = digits.load()
    result = dvae.reconstruction_accuracy(shipped_vae, data.held_x, data.held_y)
    assert result.n == len(data.held_y) and result.accuracy >= 0.95
    # scrambled latents do not decode to the digits: the judge sees the difference
    z = dvae.encode(shipped_vae, data.held_x)
    wrong = rt_judge.judge(dvae.decode(shipped_vae, z[np.roll(np.arange(len(z)), 7)]), data.held_y)
    assert wrong.accuracy < 0.5


def test_shipped_latent_weights_fit_their_config_and_autoencoder():
    path = shipped("dit_latent")
    config = json.loads((path / "config.json").read_text())
    record = json.loads((path / "train.json").read_text())
    assert config == digits.DIGITS_CONFIGS["dit_latent"] and config["in_channels"] == 4
    assert record["family"] == "dit_latent" and record["model_family"] == "dit"
    assert record["vae"]["shipped"] == "vae" and record["vae"]["sha256"] == sha256_file(VAE_DIR / dvae.WEIGHTS)
    fam = get_family("dit")
    load_strict(fam.official(fam.build(config)), read_checkpoint(path / "model.safetensors"))
    spec = fam.spec(config)
    assert spec.space == "latent" and spec.sample_shape == (4, 4, 4)
    total = sum(p.stat().st_size for p in (path / "model.safetensors", VAE_DIR / dvae.WEIGHTS))
    assert total <= 5 * 1024 * 1024


def test_shipped_latent_dit_through_torch_draws_the_requested_digits(one_thread):
    """The loop that runs bundles, driven by the PyTorch DiT, decoded by the PyTorch VAE: 5 per class, 10 steps."""
    path = shipped("dit_latent")
    name, config, module, spec = quality.load_trained(path)
    manifest = quality.trained_manifest(name, config, spec)
    assert manifest.family == "dit" and manifest.space == "latent"
    assert manifest.sampling.guidance == digits.DIGITS_SAMPLING["dit_latent"]["guidance"]
    backend = quality.TorchBackend.from_spec(module, spec)
    decoder = quality.trained_decoder(path)
    result, images = rt_judge.judge_backend(backend, manifest, per_class=5, steps=10, batch=50, decoder=decoder)
    assert images.shape == (50, 1, 16, 16)
    assert result.n == 50 and result.accuracy >= 0.9
    assert quality.OutsideClassifier().accuracy(images, rt_judge.class_order_labels(5)) >= 0.9


def test_latent_samples_are_not_judged_undecoded():
    name, config, module, spec = quality.load_trained(shipped("dit_latent"))
    manifest = quality.trained_manifest(name, config, spec)
    with pytest.raises(InvalidInput, match="decoded"):
        rt_judge.judge_backend(quality.TorchBackend.from_spec(module, spec), manifest, per_class=2, steps=1)


def _cli(*args) -> None:
    from edgediff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 0


def test_train_vae_and_latent_dit_one_step(tmp_path, one_thread, capsys):
    """`edgediff digits train-vae` then `digits train --family dit_latent --vae` on it, one step each."""
    vae_out, dit_out = tmp_path / "vae", tmp_path / "dit_latent"
    _cli("digits", "train-vae", "--out", str(vae_out), "--steps", "1", "--threads", "1")
    assert sorted(p.name for p in vae_out.iterdir()) == ["config.json", dvae.WEIGHTS, "train.json"]
    trained = dvae.load_vae(vae_out)
    sf = json.loads((vae_out / "config.json").read_text())["scaling_factor"]
    assert math.isfinite(sf) and sf > 0 and trained.config.scaling_factor == sf
    assert "held-out reconstructions" in capsys.readouterr().out

    _cli("digits", "train", "--family", "dit_latent", "--out", str(dit_out), "--steps", "1", "--threads", "1",
         "--vae", str(vae_out))
    record = json.loads((dit_out / "train.json").read_text())
    assert record["steps"] == 1 and math.isfinite(record["final_loss"])
    assert record["vae"] == {"path": str(vae_out), "sha256": sha256_file(vae_out / dvae.WEIGHTS), "scaling_factor": sf}
    name, config, module, spec = quality.load_trained(dit_out)              # loads strictly
    assert name == "dit_latent" and spec.sample_shape == (4, 4, 4)
    assert quality.trained_decoder(dit_out).vae.config.scaling_factor == sf
    with pytest.raises(InvalidInput, match="not the autoencoder"):
        quality.trained_decoder(dit_out, VAE_DIR)                           # not the VAE it learned


def test_latent_data_are_the_scaled_posterior_means(shipped_vae):
    data = train.training_data("dit_latent")
    pixels = digits.load()
    np.testing.assert_array_equal(data.train_y, pixels.train_y)
    with torch.no_grad():
        mean = shipped_vae.encode(torch.from_numpy(pixels.held_x[:8])).latent_dist.mean
    np.testing.assert_allclose(data.held_x[:8], (mean * shipped_vae.config.scaling_factor).numpy(), rtol=1e-5, atol=1e-6)


def test_pixel_models_take_no_autoencoder(tmp_path):
    with pytest.raises(InvalidInput, match="pixel-space"):
        train.train("dit", tmp_path / "x", steps=1, threads=None, progress=False, vae=VAE_DIR)


def test_latent_demo_decodes_through_the_bundle(tmp_path):
    """The real path: the DiT exported as family dit with the latent sampling, the shipped
    autoencoder added as decoder/encoder, the grid judged decoded; then kept while fresh."""
    from edgediff.digits.demo import ensure_bundle, run_demo
    from edgediff.runtime.bundle import read_bundle

    result = run_demo("dit_latent", cache=tmp_path, png=tmp_path / "demo.png", log=lambda m: None)
    manifest = read_bundle(result.bundle).manifest
    assert manifest.space == "latent" and {"decoder", "encoder"} <= set(manifest.components)
    assert result.png.is_file() and result.judge.n == 100 and result.judge.accuracy >= 0.95
    assert manifest.family == "dit" and manifest.sampling.guidance == digits.DIGITS_SAMPLING["dit_latent"]["guidance"]
    assert manifest.component("decoder").extra["layout"] == "diffusers"
    ensure_bundle("dit_latent", result.bundle, log=lambda m: None)
    assert read_bundle(result.bundle).manifest.created == manifest.created          # fresh: kept
