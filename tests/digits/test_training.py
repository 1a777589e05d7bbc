"""Digits training: every family's objective trains (finite, decreasing loss on a tiny
budget), the saved files load strictly, and the shipped weights fit their configs."""
import json
import math

import numpy as np
import pytest
import torch

from edgediff.export.models import FAMILIES, get_family
from edgediff.export.models.common import load_strict, read_checkpoint
from edgediff.digits import data as digits, inpaint, objectives, train
from edgediff.digits.demo import ASSETS, shipped

TRAINABLE = [f for f in digits.DIGITS_CONFIGS if f in FAMILIES]


@pytest.fixture(scope="module")
def data():
    return digits.load()


def test_digits_split_is_seeded_and_disjoint(data):
    assert data.train_x.shape[1:] == (1, 16, 16) and data.train_x.dtype == np.float32
    assert len(data.train_y) + len(data.held_y) == 1797
    assert data.train_x.min() == -1.0 and data.train_x.max() == 1.0
    assert set(np.bincount(data.held_y)) <= {35, 36, 37}              # 20% of every class
    again = digits.load()
    np.testing.assert_array_equal(again.held_x, data.held_x)


def test_upsample_is_bilinear_and_pools_back():
    small = np.random.default_rng(0).random((4, 8, 8))
    ref = torch.nn.functional.interpolate(torch.from_numpy(small)[:, None], scale_factor=2,
                                          mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(digits.upsample2x(small), ref, atol=1e-12)
    # 2×2 pooling brings 16×16 digits back to the 8×8 grid that outside classifiers know
    from sklearn.svm import SVC

    data = digits.load()
    originals = ((data.train_x[:, 0] + 1) / 2)                               # (N, 16, 16) in [0, 1]
    svc = SVC().fit(digits.downsample2x(originals).reshape(len(originals), -1), data.train_y)
    held = digits.downsample2x((data.held_x[:, 0] + 1) / 2).reshape(len(data.held_y), -1)
    assert np.mean(svc.predict(held) == data.held_y) >= 0.95


@pytest.mark.parametrize("family", TRAINABLE)
def test_family_trains_and_saves_loadable_weights(family, data, tmp_path, one_thread):
    h = train.Hyper(steps=16, batch=12, lr=2e-3, warmup=2)
    module, fam, result = train.fit(family, digits.DIGITS_CONFIGS[family], h, seed=0, data=data, progress=False)
    losses = result.losses
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    out = train.save(tmp_path / family, fam, module, digits.DIGITS_CONFIGS[family], {"final_loss": result.final_loss})
    config = json.loads((out / "config.json").read_text())
    fresh = get_family(family).build(config)
    load_strict(get_family(family).official(fresh), read_checkpoint(out / "model.safetensors"))
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([0.5, 0.9]) if family.startswith("ddm") else torch.tensor([10.0, 900.0])
    args = (x, t, torch.tensor([3, 10])) if fam.spec(config).conditional else (x, t)   # lucid: unconditional
    if family in digits.CONDITIONED:        # the unsplit forward, conditioned on an inpainting input
        fresh, module, args = fam.official(fresh), fam.official(module), (x, t, inpaint.mask_digits(
            data.held_x[:2], np.random.default_rng(0)))
        args = (x, t, torch.from_numpy(args[2]))
    with torch.no_grad():
        for a, b in zip(fresh(*args), module.eval()(*args)):
            torch.testing.assert_close(a, b)


def test_inpainting_masks_one_square_alike_in_numpy_and_torch(data):
    x = data.held_x[:50]
    inside = inpaint.hole_mask(*inpaint.random_corners(50, np.random.default_rng(1)))
    assert (inside.reshape(50, -1).sum(1) == inpaint.HOLE ** 2).all()       # one whole square each
    masked = inpaint.mask_digits(x, np.random.default_rng(1))
    assert (masked[inside] == inpaint.FILL).all() and np.array_equal(masked[~inside], x[~inside])
    top, left = torch.randint(0, 16 - inpaint.HOLE + 1, (2, 50), generator=torch.Generator().manual_seed(0)).numpy()
    tb = inpaint.mask_batch(torch.from_numpy(x), torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(tb, np.where(inpaint.hole_mask(top, left), inpaint.FILL, x))
    conds, labels = inpaint.held_conditions()
    assert conds.shape == data.held_x.shape and np.array_equal(labels, data.held_y)


def test_hybrid_loss_pieces():
    m = torch.zeros(3)
    assert torch.allclose(objectives._gauss_kl(m, m, m, m), torch.zeros(3))
    # a sharp decoder centred on the pixel gives ~zero NLL; a far one a large NLL
    x0 = torch.tensor([-1.0, 0.0, 1.0])
    sharp = objectives._decoder_nll(x0, x0, torch.full((3,), -20.0))
    far = objectives._decoder_nll(x0, -x0 + 0.5, torch.full((3,), -20.0))
    assert sharp.max() < 1e-3 and far.min() > 10


def test_ddm_loss_is_zero_for_the_true_targets():
    """The objective's targets: c = -x0 and the drawn noise (an oracle that knows both)."""
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    t_state = gen.get_state()

    def oracle(x_t, t, y):
        g = torch.Generator().manual_seed(0)
        g.set_state(t_state)
        torch.rand(x0.shape[0], generator=g)
        return -x0, torch.randn(x0.shape, generator=g)

    assert objectives.ddm_loss()(oracle, x0, None, gen).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("self_condition", [False, True])
def test_lucid_loss_is_zero_for_the_true_target(objective, self_condition):
    """GaussianDiffusion.p_losses' targets: the drawn noise, x0, or v = sqrt(abar)·eps -
    sqrt(1 - abar)·x0 at the drawn step (an oracle that replays the draws)."""
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    sched = objectives.DiscreteSchedule({"num_train_timesteps": 1000, "beta_schedule": "sigmoid"})
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()

    def oracle(x_t, t, *cond):
        assert len(cond) == self_condition
        g = torch.Generator()
        g.set_state(state)
        n = torch.randint(0, 1000, (4,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = (v[n][:, None, None, None] for v in (sched.sqrt_abar, sched.sqrt_1m_abar))
        return ({"pred_noise": eps, "pred_x0": x0, "pred_v": a * eps - s * x0}[objective],)

    loss = objectives.lucid_loss(sched, objective, self_condition)(oracle, x0, None, gen)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


# every shipped denoiser (the guidance classifier has its own tests: test_classifier.py)
@pytest.mark.parametrize("family", sorted(p.name for p in ASSETS.glob("*")
                                          if (p / "model.safetensors").is_file() and p.name != "classifier"))
def test_shipped_weights_load_strictly(family):
    path = shipped(family)
    assert (path / "model.safetensors").stat().st_size <= 5 * 1024 * 1024
    config = json.loads((path / "config.json").read_text())
    record = json.loads((path / "train.json").read_text())
    assert record["family"] == family and math.isfinite(record["final_loss"])
    fam = get_family(digits.model_family(family))            # dit_latent: a dit
    load_strict(fam.official(fam.build(config)), read_checkpoint(path / "model.safetensors"))


@pytest.mark.slow
def test_demo_exports_once_and_judges_its_grid(tmp_path):
    """The demo's bundle is exported on first use, reused while fresh, redone when stale."""
    from edgediff.digits.demo import DEFAULT_FAMILY, ensure_bundle, run_demo
    from edgediff.runtime.bundle import read_bundle

    result = run_demo(cache=tmp_path, png=tmp_path / "demo.png", log=lambda m: None)
    assert result.png.is_file() and result.judge.n == 100
    assert result.judge.accuracy >= 0.95
    created = read_bundle(result.bundle).manifest.created
    ensure_bundle(DEFAULT_FAMILY, result.bundle, log=lambda m: None)
    assert read_bundle(result.bundle).manifest.created == created          # fresh: kept
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    manifest["source"]["sha256"] = "0" * 64                                  # weights changed since
    (result.bundle / "bundle.json").write_text(json.dumps(manifest))
    ensure_bundle(DEFAULT_FAMILY, result.bundle, log=lambda m: None)
    assert read_bundle(result.bundle).manifest.source["sha256"] != "0" * 64


def test_train_refuses_a_foreign_out_directory_before_training(tmp_path, capsys):
    from edgediff.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["digits", "train", "--family", "dit", "--out", str(tmp_path), "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "not a digits training output" in err and "train dit" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_train_replaces_its_own_output(tmp_path, one_thread):
    first = train.train("dit", tmp_path / "run", steps=2, threads=None, progress=False, batch=4, warmup=1)
    second = train.train("dit", tmp_path / "run", steps=3, threads=None, progress=False, batch=4, warmup=1)
    assert first.path == second.path and json.loads((second.path / "train.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_ema_keeps_the_live_batchnorm_statistics():
    """The EMA copy must carry buffers (BatchNorm running stats), not only parameters: the
    ddm_cond relation layers normalise with them at inference."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.BatchNorm2d(4))
    ema = train.Ema(net, 0.999)
    net.train()(torch.randn(8, 1, 4, 4) * 3 + 2)
    ema.update(net, 0)
    bn, shadow = net[1], ema.shadow[1]
    assert not torch.equal(bn.running_mean, torch.zeros(4))
    torch.testing.assert_close(shadow.running_mean, bn.running_mean)
    torch.testing.assert_close(shadow.running_var, bn.running_var)
