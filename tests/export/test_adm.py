"""ADM numerics that the official guided-diffusion checkpoints depend on (unet.py, nn.py)."""
import functools
import inspect
import math
import time

import numpy as np
import pytest
import torch

from edgediff.export.bundle import export_bundle
from edgediff.export.models import adm
from edgediff.export.models.validation import ConfigError
from official_adm import OfficialADM
from perturb import Rung1, assert_matches_learned_sigma_reference, assert_rung1, assert_rung2, perturb_


def test_schema_defaults_are_the_official_ones():
    params = inspect.signature(adm.UNetModel.__init__).parameters
    signature = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    assert adm.SCHEMA.defaults() == signature
    assert set(adm.SCHEMA.fields) == {k for k in params if k != "self"}


def test_published_parameter_counts_and_keys():
    """Counts of upstream UNetModel built with the README flags (measured once against upstream
    at 22e0df8); the key layout is the transcription's, i.e. the checkpoints'."""
    expected = {"64x64": 295_904_454, "128x128": 421_529_606, "256x256": 553_838_086,
                "256x256-uncond": 552_814_086, "512x512": 558_997_638}
    for name, count in expected.items():
        kw = adm.check_config(adm.CONFIGS[name])
        with torch.device("meta"):
            ours, ref = adm.build(adm.CONFIGS[name]).model, OfficialADM(**kw)
        assert sum(p.numel() for p in ours.parameters()) == count, name
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
               {k: v.shape for k, v in ref.state_dict().items()}, name


def test_published_schedules():
    linear = adm.spec(adm.CONFIGS["256x256"]).schedule
    assert linear == {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    # the 64x64 model was trained with --noise_schedule cosine
    assert adm.spec(adm.CONFIGS["64x64"]).schedule["beta_schedule"] == "squaredcos_cap_v2"
    s = adm.spec(adm.CONFIGS["256x256"])
    assert (s.num_classes, s.null_label, s.outputs, s.extra["variance"]) == (1000, None, ("eps", "var"), "learned_range")
    assert adm.spec(adm.CONFIGS["lsun-cat"]).num_classes is None


def test_timestep_embedding_is_cos_first():
    model = adm.UNetModel(**adm.check_config(adm.CONFIGS["tiny"]))
    t = torch.tensor([0.0, 7.0, 999.0])
    half = 16
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = adm.sinusoidal_embedding(t, model.freqs, 32).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_learned_sigma_splits_eps_and_var():
    torch.manual_seed(0)
    view = adm.build(adm.CONFIGS["tiny"])
    perturb_(view.model, seed=1)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 500.0]), torch.tensor([1, 9])
    with torch.no_grad():
        eps, v = view(x, t, y)
        assert torch.equal(torch.cat([eps, v], 1), view.model(x, t, y))
        assert not torch.allclose(view(x, t, torch.tensor([0, 9]))[0][0], eps[0])


# --- parity with the official forward, weights perturbed ---------------------------------------
# Upstream zero-initialises every ResBlock's last conv, every attention proj_out and the final
# conv, so an untrained ADM outputs exactly 0. perturb_ redraws those tensors; ours must then
# match the independent transcription (official_adm.py, itself checked against upstream).

PERTURBED = {
    # FiLM norm, ResBlock resampling, fixed head width, q/k/v-then-heads order, 10 classes, 3 levels
    "ssn-updown-nhc-new": dict(adm.CONFIGS["tiny"], num_head_channels=32, use_new_attention_order=True,
                               channel_mult=[1, 2, 2], attention_resolutions=[2, 4], num_res_blocks=2),
    # additive embedding, conv resampling, legacy heads-then-q/k/v order, other upsampling heads, unconditional
    "legacy-uncond": dict(adm.CONFIGS["tiny"], num_classes=None, use_scale_shift_norm=False, resblock_updown=False,
                          num_heads=2, num_heads_upsample=4, out_channels=3, attention_resolutions=[1, 2]),
}


