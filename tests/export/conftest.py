import pytest


@pytest.fixture
def fixture_bundle(tmp_path):
    """``make(name) -> (family, module, bundle dir, checkpoint)``: the family's fixture config
    with seeded random weights, saved in the official layout and exported to a bundle."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from edgediff.export.bundle import build_reference, export_bundle
    from edgediff.export.models import FAMILIES

    def make(name):
        family = FAMILIES[name]
        config = family.configs[family.fixture]
        torch.manual_seed(0)
        _, module = build_reference(name, config)
        checkpoint = tmp_path / "w.safetensors"
        save_file(family.official(module).state_dict(), checkpoint)
        export_bundle(name, config, tmp_path / "b", checkpoint=checkpoint, log=lambda m: None)
        return family, module, tmp_path / "b", checkpoint

    return make
