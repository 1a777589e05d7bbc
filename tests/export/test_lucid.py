"""lucidrains denoising-diffusion-pytorch ``Unet`` (family ``lucid``): numerics, keys, configs."""
import functools
import math

import numpy as np
import pytest
import torch

from edgediff.export.models import lucid
from edgediff.export.models.common import load_strict, read_checkpoint
from edgediff.export.models.validation import ConfigError
from edgediff.runtime.schedules import Schedule
from official_lucid import OfficialUnet
from perturb import Rung1, assert_rung1, perturb_, rel_l2


def test_parameter_count_of_the_readme_unet():
    # upstream Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True) at faed4db: 35,711,491
    with torch.device("meta"):
        model = lucid.build(lucid.CONFIGS["readme-128"]).model
    assert sum(p.numel() for p in model.parameters()) == 35_711_491


def test_schema_defaults_are_upstreams():
    import inspect

    signature = {k: p.default for k, p in inspect.signature(lucid.Unet.__init__).parameters.items() if k != "self"}
    defaults = {k: tuple(v) if isinstance(v, list) else v for k, v in lucid.SCHEMA.defaults().items()}
    assert {k: defaults.get(k, inspect.Parameter.empty) for k in signature} == signature


def test_state_dict_keys_are_upstream_names():
    keys = set(lucid.build(dict(lucid.CONFIGS["tiny"], random_fourier_features=True)).model.state_dict())
    for key in ("init_conv.weight", "time_mlp.0.weights", "time_mlp.1.weight", "time_mlp.3.weight",
                "downs.0.0.block1.proj.weight", "downs.0.0.block1.norm.g", "downs.0.0.mlp.1.weight",
                "downs.0.2.mem_kv", "downs.0.2.to_qkv.weight", "downs.0.2.to_out.0.weight", "downs.0.2.to_out.1.g",
                "downs.0.3.1.weight", "downs.1.2.to_out.weight", "downs.1.3.weight", "mid_attn.mem_kv",
                "ups.0.0.res_conv.weight", "ups.0.3.1.weight", "ups.1.3.weight", "final_res_block.block2.norm.g",
                "final_conv.weight"):
        assert key in keys, key


# --- parity with the transcription, weights perturbed -----------------------------------------
# Upstream initialises every RMSNorm gain to one; perturb_ redraws them so a wrong sqrt(C)
# factor or norm placement shows. official_lucid.py was itself checked against upstream.

PERTURBED = {
    # linear attention on level 0, full attention on the last level (upstream's default)
    "tiny": lucid.CONFIGS["tiny"],
    # full attention everywhere, per-level heads, random Fourier time features, self-conditioning
    "full-fourier-selfcond": dict(dim=16, dim_mults=[1, 2], channels=3, image_size=8, full_attn=[True, True],
                                  attn_heads=[2, 4], attn_dim_head=8, random_fourier_features=True,
                                  learned_sinusoidal_dim=8, self_condition=True, init_dim=12),
    # learned sinusoidal time features, three levels, linear attention on two of them
    "learned-3level": dict(dim=8, dim_mults=[1, 2, 2], channels=1, image_size=8, attn_heads=2,
                           attn_dim_head=4, learned_sinusoidal_cond=True, sinusoidal_pos_emb_theta=100),
}


@functools.cache
def _perturbed(name: str):
    torch.manual_seed(0)
    cfg = lucid.check_config(PERTURBED[name])
    ref = OfficialUnet(**lucid.unet_kwargs(cfg)).eval()
    changed = perturb_(ref, seed=1)
    assert "init_conv.weight" not in changed and "mid_attn.norm.g" in changed
    view = lucid.LucidExport(lucid.Unet(**lucid.unet_kwargs(cfg))).eval()
    lucid.FAMILY.official(view).load_state_dict(ref.state_dict(), strict=True)
    return view, ref


