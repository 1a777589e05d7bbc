"""Checkpoint reading: safetensors, weights-only pickles, wrappers, prefixes, strict errors."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

from edgediff.export.models import dit
from edgediff.export.models.common import CheckpointError, load_strict, read_checkpoint


@pytest.fixture
def model():
    torch.manual_seed(0)
    return dit.DiT(**dit.CONFIGS["tiny"])


def _same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_safetensors_round_trip(model, tmp_path):
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    other = dit.DiT(**dit.CONFIGS["tiny"])
    assert not _same(model, other)
    load_strict(other, read_checkpoint(tmp_path / "w.safetensors"))
    assert _same(model, other)


def test_official_training_checkpoint_layout(model, tmp_path):
    """DiT's train.py saves {'model', 'ema', 'opt', 'args'}; the EMA weights are used."""
    noise = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"model": noise, "ema": model.state_dict(), "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "0001.pt")
    other = dit.DiT(**dit.CONFIGS["tiny"])
    load_strict(other, read_checkpoint(tmp_path / "0001.pt"))
    assert _same(model, other)


def test_common_prefix_is_stripped(model, tmp_path):
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    other = dit.DiT(**dit.CONFIGS["tiny"])
    load_strict(other, read_checkpoint(tmp_path / "ddp.pt"))
    assert _same(model, other)


def test_mismatch_lists_missing_and_unexpected(model):
    state = dict(model.state_dict())
    state.pop("blocks.0.attn.qkv.weight")
    state["blocks.0.attn.extra"] = torch.zeros(1)
    state["final_layer.linear.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_strict(dit.DiT(**dit.CONFIGS["tiny"]), state, label="dit")
    msg = str(err.value)
    assert "1 missing: blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected: blocks.0.attn.extra" in msg
    assert "shape mismatch: final_layer.linear.bias (3,)" in msg
    assert "\n" not in msg


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"ema": {"w": torch.zeros(1)}, "hook": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.pt")


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read w.safetensors"):
        read_checkpoint(tmp_path / "w.safetensors")
