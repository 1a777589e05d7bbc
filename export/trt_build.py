"""TensorRT engines from a bundle's ONNX: strongly typed networks only (TensorRT 10.12+ / 11).

TensorRT 11 has no FP16/INT8 builder flags: the precision is the ONNX file's (FP32, the
AutoCast FP16 mix, or INT8 Q/DQ), so ``--precision`` picks the file and the builder only
chooses kernels. The engine goes to ``engines/`` under a name that says what it depends
on, with a sidecar (``edgediff.runtime.engines``); the timing cache persists per GPU
architecture and TensorRT version so rebuilds and other bundles reuse kernel timings; a
cache shared by concurrent builds is merged, not overwritten, under a file lock.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from edgediff.runtime.backends.trt import device_info, import_tensorrt
from edgediff.runtime.bundle import SIGNATURE, read_bundle
from edgediff.runtime.files import sha256_file, write_atomic, write_json_atomic
from edgediff.runtime.engines import (ENGINE_DIR, PRECISIONS, BatchProfile, EngineError, EngineKey, batch_profile,
                                      check_engine, make_sidecar, model_digest, sidecar_path, timing_cache_name)
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.interrupts import deferred

try:
    import fcntl                          # POSIX: the timing cache's merge lock
except ImportError:                       # Windows: merged without a lock
    fcntl = None


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int | None = None          # sample batch; None: opt_batch
    guidance: bool | None = None          # None: double the batch when the model can be guided (manifest.guidable)
    timing_cache: str | Path | None = None  # None: engines/timing_<sm>_<trt>.cache; "" disables
    workspace_gib: float | None = None
    optimization_level: int | None = None   # TensorRT's builder level 0..5 (its default is 3)
    force: bool = False
    device: int = 0
    component: str = "denoiser"           # which model of the bundle: denoiser, decoder, encoder

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InvalidInput(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise InvalidInput("--workspace must be positive (GiB)")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise InvalidInput("--optimization-level must be in 0..5")
        if self.component != "denoiser" and self.guidance:
            raise InvalidInput("guidance doubles the denoiser's batch only; drop --guidance for the "
                               f"{self.component}")


def engine_profile(manifest, opts: BuildOptions) -> BatchProfile:
    """The engine batch profile: guidance doubles the denoiser's (the autoencoder components
    see sample batches as they are); the bundle's max_batch bounds it."""
    denoiser = opts.component == "denoiser"
    guidance = (denoiser and manifest.guidable) if opts.guidance is None else opts.guidance
    profile = batch_profile(opts.min_batch, opts.opt_batch, opts.max_batch, guidance)
    limit = manifest.max_batch
    if limit is not None and profile.max > limit:
        raise InvalidInput(f"the profile's max batch {profile.max} (guidance doubles it) exceeds the "
                         f"bundle's exported max_batch {limit}")
    return profile


def profile_shapes(inputs: dict[str, dict], profile: BatchProfile) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shapes per input: the symbolic batch axis takes the profile's sizes."""
    shapes = {}
    for name, decl in inputs.items():
        dims = decl["shape"]
        if any(not isinstance(d, int) for d in dims[1:]) or isinstance(dims[0], int):
            raise InvalidInput(f"input {name!r} must have a symbolic batch axis and static others, got {dims}")
        shapes[name] = tuple((b, *dims[1:]) for b in (profile.min, profile.opt, profile.max))
    return shapes


def _parse(trt, builder, logger, onnx_path: Path):
    """A strongly typed network from ``onnx_path`` (from the file, so external data loads)."""
    # Required on 10.x; accepted and ignored on 11.x, where every network is strongly typed.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    return network, parser


def _config(trt, builder, network, shapes: dict, opts: BuildOptions, cache: bytes):
    config = builder.create_builder_config()
    if opts.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * 2**30))
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
    # No TF32 in any engine. FP32 engines are parity references. The FP32 islands of the FP16
    # and INT8 models (export/fp16_targets.py: the t/y conditioning path, softmax,
    # normalization, each kept FP32 because FP16 failed the gate there) would, with TF32, have
    # their matmuls and convolutions rounded to a 10-bit mantissa, FP16's, undoing the island.
    # Off until measured harmless on a GPU (none has been lent to this check yet).
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes):
        raise EngineError(f"network inputs {names} do not match the bundle's {sorted(shapes)}")
    for name in names:
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    if not config.set_timing_cache(config.create_timing_cache(cache), ignore_mismatch=False):
        raise EngineError("TensorRT refused the timing cache (another TensorRT or GPU wrote it); "
                          "delete it or pass --timing-cache '' to build without one")
    return config


