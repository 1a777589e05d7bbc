"""Shared check of image-conditioned (ddm_cond) bundles: the runtime's cached-feature path
against the official unsplit forward, and a counter of condition-encoder work."""
import numpy as np
import torch

from edgediff.digits.inpaint import held_conditions
from edgediff.runtime.conditions import ConditionFeatures
from edgediff.runtime.parity import rel_l2
from edgediff.runtime.pipeline import Pipeline, generate


class CountingEncoder:
    def __init__(self, backend):
        self.backend, self.calls, self.rows = backend, 0, 0
        self.inputs = backend.inputs

    def infer(self, feed):
        self.calls += 1
        self.rows += len(feed["cond"])
        return self.backend.infer(feed)

    def close(self):
        self.backend.close()


class UnsplitTorch:
    """The official forward ``Unet(x, t, cond)``: the condition recomputed at every call."""

    def __init__(self, net):
        self.net = net.eval()

    def infer(self, feed):
        args = (torch.from_numpy(np.array(feed[k])) for k in ("x", "t", "cond_raw"))
        with torch.no_grad():
            c, eps = self.net(*args)
        return {"c": c.numpy(), "eps": eps.numpy()}


def check_conditioned_trajectory(module, path, steps: int = 8) -> None:
    """Three conditions x 2 samples: the encoder runs once per condition, and the samples
    equal those of the unsplit PyTorch forward under the same sampler and noise."""
    conds = held_conditions()[0][:3]
    with Pipeline.from_bundle(path) as pipe:
        pipe.cond_encoder = counting = CountingEncoder(pipe.cond_encoder)
        out = pipe(2, cond=conds, steps=steps, batch=4, seed=3)
        manifest = pipe.manifest
    assert counting.rows == 3 and counting.calls == 1          # not once per step, sample or batch
    np.testing.assert_array_equal(out.cond_index, [0, 0, 1, 1, 2, 2])
    ref = generate(UnsplitTorch(module.net), manifest, 6, steps=steps, batch=4, seed=3,
                   conditions=ConditionFeatures({"cond_raw": conds}, out.cond_index))
    assert np.isfinite(out.samples).all()
    assert rel_l2(ref.samples, out.samples) <= 1e-4