@pytest.mark.parametrize("name", list(PERTURBED))
@torch.no_grad()
def test_matches_transcription_with_perturbed_weights(name, one_thread):
    view, ref = _perturbed(name)
    cfg = lucid.check_config(PERTURBED[name])
    shape = (3, cfg["channels"], cfg["image_size"], cfg["image_size"])
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for t in (0.0, 500.0, 999.0):
        x, tt = torch.randn(shape, generator=gen), torch.full((3,), t)
        worst = max(worst, rel_l2(view(x, tt)[0], ref(x, tt)))
        if cfg["self_condition"]:
            cond = torch.randn(shape, generator=gen)
            worst = max(worst, rel_l2(view.model(x, tt, cond), ref(x, tt, cond)))
    assert worst <= 1e-5, f"rel-L2 {worst:.3e}"
    print(f"lucid {name} eager vs transcription: {worst:.2e}")


@pytest.fixture(scope="module")
def rung1(tmp_path_factory):
    return Rung1(tmp_path_factory, lucid.FAMILY.tolerance)


def _io_spec(name):
    """The bundle spec refuses Fourier time features (the runtime lacks their time convention);
    the network's graph is still checked under a spec of the same shape. Self-conditioning
    exports, with x_self_cond as a third input."""
    cfg = {k: v for k, v in PERTURBED[name].items() if k not in ("random_fourier_features", "learned_sinusoidal_cond")}
    spec = lucid.spec({"objective": "pred_v", "beta_schedule": "sigmoid", **cfg})
    assert spec.inputs == (("x", "t", "x_self_cond") if cfg.get("self_condition") else ("x", "t"))
    return spec


@pytest.mark.parametrize("name", list(PERTURBED))
def test_rung1_onnx_with_perturbed_weights(name, rung1, one_thread):
    assert_rung1(rung1, "lucid", name, _perturbed(name)[0], _io_spec(name))


# --- spec: time, schedules, refusals ----------------------------------------------------------

def _lucid_betas(kind: str, n: int) -> np.ndarray:
    """GaussianDiffusion's linear / cosine / sigmoid beta schedules, in float64 (the sigmoid's
    end values are float32 there: torch.tensor(±3.).sigmoid())."""
    if kind == "linear":
        scale = 1000 / n
        return np.linspace(scale * 1e-4, scale * 0.02, n)
    steps = np.linspace(0, n, n + 1) / n
    if kind == "cosine":
        abar = np.cos((steps + 0.008) / 1.008 * math.pi * 0.5) ** 2
    else:
        lo, hi = (float(torch.tensor(v).sigmoid()) for v in (-3.0, 3.0))
        abar = (hi - 1 / (1 + np.exp(-(steps * 6 - 3)))) / (hi - lo)
    abar = abar / abar[0]
    return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("n", [1000, 250])
def test_schedule_is_gaussian_diffusions(kind, n):
    spec = lucid.spec(dict(lucid.CONFIGS["tiny"], beta_schedule=kind, timesteps=n))
    assert spec.time == {"convention": "discrete", "min": 0, "max": n - 1}
    assert spec.prediction == "epsilon" and spec.outputs == ("eps",)
    betas = Schedule.from_config(spec.schedule).betas
    np.testing.assert_allclose(betas, _lucid_betas(kind, n), rtol=1e-11, atol=2e-15)


@pytest.mark.parametrize("objective, prediction, output", [
    ("pred_noise", "epsilon", "eps"), ("pred_x0", "sample", "x0"), ("pred_v", "v_prediction", "v")])
