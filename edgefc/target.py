"""The target interface core defines (:class:`Target`, a ``typing.Protocol``), the SRAM budget
vocabulary every consumer shares (:class:`SramBudget`), and the target registry.

A target is a hardware description plus what core calls on it (DESIGN.md "Target"). Core only
knows this interface; the concrete targets live in ``edgefc.targets`` and register themselves
here, so a hardware-aware pass (MLT asks for a tile count) receives the target through
``PassContext.target`` and never imports ``edgefc.targets``. Callers never probe a target with
``hasattr``: what a target can do is part of the interface (``has_cost_model``,
``fuses_epilogues``), and the members a target without a cost model cannot serve raise one
:class:`~edgefc.errors.TargetError` sentence.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from edgefc.errors import TargetError

_TARGETS: dict[str, Callable[[], "Target"]] = {}
_file_loader: Callable[[str], "Target"] | None = None


@dataclass(frozen=True)
class SramBudget:
    """The on-chip SRAM scratchpad and its named parts -- one vocabulary for the tile solver, the
    lowering's residency and the attention spill test (PERFORMANCE.md "Residency").

    ``total``          the scratchpad (``sram.bytes``);
    ``weight_buffer``  the part the running op streams its weights through, double buffered
                       (``sram.weight_buffer_bytes``);
    ``reserve``        the part MLT leaves to what else is live around an attention when it sizes
                       the tiles (``sram.reserve_bytes``).

    The budgets drawn from them are the properties below; nothing else subtracts SRAM parts.
    A target without SRAM has ``SramBudget(0, 0, 0)``.
    """

    total: int
    weight_buffer: int = 0
    reserve: int = 0

    def __post_init__(self):
        for name in ("total", "weight_buffer", "reserve"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TargetError(f"SRAM {name} must be a whole number of bytes, 0 or more, got {v!r}")
        if self.total and self.weight_buffer >= self.total:
            raise TargetError(f"the SRAM weight buffer ({self.weight_buffer} bytes) must be smaller than the "
                              f"SRAM ({self.total} bytes): the activations need the rest")
        if self.total and self.reserve >= self.total:
            raise TargetError(f"the SRAM reserve ({self.reserve} bytes) must be less than the SRAM "
                              f"({self.total} bytes)")

    @property
    def activations(self) -> int:
        """What the lowering keeps activations in: the SRAM less the weight buffer (less the
        resident weights, when a model keeps them on chip)."""
        return self.total - self.weight_buffer

    @property
    def tiles(self) -> int:
        """The budget MLT sizes attention tiles against by default: the SRAM less the reserve."""
        return self.total - self.reserve

    @property
    def attention(self) -> int:
        """What one attention tile's working set may take before S_in/S_out spill to DRAM: the
        whole SRAM (the block runs alone: it streams no weights, and the lowering evicts what is
        live until its tiles fit)."""
        return self.total


class Target(Protocol):
    """What core, the passes and the CLI call on a target.

    Data: ``name``; ``is_npu`` (NPU passes apply: tiling, NPU quantization defaults);
    ``has_cost_model`` (``attention_*`` and ``profile`` can be called); ``clock_hz``;
    ``row_granularity`` (query rows per tensor-engine pass, the granule of an attention row
    tile); ``sram`` (:class:`SramBudget`); ``description_file`` (the file it was read from, or None);
    ``fuses_epilogues`` (elementwise epilogues run inside
    the kernel of the tensor-engine op they follow; NPU targets do by default).

    A class that subclasses ``Target`` inherits the defaults below: no cost model (the methods
    that need one raise a :class:`TargetError` naming the target) and no artifacts besides
    ``model.onnx`` and ``report.json``.
    """

    name: str = ""
    is_npu: bool = False
    has_cost_model: bool = False
    clock_hz: float = 0.0
    row_granularity: int = 1
    sram: SramBudget = SramBudget(0)
    #: the description file the target was read from (hashed into report.json "reproducibility"),
    #: None for a target built in memory
    description_file: str | None = None

    @property
    def fuses_epilogues(self) -> bool:
        return bool(self.is_npu)

    def attention_variants(self, schedule: str | None = None) -> tuple[str, ...]:
        """The ways a tiled attention block can run under ``schedule`` (a name the target knows;
        None: its default), preferred first; the MLT solver weighs every tiling under each.
        Default: one way, unnamed."""
        return ("",)

    def attention_sram_bytes(self, spec, tiling, variant: str = "") -> int:
        """SRAM working set of one tile of an attention block (``edgefc.attention``'s
        ``AttentionSpec`` split by a ``Tiling``) run as ``variant``, padding included."""
        raise TargetError(f"target '{self.name}' has no cost model")

    def attention_cycles(self, spec, tiling, variant: str = "") -> float:
        """The cost model's cycles of the whole attention block under ``tiling``, run as ``variant``
        (what the profile reports for it)."""
        raise TargetError(f"target '{self.name}' has no cost model")

    def profile(self, graph, *, precision: str = "as-built", schedule: str | None = None, model: str = "") -> Any:
        """Lower and price ``graph``: a profile (``total_ms``, ``table()``, ``write_json()`` ...)."""
        raise TargetError(f"target '{self.name}' has no cost model")

    def write_artifacts(self, graph, out_dir, ctx, report) -> None:
        """Called by ``edgefc compile`` with the compiled graph: write the target's files into the
        build folder being staged and add their summary to ``report``. Default: nothing."""
        return None


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


def get_target(spec: "str | os.PathLike | Target") -> Target:
    """A target by registered name (``exynos2400``) or from a target description file (``npu.toml``),
    read and validated here; a Target object is returned as it is (resolve once, pass it on)."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    spec = os.fspath(spec)
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
