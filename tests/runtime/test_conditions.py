"""Condition images: reading (file, directory, npz), sizes, errors, per-sample feature rows."""
import numpy as np
import pytest
from PIL import Image

from edgediff.runtime.conditions import (ConditionFeatures, condition_strip, encode_conditions, load_conditions,
                                         parse_size)
from edgediff.runtime.errors import InvalidInput


def _png(path, value, size=(8, 6), mode="L"):
    arr = np.full((size[1], size[0]) + (() if mode == "L" else (3,)), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_parse_size():
    assert parse_size("16,8") == (16, 8)
    assert parse_size("32") == (32, 32)
    assert parse_size("4x5") == (4, 5)
    assert parse_size(None) is None
    for bad in ("a,b", "0,4", "1,2,3", "-3", "16,16,16"):
        with pytest.raises(InvalidInput, match="--cond-size"):
            parse_size(bad)


def test_image_file_is_resized_and_scaled(tmp_path):
    path = _png(tmp_path / "c.png", 255, size=(8, 6))
    conds = load_conditions(path, (1, 4, 4))
    assert conds.shape == (1, 1, 4, 4) and conds.dtype == np.float32
    np.testing.assert_allclose(conds, 1.0)
    rgb = load_conditions(path, (3, None, None), size=(5, 7))       # grey -> RGB, free size
    assert rgb.shape == (1, 3, 5, 7)


def test_directory_sorted_and_npz(tmp_path):
    _png(tmp_path / "b.png", 0)
    _png(tmp_path / "a.png", 255)
    (tmp_path / "notes.txt").write_text("not an image")
    conds = load_conditions(tmp_path, (1, 6, 8))
    assert conds.shape == (2, 1, 6, 8)
    assert conds[0].min() == 1.0 and conds[1].max() == -1.0            # a.png first
    floats = np.linspace(-1, 1, 2 * 6 * 8, dtype=np.float32).reshape(2, 1, 6, 8)
    np.savez(tmp_path / "c.npz", cond=floats)
    np.testing.assert_array_equal(load_conditions(tmp_path / "c.npz", (1, 6, 8)), floats)
    np.savez(tmp_path / "u.npz", cond=np.full((3, 6, 8, 1), 255, np.uint8))
    np.testing.assert_allclose(load_conditions(tmp_path / "u.npz", (1, 6, 8)), 1.0)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "not_image", "npz_key", "npz_shape", "nan", "free_size",
                                  "empty_npz", "out_of_range", "png16", "uint8_shape"])
def test_bad_conditions_are_one_line_errors(tmp_path, case):
    shape = (1, 6, 8)
    if case == "missing":
        src = tmp_path / "nope.png"
    elif case == "empty_dir":
        src = tmp_path / "d"
        src.mkdir()
    elif case == "not_image":
        src = tmp_path / "x.png"
        src.write_bytes(b"not a png")
    elif case == "npz_key":
        src = tmp_path / "k.npz"
        np.savez(src, images=np.zeros((1, 1, 6, 8), np.float32))
    elif case == "npz_shape":
        src = tmp_path / "s.npz"
        np.savez(src, cond=np.zeros((1, 3, 6, 8), np.float32))
    elif case == "nan":
        src = tmp_path / "n.npz"
        np.savez(src, cond=np.full((1, 1, 6, 8), np.nan, np.float32))
    elif case == "empty_npz":
        src = tmp_path / "e.npz"
        np.savez(src, cond=np.zeros((0, 1, 6, 8), np.float32))
    elif case == "out_of_range":
        src = tmp_path / "r.npz"
        np.savez(src, cond=np.full((1, 1, 6, 8), 50.0, np.float32))
    elif case == "png16":
        src = tmp_path / "w.png"
        Image.fromarray(np.full((6, 8), 40000, np.uint16)).save(src)
    elif case == "uint8_shape":
        src = tmp_path / "u.npz"
        np.savez(src, cond=np.zeros((2, 6, 8, 3), np.uint8))
    else:
        src = _png(tmp_path / "f.png", 3)
        shape = (1, None, None)
    with pytest.raises(InvalidInput) as err:
        load_conditions(src, shape)
    assert "\n" not in str(err.value)
    if case == "npz_key":                  # names the missing array and what the archive has
        assert "has no array 'cond' (found: images)" in str(err.value)
    if case == "uint8_shape":              # the message shows what was given, not a conversion of it
        assert "uint8 (2, 6, 8, 3)" in str(err.value) and "(K, 6, 8, 1)" in str(err.value)


class _Encoder:
    """A real computation standing in for an ONNX encoder: two named features per row."""

    def __init__(self):
        self.rows = 0

    def infer(self, feed):
        c = feed["cond"]
        self.rows += len(c)
        return {"f0": c.mean(axis=(1, 2, 3))[:, None], "f1": c[:, :, ::2, ::2] * 2}


def test_each_condition_encoded_once_and_gathered_per_sample():
    conds = np.random.default_rng(0).standard_normal((5, 1, 4, 4)).astype(np.float32)
    enc = _Encoder()
    feats = encode_conditions(enc, conds, batch=2)
    assert enc.rows == 5 and feats["f1"].shape == (5, 1, 2, 2)
    per = ConditionFeatures(feats, np.repeat(np.arange(5), 3))
    rows = per.rows(4, 10)                                  # samples 4..9 -> conditions 1,1,2,2,2,3
    np.testing.assert_array_equal(rows["f0"][:, 0], feats["f0"][[1, 1, 2, 2, 2, 3], 0])


def test_condition_strip_resizes_and_converts():
    conds = np.stack([np.full((1, 2, 2), -1.0), np.full((1, 2, 2), 1.0)]).astype(np.float32)
    strip = condition_strip(conds, 4, 4, 3)
    assert strip.shape == (2, 4, 4, 3) and strip.dtype == np.uint8
    assert strip[0].max() == 0 and strip[1].min() == 255
