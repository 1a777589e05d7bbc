"""Companion models in the manifest (decoder/encoder) and decoding in bounded batches."""
import json

import numpy as np
import pytest

from edgediff.runtime.backends import Backend
from edgediff.runtime.images import save_outputs
from edgediff.runtime.manifest import Component, Manifest, ManifestError
from edgediff.runtime.pipeline import Generation, decode, decode_images


def latent_manifest(**components) -> Manifest:
    decl = {"dtype": "float32", "shape": ["batch", 4, 2, 2]}
    return Manifest(family="dit", config={}, prediction="epsilon", time={}, schedule={}, sample_shape=(4, 2, 2),
                    models={"fp32": "model.onnx"}, space="latent", num_classes=10, null_label=10,
                    inputs={"x": decl, "t": {"dtype": "float32", "shape": ["batch"]},
                            "y": {"dtype": "int64", "shape": ["batch"]}},
                    outputs={"eps": decl}, components=components)


DECODER = Component(inputs={"latents": {"dtype": "float32", "shape": ["batch", 4, 2, 2]}},
                    outputs={"image": {"dtype": "float32", "shape": ["batch", 1, 8, 8]}},
                    models={"fp32": "decoder.onnx"}, extra={"scaling_factor": 0.5})


class Upsampler(Backend):
    """A decoder stand-in: image = tanh of the first latent channel, nearest-upsampled 4x."""

    def __init__(self):
        super().__init__(DECODER.inputs, DECODER.output_names)
        self.batches = []

    def infer_impl(self, feed):
        z = feed["latents"]
        self.batches.append(len(z))
        return [np.tanh(z[:, :1].repeat(4, axis=2).repeat(4, axis=3)).astype(np.float32)]


def test_components_round_trip_and_lookup():
    m = latent_manifest(decoder=DECODER)
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.component("decoder") == DECODER and again.all_model_files == ["model.onnx", "decoder.onnx"]
    assert again.component("denoiser").models == {"fp32": "model.onnx"}
    with pytest.raises(ManifestError, match="no encoder"):
        again.component("encoder")


@pytest.mark.parametrize("change,match", [
    ({"vae": {}}, "unknown component"),
    ({"decoder": {"inputs": {}, "outputs": {}}}, "lacks models"),
    ({"decoder": {"inputs": {}, "outputs": {}, "models": {"fp32": "../d.onnx"}}}, "inside the bundle"),
])
def test_bad_components_are_refused(change, match):
    raw = latent_manifest().to_dict()
    raw["components"] = change
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(raw)


def test_decode_runs_in_bounded_batches():
    decoder = Upsampler()
    latents = np.random.default_rng(0).standard_normal((37, 4, 2, 2)).astype(np.float32)
    images = decode(decoder, latents, batch=16)
    assert decoder.batches == [16, 16, 5] and images.shape == (37, 1, 8, 8)
    np.testing.assert_array_equal(images[20], decode(Upsampler(), latents[20:21], batch=1)[0])
    as_uint8 = decode_images(Upsampler(), latents, batch=16)
    assert as_uint8.shape == (37, 8, 8, 1) and as_uint8.dtype == np.uint8


def test_latent_outputs_need_a_decoder_for_pictures(tmp_path):
    m = latent_manifest()
    latents = np.zeros((2, 4, 2, 2), np.float32)
    gen = Generation(latents, np.array([1, 2]), latent=True)
    with pytest.raises(ValueError, match="edgediff add-vae"):
        save_outputs(m, gen, png=tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()
    save_outputs(m, gen, npz=tmp_path / "s.npz")
    assert sorted(np.load(tmp_path / "s.npz").files) == ["labels", "latents"]
    gen.decoded_images = decode_images(Upsampler(), latents, batch=1)
    save_outputs(m, gen, png=tmp_path / "g.png", npz=tmp_path / "s.npz")
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (2, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["latents"].shape == (2, 4, 2, 2) and (tmp_path / "g.png").is_file()