@pytest.mark.parametrize("self_condition", [False, True])
def test_objectives_and_self_conditioning_reach_the_bundle(objective, prediction, output, self_condition):
    """The objective names the prediction type and the output (``v``: v-prediction, never
    DiT's variance, which schema 2 calls ``var``); self-conditioning adds the x_self_cond input."""
    from edgediff.export.reference import manifest_for

    cfg = dict(lucid.CONFIGS["tiny"], objective=objective, self_condition=self_condition)
    spec = lucid.spec(cfg)
    assert (spec.prediction, spec.outputs) == (prediction, (output,))
    assert spec.inputs == ("x", "t", "x_self_cond")[:3 if self_condition else 2]
    manifest = manifest_for("lucid", spec, cfg)
    assert manifest.prediction == prediction and manifest.output_names == [output]
    assert manifest.inputs.get("x_self_cond", manifest.inputs["x"]) == manifest.inputs["x"]
    assert manifest.option("use_clipped_model_output") is True        # ddim_sample's re-derived noise


@pytest.mark.parametrize("change, message", [
    ({"learned_variance": True}, "learned_variance"),
    ({"out_dim": 2}, "out_dim != channels"),
    ({"random_fourier_features": True}, "continuous-time trainers"),
])
def test_spec_refuses_what_the_runtime_lacks(change, message):
    cfg = dict(lucid.CONFIGS["tiny"], **change)
    lucid.build(cfg)                                         # the network itself builds
    with pytest.raises(ConfigError, match=message) as err:
        lucid.spec(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"dimm": 3}, "unknown lucid argument"),
    ({"dim": 6.0}, "dim must be a positive integer"),
    ({"dim": 6, "dim_mults": [1, 2], "image_size": 8, "attn_heads": 2}, None),
    ({"dim": 7}, "dim 7 must be even"),
    ({"dim_mults": []}, "dim_mults must be a non-empty list"),
    ({"image_size": 12, "dim_mults": [1, 2, 2, 2]}, "image_size 12 must be divisible by 2"),
    ({"full_attn": [True]}, "one entry per dim_mults level"),
    ({"attn_heads": [2, 2, 2]}, "one entry per dim_mults level"),
    ({"attn_heads": 0}, "attn_heads and attn_dim_head must be positive integers"),
    ({"full_attn": "yes"}, "full_attn null, a boolean"),
    ({"objective": "eps"}, "objective must be one of"),
    ({"beta_schedule": "quad"}, "beta_schedule must be one of"),
    ({"flash_attn": "false"}, "flash_attn must be true or false"),
    ({"learned_sinusoidal_dim": 7, "learned_sinusoidal_cond": True}, "learned_sinusoidal_dim 7 must be even"),
    ({"timesteps": 1}, "timesteps must be"),
    ({"dropout": 1.5}, "dropout must be"),
])
def test_bad_configs_fail_in_one_line(change, message):
    cfg = dict(lucid.CONFIGS["tiny"], **change)
    if message is None:
        lucid.spec(cfg)
        return
    with pytest.raises(ConfigError, match=message) as err:
        lucid.spec(cfg)
    assert "\n" not in str(err.value) and str(err.value).startswith("lucid config: ")


# --- the Trainer's checkpoint layout ----------------------------------------------------------

