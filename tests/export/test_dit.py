"""DiT numerics that the official checkpoints depend on (facebookresearch/DiT models.py)."""
import math

import numpy as np
import pytest
import torch

from edgediff.export.models import dit


def test_official_parameter_count():
    # train.py logs "DiT Parameters: 675,129,632" for DiT-XL/2 (pos_embed included).
    with torch.device("meta"):
        model = dit.DiT(**dit.CONFIGS["DiT-XL/2"])
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_timestep_embedding_is_cos_first_with_256_frequencies():
    emb = dit.TimestepEmbedder(8)
    t = torch.tensor([0.0, 7.0, 999.0])
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = dit.sinusoidal_embedding(t, emb.freqs, 256).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_pos_embed_layout():
    """First half encodes the column (w) index, second half the row (h); each [sin | cos]."""
    table = dit.pos_embed_2d(16, 4)                          # (16 tokens, 16 dims)
    assert table.shape == (16, 16)
    token = 1 * 4 + 2                                        # row 1, column 2
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    np.testing.assert_allclose(table[token, :4], np.sin(2 * omega))
    np.testing.assert_allclose(table[token, 4:8], np.cos(2 * omega))
    np.testing.assert_allclose(table[token, 8:12], np.sin(1 * omega))
    np.testing.assert_allclose(table[token, 12:], np.cos(1 * omega))


def test_unpatchify_inverts_patch_order():
    model = dit.DiT(**dict(dit.CONFIGS["tiny"], learn_sigma=False))
    p, c = model.patch_size, model.out_channels
    img = torch.arange(2 * c * 8 * 8, dtype=torch.float32).reshape(2, c, 8, 8)
    # tokens in row-major (h, w) order, each patch flattened as (p, q, c)
    tokens = img.reshape(2, c, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * c)
    assert torch.equal(model.unpatchify(tokens), img)


def test_learned_sigma_splits_eps_and_v():
    torch.manual_seed(0)
    view = dit.build(dit.CONFIGS["tiny"])
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 10])
    eps, v = view(x, t, y)
    full = view.model(x, t, y)
    assert torch.equal(torch.cat([eps, v], 1), full)
    assert dit.spec(dit.CONFIGS["tiny"]).outputs == ("eps", "var")
    assert dit.spec(dit.CONFIGS["tiny"]).null_label == 10


def test_label_changes_output():
    torch.manual_seed(0)
    view = dit.build(dit.CONFIGS["tiny"])
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([100.0])
    assert not torch.allclose(view(x, t, torch.tensor([0]))[0], view(x, t, torch.tensor([1]))[0])


def test_unknown_kwarg_is_refused():
    with pytest.raises(ValueError, match="unknown DiT argument"):
        dit.build({"hidden": 3})
