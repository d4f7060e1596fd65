"""The package layout's promises: core/ never imports vLLM, the layers import
downwards only, and pyproject.toml installs every package folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medusa_vllm"


def _modules(sub: str) -> list[str]:
    base = PACKAGE / sub
    return sorted(
        "medusa_vllm." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in base.rglob("*.py")
    )


def _imported_after(modules: list[str]) -> set[str]:
    """Top-level names of the packages in sys.modules after importing ``modules``
    in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_core_never_imports_vllm():
    loaded = _imported_after(_modules("core"))
    assert not {m for m in loaded if m == "vllm" or m.startswith("vllm.")}
    assert not {m for m in loaded if m.startswith(("medusa_vllm.engine", "medusa_vllm.checkpoints"))}


def test_checkpoints_import_neither_vllm_nor_the_engine():
    loaded = _imported_after(_modules("checkpoints"))
    assert not {m for m in loaded if m == "vllm" or m.startswith("vllm.")}
    assert not {m for m in loaded if m.startswith(("medusa_vllm.engine", "medusa_vllm.tools",
                                                   "medusa_vllm.training"))}


@pytest.mark.parametrize("module", ["medusa_vllm.core.heads", "medusa_vllm.core.tree"])
def test_core_modules_stand_alone(module):
    loaded = _imported_after([module])
    assert not {m for m in loaded if m.startswith("medusa_vllm.checkpoints")}


def test_pyproject_lists_every_package_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")
    } | {"medusa_vllm_patches"}
    assert listed == found, f"pyproject packages {sorted(listed ^ found)} differ from the folders"
    assert config["package-dir"] == {"medusa_vllm_patches": "patches"}


def test_patches_install_under_a_unique_name():
    import medusa_vllm_patches

    assert Path(medusa_vllm_patches.__file__).resolve().parent == ROOT / "patches"
    assert all(name.startswith("medusa_vllm_patches.") for name in medusa_vllm_patches.PATCHES)
