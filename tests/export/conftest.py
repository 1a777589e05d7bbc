import shutil

import pytest


@pytest.fixture(scope="session")
def _bundle_cache(tmp_path_factory):
    return {}


@pytest.fixture
def fixture_bundle(tmp_path, tmp_path_factory, _bundle_cache):
    """``make(name) -> (family, module, bundle dir, checkpoint)``: the family's fixture config
    with seeded random weights, saved in the official layout and exported to a bundle. The
    export happens once per session and family; each test gets its own copy of the files
    (at ``tmp_path/b`` and ``tmp_path/w.safetensors``), so it may alter them."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES
    from edgediff.export.reference import build_reference

    def make(name):
        family = FAMILIES[name]
        config = family.configs[family.fixture]
        if name not in _bundle_cache:
            root = tmp_path_factory.mktemp(f"fixture-{name}")
            torch.manual_seed(0)
            _, module = build_reference(name, config)
            save_file(family.official(module).state_dict(), root / "w.safetensors")
            export_bundle(name, config, root / "b", checkpoint=root / "w.safetensors", log=lambda m: None)
            _bundle_cache[name] = (module, root)
        module, root = _bundle_cache[name]
        shutil.copytree(root / "b", tmp_path / "b")
        shutil.copy(root / "w.safetensors", tmp_path / "w.safetensors")
        return family, module, tmp_path / "b", tmp_path / "w.safetensors"

    return make
