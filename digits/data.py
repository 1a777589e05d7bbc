"""scikit-learn's bundled digits as a 16×16 diffusion data set, and the small
class-conditional configurations every family trains on it.

The 1,797 images are 8×8 with 17 grey levels (0..16). They are upsampled 2× bilinearly
(half-pixel centres, edges replicated, as ``F.interpolate(..., mode="bilinear")``):
smooth strokes are easier for a small denoiser than nearest-neighbour blocks, and 2×2
average pooling brings a sample back close to the 8×8 original for outside classifiers.
Pixels are scaled to [-1, 1]; one channel; labels 0..9; label 10 is the null label.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .text import MAX_LENGTH as TEXT_TOKENS, WIDTH as TEXT_WIDTH

SIZE = 16
NUM_CLASSES = 10
HELD_OUT = 0.2          # fraction of each class kept away from every model and the judge
SPLIT_SEED = 0


def upsample2x(images: np.ndarray) -> np.ndarray:
    """(N, h, w) -> (N, 2h, 2w) bilinear, half-pixel centres, edge pixels replicated."""
    def along(a: np.ndarray, axis: int) -> np.ndarray:
        prev = np.concatenate([a.take([0], axis), a.take(range(a.shape[axis] - 1), axis)], axis)
        nxt = np.concatenate([a.take(range(1, a.shape[axis]), axis), a.take([-1], axis)], axis)
        even, odd = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
        out = np.stack([even, odd], axis=axis + 1)               # (..., n, 2, ...)
        shape = list(a.shape)
        shape[axis] *= 2
        return out.reshape(shape)

    return along(along(images.astype(np.float64), 1), 2)


def downsample2x(images: np.ndarray) -> np.ndarray:
    """(N, 2h, 2w) -> (N, h, w) by 2×2 averaging: back to the 8×8 grid of the originals."""
    n, h, w = images.shape
    return images.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


@dataclass(frozen=True)
class Digits:
    """Images (N, 1, 16, 16) float32 in [-1, 1] and labels (N,) int64, split in two."""

    train_x: np.ndarray
    train_y: np.ndarray
    held_x: np.ndarray
    held_y: np.ndarray


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split, so the held-out set has every class in proportion."""
    rng = np.random.default_rng(seed)
    held = []
    for k in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == k)
        held.extend(rng.permutation(idx)[: int(round(fraction * idx.size))])
    held = np.sort(np.asarray(held))
    train = np.setdiff1d(np.arange(labels.size), held)
    return train, held


