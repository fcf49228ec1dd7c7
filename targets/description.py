"""A hardware description read from a TOML file (``targets/exynos2400.toml``).

The numbers live in the file, each with a comment saying where it comes from (STYLE.md: hardware
numbers in the target file, formulas in the cost model, tiling decisions in the solver). A missing
or mistyped field is a :class:`TargetError` naming the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgefc.errors import TargetError
from edgefc.target import Target

# section.field -> expected type; every field is required.
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "target.name": str,
    "target.kind": str,
    "clock.hz": (int, float),
    "sram.bytes": int,
}


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


class NpuTarget(Target):
    """A target described by a TOML file; fields are reachable as ``target["section.field"]``."""

    def __init__(self, data: dict, source: str = "<memory>"):
        self.data = data
        self.source = source
        for field, typ in SCHEMA.items():
            try:
                value = _lookup(data, field)
            except KeyError:
                raise TargetError(f"target description {source} has no field '{field}'") from None
            if isinstance(value, bool) or not isinstance(value, typ):
                want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
                raise TargetError(f"target description {source}: field '{field}' must be {want}, got {value!r}")
        self.name = data["target"]["name"]
        self.is_npu = data["target"]["kind"] == "npu"
        self.sram_bytes = int(data["sram"]["bytes"])

    def __getitem__(self, dotted: str) -> Any:
        return _lookup(self.data, dotted)

    @classmethod
    def from_toml(cls, path: str | Path) -> "NpuTarget":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TargetError(f"target description file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TargetError(f"target description {path} is not valid TOML: {e}") from None
        return cls(data, str(path))
