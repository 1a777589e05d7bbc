import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """Many tiny ops: one torch thread avoids OpenMP oversubscription under `pytest -n 2` (~10x)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def latent_bundle(tmp_path_factory):
    """A latent DiT bundle with a tiny random diffusers autoencoder (decoder and encoder).
    Shared: copy it before changing it."""
    diffusers = pytest.importorskip("diffusers")
    import json

    import torch

    from edgediff.export.bundle import export_bundle
    from edgediff.export.vae import add_vae

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                            latent_channels=4, sample_size=16).save_pretrained(root / "vae")
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    (root / "dit.json").write_text(json.dumps(config))
    export_bundle("dit", config, root / "b", log=lambda m: None)
    add_vae(root / "b", root / "vae", log=lambda m: None)
    return root / "b"
