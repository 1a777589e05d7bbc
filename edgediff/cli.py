"""The ``edgediff`` command line: one click group, thin commands over the library."""
from __future__ import annotations

import json
import sys
import time

import click

from tqdm.auto import tqdm

from edgediff import __version__
from edgediff.cli_bench import COMMANDS as BENCH_COMMANDS
from edgediff.cli_calibrate import COMMANDS as CALIBRATE_COMMANDS
from edgediff.cli_classifier import COMMANDS as CLASSIFIER_COMMANDS
from edgediff.cli_digits import DIGITS_COMMANDS
from edgediff.cli_parity import COMMANDS as PARITY_COMMANDS
from edgediff.cli_precision import COMMANDS as PRECISION_COMMANDS
from edgediff.cli_precision import add_to_bundle
from edgediff.cli_ray import COMMANDS as RAY_COMMANDS
from edgediff.cli_ray import sharded_generate, sharded_options
from edgediff.cli_sign import COMMANDS as SIGN_COMMANDS
from edgediff.cli_text import COMMANDS as TEXT_COMMANDS
from edgediff.cli_vae import COMMANDS as VAE_COMMANDS
from edgediff.cli_vae import LAYOUTS as VAE_LAYOUTS
from edgediff.cli_vae import add_vae_to_bundle
from edgediff.export.models import FAMILIES
from edgediff.runtime.backends import BACKENDS
from edgediff.runtime.samplers import SAMPLERS

from edgediff.runtime.errors import EdgediffError, missing_extra
from edgediff.runtime.interrupts import Interrupted, exit_quietly_on_signal
from edgediff.runtime.interrupts import install as install_interrupts
from edgediff.runtime.interrupts import restore as restore_interrupts


