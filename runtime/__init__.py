"""Torch-free runtime: bundles, schedules, samplers, backends and the generation loop.

    from edgediff.runtime import Schedule, SAMPLERS, sample
    sched = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                  "beta_start": 1e-4, "beta_end": 0.02})
    x0 = sample("ddim", denoise, x_T, sched, steps=50, noise=np.random.default_rng(0))
"""
from .bundle import Bundle, BundleError, read_bundle
from .samplers import SAMPLERS, init_noise_sigma, sample
from .schedules import Schedule

__all__ = ["Bundle", "BundleError", "SAMPLERS", "Schedule", "init_noise_sigma", "read_bundle", "sample"]
