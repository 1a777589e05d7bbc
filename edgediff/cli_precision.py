"""CLI commands for precision: FP16 bundles and TensorRT engines (registered in cli.py).

Imports of torch, ModelOpt and TensorRT stay inside the commands so ``edgediff --help``
and the torch-free runtime never pay for them.
"""
from __future__ import annotations

import time

import click

ADDABLE = ["fp16", "int8"]            # precisions `add-precision` can add (`export --precision`: fp16)
COMPONENTS = ["denoiser", "decoder", "encoder", "cond_encoder", "classifier", "text_encoder"]     # the denoiser and runtime.manifest.COMPONENTS


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def add_to_bundle(bundle: str, precision: str, checkpoint: str | None, calibration_rows: int = 12,
                  component: str = "denoiser") -> None:
    """Add ``precision`` to a bundle and print its gate result (shared by export and add-precision)."""
    if precision == "fp32":
        return
    from edgediff.export.fp16 import add_fp16

    parity = add_fp16(bundle, checkpoint=checkpoint, calibration_rows=calibration_rows, log=_log,
                      component=component)
    click.echo(parity.summary())


def add_int8_to_bundle(bundle: str, calib_samples: int, calib_cap: int, calib_data: str | None,
                       quality: bool | None) -> None:
    """INT8 of the denoiser, gated per step and (digits bundles) on judged samples."""
    from edgediff.digits.precision_gate import judge_applies, quality_gate
    from edgediff.export.int8_bundle import add_int8
    from edgediff.runtime.bundle import read_bundle

    applies = judge_applies(read_bundle(bundle).manifest)
    if quality and not applies:
        raise click.UsageError("--quality: the digits judge cannot read this bundle's samples")
    parity, gate = add_int8(bundle, calib_samples=calib_samples, calib_cap=calib_cap, calib_data=calib_data,
                            judge=quality_gate if (applies if quality is None else quality) else None, log=_log)
    click.echo(parity.summary())
    if gate is not None:
        click.echo(f"sample quality {gate.summary()}")


# options that only one precision reads: given for the other, they are refused, not ignored
ONLY_FOR = {"checkpoint": "fp16", "calibration_rows": "fp16", "calib_samples": "int8", "calib_cap": "int8",
            "calib_data": "int8", "quality": "int8"}


def refuse_foreign_options(ctx: click.Context, precision: str) -> None:
    from click.core import ParameterSource

    given = [name for name, only in ONLY_FOR.items()
             if only != precision and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(f"{names}: not used by --precision {precision}")
    if precision == "int8" and ctx.params["component"] != "denoiser":
        raise click.UsageError("--precision int8 converts the denoiser only (components stay FP32/FP16)")


@click.command("add-precision")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", required=True, type=click.Choice(ADDABLE),
              help="Precision to add: fp16 (ModelOpt AutoCast, gate rel-L2 ≤ 5e-3) or int8 (ModelOpt Q/DQ, "
                   "denoiser only, gate rel-L2 ≤ 5e-2 at every step, and judged sample quality for digits bundles).")
@click.option("--checkpoint", type=click.Path(exists=True),
              help="The checkpoint the model was exported from (the gate compares against PyTorch with it); "
                   "for a component, the autoencoder's weights file or diffusers folder.")
@click.option("--calibration-rows", default=12, show_default=True, type=click.IntRange(2, 256),
              help="Calibration rows (schedule points for the denoiser, data draws for a component) whose "
                   "activations decide the FP32 islands.")
@click.option("--component", default="denoiser", show_default=True, type=click.Choice(COMPONENTS),
              help="Which model of the bundle to convert (int8: the denoiser only).")
@click.option("--calib-samples", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="int8: sampling trajectories recorded as calibration feeds (every class in turn).")
@click.option("--calib-cap", default=16, show_default=True, type=click.IntRange(1, 100_000),
              help="int8: calibration rows kept per sampler step.")
@click.option("--calib-data", type=click.Path(exists=True, dir_okay=False),
              help="int8: feeds .npz from `edgediff calibrate` instead of recording them (a quarter of each "
                   "step's rows is held out for the gate; needed for text- and image-conditioned bundles), or an "
                   ".npz of real 'images' (+ 'labels'), diffused to every sampler step (latent bundles: through "
                   "their encoder).")
@click.option("--quality/--no-quality", default=None,
              help="int8: judge 500 FP32 and 500 INT8 samples (default: where the digits judge applies).")
@click.pass_context
def add_precision(ctx, bundle, precision, checkpoint, calibration_rows, component, calib_samples, calib_cap,
                  calib_data, quality):
    """Add a lower-precision model to an existing bundle, gated against FP32."""
    start = time.perf_counter()
    refuse_foreign_options(ctx, precision)
    if precision == "int8":
        add_int8_to_bundle(bundle, calib_samples, calib_cap, calib_data, quality)
    else:
        add_to_bundle(bundle, precision, checkpoint, calibration_rows, component)
    what = "" if component == "denoiser" else f" ({component})"
    click.echo(f"added {precision}{what} to {bundle} in {time.perf_counter() - start:.1f} s")


@click.command("build")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Which ONNX model of the bundle to build (its types are kept: strongly typed).")
@click.option("--min-batch", default=1, show_default=True, type=click.IntRange(1), help="Smallest sample batch.")
@click.option("--opt-batch", default=8, show_default=True, type=click.IntRange(1), help="Sample batch to tune for.")
@click.option("--max-batch", type=click.IntRange(1), help="Largest sample batch (default: --opt-batch).")
@click.option("--guidance/--no-guidance", default=None,
              help="Double opt/max for classifier-free guidance (default: when the model has a null label).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="Timing cache file (default: engines/timing_<sm>_<trt>.cache in the bundle).")
@click.option("--workspace", "workspace_gib", type=float, help="Builder workspace limit in GiB.")
@click.option("--force", is_flag=True, help="Rebuild even when a matching engine exists.")
@click.option("--device", default=0, show_default=True, type=click.IntRange(0), help="CUDA device.")
@click.option("--component", default="denoiser", show_default=True, type=click.Choice(COMPONENTS),
              help="Which model of the bundle to build (components get no guidance doubling).")
def build(bundle, precision, min_batch, opt_batch, max_batch, guidance, timing_cache, workspace_gib, force, device,
          component):
    """Build a TensorRT engine for this GPU from a bundle's ONNX model."""
    from edgediff.export.trt_build import BuildOptions, build_engine

    opts = BuildOptions(precision=precision, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                        guidance=guidance, timing_cache=timing_cache, workspace_gib=workspace_gib,
                        force=force, device=device, component=component)
    start = time.perf_counter()
    path = build_engine(bundle, opts, log=_log)
    click.echo(f"engine {path} ready in {time.perf_counter() - start:.1f} s")


COMMANDS = (add_precision, build)
