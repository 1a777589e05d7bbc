"""Torch-free runtime: bundles, schedules, samplers, backends and the generation loop.

    from edgediff.runtime import Pipeline
    with Pipeline.from_bundle("build/digits-dit") as pipe:
        images = pipe(n=8, classes=[3], seed=0).images      # (8, H, W, C) uint8

Lower level: ``read_bundle`` + ``load_backend`` + ``generate``, or a sampler alone:

    from edgediff.runtime import Schedule, sample
    sched = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                  "beta_start": 1e-4, "beta_end": 0.02})
    x0 = sample("ddim", denoise, x_T, sched, steps=50)
"""
from .bundle import Bundle, BundleError, read_bundle
from .errors import EdgediffError
from .manifest import Manifest
from .pipeline import Generation, Pipeline, generate
from .samplers import SAMPLERS, init_noise_sigma, sample
from .schedules import Schedule

__all__ = ["Bundle", "BundleError", "EdgediffError", "Generation", "Manifest", "Pipeline", "SAMPLERS",
           "Schedule", "generate", "init_noise_sigma", "read_bundle", "sample"]
