"""DDPM U-Net against its peer, diffusers' UNet2DModel: same keys, same numbers, same configs."""
from __future__ import annotations

import functools
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from edgediff.export.models import ddpm  # noqa: E402
from edgediff.export.models.common import (CheckpointError, load_strict, read_checkpoint,  # noqa: E402
                                           sinusoidal_embedding, timestep_frequencies)
from perturb import Rung1, assert_rung1, assert_rung2, perturb_, rel_l2  # noqa: E402

TINY = ddpm.CONFIGS["tiny"]
# Mid-size, unconditional, exercising the non-DDPM settings: multi-head attention, cos-first
# embedding without shift, symmetric downsample padding, centring, a separate time-embedding
# width, mid-block rescaling and its own attention group count.
MID = {
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64, 64],
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"],
    "layers_per_block": 2, "attention_head_dim": 16, "norm_num_groups": 16, "attn_norm_num_groups": 8,
    "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "center_input_sample": True, "time_embedding_dim": 96, "mid_block_scale_factor": 2 ** 0.5,
}
VARIANTS = {
    "tiny": TINY,
    "tiny-unconditional": {k: v for k, v in TINY.items() if k != "num_class_embeds"},
    "tiny-no-mid-attention": dict(TINY, add_attention=False, layers_per_block=2),
    "tiny-no-mid-block": dict(TINY, mid_block_type=None),
    "tiny-ragged-heads": dict(TINY, attention_head_dim=12),     # 2 heads of 12 in 32 channels, as diffusers
    "mid": MID,
}


@functools.cache
def _peer(name: str) -> torch.nn.Module:
    """diffusers' model for VARIANTS[name], with every weight perturbed (GroupNorm scales and
    biases too, so a swapped or missing affine shows). Cached: tests only read it."""
    torch.manual_seed(0)
    config = VARIANTS[name]
    model = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _ours(config: dict, state: dict) -> torch.nn.Module:
    wrapper = ddpm.build(config)
    load_strict(ddpm.FAMILY.official(wrapper), state, label="ddpm")
    return wrapper


def _inputs(config: dict, n: int = 4):
    gen = torch.Generator().manual_seed(1)
    cfg = ddpm.check_config(config)
    size = cfg["sample_size"]
    x = torch.randn(n, cfg["in_channels"], size, size, generator=gen)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0][:n])
    y = None if cfg["num_class_embeds"] is None else torch.arange(n) % cfg["num_class_embeds"]
    return x, t, y


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_diffusers(name):
    config = VARIANTS[name]
    ref = _peer(name)
    ours = _ours(config, ref.state_dict())
    x, t, y = _inputs(config)
    with torch.no_grad():
        expected = ref(x, t, class_labels=y).sample
        (eps,) = ours(x, t) if y is None else ours(x, t, y)
    assert eps.shape == expected.shape
    assert _rel(eps, expected) <= 1e-6


def test_class_labels_change_the_output_and_are_required():
    ref = _peer("tiny")
    ours = _ours(TINY, ref.state_dict())
    x, t, y = _inputs(TINY)
    with torch.no_grad():
        assert _rel(ours(x, t, y)[0], ours(x, t, (y + 1) % 11)[0]) > 1e-3
        with pytest.raises(ValueError, match="class-conditional"):
            ours(x, t)
    unconditional = ddpm.build(VARIANTS["tiny-unconditional"])
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional(x, t, y)


@pytest.mark.parametrize("name", ["ddpm-cifar10-32", "ddpm-256", "tiny"])
def test_named_configs_have_the_diffusers_state_dict(name):
    config = ddpm.CONFIGS[name]
    with torch.device("meta"):                                   # shapes only: no memory, no init time
        ref = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = ddpm.FAMILY.official(ddpm.build(config))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_cifar10_parameter_count():
    with torch.device("meta"):
        model = ddpm.build(ddpm.CONFIGS["ddpm-cifar10-32"])
    assert sum(p.numel() for p in model.parameters()) == 35_746_307   # google/ddpm-cifar10-32


def test_save_pretrained_directory_loads_strictly(tmp_path):
    """diffusers' on-disk layout: config.json used as-is, weights from the .safetensors file."""
    ref = _peer("mid")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
    ours = _ours(config, read_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors"))
    x, t, _ = _inputs(MID, n=2)
    with torch.no_grad():
        assert _rel(ours(x, t)[0], ref(x, t).sample) <= 1e-6


def test_checkpoint_of_another_config_is_refused():
    state = _peer("mid").state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch|missing"):
        _ours(TINY, state)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_is_bit_identical(flip, shift, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0])
    ours = sinusoidal_embedding(t, timestep_frequencies(dim, 10000, shift), dim, cos_first=flip)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(ours, theirs)


