"""The package is laid out as its stages, and each stage imports only from earlier ones.

model -> particles -> sampling -> ops -> infer -> applications (models, data, contrib),
with the contraction engine (``ops``) independent of everything but ``errors``.
"""

import ast
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT

PKG = ROOT / "tmcgraph"

#: Stage -> the stages its modules may import (besides their own).
ALLOWED = {
    "errors": set(),
    "model": {"errors"},
    "particles": {"errors"},
    "sampling": {"errors", "model", "particles"},
    "ops": {"errors"},
    "infer": {"errors", "model", "particles", "sampling", "ops"},
    "models": {"errors", "model", "particles", "sampling", "ops", "infer"},
    "data": {"errors"},
    "contrib": {"errors"},
    "pyro": {"errors", "model", "particles", "sampling", "ops", "infer"},
    "export": {"errors", "model", "particles", "sampling", "ops", "infer"},
}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path):
    """Absolute tmcgraph module names imported by a source file."""
    pkg = ".".join(path.parent.relative_to(ROOT).parts)  # the package a relative import starts from
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("tmcgraph"):
                yield name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tmcgraph"):
                    yield a.name


SOURCES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_stage_imports_only_earlier_stages(path):
    rel = path.relative_to(ROOT).with_suffix("")
    stage = _stage(".".join(rel.parts))
    bad = []
    for name in _imports(path):
        target = _stage(name)
        if target != stage and target not in ALLOWED[stage]:
            bad.append(name)
    assert not bad, f"{path.relative_to(ROOT)} (stage {stage!r}) imports {bad}; allowed: {sorted(ALLOWED[stage])}"


def _loaded(code: str) -> list:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(sorted(sys.modules))"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[-2]


def test_import_tmcgraph_loads_no_application():
    mods = _loaded("import tmcgraph")
    for app in ("tmcgraph.models", "tmcgraph.data", "tmcgraph.contrib", "tmcgraph.pyro", "tmcgraph.export"):
        assert f"'{app}" not in mods, app
