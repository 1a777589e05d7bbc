"""A tiny KL autoencoder for the digits (the first stage of the latent digits model).

diffusers' ``AutoencoderKL`` at a small size: 16×16×1 digits <-> 4×4×4 latents (three
``DownEncoderBlock2D``/``UpDecoderBlock2D`` levels, two 2× down/upsamplings). Trained as
LDM's first stage (Rombach et al. 2022, ``LPIPSWithDiscriminator`` with the perceptual and
adversarial parts left out: digits are one-channel 16×16 and there is no pretrained network
for them): per image the summed L1 reconstruction error of a posterior *sample*, plus
``kl_weight`` times the summed KL of the diagonal Gaussian posterior to N(0, I), averaged
over the batch; AdamW, warm-up and cosine decay, gradient clipping, an EMA of the weights
(what gets saved).

After training, the latent scaling factor is 1 / std of the training latents (the
posterior means of the train split, every element), as LDM computes it, and goes into the
saved config as ``scaling_factor``. A latent denoiser then trains on
``posterior mean × scaling_factor`` (unit variance) and its samples are decoded from
``latents / scaling_factor``.

The output directory is diffusers' layout, written atomically: ``config.json`` (with
``scaling_factor``), ``diffusion_pytorch_model.safetensors`` and ``train.json``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.files import check_replaceable, public_mode, replace_dir, staged_dir

from . import data as digits

WEIGHTS = digits.AUTOENCODER_WEIGHTS                # diffusers' file name
TRAIN_RECORD = "train.json"

# AutoencoderKL keyword arguments: 16×16×1 -> 4×4×4 (factor 4 per side; 64 latent numbers
# for 256 pixels), one resnet per level (two per decoder level, as diffusers builds them),
# the mid block's self-attention at 4×4 as in LDM's first stage.
VAE_CONFIG: dict = {
    "in_channels": 1, "out_channels": 1, "latent_channels": 4, "sample_size": digits.SIZE,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "act_fn": "silu", "mid_block_add_attention": True, "scaling_factor": 1.0,
}


@dataclass
class VaeHyper:
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200
    kl_weight: float = 1e-2        # on summed-per-image losses, as LDM's kl_weight
    ema_decay: float = 0.999
    grad_clip: float = 1.0


@dataclass
class VaeResult:
    path: Path | None
    final_loss: float
    seconds: float
    scaling_factor: float
    curve: list = field(default_factory=list)      # [step, smoothed loss, smoothed L1, smoothed KL]
    losses: list = field(default_factory=list)


def build_vae(config: dict | None = None, seed: int | None = None):
    """A fresh ``AutoencoderKL`` of ``config`` (default: :data:`VAE_CONFIG`)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL.from_config(dict(config or VAE_CONFIG))


def load_vae(path: str | Path):
    """The shipped (or trained) autoencoder at ``path``: config.json + the safetensors weights,
    loaded strictly (same keys, same shapes), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("config.json", WEIGHTS):
        if not (path / name).is_file():
            raise InvalidInput(f"{path} holds no digits autoencoder ({name} missing); "
                               "train one with `edgediff digits train-vae --out DIR`")
    config = json.loads((path / "config.json").read_text())
    vae = build_vae(config)
    vae.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return vae.eval().requires_grad_(False)


def scaling_factor(vae) -> float:
    return float(vae.config.scaling_factor)


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 512, scaled: bool = True) -> np.ndarray:
    """Images (N, 1, 16, 16) in [-1, 1] -> posterior means (N, 4, 4, 4) float32, times the
    scaling factor unless ``scaled`` is False."""
    scale = scaling_factor(vae) if scaled else 1.0
    parts = [vae.encode(torch.from_numpy(np.ascontiguousarray(images[i:i + batch], dtype=np.float32)))
             .latent_dist.mean * scale for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy()


@torch.no_grad()
def decode(vae, latents: np.ndarray, batch: int = 512) -> np.ndarray:
    """Scaled latents (N, 4, 4, 4) -> images (N, 1, 16, 16) float32 (about [-1, 1])."""
    scale = scaling_factor(vae)
    parts = [vae.decode(torch.from_numpy(np.ascontiguousarray(latents[i:i + batch], dtype=np.float32)) / scale)
             .sample for i in range(0, len(latents), batch)]
    return torch.cat(parts).numpy()


def latent_digits(path: str | Path) -> digits.Digits:
    """The digits split, each image encoded once by the autoencoder at ``path`` into its scaled
    latent (posterior mean × scaling_factor, (N, 4, 4, 4)): what a latent digits model learns."""
    vae = load_vae(path)
    data = digits.load()
    return digits.Digits(encode(vae, data.train_x), data.train_y, encode(vae, data.held_x), data.held_y)


def autoencoder_record(path: str | Path, shipped: str | Path | None = None) -> dict:
    """What a latent model's train.json says of its autoencoder: where (``shipped``: the name
    of the shipped one, else the path given), the weights' sha256, the scaling factor."""
    from edgediff.runtime.files import sha256_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    where = ({"shipped": path.name} if shipped is not None and path.resolve() == Path(shipped).resolve()
             else {"path": str(path)})
    return {**where, "sha256": sha256_file(path / WEIGHTS), "scaling_factor": config["scaling_factor"]}