@functools.cache
def _perturbed(name: str):
    torch.manual_seed(0)
    kw = adm.check_config(PERTURBED[name])
    ref = OfficialADM(**kw).eval()
    changed = perturb_(ref, seed=1)
    assert {"out.2.weight", "middle_block.1.proj_out.weight", "middle_block.0.out_layers.3.weight"} <= set(changed)
    ours = adm.build(PERTURBED[name])
    adm.FAMILY.official(ours).load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", list(PERTURBED))
def test_matches_official_forward_with_perturbed_weights(name, one_thread):
    ours, ref = _perturbed(name)
    spec = adm.spec(PERTURBED[name])
    assert_matches_learned_sigma_reference(f"adm {name}", ours, ref, spec,
                                           ([1, 4, 2],) if spec.conditional else (None,))


@pytest.fixture(scope="module")
def rung1(tmp_path_factory):
    return Rung1(tmp_path_factory, adm.FAMILY.tolerance)


@pytest.mark.parametrize("name", list(PERTURBED))
def test_rung1_onnx_with_perturbed_weights(name, rung1, one_thread):
    assert_rung1(rung1, "adm", name, _perturbed(name)[0], adm.spec(PERTURBED[name]))


def test_rung2_fp16_with_perturbed_weights(rung1, one_thread):
    name = "ssn-updown-nhc-new"
    assert_rung2(rung1, "adm", name, _perturbed(name)[0], adm.spec(PERTURBED[name]))


# --- config validation: one line naming the key, before any module is built ----------------------

BAD = [
    ({"model_channels": "32"}, "model_channels must be a positive integer, got '32' (str)"),
    ({"channel_mult": [1, "2"]}, "channel_mult must be a non-empty list of positive numbers"),
    ({"channel_mult": []}, "channel_mult must be a non-empty list of positive numbers"),
    ({"model_channels": 48}, "each must be a positive multiple of 32 (GroupNorm32)"),
    ({"image_size": 15}, "image_size 15 must be divisible by 2 (2 levels)"),
    ({"attention_resolutions": [8]}, "attention_resolutions [8] are downsample factors (image_size // resolution)"),
    ({"num_head_channels": 48}, "num_head_channels 48 must divide the attention width 64"),
    ({"num_head_channels": 0}, "num_head_channels must be -1 or a positive integer, got 0"),
    ({"num_heads": 3}, "num_heads 3 must divide the attention width 64"),
    ({"out_channels": 4}, "out_channels 4 must be in_channels 3 or twice it (learn_sigma)"),
    ({"dims": 3}, "dims must be one of 2, got 3"),
    ({"use_scale_shift_norm": "true"}, "use_scale_shift_norm must be true or false"),
    ({"num_classes": 0}, "num_classes must be a positive integer or null, got 0"),
    ({"learn_sigma": True}, "unknown UNetModel argument(s): learn_sigma"),
    ({"_noise_schedule": "sigmoid"}, "_noise_schedule must be one of linear, cosine, got 'sigmoid'"),
]


@pytest.mark.parametrize("override, expected", BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_bad_config_is_one_line(override, expected, tmp_path, monkeypatch):
    config = dict(adm.CONFIGS["tiny"], **override)
    checks = [lambda: adm.spec(config), lambda: export_bundle("adm", config, tmp_path / "B", log=lambda m: None)]
    if "_noise_schedule" not in override:          # build() needs no schedule
        checks.append(lambda: adm.build(config))

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built before the config was validated")
    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    for call in checks:
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            call()
        assert time.perf_counter() - start < 1.0
        message = str(err.value)
        assert expected in message and "\n" not in message and message.startswith("adm config: "), message
    assert not (tmp_path / "B").exists()


def test_plain_pt_state_dict_loads_strictly(tmp_path):
    """The released checkpoints are plain ``torch.save(model.state_dict())`` files."""
    from edgediff.export.models.common import load_strict, read_checkpoint

    ours, ref = _perturbed("legacy-uncond")
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    fresh = adm.build(PERTURBED["legacy-uncond"])
    load_strict(adm.FAMILY.official(fresh), read_checkpoint(tmp_path / "model.pt"), label="adm")
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, fresh.model.state_dict()[k]), k
