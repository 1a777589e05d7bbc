"""Per-sample noise streams: sample ``i``'s x_T and every step's noise come from its own
generator, seeded by ``(seed, i)`` through NumPy's ``SeedSequence`` (``spawn_key=(i,)``).
A sample's result therefore depends only on (seed, i, options), never on the batch size,
the number of workers or the order in which batches run: ``-n 16`` equals the first 16 of
``-n 32``, and a shard of samples 1000..1999 can be drawn anywhere.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidInput


def sample_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` under ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),))))


class SampleNoise:
    """Noise for a batch of samples ``indices``: ``initial(shape)`` draws x_T, then the
    object is the sampler's ``noise(step, shape)`` callable (one draw per sample per call,
    in step order)."""

    def __init__(self, seed: int, indices):
        self.generators = [sample_generator(seed, i) for i in indices]

    @classmethod
    def of_streams(cls, streams) -> "SampleNoise":
        """Noise for rows of different seeds: ``streams`` lists each row's (seed, index), so
        requests merged into one batch (a server's) draw what each would alone."""
        noise = cls(0, [])
        noise.generators = [sample_generator(seed, i) for seed, i in streams]
        return noise

    def _draw(self, row_shape) -> np.ndarray:
        return np.stack([g.standard_normal(row_shape, dtype=np.float32) for g in self.generators])

    def initial(self, row_shape, scale: float = 1.0) -> np.ndarray:
        """x_T for the batch: ``scale·z``, z ~ N(0, I) from each sample's stream."""
        return (np.float32(scale) * self._draw(tuple(row_shape))).astype(np.float32, copy=False)

    def __call__(self, step: int, shape) -> np.ndarray:
        if shape[0] != len(self.generators):
            raise InvalidInput(f"noise asked for a batch of {shape[0]}, this stream has {len(self.generators)}")
        return self._draw(tuple(shape[1:]))