def test_trainer_checkpoint_loads_the_ema_weights(tmp_path):
    """Trainer.save: {'step', 'model': GaussianDiffusion.state_dict() ('model.' + Unet keys and
    the schedule buffers), 'opt': Adam.state_dict(), 'ema': EMA.state_dict() ('ema_model.model.',
    'online_model.model.', 'initted', 'step'), 'scaler': None, 'version': str}."""
    torch.manual_seed(0)
    cfg = lucid.CONFIGS["tiny"]
    online, ema = lucid.build(cfg).model, lucid.build(cfg).model
    opt = torch.optim.Adam(online.parameters(), lr=8e-5, betas=(0.9, 0.99))
    online(torch.randn(1, 1, 8, 8), torch.tensor([3.0])).sum().backward()
    opt.step()
    buffers = {"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000)}
    diffusion = {**{f"model.{k}": v for k, v in online.state_dict().items()}, **buffers}
    ema_state = {"initted": torch.tensor(True), "step": torch.tensor(10),
                 **{f"ema_model.model.{k}": v for k, v in ema.state_dict().items()},
                 **{f"ema_model.{k}": v for k, v in buffers.items()},
                 **{f"online_model.model.{k}": v for k, v in online.state_dict().items()}}
    torch.save({"step": 10, "model": diffusion, "opt": opt.state_dict(), "ema": ema_state,
                "scaler": None, "version": "2.1.1"}, tmp_path / "model-1.pt")
    target = lucid.build(cfg).model
    load_strict(target, read_checkpoint(tmp_path / "model-1.pt"), "lucid")
    for k, v in target.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k


def test_export_needs_the_training_objective_and_schedule_stated():
    """GaussianDiffusion defaults to pred_v + sigmoid: an export must not assume otherwise."""
    base = {k: v for k, v in lucid.CONFIGS["tiny"].items() if k not in ("objective", "beta_schedule")}
    with pytest.raises(ValueError, match="say objective and beta_schedule"):
        lucid.spec(base)
    assert lucid.spec({**base, "objective": "pred_noise", "beta_schedule": "cosine"}).schedule
    assert lucid.spec({**base, "objective": "pred_v", "beta_schedule": "sigmoid"}).prediction == "v_prediction"


# --- a v-prediction, sigmoid, self-conditioned bundle end to end --------------------------------

def test_self_conditioned_v_bundle_generates_like_pytorch(tmp_path, one_thread):
    """Exported with x_self_cond, sampled through the pipeline on ONNX Runtime and on the
    PyTorch module (rung 5), the runtime feeding zeros first, then the previous call's clipped x0."""
    from safetensors.torch import save_file

    from edgediff.export.bundle import export_bundle
    from edgediff.export.reference import TorchBackend
    from edgediff.runtime import read_bundle
    from edgediff.runtime.backends import load_backend
    from edgediff.runtime.parity import rel_l2 as np_rel_l2
    from edgediff.runtime.pipeline import generate

    cfg = dict(lucid.CONFIGS["tiny"], objective="pred_v", beta_schedule="sigmoid", self_condition=True, timesteps=100)
    torch.manual_seed(0)
    module = lucid.build(cfg)
    perturb_(module.model, seed=1)
    save_file(module.model.state_dict(), tmp_path / "w.safetensors")
    export_bundle("lucid", cfg, tmp_path / "b", checkpoint=tmp_path / "w.safetensors", log=lambda m: None)
    bundle = read_bundle(tmp_path / "b")
    m = bundle.manifest
    assert (m.prediction, m.output_names, m.input_names) == ("v_prediction", ["v"], ["x", "t", "x_self_cond"])
    assert m.schedule["beta_schedule"] == "sigmoid" and m.option("use_clipped_model_output") is True

    class Spy(TorchBackend):
        feeds: list = []

        def infer_impl(self, feed):
            self.feeds.append((feed["x"].copy(), feed["t"].copy(), feed["x_self_cond"].copy()))
            return super().infer_impl(feed)

    for sampler in ("ddim", "dpmpp_2m", "heun"):
        kw = dict(sampler=sampler, steps=6, batch=2, seed=3)
        ort_run = generate(load_backend(bundle, "ort"), m, 2, **kw)
        Spy.feeds = []
        ref_run = generate(Spy(module, m.inputs, m.output_names), m, 2, **kw)
        assert np.isfinite(ort_run.samples).all() and np_rel_l2(ref_run.samples, ort_run.samples) <= 1e-4
        (x1, t1, c1), (_, _, c2) = Spy.feeds[:2]
        assert not c1.any() and c2.any()
        sched = m.noise_schedule
        a, s = np.sqrt(sched.alphas_cumprod[int(t1[0])]), np.sqrt(1 - sched.alphas_cumprod[int(t1[0])])
        with torch.no_grad():
            v = module(torch.from_numpy(x1), torch.from_numpy(t1), torch.from_numpy(c1))[0].numpy()
        np.testing.assert_allclose(c2, np.clip(a * x1 - s * v, -1, 1), atol=1e-5)