class _Stop(BaseException):
    """An interrupt carried past click, which would print a blank line and make it an Abort."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:        # SIGINT, or SIGTERM as Interrupted
            raise _Stop(getattr(exc, "exit_code", 130)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgediff")
def cli():
    """Export diffusion denoisers to ONNX/TensorRT bundles and run them without PyTorch."""


def _read_json(path: str | None):
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid JSON: {exc}", param_hint="--config") from None


@cli.command()
@click.option("--family", required=True, type=click.Choice(list(FAMILIES)), help="Model family.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON file of the official constructor keyword arguments (diffusers config.json for ddpm).")
@click.option("--size", help="Named configuration instead of --config (see `edgediff families`).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Weights in the official layout: .safetensors, or .pt/.pth loaded with weights_only=True.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--opset", default=21, show_default=True, type=click.IntRange(18, 23), help="ONNX opset.")
@click.option("--max-batch", type=click.IntRange(2, None), help="Upper bound of the dynamic batch axis.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Also add a mixed-precision model (fp16: ModelOpt AutoCast, gated at rel-L2 ≤ 5e-3).")
@click.option("--vae", "vae_checkpoint", type=click.Path(exists=True),
              help="Also add this autoencoder (latent models; see `edgediff add-vae`): a diffusers folder or a file.")
@click.option("--vae-config", type=click.Path(exists=True, dir_okay=False),
              help="The autoencoder's JSON config (diffusers config.json, or LDM ddconfig + embed_dim).")
@click.option("--vae-layout", type=click.Choice(VAE_LAYOUTS), help="The autoencoder's layout (default: detected).")
def export(family, config_path, size, checkpoint, out, opset, max_batch, precision, vae_checkpoint, vae_config,
           vae_layout):
    """Export a PyTorch denoiser to a validated FP32 ONNX bundle."""
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import resolve_config
    from edgediff.runtime.bundle import MANIFEST
    from edgediff.runtime.files import built_whole

    start = time.perf_counter()
    config = resolve_config(FAMILIES[family], size, _read_json(config_path))
    if (vae_config or vae_layout) and not vae_checkpoint:
        raise click.UsageError("--vae-config/--vae-layout describe --vae: give --vae too")
    if vae_checkpoint and FAMILIES[family].spec(config).space != "latent":   # torch-free, before the export
        raise click.UsageError(f"--vae needs a latent model; this {family} config works in pixel space")
    # Every step (export, --vae, --precision) works on a private bundle that replaces OUT only
    # when all passed: an interrupt or a failed FP16 gate leaves an existing OUT as it was.
    with built_whole(out, MANIFEST, "a bundle") as work:
        result = export_bundle(family, config, work, checkpoint=checkpoint, opset=opset, max_batch=max_batch,
                               log=lambda msg: click.echo(msg, err=True))
        click.echo(result.parity.summary())
        if vae_checkpoint:
            add_vae_to_bundle(str(work), vae_checkpoint, vae_config, vae_layout)
        add_to_bundle(str(work), precision, checkpoint)
        for name in result.manifest.components:   # companions exported with the denoiser (cond_encoder)
            if name not in ("decoder", "encoder"):
                add_to_bundle(str(work), precision, checkpoint, component=name)
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def _parse_classes(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint="--classes") from None


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--sampler", type=click.Choice(list(SAMPLERS)),
              help="Sampler (default: the bundle's recommended one, else the schedule's usual one).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampler steps (default: the bundle's recommended).")
@click.option("-n", "num", type=click.IntRange(1, 1_000_000),
              help="Number of samples (default 64); per condition image with --cond, per prompt with "
                   "--prompt/--prompts-file, per context row with --context-npz (default 4).")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(1, 4096), help="Samples per backend batch.")
@click.option("--classes", help="Comma-separated class labels, cycled over the samples (default: all classes).")
@click.option("--class", "one_class", type=int, help="A single class label for every sample.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale w (default: the bundle's recommended).")
@click.option("--classifier-scale", type=float, default=0.0, show_default=True,
              help="Classifier guidance scale s (guided-diffusion's classifier_scale); needs the bundle's classifier "
                   "(edgediff add-classifier) and the ddpm, ddim or dpmpp_2m sampler.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the per-sample noise streams.")
@click.option("--first", default=0, show_default=True, type=click.IntRange(0),
              help="Index of the first sample: draws samples FIRST..FIRST+n-1 of the seed's sequence, so a large set "
                   "can be made in parts that equal one run.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(list(BACKENDS)), help="Backend.")
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to run.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu: the gpu-cu12/gpu-cu13 extras).")
@click.option("--threads", type=click.IntRange(1), help="Intra-op threads (default: all cores).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="PNG grid to write (pixel-space models, or latent bundles with a decoder).")
@click.option("--npz", type=click.Path(dir_okay=False),
              help="Also save uint8 images (and float32 latents for latent models) and labels as .npz; "
                   "text-to-image runs add 'prompts' (K,) and 'prompt_index' (N,), the prompt of each sample.")
@click.option("--decode-batch", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Latents decoded per decoder call (latent bundles with a decoder).")
@click.option("--cond", "cond_path", type=click.Path(exists=True),
              help="Condition image(s) of an image-conditioned bundle: an image file, a directory of them, "
                   "or an .npz with 'cond' (float (K, C, H, W) in [-1, 1] or uint8 (K, H, W, C)).")
@click.option("--cond-size", help="Resize condition images to H,W (default: the bundle's condition size).")
@click.option("--prompt", "prompts", multiple=True,
              help="Text prompt of a text-to-image bundle with a text encoder (repeatable: -n samples per prompt; "
                   "each distinct prompt is encoded once).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text file of prompts, one per line (blank lines skipped), after any --prompt.")
@click.option("--context-npz", type=click.Path(exists=True, dir_okay=False),
              help="Precomputed text contexts instead of prompts (no text encoder needed): an .npz with 'context' "
                   "float (K, L, D), optional 'null_context' (L, D) or (1, L, D), guidance's null: U-ViT's "
                   "MS-COCO empty_context.npy, and optional 'prompts' (K,) strings saved as labels.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Debugging: keep going when a model output or sample is NaN/inf or the sampling diverges "
                   "(default: stop with the step, t and output).")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
              help="EC public key (PEM): refuse a bundle that is unsigned or changed since it was signed.")
@sharded_options
def generate(bundle, sampler, steps, num, batch, classes, one_class, guidance, classifier_scale, seed, first, backend,
             precision, device, threads, out, npz, decode_batch, cond_path, cond_size, prompts, prompts_file,
             context_npz, allow_nonfinite, public_key, **sharded):
    """Generate samples from a bundle with a NumPy sampler (no PyTorch)."""
    if any(v not in (None, False) for v in sharded.values()):      # --out-dir, --ray ...: in shards
        return sharded_generate(click.get_current_context().params)
    from edgediff.runtime.conditions import read_conditions
    from edgediff.runtime.images import check_outputs, save_outputs
    from edgediff.runtime.pipeline import Pipeline, total_model_calls
    from edgediff.runtime.prompts import read_prompts_file

    if not (out or npz):
        raise click.UsageError("give --out grid.png and/or --npz samples.npz")
    if one_class is not None and classes is not None:
        raise click.UsageError("give --class or --classes, not both")
    if context_npz and (prompts or prompts_file):
        raise click.UsageError("--context-npz holds the contexts already: drop --prompt/--prompts-file")
    wanted = [one_class] if one_class is not None else _parse_classes(classes)
    prompts = [*prompts, *(read_prompts_file(prompts_file) if prompts_file else [])]
    start = time.perf_counter()
    with Pipeline.from_bundle(bundle, backend, precision, device=device, threads=threads, max_batch=batch,
                              decode_batch=decode_batch, public_key=public_key) as pipe:
        check_outputs(bundle, pipe.manifest, pipe.decoder is not None, png=out, npz=npz)
        cond = read_conditions(pipe, cond_path, cond_size)
        context = _read_contexts(pipe, context_npz)
        per = len(cond) if cond is not None else len(context.context) if context is not None else len(prompts) or None
        num = num or (64 if per is None else 4)
        count = num * (per or 1)
        choice = dict(sampler=sampler, steps=steps, guidance=guidance)
        total = total_model_calls(pipe.manifest, count, min(batch, count), **choice)
        with tqdm(total=total, desc="sampling", unit="call", disable=None) as bar:
            result = pipe(num, classes=wanted, seed=seed, first=first, batch=batch, decode_batch=decode_batch,
                          progress=bar.update, cond=cond, classifier_scale=classifier_scale,
                          prompt=prompts or None, context=context, allow_nonfinite=allow_nonfinite, **choice)
        for line in save_outputs(pipe.manifest, result, png=out, npz=npz):
            click.echo(line)
    click.echo(f"{count} samples in {time.perf_counter() - start:.1f} s")


def _read_contexts(pipe, path: str | None):
    """``--context-npz`` for an open pipeline: its TextContexts, or None."""
    from edgediff.runtime.prompts import load_context_npz

    if path is None:
        return None
    if pipe.context_shape is None:
        raise click.UsageError("--context-npz: this bundle's model takes no text context")
    return load_context_npz(path, pipe.context_shape)


@cli.command()
def families():
    """List model families and their named configurations."""
    for name in FAMILIES:
        try:
            family = FAMILIES[name]
        except ImportError as exc:            # a torch-free (runtime-only) install
            click.echo(f"{name}: the export side is not installed ({missing_extra(exc) or exc})")
            continue
        click.echo(f"{name}: {family.description}")
        click.echo("  sizes: " + ", ".join(family.configs))


for _command in (*BENCH_COMMANDS, *PRECISION_COMMANDS, *PARITY_COMMANDS, *VAE_COMMANDS, *CLASSIFIER_COMMANDS,
                 *TEXT_COMMANDS, *CALIBRATE_COMMANDS, *DIGITS_COMMANDS, *SIGN_COMMANDS, *RAY_COMMANDS):
    cli.add_command(_command)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv=None):
    """Run the CLI: user errors (EdgediffError, a missing optional dependency, click's usage
    errors) become one line and a non-zero exit; anything else is a bug and keeps its traceback.
    SIGINT and SIGTERM raise :class:`~edgediff.runtime.interrupts.Interrupted`, so staged
    outputs are cleaned up on the way out; they end with "interrupted" and 130 / 143. The
    previous signal handlers are restored on return (for callers in the same process)."""
    sys.exit(_main(argv, console=False))


def console():
    """The ``edgediff`` console script (``edgediff.entry``): as :func:`main`, but once the
    command is over (outputs in place or cleaned up) a signal during interpreter shutdown,
    where other libraries' atexit hooks (torch's among them) still run, ends the process at
    once without a traceback."""
    sys.exit(_main(None, console=True))


def _main(argv, console: bool) -> int:
    previous = install_interrupts()
    try:
        return _run(argv)
    except (Interrupted, _Stop) as exc:       # a signal while a message was being printed
        return exc.exit_code
    finally:
        if console:
            exit_quietly_on_signal()
        else:
            restore_interrupts(previous)


def _run(argv) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as exc:       # click turns a KeyboardInterrupt into Abort
        return _interrupted(exc.__cause__ or exc.__context__)
    except (_Stop, KeyboardInterrupt) as exc:   # KeyboardInterrupt: a signal outside a command
        return _interrupted(exc)
    except click.ClickException as exc:        # usage errors too: one line, click's exit code
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except EdgediffError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        return 1
    except ImportError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KeyboardInterrupt):    # a signal while a C extension initialised
            return _interrupted(cause)              # (onnxruntime turns it into ImportError)
        extra = missing_extra(exc)
        if extra is None:
            raise
        click.echo(f"error: {extra}", err=True)
        return 1
    return 0


def _interrupted(exc) -> int:
    click.echo("interrupted", err=True)
    return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    main()