def test_spec():
    tiny, cifar = ddpm.spec(TINY), ddpm.spec(ddpm.CONFIGS["ddpm-cifar10-32"])
    assert tiny.sample_shape == (1, 8, 8) and tiny.inputs == ("x", "t", "y")
    assert (tiny.num_classes, tiny.null_label) == (10, 10)
    assert cifar.sample_shape == (3, 32, 32) and cifar.inputs == ("x", "t") and cifar.null_label is None
    assert cifar.outputs == ("eps",) and cifar.prediction == "epsilon" and cifar.space == "pixel"
    assert cifar.time == {"convention": "discrete", "min": 0, "max": 999}
    assert cifar.schedule["beta_schedule"] == "linear" and cifar.schedule["num_train_timesteps"] == 1000
    assert ddpm.spec(ddpm.CONFIGS["ddpm-256"]).sample_shape == (3, 256, 256)


def test_metadata_and_inert_keys_are_accepted():
    legacy = ["UNetResDownBlock2D", "UNetResAttnDownBlock2D", "UNetResDownBlock2D", "UNetResDownBlock2D"]
    config = dict(ddpm.CONFIGS["ddpm-cifar10-32"], _diffusers_version="0.5.0.dev0", _name_or_path="x",
                  dropout=0.1, num_train_timesteps=None, class_embed_type=None, upsample_type="conv",
                  resnet_time_scale_shift="default", down_block_types=legacy)
    assert ddpm.check_config(config)["down_block_types"][1] == "AttnDownBlock2D"


@pytest.mark.parametrize("key, value", [
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("act_fn", "gelu"),
    ("downsample_type", "resnet"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "SkipUpBlock2D"]),
    ("up_block_types", ["UpBlock2D"]),
    ("norm_num_groups", None),
    ("sample_size", 9),
])
def test_unsupported_values_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        ddpm.check_config(dict(TINY, **{key: value}))


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown key.*block_channels"):
        ddpm.check_config(dict(TINY, block_channels=[16, 32]))


# --- parity with diffusers, perturb_ on its own init (issue 11) --------------------------------
# diffusers' init leaves every GroupNorm at (1, 0), attention group norms included. perturb_
# redraws exactly those (and any all-zero tensor), and loads the same state dict strictly into
# both; the existing test above adds noise to all weights instead. Inputs span t at both ends
# and the middle, class labels and the null label.

# MID's non-DDPM settings at the tiny size, so that its ONNX export stays cheap (rung 1).
SMALL_MID = dict(MID, sample_size=8, in_channels=2, out_channels=2, block_out_channels=[16, 32],
                 down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
                 layers_per_block=1, attention_head_dim=8, norm_num_groups=8, attn_norm_num_groups=4,
                 time_embedding_dim=48)
PERTURBED = {"tiny": TINY, "mid": MID, "small-mid": SMALL_MID}


@functools.cache
def _perturbed(name: str):
    config = {k: v for k, v in PERTURBED[name].items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**config).eval()
    changed = set(perturb_(ref, seed=1))
    norms = {k for k in ref.state_dict() if "norm" in k}
    assert norms and norms <= changed, sorted(norms - changed)
    ours = ddpm.build(PERTURBED[name])
    ddpm.FAMILY.official(ours).load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", list(PERTURBED))
@torch.no_grad()
def test_matches_diffusers_with_perturbed_weights(name, one_thread):
    ours, ref = _perturbed(name)
    spec = ddpm.spec(PERTURBED[name])
    label_sets = ([1, 4, 2], [spec.null_label] * 3) if spec.conditional else (None,)
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for t in (0.0, 500.0, 999.0):
        for labels in label_sets:
            x = torch.randn(3, *spec.sample_shape, generator=gen)
            tt, y = torch.full((3,), t), None if labels is None else torch.tensor(labels)
            (eps,) = ours(x, tt) if y is None else ours(x, tt, y)
            err = rel_l2(eps, ref(x, tt, class_labels=y).sample)
            worst = max(worst, err)
            assert err <= 1e-5, f"eps at t={t:g} y={labels}: rel-L2 {err:.3e}"
    print(f"ddpm {name} eager vs diffusers: eps {worst:.2e}")


@pytest.fixture(scope="module")
def rung1(tmp_path_factory):
    return Rung1(tmp_path_factory, ddpm.FAMILY.tolerance)


@pytest.mark.parametrize("name", ["tiny", "small-mid"])
def test_rung1_onnx_with_perturbed_weights(name, rung1, one_thread):
    assert_rung1(rung1, "ddpm", name, _perturbed(name)[0], ddpm.spec(PERTURBED[name]))


def test_rung2_fp16_with_perturbed_weights(rung1, one_thread):
    name = "tiny"
    assert_rung2(rung1, "ddpm", name, _perturbed(name)[0], ddpm.spec(PERTURBED[name]))
