"""Train the digits judge (a small MLP) and write the torch-free ``digits/assets/judge.npz``.

The judge sees only the train split of :func:`digits.load`; the held-out split is stored
in the npz (as uint8) so the runtime can score real digits as the baseline. Training
shifts images by up to one pixel and adds a little noise, so that slightly imperfect
samples are judged by their shape rather than by pixel-exact agreement.

    edgediff digits train-judge --out digits/assets/judge.npz
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgediff.digits import judge as rt_judge
from edgediff.runtime.images import save_npz, to_uint8

from . import data as digits

HIDDEN = (256, 64)      # the last hidden layer's activations are the FD features


def _net(hidden=HIDDEN) -> nn.Sequential:
    dims = (digits.SIZE * digits.SIZE, *hidden)
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Linear(dims[-1], digits.NUM_CLASSES))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of -1..1 pixel (background fill) and N(0, 0.1²) noise."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)      # (N, 1, 18, 18)
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(digits.SIZE))[:, :, None]           # (N, 16, 1)
    cols = (dx[:, None] + torch.arange(digits.SIZE))[:, None, :]           # (N, 1, 16)
    shifted = padded[:, 0][torch.arange(n)[:, None, None], rows, cols]     # (N, 16, 16)
    return shifted[:, None] + 0.1 * torch.randn(x.shape, generator=gen)


def train_judge(data: digits.Digits, epochs: int = 150, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _net()
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = _augment(x[idx], gen).flatten(1)                # (B, 256)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, 1, 16, 16) in [-1, 1] -> (N, 16, 16) uint8, as samples are saved."""
    return to_uint8(x)[..., 0]


def export_weights(net: nn.Sequential, data: digits.Digits) -> dict[str, np.ndarray]:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights = {"layers": np.int64(len(linears))}
    for i, lin in enumerate(linears):
        weights[f"w{i}"] = lin.weight.detach().numpy().T.astype(np.float32).copy()   # (in, out)
        weights[f"b{i}"] = lin.bias.detach().numpy().astype(np.float32).copy()
    feats, _ = rt_judge.forward(weights, rt_judge.as_images(_to_uint8(data.train_x)))
    weights["ref_mu"], weights["ref_cov"] = rt_judge.feature_stats(feats)
    weights["held_images"] = _to_uint8(data.held_x)
    weights["held_labels"] = data.held_y.astype(np.int64)
    return weights


def train_and_save(out: str | Path = rt_judge.JUDGE_PATH, epochs: int = 150, seed: int = 0):
    """Train the judge, write its npz atomically; return the held-out JudgeResult."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = digits.load()
    weights = export_weights(train_judge(data, epochs, seed), data)
    save_npz(out, **weights)
    return rt_judge.judge(weights["held_images"], weights["held_labels"], weights)
