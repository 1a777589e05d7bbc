"""CLI command ``edgediff bench`` (registered in cli.py): the bundle's model timed side by
side with PyTorch eager and ``torch.compile`` in one run (runtime/bench.py)."""
from __future__ import annotations

import click

from edgediff.runtime.backends import BACKENDS
from edgediff.runtime.bench import TORCH_ENGINES


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: batch sizes must be integers ≥ 1")
    return values


def _engines(text: str | None) -> list[str]:
    names = [v.strip() for v in (text or "").split(",") if v.strip()]
    bad = [n for n in names if n not in TORCH_ENGINES]
    if bad:
        raise click.BadParameter(f"unknown engine(s) {', '.join(bad)}; choose from {', '.join(TORCH_ENGINES)}")
    return list(dict.fromkeys(names))


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to time.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(list(BACKENDS)), help="Runtime backend.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--against", default=None,
              help="PyTorch engines timed in the same run: eager, compile or eager,compile (needs the export extra).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="The bundle's source checkpoint for the PyTorch engines (default: the family's random "
                   "initialisation at the bundle's config, which times the same shapes).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1), help="Timed rounds (one call per engine and batch each).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0), help="Untimed calls per engine and batch after the first.")
@click.option("--threads", type=click.IntRange(1), help="Threads per engine (default: all cores).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
def bench(bundle, precision, backend, batches, against, checkpoint, repeats, warmup, threads, json_path):
    """Time the bundle's denoiser (ms per call p50/p90, per step, per image, load, first call,
    peak RSS, GFLOP/s beside a NumPy sgemm), each engine in its own process, interleaved."""
    from edgediff.runtime.bench import format_report, run_bench
    from edgediff.runtime.files import write_json_atomic

    report = run_bench(bundle, precision, backend, _ints(batches), _engines(against), repeats, warmup, threads,
                       checkpoint, log=lambda m: click.echo(m, err=True))
    click.echo(format_report(report))
    if json_path:
        write_json_atomic(json_path, report)
        click.echo(f"wrote {json_path}")


COMMANDS = [bench]
