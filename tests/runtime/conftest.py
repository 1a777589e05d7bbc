"""Shared bundles for the integrity, signing and fuzz tests: one tiny real export per worker."""
import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A real exported ddpm tiny bundle (class-conditional); never modified by tests."""
    torch = pytest.importorskip("torch")
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("tiny") / "ddpm"
        export_bundle("ddpm", FAMILIES["ddpm"].configs["tiny"], out, log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    return copy



@pytest.fixture(scope="session")
def ray_local():
    """A local Ray of 2 CPUs, shared by the distributed and serving tests of this process."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
