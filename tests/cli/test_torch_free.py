"""A runtime-only install (no torch): the CLI's front door, generate and the README's Python
example work; export says in one line which extra to install. Torch is blocked in a
subprocess, as if it were not installed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgediff.export.bundle import export_bundle
from edgediff.export.models import FAMILIES

BLOCK = ("import sys\n"
         "class _NoTorch:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('torch', 'onnxscript', 'transformers'):\n"
         "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
         "sys.meta_path.insert(0, _NoTorch())\n")
README = Path(__file__).resolve().parents[2] / "README.md"


def run_cli(*args, cwd=None):
    code = BLOCK + f"from edgediff.cli import main\nmain({list(args)!r})\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def digits_like_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    export_bundle("dit", FAMILIES["dit"].configs["tiny"], root / "build" / "digits-dit", log=lambda m: None)
    return root


def test_help_and_families_without_torch():
    res = run_cli("--help")
    assert res.returncode == 0 and "generate" in res.stdout, res.stderr
    res = run_cli("families")
    assert res.returncode == 0, res.stderr
    assert all(name in res.stdout for name in FAMILIES) and "edgediff[export]" in res.stdout


def test_export_without_torch_is_one_line_naming_the_extra(tmp_path):
    res = run_cli("export", "--family", "dit", "--size", "tiny", "--out", str(tmp_path / "b"))
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "pip install 'edgediff[export]'" in res.stderr
    assert not list(tmp_path.iterdir())


def test_generate_without_torch(digits_like_bundle):
    out = digits_like_bundle / "g.png"
    res = run_cli("generate", str(digits_like_bundle / "build" / "digits-dit"), "-n", "4", "--steps", "2",
                  "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.is_file()


def test_generate_prompt_without_torch_or_transformers(tmp_path):
    """A text-to-image bundle: tokenizer (`tokenizers`) and text encoder (ONNX) run without
    torch and transformers."""
    from edgediff.digits.demo import ensure_bundle

    bundle = ensure_bundle("uvit_t2i", tmp_path / "t2i", log=lambda m: None)
    res = run_cli("generate", str(bundle), "--prompt", "the digit 7", "--prompt", "a handwritten two", "-n", "2",
                  "--steps", "2", "--npz", str(tmp_path / "g.npz"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.npz").is_file()


def test_readme_python_blocks_run_as_written_without_torch(digits_like_bundle):
    """Every ```python block of the README runs (from a directory holding build/digits-dit)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        res = subprocess.run([sys.executable, "-c", BLOCK + block], capture_output=True, text=True,
                             cwd=digits_like_bundle, timeout=300)
        assert res.returncode == 0, f"README block failed:\n{block}\n{res.stderr[-2000:]}"


def test_generate_decodes_a_latent_bundle_without_torch(latent_bundle, tmp_path):
    res = run_cli("generate", str(latent_bundle), "-n", "5", "--steps", "2", "--decode-batch", "2",
                  "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"))
    assert res.returncode == 0, res.stderr
    import numpy as np

    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (5, 16, 16, 3) and data["latents"].shape == (5, 4, 8, 8)
    assert (tmp_path / "g.png").is_file()