class TorchDecoder:
    """The PyTorch autoencoder behind a bundle decoder's contract: ``infer({"latents": z})``
    -> ``{"image": x}`` with z in the denoiser's (scaled) latent space and x in [-1, 1];
    what ``runtime.pipeline.decode`` and the digits judge take."""

    def __init__(self, vae):
        self.vae = vae

    def infer(self, feed: dict) -> dict:
        return {"image": np.clip(decode(self.vae, feed["latents"]), -1.0, 1.0)}

    def close(self) -> None:
        pass


def reconstruction_accuracy(vae, images: np.ndarray | None = None, labels: np.ndarray | None = None):
    """The judge's result on reconstructions (posterior mean, decoded) of the held-out digits."""
    from . import judge

    if images is None:
        held = digits.load()
        images, labels = held.held_x, held.held_y
    return judge.judge(np.clip(decode(vae, encode(vae, images)), -1.0, 1.0), labels)


# --- training ------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, kl_weight: float, gen: torch.Generator | None = None):
    """(loss, L1, KL): LDM's first-stage loss without the perceptual and GAN terms; the
    reconstruction is of a posterior sample, both terms summed per image, batch mean."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)   # (B, 4, 4, 4)
    rec = vae.decode(z).sample                                              # (B, 1, 16, 16)
    l1 = (rec - x).abs().flatten(1).sum(1).mean()
    kl = post.kl().mean()                                                   # summed over latent dims
    return l1 + kl_weight * kl, l1, kl


def fit_vae(h: VaeHyper, seed: int = 0, data: digits.Digits | None = None, config: dict | None = None,
            progress: bool = True):
    """Train; returns (EMA autoencoder with its scaling factor set, VaeResult without a path)."""
    from .train import optimise

    data = data or digits.load()
    vae = build_vae(config, seed).train()
    gen = torch.Generator().manual_seed(seed)
    train_x = torch.from_numpy(data.train_x)

    def step_loss(step):                    # (loss, L1, KL): the curve keeps all three
        x = train_x[torch.randint(0, len(train_x), (h.batch,), generator=gen)]
        return vae_loss(vae, x, h.kl_weight, gen)

    model, curve, losses, run, seconds = optimise(vae, h, step_loss, "train vae", progress)
    # LDM: scale_factor = 1 / std of the first stage's latents, here over the whole train split
    std = float(encode(model, data.train_x, scaled=False).astype(np.float64).std())
    model.register_to_config(scaling_factor=1.0 / std)
    return model, VaeResult(None, float(run[0]), seconds, 1.0 / std, curve, losses)


def save_vae(out: str | Path, vae, record: dict) -> Path:
    """config.json (with scaling_factor) + diffusion_pytorch_model.safetensors + train.json,
    written into ``out`` atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    with staged_dir(out) as stage:
        tmp = stage.path
        state = {k: v.detach().contiguous().clone() for k, v in vae.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        public_mode(tmp / WEIGHTS)
        config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        config = {"_class_name": "AutoencoderKL", **config}
        for name, obj in (("config.json", config), (TRAIN_RECORD, record)):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        replace_dir(tmp, out, TRAIN_RECORD, "a digits training output")
    return out


def train_vae(out: str | Path | None, *, steps: int | None = None, seed: int = 0, threads: int | None = 2,
              progress: bool = True, **overrides) -> VaeResult:
    """Train the digits autoencoder and write ``out`` (the command ``edgediff digits train-vae``)."""
    if out is not None:
        check_replaceable(Path(out), TRAIN_RECORD, "a digits training output")
    if threads:
        torch.set_num_threads(threads)
    h = VaeHyper(**{**asdict(VaeHyper()), **overrides, **({"steps": steps} if steps else {})})
    data = digits.load()
    vae, result = fit_vae(h, seed, data, progress=progress)
    judged = reconstruction_accuracy(vae, data.held_x, data.held_y)
    record = {"family": "vae", "model": "AutoencoderKL", "seed": seed, "steps": h.steps,
              "final_loss": result.final_loss, "seconds": round(result.seconds, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "scaling_factor": result.scaling_factor, "hyper": asdict(h),
              "held_out_reconstruction": {"judge_accuracy": judged.accuracy, "fd": judged.fd,
                                          "real_accuracy": judged.baseline_accuracy, "n": judged.n},
              "loss": "LDM first stage without LPIPS and GAN: sum |x - D(z)| per image, z ~ q(z|x), "
                      "+ kl_weight * KL(q(z|x) || N(0, I)) summed per image; batch mean",
              "loss_curve_columns": ["step", "loss", "l1", "kl"], "loss_curve": result.curve,
              "data": {"train": "sklearn load_digits, 80% per-class split (seed 0), 8x8 -> 16x16 bilinear, [-1, 1]"}}
    if out is not None:
        result.path = save_vae(out, vae, record)
    result.reconstruction = judged
    return result
