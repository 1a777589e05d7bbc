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



@pytest.fixture(scope="session")
def t2i_bundle(tmp_path_factory):
    """A tiny U-ViT t2i bundle without a text encoder (context 5 x 12), at ``root/b``: ``root``.
    Shared: copy the bundle before changing it."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from edgediff.export.bundle import export_bundle
    from edgediff.export.models.uvit import FAMILY

    root = tmp_path_factory.mktemp("t2i")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    save_file(FAMILY.official(FAMILY.build(FAMILY.configs["tiny_t2i"])).state_dict(), str(root / "u.safetensors"))
    export_bundle("uvit", FAMILY.configs["tiny_t2i"], root / "b", checkpoint=root / "u.safetensors",
                  log=lambda m: None)
    torch.set_num_threads(before)
    return root


@pytest.fixture(scope="session")
def t2i(t2i_bundle):
    """The tiny t2i bundle (``root/b``), a perturbed CLIP text encoder saved in the published key
    layout (``root/te.safetensors``, ``text_model.*``) and tokenizer files: ``(root, text
    module, tokenizer dir)``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from perturb import perturb_
    from safetensors.torch import save_file
    from tiny_clip import CONFIG, tokenizer_dir

    from edgediff.export import text_encoder as te

    torch.manual_seed(1)
    model = te.build(CONFIG)
    assert perturb_(model)                                        # LayerNorms are ones/zeros at init
    save_file({"text_model." + k: v for k, v in model.state_dict().items()}, str(t2i_bundle / "te.safetensors"))
    return t2i_bundle, model, tokenizer_dir(t2i_bundle / "tok")


@pytest.fixture(scope="session")
def t2i_text(t2i):
    """The tiny t2i bundle with its text encoder and tokenizer added (``root/bt``). Shared: copy
    it before changing it."""
    torch = pytest.importorskip("torch")
    from tiny_clip import CONFIG

    from edgediff.export import text_encoder as te

    root, _, tok = t2i
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    shutil.copytree(root / "b", root / "bt")
    te.add_text_encoder(root / "bt", root / "te.safetensors", CONFIG, tokenizer=tok, log=lambda m: None)
    torch.set_num_threads(before)
    return root / "bt"