def _write_atomic(path: Path, data) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def build_engine(bundle_dir: str | Path, opts: BuildOptions = BuildOptions(), log=print) -> Path:
    """Build (or reuse) the engine for ``opts``; return its path under ``engines/``."""
    bundle = read_bundle(bundle_dir)
    component = bundle.manifest.component(opts.component)
    if opts.precision not in component.models:
        how = f"edgediff add-precision --precision {opts.precision}"
        what = "model" if opts.component == "denoiser" else opts.component
        raise InvalidInput(f"bundle {bundle.path} has no {opts.precision} {what} (has: {', '.join(component.models)}); "
                         f"add it with {how} first")
    onnx_path = bundle.model_path(opts.precision, opts.component)
    profile = engine_profile(bundle.manifest, opts)
    trt = import_tensorrt()
    gpu = device_info(opts.device)
    key = EngineKey(opts.precision, gpu["compute_capability"], trt.__version__,
                    model_digest(bundle.manifest, opts.precision, opts.component), profile)
    folder = bundle.path / ENGINE_DIR
    made_folder = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        return _build_into(bundle, opts, component, onnx_path, profile, trt, gpu, key, folder, log)
    except BaseException:                  # errors and interrupts: leave the bundle as it was
        if made_folder and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _build_into(bundle, opts, component, onnx_path, profile, trt, gpu, key, folder, log) -> Path:
    path = folder / key.name
    if not opts.force and path.is_file() and check_engine(path, key)[1] is None:
        log(f"{path} is up to date (use --force to rebuild)")
        return path
    cache_path = (folder / timing_cache_name(key.compute_capability, key.tensorrt_version)
                  if opts.timing_cache is None else Path(opts.timing_cache) if opts.timing_cache else None)
    log(f"building a strongly typed {opts.precision} {opts.component} engine for {gpu['name']} (sm {key.compute_capability}, "
        f"TensorRT {key.tensorrt_version}), engine batch {profile.min}..{profile.opt}..{profile.max} ...")
    engine, timing = _build(trt, onnx_path, profile_shapes(component.inputs, profile), opts, cache_path)
    with deferred():                                # engine and sidecar: both or neither
        _write_atomic(path, engine)
        _write_sidecar(path, key, onnx_path, gpu, opts)
    if cache_path is not None and timing is not None:   # after the engine: a failed cache write loses no build
        save_timing_cache(timing, cache_path, log)
    if (bundle.path / SIGNATURE).is_file():        # the signature covers engines/: now it does not verify
        log(f"note: {bundle.path} was signed before this build; re-sign it (edgediff sign {bundle.path} --key KEY.pem)")
    return path


def _write_sidecar(path: Path, key, onnx_path: Path, gpu: dict, opts: BuildOptions) -> None:
    side = make_sidecar(key, sha256_file(path), onnx_path.name, gpu_name=gpu["name"],
                        built=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        sample_batch={"min": opts.min_batch, "opt": opts.opt_batch,
                                      "max": opts.max_batch or opts.opt_batch},
                        workspace_gib=opts.workspace_gib, optimization_level=opts.optimization_level,
                        component=opts.component)
    write_json_atomic(sidecar_path(path), side)     # after the engine: a stale sidecar fails its sha check


@dataclass
class TimingCache:
    """The build's timing cache, with what it started from and the config that can read others."""
    cache: object                         # trt.ITimingCache
    loaded: bytes                         # the file's bytes when the build began
    config: object                        # trt.IBuilderConfig (creates caches from bytes)


def _build(trt, onnx_path: Path, shapes: dict, opts: BuildOptions, cache_path: Path | None):
    """(serialized engine, the TimingCache to keep or None)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)   # the parser must outlive the build
    loaded = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config = _config(trt, builder, network, shapes, opts, loaded)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    cache = config.get_timing_cache() if cache_path is not None else None      # may be None
    return memoryview(serialized), (TimingCache(cache, bytes(loaded), config) if cache is not None else None)


def save_timing_cache(timing: TimingCache, cache_path: Path, log=print) -> None:
    """Write the build's timing cache; when another build wrote the file since this one read
    it (a cache shared with --timing-cache), merge that one in first, all under an exclusive
    lock on ``<cache>.lock``, so concurrent builds add up instead of the last writer winning."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path.with_name(cache_path.name + ".lock"), "a+b") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            on_disk = cache_path.read_bytes() if cache_path.is_file() else b""
            if on_disk and on_disk != timing.loaded:
                other = timing.config.create_timing_cache(on_disk)
                if other is None or not timing.cache.combine(other, False):     # ignore_mismatch=False
                    log(f"note: {cache_path} changed during the build and could not be merged "
                        "(another TensorRT or GPU wrote it); replacing it with this build's")
            _write_atomic(cache_path, memoryview(timing.cache.serialize()))
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
