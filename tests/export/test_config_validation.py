"""Strict config validation: bad configs fail fast, before torch builds anything, with one
line naming the key; every named config passes; the CLI leaves no files behind."""
import inspect
import math
import time

import pytest

torch = pytest.importorskip("torch")

from edgediff.cli import main  # noqa: E402
from edgediff.export.bundle import export_bundle  # noqa: E402
from edgediff.export.models import FAMILIES  # noqa: E402
from edgediff.export.models.validation import ConfigError  # noqa: E402

DROP = object()   # an override value meaning "remove this key"

# (family, named base config, override, substring the one-line error must contain)
BAD = [
    # DiT
    ("dit", "tiny", {"hidden_size": "32"}, "dit config: hidden_size must be a positive integer, got '32' (str)"),
    ("dit", "tiny", {"learn_sigma": "false"}, "learn_sigma must be true or false"),
    ("dit", "tiny", {"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ("dit", "tiny", {"depth": -1}, "depth must be a positive integer, got -1"),
    ("dit", "tiny", {"input_size": 8.5}, "input_size must be a positive integer, got 8.5 (float)"),
    ("dit", "tiny", {"in_channels": True}, "in_channels must be a positive integer, got True (bool)"),
    ("dit", "tiny", {"patch_size": 3}, "patch_size 3 must divide input_size 8"),
    ("dit", "DiT-S/8", {"input_size": 36}, "patch_size 8 must divide input_size 36"),
    ("dit", "tiny", {"num_heads": 3}, "hidden_size 32 must be divisible by num_heads 3"),
    ("dit", "tiny", {"hidden_size": 30}, "hidden_size 30 must be divisible by 4"),
    ("dit", "tiny", {"num_classes": None}, "num_classes must be a positive integer, got null"),
    ("dit", "tiny", {"mlp_ratio": math.nan}, "mlp_ratio must be a positive finite number, got nan"),
    ("dit", "tiny", {"class_dropout_prob": math.inf}, "class_dropout_prob must be a finite number in [0, 1]"),
    ("dit", "tiny", {"hidden": 3}, "unknown DiT argument(s): hidden"),
    # lucid (denoising-diffusion-pytorch Unet)
    ("lucid", "tiny", {"dim": 7}, "lucid config: dim 7 must be even and >= 4"),
    ("lucid", "tiny", {"dim_mults": [1, "2"]}, "dim_mults must be a non-empty list of positive integers"),
    ("lucid", "tiny", {"image_size": 9}, "image_size 9 must be divisible by 2^(len(dim_mults) - 1)"),
    ("lucid", "tiny", {"full_attn": [True, False, True]}, "need one entry per dim_mults level"),
    ("lucid", "tiny", {"unet_dim": 3}, "unknown lucid argument(s): unet_dim"),
    # U-ViT
    ("uvit", "tiny", {"img_size": 9}, "patch_size 2 must divide img_size 9"),
    ("uvit", "tiny", {"embed_dim": 30, "num_heads": 4}, "embed_dim 30 must be divisible by num_heads 4"),
    ("uvit", "tiny", {"qkv_bias": "true"}, "qkv_bias must be true or false"),
    ("uvit", "tiny", {"num_classes": None}, "num_classes must be an integer >= -1, got null"),
    ("uvit", "tiny", {"cfg_scale": math.nan}, "cfg_scale must be a non-negative finite number or null"),
    ("uvit", "tiny", {"timesteps": "linear"}, "timesteps must be one of 'continuous', 'discrete'"),
    ("uvit", "cifar10_uvit_small", {"cfg": True}, "cfg=True needs num_classes >= 2"),
    ("uvit", "tiny", {"depth": 0}, "depth must be a positive integer"),
    ("uvit", "tiny", {"norm_layer": "LayerNorm"}, "norm_layer must be left out (only the default nn.LayerNorm"),
    ("uvit", "tiny", {"learn_sigma": True}, "unknown U-ViT config keys learn_sigma"),
    ("uvit", "tiny_t2i", {"num_classes": 11}, "num_classes is a libs/uvit.py key"),
    ("uvit", "tiny_t2i", {"clip_dim": 0}, "clip_dim must be a positive integer"),
    # DDPM (diffusers UNet2DModel config.json)
    ("ddpm", "tiny", {"block_out_channels": [16, "32"]}, "block_out_channels must be a non-empty list of positive"),
    ("ddpm", "tiny", {"norm_num_groups": 12}, "norm_num_groups 12 does not divide block_out_channels entry 16"),
    ("ddpm", "tiny", {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]},
     "unsupported down_block_types block type 'CrossAttnDownBlock2D'"),
    ("ddpm", "tiny", {"up_block_types": ["UpBlock2D"]}, "up_block_types has 1 entries, needs one per"),
    ("ddpm", "tiny", {"down_block_types": "DownBlock2D"}, "down_block_types must be a non-empty list of strings"),
    ("ddpm", "tiny", {"sample_size": 9}, "sample_size 9 must be a multiple of 2**(len(block_out_channels)-1) = 2"),
    ("ddpm", "tiny", {"sample_size": [8]}, "sample_size must be a positive integer or a [height, width] pair"),
    ("ddpm", "tiny", {"out_channels": 2}, "out_channels 2 must equal in_channels 1"),
    ("ddpm", "tiny", {"attention_head_dim": 64}, "attention_head_dim 64 exceeds the 32 channels"),
    ("ddpm", "tiny", {"num_class_embeds": 1}, "num_class_embeds must be an integer >= 2 or null"),
    ("ddpm", "tiny", {"center_input_sample": "false"}, "center_input_sample must be true or false"),
    ("ddpm", "tiny", {"norm_eps": -1e-6}, "norm_eps must be a positive finite number"),
    ("ddpm", "tiny", {"downsample_padding": 2}, "downsample_padding must be one of 0, 1"),
    ("ddpm", "tiny", {"act_fn": "gelu"}, "act_fn must be one of 'silu', 'swish'"),
    ("ddpm", "tiny", {"_class_name": "UNet2DConditionModel"}, "_class_name 'UNet2DConditionModel' is not supported"),
    ("ddpm", "tiny", {"sample_size": None}, "sample_size is required for export"),
    # DDM (official yaml unet: section)
    ("ddm", "tiny", {"channel_mult": [1, "4"]}, "channel_mult must be a non-empty list of positive integers"),
    ("ddm", "tiny", {"attn_resolutions": [8.0]}, "attn_resolutions must be a list of positive integers"),
    ("ddm", "tiny", {"img_resolution": 9}, "img_resolution 9 must be divisible by 2**(len(channel_mult)-1)"),
    ("ddm", "tiny", {"model_channels": 33}, "model_channels 33 with channel_mult [1, 4] gives a 33-channel GroupNorm"),
    ("ddm", "tiny", {"model_channels": 2}, "gives a 2-channel GroupNorm"),
    ("ddm", "tiny", {"model_channels": 56}, "gives a 224-channel attention block, which 3 heads of 64 cannot split"),
    ("ddm", "tiny", {"label_dim": -1}, "label_dim must be a non-negative integer"),
    ("ddm", "tiny", {"precondition": "yes"}, "precondition must be true or false"),
    ("ddm", "tiny", {"sigma_data": math.nan}, "sigma_data must be a positive finite number, got nan"),
    ("ddm", "tiny", {"img_resolution": DROP}, "img_resolution is required"),
    ("ddm", "tiny", {"out_mul": 2}, "out_mul must be 1"),
    ("ddm", "tiny", {"model_type": "SongUNet"}, "model_type must be one of 'DhariwalUNet', got 'SongUNet'"),
    ("ddm", "tiny", {"num_blocks": 0}, "num_blocks must be a positive integer"),
    ("ddm", "tiny", {"dropout": 1.5}, "dropout must be a finite number in [0, 1]"),
    ("ddm", "tiny", {"num_res_blocks": 2}, "unknown config key(s) num_res_blocks"),
]


def _config(family, base, override):
    config = dict(FAMILIES[family].configs[base])
    for key, value in override.items():
        if value is DROP:
            config.pop(key)
        else:
            config[key] = value
    return config


@pytest.fixture
def no_modules(monkeypatch):
    """Any torch module construction fails the test: validation must come first."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built before the config was validated")
    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)


def _ids(case):
    family, base, override, _ = case
    return f"{family}-{base}-{'+'.join(override)}"


@pytest.mark.parametrize("family, base, override, expected", BAD, ids=map(_ids, BAD))
def test_bad_config_fails_fast_naming_the_key(family, base, override, expected, no_modules, tmp_path):
    config = _config(family, base, override)
    paths = (("spec", lambda: FAMILIES[family].spec(config)),
             ("export", lambda: export_bundle(family, config, tmp_path / "B", log=lambda m: None)))
    if override != {"sample_size": None}:                 # build() itself needs no sample size
        paths += (("build", lambda: FAMILIES[family].build(config)),)
    for _, call in paths:
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            call()
        assert time.perf_counter() - start < 1.0
        message = str(err.value)
        assert expected in message and "\n" not in message, message
        assert message.startswith(f"{family} config: ")
    assert list(tmp_path.iterdir()) == []                 # export_bundle created nothing


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_non_object_config_is_refused():
    with pytest.raises(ConfigError, match="dit config: must be a JSON object"):
        FAMILIES["dit"].spec([1, 2])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_named_config_passes(family, no_modules):
    for name, config in FAMILIES[family].configs.items():
        spec = FAMILIES[family].spec(config)
        assert spec.sample_shape[0] >= 1, name


def test_schema_defaults_are_the_official_ones():
    from edgediff.export.models import ddm, dit, uvit

    signature = {k: p.default for k, p in inspect.signature(dit.DiT.__init__).parameters.items() if k != "self"}
    assert dit.SCHEMA.defaults() == signature
    assert uvit.SCHEMA.defaults() == {**uvit.OFFICIAL_DEFAULTS, **uvit.T2I_DEFAULTS, **uvit.EXTRA_DEFAULTS}
    full = ddm.normalize_config({"img_resolution": 32, "img_channels": 3})
    assert full["model_channels"] == 192 and full["channel_mult"] == [1, 2, 3, 4] and full["sigma_max"] == math.inf


def test_legacy_and_metadata_keys_still_pass():
    from edgediff.export.models import ddpm

    config = dict(ddpm.CONFIGS["tiny"], _diffusers_version="0.5.0", down_block_types=["UNetResDownBlock2D",
                                                                                    "UNetResAttnDownBlock2D"])
    assert ddpm.check_config(config)["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert ddpm.check_config(dict(config, sample_size=[8, 16]))["sample_size"] == [8, 16]


# --- the CLI: one line, exit 1, nothing left on disk ---------------------------------------

CLI_BAD = [
    ("dit", '{"input_size": 8, "patch_size": 3, "hidden_size": 32, "num_heads": 2, "in_channels": 1}',
     "error: dit config: patch_size 3 must divide input_size 8"),
    ("dit", '{"learn_sigma": "false"}', "error: dit config: learn_sigma must be true or false"),
    ("uvit", '{"img_size": 8, "patch_size": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": NaN}',
     "error: uvit config: mlp_ratio must be a positive finite number, got nan"),
    ("ddpm", '{"sample_size": 8, "block_out_channels": [16, 32], "norm_num_groups": 12,'
             ' "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}',
     "error: ddpm config: norm_num_groups 12 does not divide"),
    ("ddm", '{"img_resolution": 8, "img_channels": 1, "channel_mult": [1, "2"]}',
     "error: ddm config: channel_mult must be a non-empty list"),
]


@pytest.mark.parametrize("family, text, expected", CLI_BAD, ids=[c[0] + str(i) for i, c in enumerate(CLI_BAD)])
def test_cli_bad_config_is_one_line_exit_1_and_no_files(family, text, expected, tmp_path, capsys, no_modules):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "bad.json").write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--family", family, "--config", str(cfg_dir / "bad.json"), "--out", str(work / "B")])
    assert time.perf_counter() - start < 5.0
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(work.iterdir()) == []                   # no B, B.failed or .B.tmp-*


def test_cli_config_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--family", "dit", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "B")])
    assert exc.value.code == 1 and "JSON object" in capsys.readouterr().err
    assert not (tmp_path / "B").exists()
