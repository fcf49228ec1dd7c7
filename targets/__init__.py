"""Target descriptions (TOML), lowering to a Program, the cost model, TVM lowering.

Importing this package registers the built-in targets with ``edgefc.target``.
"""

from pathlib import Path

from edgefc.target import register_target, register_target_file_loader
from edgefc.targets.npu import NpuTarget

TARGET_DIR = Path(__file__).parent

register_target("exynos2400", lambda: NpuTarget.from_toml(TARGET_DIR / "exynos2400.toml"))
register_target("exynos2200", lambda: NpuTarget.from_toml(TARGET_DIR / "exynos2200.toml"))
register_target_file_loader(NpuTarget.from_toml)
