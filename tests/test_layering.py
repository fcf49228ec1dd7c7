"""The layering of DESIGN.md as a checked contract: ``.ci/lint-imports`` (import-linter over the
installed package layout) passes on this tree and fails, naming the import, when a layer is broken
or when an import cycle appears anywhere in the package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ("core never imports passes, targets, models or the CLI",
             "passes never import targets, models or the CLI",
             "targets never import passes, models or the CLI",
             "nothing but the CLI imports the CLI",
             "no import cycles")


def _lint(repo: Path) -> tuple[int, str]:
    proc = subprocess.run([str(ROOT / ".ci" / "lint-imports"), str(repo)], capture_output=True, text=True,
                          check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _verdicts(out: str) -> dict[str, str]:
    """Contract name -> KEPT / BROKEN, from lint-imports' summary lines."""
    found = {}
    for line in out.splitlines():
        for name in CONTRACTS:
            if line.startswith(name + " "):
                found[name] = line[len(name) + 1:].split()[0]
    return found


def test_this_tree_keeps_every_layering_contract():
    rc, out = _lint(ROOT)
    assert rc == 0, out
    assert _verdicts(out) == {name: "KEPT" for name in CONTRACTS}, out
    # the link tree really shows lint-imports the subpackages (not only edgefc/'s own modules)
    files = int(out.split("Analyzed ", 1)[1].split(" files", 1)[0])
    assert files == sum(1 for d in ("edgefc", "passes", "targets", "models") for _ in (ROOT / d).rglob("*.py")), out


def _copy(tmp_path) -> Path:
    repo = tmp_path / "repo"
    for d in ("edgefc", "passes", "targets", "models"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    return repo


def test_a_deliberate_violation_breaks_the_contracts(tmp_path):
    repo = _copy(tmp_path)
    # the core reaching for the CLI, and a pass reaching for a target module
    (repo / "edgefc" / "layering_demo.py").write_text('"""A deliberate violation."""\n\nimport edgefc.cli\n')
    (repo / "passes" / "layering_demo.py").write_text(
        '"""A deliberate violation."""\n\nfrom edgefc.targets import cost_model  # noqa: F401\n')
    rc, out = _lint(repo)
    assert rc == 1, out
    assert _verdicts(out) == {CONTRACTS[0]: "BROKEN", CONTRACTS[1]: "BROKEN", CONTRACTS[2]: "KEPT",
                              CONTRACTS[3]: "BROKEN", CONTRACTS[4]: "KEPT"}, out
    assert "edgefc.layering_demo -> edgefc.cli (l.3)" in out, out
    assert "edgefc.passes.layering_demo -> edgefc.targets.cost_model (l.3)" in out, out


@pytest.mark.parametrize("where", ["targets", "core"])
def test_a_deliberate_import_cycle_breaks_the_acyclic_contract(tmp_path, where):
    """A cycle inside one package (the cost model importing the target facade that imports it),
    or one through a function-level import in the core, fails the "no import cycles" contract and
    names an import that would break it; every layering contract still holds."""
    repo = _copy(tmp_path)
    if where == "targets":
        path, line = repo / "targets" / "cost_model.py", "from edgefc.targets import npu  # noqa: F401\n"
    else:
        path, line = repo / "edgefc" / "errors.py", "def _f():\n    from edgefc import ir  # noqa: F401\n"
    path.write_text(path.read_text() + "\n" + line)
    rc, out = _lint(repo)
    assert rc == 1, out
    assert _verdicts(out) == {**{c: "KEPT" for c in CONTRACTS[:4]}, CONTRACTS[4]: "BROKEN"}, out
    assert "could be made acyclic by removing" in out, out
    assert ("No cycles are allowed in edgefc.targets" if where == "targets" else "No cycles are allowed in edgefc.\n") in out, out


def test_bench_scripts_do_not_import_the_cli():
    """bench/ is not a package, so import-linter does not see it: the same rule, read from the source."""
    import ast

    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert len(scripts) >= 5
    offenders = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n == "edgefc.cli" or n.startswith("edgefc.cli.")]
    assert offenders == []


def test_module_map_names_every_module():
    """docs/modules.md has one line per module of edgefc/, passes/, targets/ and models/, and no
    line for a module that is gone."""
    import re

    text = (ROOT / "docs" / "modules.md").read_text()
    mapped = re.findall(r"^\| `([\w/]+\.py)` \|", text, flags=re.M)
    tree = {str(p.relative_to(ROOT)) for d in ("edgefc", "passes", "targets", "models") for p in (ROOT / d).rglob("*.py")}
    assert len(mapped) == len(set(mapped)), "docs/modules.md names a module twice"
    missing, gone = sorted(tree - set(mapped)), sorted(set(mapped) - tree)
    assert not missing and not gone, (f"docs/modules.md lacks {missing} (add one line each: what it holds)"
                                      f" and names modules that are gone: {gone}")
