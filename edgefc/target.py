"""The target interface core defines, and the target registry.

A target is a hardware description (DESIGN.md "Target"). Core only knows this interface; the
concrete targets live in ``edgefc.targets`` and register themselves here, so a hardware-aware pass
(MLT asks for a tile count) receives the target through ``PassContext.target`` and never imports
``edgefc.targets``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from edgefc.errors import TargetError

_TARGETS: dict[str, Callable[[], "Target"]] = {}
_file_loader: Callable[[str], "Target"] | None = None


class Target:
    """Interface of a compilation target.

    ``name``      the target's name (``exynos2400``);
    ``is_npu``    whether NPU passes (tiling, NPU quantization defaults) apply;
    ``sram_bytes`` on-chip scratchpad the tiling solver budgets against;
    ``sram_reserve_bytes`` the part of it the solver leaves to everything else live around an
    attention (0 unless the target says);
    ``row_granularity`` query rows per tensor-engine pass, the granule of an attention row tile
    (1, rows not padded, unless the target says).
    Concrete targets add lowering (``lower(graph) -> Program``) and pricing (``profile``).
    """

    name: str = ""
    is_npu: bool = False
    sram_bytes: int = 0
    sram_reserve_bytes: int = 0
    row_granularity: int = 1


def register_target(name: str, factory: Callable[[], Target]) -> None:
    """Make ``factory()`` available as ``--target name``."""
    if name in _TARGETS:
        raise TargetError(f"a target named '{name}' is already registered")
    _TARGETS[name] = factory


def register_target_file_loader(loader: Callable[[str], Target]) -> None:
    """Set the function that turns a target description file (``--target npu.toml``) into a Target."""
    global _file_loader
    _file_loader = loader


def _load_builtins() -> None:
    """Import the built-in targets; every lookup calls it (a dictionary lookup after the first)."""
    importlib.import_module("edgefc.targets")


def list_targets() -> list[str]:
    _load_builtins()
    return sorted(_TARGETS)


def get_target(spec: "str | Target") -> Target:
    """A target by registered name (``exynos2400``) or from a target description file (``npu.toml``)."""
    if isinstance(spec, Target):
        return spec
    _load_builtins()
    if spec in _TARGETS:
        return _TARGETS[spec]()
    if spec.endswith(".toml") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise TargetError(f"target description file not found: {spec}")
        if _file_loader is None:
            raise TargetError("no loader for target description files is registered")
        return _file_loader(spec)
    known = ", ".join(sorted(_TARGETS))
    raise TargetError(f"unknown target '{spec}' (known: {known}; or pass a target description .toml file)")