def load(fraction: float = HELD_OUT, seed: int = SPLIT_SEED) -> Digits:
    """The digits at 16×16 in [-1, 1], split into train and held-out parts (seeded)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = data.images.astype(np.float64) / 16.0                # (N, 8, 8) in [0, 1]
    x = (upsample2x(small) * 2.0 - 1.0).astype(np.float32)[:, None]   # (N, 1, 16, 16)
    y = data.target.astype(np.int64)
    train, held = _split(y, fraction, seed)
    return Digits(x[train], y[train], x[held], y[held])


# Recommended sampling recorded in each digits bundle (what `edgediff generate` and the judge
# use when given none): the settings the README's quality table measured best.
DIGITS_SAMPLING: dict[str, dict] = {
    "ddpm": {"guidance": 2.0}, "uvit": {"guidance": 2.0}, "dit": {"guidance": 2.0},
    "ddm": {"guidance": 1.25, "steps": 20},
    "lucid": {},
    # measured through PyTorch, 20 dpmpp_2m steps, n = 1000: w = 1 97.1% / FD 3.1, w = 1.25 99.2% / FD 4.9,
    # w = 1.5 99.7% / FD 12.7, w = 2 99.9% / FD 33.1 (real held-out digits: 98.3% / FD 4.1)
    "dit_latent": {"guidance": 1.25},
    "ddm_cond": {"steps": 10},          # DDM-Public's sampling_timesteps
    "uvit_t2i": {"guidance": 2.0},
}

# Image-conditioned digits models: name -> their task (digits/inpaint.py: a digit with a
# random 6×6 square blanked is the condition; the model draws the whole digit).
CONDITIONED: dict[str, str] = {"ddm_cond": "inpaint"}

# Digits models are keyed by name; a name that is not a model family says which family it is.
MODEL_FAMILY: dict[str, str] = {"dit_latent": "dit", "uvit_t2i": "uvit"}
# Text-conditioned digits models (digits/text.py): prompts naming the digit, through a frozen
# CLIP-layout text encoder that ships with the model.
TEXT_CONDITIONED = ("uvit_t2i",)
# Latent digits models: name -> the shipped autoencoder (digits/assets/NAME, diffusers'
# AutoencoderKL layout) whose scaled latents they learn and through which they are decoded.
AUTOENCODER: dict[str, str] = {"dit_latent": "vae"}
LATENT_SIZE = 4          # the autoencoder's 16×16×1 -> 4×4×4
AUTOENCODER_WEIGHTS = "diffusion_pytorch_model.safetensors"      # diffusers' file name


def model_family(name: str) -> str:
    """The model family (``edgediff export --family``) of the digits model ``name``."""
    return MODEL_FAMILY.get(name, name)

# Official constructor keyword arguments of each family at 16×16, one channel, ten classes
# plus the null label (index 10) for classifier-free guidance. Sized to train on 2 CPU
# cores in under ten minutes and to stay under 5 MB of FP32 weights.
DIGITS_CONFIGS: dict[str, dict] = {
    # diffusers UNet2DModel: the last class embedding row is the null label; attention at 4×4.
    "ddpm": {
        "_class_name": "UNet2DModel", "sample_size": SIZE, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "attention_head_dim": 32, "num_class_embeds": NUM_CLASSES + 1,
    },
    # U-ViT: 4×4 patches (16 tokens + time + label); discrete time (model t = step + 1), so
    # dpmpp_2m and ddpm sample it like the others.
    "uvit": {
        "img_size": SIZE, "patch_size": 4, "in_chans": 1, "embed_dim": 96, "depth": 5,
        "num_heads": 4, "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False,
        "num_classes": NUM_CLASSES + 1, "cfg": True, "timesteps": "discrete",
    },
    # U-ViT text-to-image (libs/uvit_t2i.py): the same network reading 8 text-encoder states
    # of width 32 (digits/text.py) between the time token and the patches.
    "uvit_t2i": {
        "img_size": SIZE, "patch_size": 4, "in_chans": 1, "embed_dim": 96, "depth": 5,
        "num_heads": 4, "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False,
        "clip_dim": TEXT_WIDTH, "num_clip_token": TEXT_TOKENS, "timesteps": "discrete",
    },
    # DiT with learned sigma and 4×4 patches; class_dropout_prob > 0 adds the null row.
    "dit": {
        "input_size": SIZE, "patch_size": 4, "in_channels": 1, "hidden_size": 96, "depth": 4,
        "num_heads": 4, "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": NUM_CLASSES,
        "learn_sigma": True,
    },
    # A latent DiT on the digits autoencoder's 4×4×4 latents (posterior mean × scaling factor,
    # as DiT trains on sd-vae latents): 1×1 patches, 16 tokens, learned sigma.
    "dit_latent": {
        "input_size": LATENT_SIZE, "patch_size": 1, "in_channels": 4, "hidden_size": 96, "depth": 4,
        "num_heads": 4, "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": NUM_CLASSES,
        "learn_sigma": True,
    },
    # DDM's EDMPrecond/DhariwalUNet: one-hot labels; the all-zero label vector is the null.
    "ddm": {
        "img_resolution": SIZE, "img_channels": 1, "label_dim": NUM_CLASSES, "sigma_data": 1.0,
        "model_type": "DhariwalUNet", "model_channels": 16, "channel_mult": [1, 2, 2],
        "channel_mult_emb": 4, "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
        "label_dropout": 0.1, "augment_dim": 0,
    },
    # lucidrains' Unet is unconditional (no labels, so no guidance): trained as GaussianDiffusion
    # trains by default, v-prediction on the sigmoid schedule; linear attention at 16 and 8, full at 4.
    "lucid": {
        "dim": 16, "dim_mults": [1, 2, 4], "channels": 1, "attn_heads": 2, "attn_dim_head": 16,
        "image_size": SIZE, "timesteps": 1000, "objective": "pred_v", "beta_schedule": "sigmoid",
    },
    # DDM's conditional dual U-Net (cond_unet.Unet) with edgediff's small condition encoder
    # (features at 16, 8, 4, 2 of a 16×16 condition): the inpainting task, no labels.
    "ddm_cond": {
        "dim": 16, "dim_mults": [1, 2, 2, 2], "channels": 1, "cond_in_dim": 1, "cond_net": "small",
        "small_width": 8, "small_stride": 1, "window_sizes1": [[2, 2], [2, 2], [1, 1], [1, 1]],
        "window_sizes2": [[2, 2], [1, 1], [1, 1], [1, 1]], "fourier_scale": 16,
        "sample_size": [SIZE, SIZE], "cond_size": [SIZE, SIZE], "space": "pixel",
    },
}
