"""U-ViT reference model: strict checkpoint loading, export view, spec facts, and numeric
properties of the official computation checked independently of the implementation."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from edgediff.runtime.schedules import Schedule
import torch
from safetensors.torch import save_file

from edgediff.export.models import get_family
from edgediff.export.models.common import CheckpointError, load_strict, read_checkpoint
from official_uvit import OfficialUViT, OfficialUViTT2I
from perturb import Rung1, assert_rung1, assert_rung2, perturb_, rel_l2

FAMILY = get_family("uvit")
TINY = FAMILY.configs[FAMILY.fixture]
TINY_UNCOND = {**TINY, "num_classes": -1, "cfg": False, "mlp_time_embed": False, "qkv_bias": False}
TINY_T2I = FAMILY.configs["tiny_t2i"]


def _randomized(config: dict, seed: int = 0) -> torch.nn.Module:
    """A built model with every parameter random (LayerNorm affine included), so a swapped
    or mis-wired tensor cannot hide behind the default init."""
    torch.manual_seed(seed)
    model = FAMILY.build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return model


def _record(store: dict, key: str, pick):
    """A forward hook that stores pick(inputs, output) and returns None (keeps the output)."""
    def hook(module, inputs, output):
        store[key] = pick(inputs, output)
    return hook


def _inputs(config: dict, batch: int = 3, seed: int = 1):
    spec = FAMILY.spec(config)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.sample_shape, generator=g)
    t = torch.rand(batch, generator=g) * spec.time["max"]
    if "context" in spec.features:
        return x, t, torch.randn(batch, *spec.features["context"]["shape"][1:], generator=g)
    if spec.conditional:
        return x, t, torch.randint(0, spec.num_classes + 1, (batch,), generator=g)
    return x, t


@torch.no_grad()
def test_checkpoint_round_trip_safetensors_and_wrapped_pt(tmp_path):
    model = _randomized(TINY)
    state = FAMILY.official(model).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "uvit.safetensors"))
    torch.save({"ema": state, "step": 5}, tmp_path / "uvit.pt")
    args = _inputs(TINY)
    (want,) = model(*args)
    for name in ("uvit.safetensors", "uvit.pt"):
        fresh = FAMILY.build(TINY)
        load_strict(FAMILY.official(fresh), read_checkpoint(tmp_path / name), "tiny")
        (got,) = fresh(*args)
        assert torch.equal(got, want), name


def test_official_key_layout():
    keys = set(FAMILY.official(FAMILY.build(TINY)).state_dict())
    for key in ("patch_embed.proj.weight", "time_embed.0.weight", "time_embed.2.bias", "label_emb.weight",
                "pos_embed", "in_blocks.1.attn.qkv.bias", "mid_block.mlp.fc2.weight",
                "out_blocks.0.skip_linear.weight", "norm.weight", "decoder_pred.bias", "final_layer.weight"):
        assert key in keys, key
    # Only out-blocks carry the long-skip fusion; the frequency table is not a checkpoint tensor.
    assert not any(k.startswith(("in_blocks", "mid_block")) and "skip_linear" in k for k in keys)
    assert "freqs" not in keys


def test_load_failure_names_missing_and_unexpected_keys():
    state = FAMILY.official(FAMILY.build(TINY)).state_dict()
    del state["mid_block.attn.proj.weight"]
    state["mid_block.attn.bogus"] = torch.zeros(1)
    expected = r"missing: mid_block\.attn\.proj\.weight.*unexpected: mid_block\.attn\.bogus"
    with pytest.raises(CheckpointError, match=expected):
        load_strict(FAMILY.official(FAMILY.build(TINY)), state, "tiny")
    # A class-conditional checkpoint does not fit an unconditional config.
    cond_state = FAMILY.official(FAMILY.build({**TINY_UNCOND, "num_classes": 11})).state_dict()
    with pytest.raises(CheckpointError, match=r"unexpected: label_emb\.weight.*shape mismatch: pos_embed"):
        load_strict(FAMILY.official(FAMILY.build(TINY_UNCOND)), cond_state, "tiny")


@pytest.mark.parametrize("config", [TINY, TINY_UNCOND], ids=["conditional", "unconditional"])
@torch.no_grad()
def test_export_view_returns_one_eps_tensor(config):
    args = _inputs(config, batch=3)
    outs = FAMILY.build(config)(*args)
    assert isinstance(outs, tuple) and len(outs) == 1
    assert outs[0].shape == (3, *FAMILY.spec(config).sample_shape) and outs[0].dtype == torch.float32


def test_constructor_rejects_unknown_arguments():
    from edgediff.export.models.uvit import UViT

    with pytest.raises(ValueError, match="unknown UViT arguments.*'depht'"):
        UViT(depht=4)
    with pytest.raises(ValueError, match="norm_layer"):
        UViT(norm_layer=torch.nn.GroupNorm)
    with pytest.raises(ValueError, match="unknown U-ViT config keys"):
        FAMILY.build({**TINY, "learn_sigma": True})
    with pytest.raises(ValueError, match="needs y"):
        FAMILY.build(TINY)(*_inputs(TINY)[:2])


def test_spec_facts():
    tiny = FAMILY.spec(TINY)
    assert (tiny.sample_shape, tiny.inputs, tiny.outputs) == ((1, 8, 8), ("x", "t", "y"), ("eps",))
    assert (tiny.num_classes, tiny.null_label, tiny.prediction, tiny.space) == (10, 10, "epsilon", "pixel")

    cifar = FAMILY.spec(FAMILY.configs["cifar10_uvit_small"])
    assert cifar.sample_shape == (3, 32, 32) and cifar.inputs == ("x", "t") and cifar.num_classes is None
    assert cifar.time == {"convention": "continuous", "min": 0.0, "max": 999.0, "scale": 999.0}
    sched = Schedule.from_config(cifar.schedule)
    assert (sched.kind, sched.beta_min, sched.beta_max, tuple(sched.ignored_keys)) == ("vp_continuous", 0.1, 20.0, ())
    assert sched.model_time(1.0) == 999.0                       # sde.py: nnet(xt, t * 999)

    huge = FAMILY.spec(FAMILY.configs["imagenet256_uvit_huge"])
    assert (huge.sample_shape, huge.space, huge.num_classes, huge.null_label) == ((4, 32, 32), "latent", 1000, 1000)
    time = huge.time
    assert (time["convention"], time["min"], time["max"], time["offset"]) == ("discrete", 1.0, 1000.0, 1)
    sched = Schedule.from_config(huge.schedule)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(sched.betas, betas, rtol=1e-12)
    assert sched.model_time(0) == 1.0 and not sched.ignored_keys   # step n-1 is the model's n
    assert huge.extra["cfg_scale"] == 0.4
    # U-ViT-L/2 on ImageNet-256 was trained with train_ldm.py: latent but VP-SDE continuous time.
    assert FAMILY.spec(FAMILY.configs["imagenet256_uvit_large"]).time["scale"] == 999.0
    # ImageNet-64 models have 1000 labels and no null class.
    in64 = FAMILY.spec(FAMILY.configs["imagenet64_uvit_mid"])
    assert (in64.num_classes, in64.null_label, in64.space) == (1000, None, "pixel")


def _official_param_count(c: dict) -> int:
    """Count written from the architecture description, not from the module tree."""
    d, p, ch = c["embed_dim"], c["patch_size"], c.get("in_chans", 3)
    hidden, tokens = int(d * c["mlp_ratio"]), (c["img_size"] // p) ** 2 + (2 if c["num_classes"] > 0 else 1)
    block = 4 * d + 3 * d * d + (3 * d if c["qkv_bias"] else 0) + d * d + d + 2 * d * hidden + hidden + d
    half = c["depth"] // 2
    total = ch * p * p * d + d + tokens * d + (2 * half + 1) * block + half * (2 * d * d + d)
    total += 2 * d + d * p * p * ch + p * p * ch
    total += (8 * d * d + 5 * d) if c["mlp_time_embed"] else 0
    total += c["num_classes"] * d if c["num_classes"] > 0 else 0
    total += (9 * ch * ch + ch) if c.get("conv", True) else 0
    return total


@pytest.mark.parametrize("name,paper_millions", [("tiny", None), ("cifar10_uvit_small", 44),
                                                 ("imagenet64_uvit_mid", 131), ("imagenet256_uvit_huge", 501)])
def test_parameter_count_matches_architecture_and_paper(name, paper_millions):
    config = FAMILY.configs[name]
    with torch.device("meta"):                                      # no memory, no init cost
        count = sum(p.numel() for p in FAMILY.build(config).parameters())
    assert count == _official_param_count(config)
    if paper_millions is not None:                                  # arXiv 2209.12152, Table 1
        assert round(count / 1e6) == paper_millions


def _first_block_tokens(config, t):
    """(model, official net, x, its third input, t, the first block's input tokens minus
    pos_embed) with the time token a raw sinusoid, and that sinusoid, cos first."""
    config = {**config, "mlp_time_embed": False}
    model = _randomized(config)
    net = FAMILY.official(model)
    seen = {}
    net.in_blocks[0].register_forward_hook(_record(seen, "tokens", lambda a, out: a[0]))
    x, _, third = _inputs(config)
    t = torch.tensor(t)
    model(x, t, third)
    half = net.embed_dim // 2
    args = t.double().numpy()[:, None] * np.exp(-math.log(10000.0) * np.arange(half) / half)[None]
    sinusoid = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    return model, net, x, third, t, seen["tokens"] - net.pos_embed, sinusoid


@torch.no_grad()
def test_token_layout_label_then_time_then_patches_with_cos_first_embedding():
    model, net, x, y, t, tokens, expected_time = _first_block_tokens(TINY, [0.0, 1.0, 999.0])   # (N, 2 + L, D)
    assert tokens.shape[1] == 2 + 16 and tokens.shape[2] == net.embed_dim
    np.testing.assert_allclose(tokens[:, 0].numpy(), net.label_emb.weight[y].numpy(), atol=1e-6)
    np.testing.assert_allclose(tokens[:, 1].numpy(), expected_time, atol=2e-4)
    # Patch token k is the row-major patch (k // 4, k % 4) of the 4x4 grid.
    conv = net.patch_embed.proj
    patch = x[:, :, 2:4, 4:6]                                       # row 1, column 2 -> token 6
    direct = torch.einsum("nchw,dchw->nd", patch, conv.weight) + conv.bias
    np.testing.assert_allclose(tokens[:, 2 + 6].numpy(), direct.numpy(), atol=1e-5)


@torch.no_grad()
def test_label_matters_and_null_row_is_used():
    model = _randomized(TINY)
    x, t, _ = _inputs(TINY, batch=2)
    (a,) = model(x, t, torch.tensor([3, 3]))
    (b,) = model(x, t, torch.tensor([4, 10]))                       # 10 is the null label
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    FAMILY.official(model).label_emb.weight[10].zero_()
    (c,) = model(x, t, torch.tensor([4, 10]))
    assert torch.equal(c[0], b[0]) and not torch.equal(c[1], b[1])


@torch.no_grad()
def test_long_skips_pair_deepest_in_block_with_first_out_block():
    net = FAMILY.official(_randomized(TINY))
    seen = {}
    for i, blk in enumerate(net.in_blocks):
        blk.register_forward_hook(_record(seen, f"in{i}", lambda a, out: out))
    for i, blk in enumerate(net.out_blocks):
        blk.skip_linear.register_forward_hook(_record(seen, f"cat{i}", lambda a, out: a[0]))
    net(*_inputs(TINY))
    d = net.embed_dim
    last = len(net.in_blocks) - 1
    for i in range(len(net.out_blocks)):                            # concat([main, skip]): skip second
        assert torch.equal(seen[f"cat{i}"][..., d:], seen[f"in{last - i}"])


def test_unpatchify_matches_einops_pattern_by_loops():
    """'B (h w) (p1 p2 C) -> B C (h p1) (w p2)', spelled out element by element."""
    net = FAMILY.official(FAMILY.build({**TINY_UNCOND, "in_chans": 3}))
    g, p, c = net.grid, net.patch_size, net.in_chans
    x = torch.randn(2, g * g, p * p * c)
    want = torch.empty(2, c, g * p, g * p)
    for h in range(g):
        for w in range(g):
            for p1 in range(p):
                for p2 in range(p):
                    for ch in range(c):
                        want[:, ch, h * p + p1, w * p + p2] = x[:, h * g + w, (p1 * p + p2) * c + ch]
    assert torch.equal(net.unpatchify(x), want)


def test_mlp_uses_exact_gelu_and_default_layernorm():
    net = FAMILY.official(FAMILY.build(TINY))
    assert net.mid_block.mlp.act.approximate == "none"
    assert net.norm.eps == 1e-5 and net.in_blocks[0].norm1.eps == 1e-5
    head_dim = net.embed_dim // 2
    assert net.mid_block.attn.scale == head_dim ** -0.5


@torch.no_grad()
def test_attention_matches_torch_multi_head_attention():
    """Fused qkv features split as (q|k|v, head, head_dim), as nn.MultiheadAttention packs them."""
    attn = FAMILY.official(_randomized(TINY)).mid_block.attn
    x = torch.randn(2, 18, attn.proj.in_features)
    want, _ = torch.nn.functional.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn.proj.in_features, attn.num_heads,
        attn.qkv.weight, attn.qkv.bias, None, None, False, 0.0, attn.proj.weight, attn.proj.bias,
        training=False, need_weights=False)
    torch.testing.assert_close(attn(x), want.transpose(0, 1), rtol=1e-5, atol=1e-6)


# --- parity with the official forward, weights perturbed (issue 11) ---------------------------
# The official init zeroes every Linear bias and sets every LayerNorm to (1, 0). perturb_
# redraws exactly those; ours must then match the independent transcription
# (official_uvit.py, itself checked against upstream libs/uvit.py).

PERTURBED = {
    "tiny": TINY,                      # label + time tokens, time MLP, qkv bias, output conv, null label
    "uncond-noconv": dict(img_size=16, patch_size=4, in_chans=3, embed_dim=48, depth=6, num_heads=3, mlp_ratio=4,
                          qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=False),
    "tiny_t2i": TINY_T2I,              # time + 5 text tokens (libs/uvit_t2i.py), time MLP, qkv bias, output conv
}
_EDGEDIFF_ONLY = ("timesteps", "cfg", "cfg_scale")


@functools.cache
def _perturbed(name: str):
    """(our export view, the official transcription) with the same perturbed official-init weights."""
    config = PERTURBED[name]
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k not in _EDGEDIFF_ONLY}
    official = OfficialUViTT2I if "clip_dim" in config else OfficialUViT
    ref = official(**kwargs).official_init_().eval()
    changed = set(perturb_(ref, seed=1))
    # every Linear bias (zero) and LayerNorm weight/bias (one/zero) was constant, so redrawn
    linear_bias = {k for k in ref.state_dict() if k.endswith(".bias") and not k.startswith(("patch_embed", "final_layer"))}
    norms = {k for k in ref.state_dict() if "norm" in k}
    assert linear_bias | norms <= changed, sorted((linear_bias | norms) - changed)
    assert "pos_embed" not in changed                          # learned (trunc-normal), not constant
    ours = FAMILY.build(config)
    FAMILY.official(ours).load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", list(PERTURBED))
@torch.no_grad()
def test_matches_official_forward_with_perturbed_weights(name, one_thread):
    ours, ref = _perturbed(name)
    spec = FAMILY.spec(PERTURBED[name])
    label_sets = ([1, 4, 2], [spec.null_label] * 3) if spec.conditional else (None,)
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for t in (spec.time["min"], (spec.time["min"] + spec.time["max"]) / 2, spec.time["max"]):
        for labels in label_sets:
            x = torch.randn(3, *spec.sample_shape, generator=gen)
            args = (x, torch.full((3,), float(t))) + (() if labels is None else (torch.tensor(labels),))
            if "context" in spec.features:                          # text-to-image: (x, t, context)
                context = torch.randn(3, *spec.features["context"]["shape"][1:], generator=gen)
                (eps,) = ours(*args, context)
                err = rel_l2(eps, ref(*args, context=context))
            else:
                (eps,) = ours(*args)
                err = rel_l2(eps, ref(*args))
            worst = max(worst, err)
            assert err <= 1e-5, f"eps at t={t:g} y={labels}: rel-L2 {err:.3e}"
    print(f"uvit {name} eager vs official: eps {worst:.2e}")


@pytest.fixture(scope="module")
def rung1(tmp_path_factory):
    return Rung1(tmp_path_factory, FAMILY.tolerance)


@pytest.mark.parametrize("name", list(PERTURBED))
def test_rung1_onnx_with_perturbed_weights(name, rung1, one_thread):
    assert_rung1(rung1, "uvit", name, _perturbed(name)[0], FAMILY.spec(PERTURBED[name]))


@pytest.mark.parametrize("name", ["tiny", "tiny_t2i"])
def test_rung2_fp16_with_perturbed_weights(name, rung1, one_thread):
    assert_rung2(rung1, "uvit", name, _perturbed(name)[0], FAMILY.spec(PERTURBED[name]))


# --- text-to-image layout (libs/uvit_t2i.py) ----------------------------------------------------

def test_t2i_spec_facts_for_the_mscoco_models():
    small = FAMILY.spec(FAMILY.configs["mscoco_uvit_small"])
    assert (small.inputs, small.outputs, small.sample_shape) == (("x", "t", "context"), ("eps",), (4, 32, 32))
    assert small.features == {"context": {"dtype": "float32", "shape": ["batch", 77, 768]}}
    assert (small.num_classes, small.null_label, small.space, small.prediction) == (None, None, "latent", "epsilon")
    # train_t2i_discrete.py: n in 1..1000 on the Stable Diffusion schedule, as the *_huge models
    assert small.time == FAMILY.spec(FAMILY.configs["imagenet256_uvit_huge"]).time
    assert small.schedule == FAMILY.spec(FAMILY.configs["imagenet256_uvit_huge"]).schedule
    assert small.extra["cfg_scale"] == 1.0 and "empty prompt" in small.extra["guidance"]
    deep = FAMILY.configs["mscoco_uvit_small_deep"]
    assert deep == {**FAMILY.configs["mscoco_uvit_small"], "depth": 16}    # README: --config.nnet.depth=16
    tiny = FAMILY.spec(TINY_T2I)
    assert tiny.inputs == ("x", "t", "context") and tiny.features["context"]["shape"] == ["batch", 5, 12]


def test_t2i_official_key_layout_and_parameter_count():
    config = FAMILY.configs["mscoco_uvit_small"]
    with torch.device("meta"):
        net = FAMILY.official(FAMILY.build(config))
    state = net.state_dict()
    assert state["context_embed.weight"].shape == (512, 768) and state["context_embed.bias"].shape == (512,)
    assert state["pos_embed"].shape == (1, 1 + 77 + 16 * 16, 512)          # time, 77 text tokens, patches
    assert not any(k.startswith("label_emb") for k in state)
    # the class-conditional count (uvit.py layout) with a context Linear in place of the label table
    as_uvit = {**{k: v for k, v in config.items() if k not in ("clip_dim", "num_clip_token")}, "num_classes": -1}
    extra_tokens = 77 * 512                                                 # pos_embed rows beyond the time token
    assert sum(p.numel() for p in net.parameters()) == _official_param_count(as_uvit) + 768 * 512 + 512 + extra_tokens


@torch.no_grad()
def test_t2i_token_layout_time_then_context_then_patches():
    model, net, x, context, t, tokens, expected_time = _first_block_tokens(TINY_T2I, [1.0, 500.0, 1000.0])
    assert tokens.shape[1] == 1 + 5 + 16                            # (N, 1 + 5 + 16, D)
    np.testing.assert_allclose(tokens[:, 0].numpy(), expected_time, atol=2e-4)
    words = context @ net.context_embed.weight.T + net.context_embed.bias
    np.testing.assert_allclose(tokens[:, 1:6].numpy(), words.numpy(), atol=1e-5)
    conv = net.patch_embed.proj
    direct = torch.einsum("nchw,dchw->nd", x[:, :, 2:4, 4:6], conv.weight) + conv.bias   # row 1, column 2
    np.testing.assert_allclose(tokens[:, 6 + 6].numpy(), direct.numpy(), atol=1e-5)
    # each sample's output depends on its own context
    (a,) = model(x, t, context)
    (b,) = model(x, t, context.roll(1, dims=0))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_t2i_config_and_constructor_validation():
    from edgediff.export.models.uvit import UViT
    from edgediff.export.models.validation import ConfigError

    cases = [({**TINY_T2I, "num_classes": 11}, "num_classes is a libs/uvit.py key"),
             ({**TINY_T2I, "clip_dim": 0}, "clip_dim must be a positive integer"),
             ({**TINY_T2I, "num_clip_token": "77"}, "num_clip_token must be a positive integer"),
             ({**TINY_T2I, "learn_sigma": True}, "unknown U-ViT config keys learn_sigma")]
    for config, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            FAMILY.spec(config)
    FAMILY.spec({**TINY_T2I, "cfg": True})       # t2i guidance's null is a context, not a label
    with pytest.raises(ValueError, match="unknown UViT arguments.*'num_classes'"):
        UViT(clip_dim=8, num_classes=3)
    model = FAMILY.build(TINY_T2I)
    x, t, context = _inputs(TINY_T2I)
    with pytest.raises(ValueError, match="takes .x, timesteps, context. and no y"):
        FAMILY.official(model)(x, t)
    with pytest.raises(ValueError, match="needs y exactly when conditional"):
        FAMILY.official(FAMILY.build(TINY))(x, t, torch.tensor([1, 2, 3]), context=context)


def test_t2i_checkpoint_does_not_fit_a_class_conditional_config():
    state = FAMILY.official(FAMILY.build(TINY_T2I)).state_dict()
    no_text = {k: v for k, v in TINY_T2I.items() if k not in ("clip_dim", "num_clip_token")}
    with pytest.raises(CheckpointError, match=r"unexpected: context_embed\.bias, context_embed\.weight"):
        load_strict(FAMILY.official(FAMILY.build(no_text)), state, "tiny")


def test_t2i_bundle_declares_context_and_generate_fails_in_one_line(tmp_path, capsys, one_thread):
    """The bundle carries ``context`` without a cond_encoder; with no text encoder yet,
    ``generate`` stops with one line instead of an ONNX Runtime feed error."""
    from edgediff.cli import main
    from edgediff.export.bundle import export_bundle
    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import InvalidInput

    torch.manual_seed(0)
    save_file(FAMILY.official(FAMILY.build(TINY_T2I)).state_dict(), str(tmp_path / "w.safetensors"))
    result = export_bundle("uvit", TINY_T2I, tmp_path / "b", checkpoint=tmp_path / "w.safetensors", log=lambda m: None)
    assert result.parity.passed and result.manifest.input_names == ["x", "t", "context"]
    assert result.manifest.inputs["context"] == {"dtype": "float32", "shape": ["batch", 5, 12]}
    with Pipeline.from_bundle(tmp_path / "b") as pipe, pytest.raises(InvalidInput, match="needs a text context"):
        pipe(n=2, steps=1)
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "b"), "-n", "2", "--steps", "1", "--npz", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error: this bundle needs a text context") and "\n" not in err
    assert not (tmp_path / "s.npz").exists()
