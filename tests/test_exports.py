"""The public surface: every exported name resolves, and re-exports are the defining module's objects.

The reference for each name is the module that defines it, read from ``sys.modules`` (not by
attribute access through the package: ``tmcgraph.infer.fit``, ``tmcgraph.infer.subsample``
and ``tmcgraph.infer.posterior`` are functions that share their module's name).
"""

import importlib
import pkgutil
import re
import sys

import pytest
from conftest import ROOT

import tmcgraph

#: Packages whose ``__all__`` names objects (applications list their modules instead).
PACKAGES = ["tmcgraph", "tmcgraph.infer", "tmcgraph.sampling", "tmcgraph.ops"]
#: Application packages: ``__all__`` lists their modules, imported on demand.
APPLICATIONS = ["tmcgraph.models", "tmcgraph.data"]

#: Modules whose whole ``__all__`` the given package re-exports.
FULLY_EXPORTED = [
    ("tmcgraph.infer", "tmcgraph.infer.fit"),
    ("tmcgraph.infer", "tmcgraph.infer.qem"),
    ("tmcgraph.infer", "tmcgraph.infer.subsample"),
    ("tmcgraph.sampling", "tmcgraph.sampling.group"),
]

#: Top-level name -> the module that defines it.
TOP_LEVEL = {
    "fit": "tmcgraph.infer.fit",
    "MPVI": "tmcgraph.infer.fit",
    "MPRWS": "tmcgraph.infer.fit",
    "QEM": "tmcgraph.infer.qem",
    "MeanFieldNormal": "tmcgraph.infer.qem",
    "subsample": "tmcgraph.infer.subsample",
    "Group": "tmcgraph.sampling.group",
    "TMC": "tmcgraph.infer.estimators",
    "IWAE": "tmcgraph.infer.estimators",
    "RWS": "tmcgraph.infer.rws",
    "posterior": "tmcgraph.infer.posterior",
    "Paired": "tmcgraph.sampling.couplings",
    "Factor": "tmcgraph.ops.factor",
}

#: Modules that must define every name of their ``__all__``.
MODULES = [
    "tmcgraph.infer.fit",
    "tmcgraph.infer.qem",
    "tmcgraph.infer.subsample",
    "tmcgraph.sampling.group",
    "tmcgraph.ops.scan",
    "tmcgraph.models.hierarchical",
    "tmcgraph.data.hierarchical",
]


def _module(name):
    importlib.import_module(name)
    return sys.modules[name]


@pytest.mark.parametrize("pkg", PACKAGES + APPLICATIONS + MODULES)
def test_all_has_no_duplicates(pkg):
    names = _module(pkg).__all__
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("pkg", PACKAGES + MODULES)
def test_every_name_in_all_resolves(pkg):
    mod = _module(pkg)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{pkg}.__all__ names undefined attributes {missing}"
    ns = {}
    exec(f"from {pkg} import *", ns)
    assert set(mod.__all__) <= set(ns)


@pytest.mark.parametrize("pkg", APPLICATIONS)
def test_application_all_lists_every_module(pkg):
    mod = _module(pkg)
    modules = sorted(m.name for m in pkgutil.iter_modules(mod.__path__) if not m.name.startswith("_"))
    assert sorted(mod.__all__) == modules
    for name in mod.__all__:
        sub = _module(f"{pkg}.{name}")
        assert getattr(mod, name) is sub


@pytest.mark.parametrize("pkg", ["tmcgraph.infer", "tmcgraph.sampling", "tmcgraph.ops"])
def test_reexports_are_the_defining_modules_objects(pkg):
    """Every name a stage package exports comes from one of its modules' ``__all__``, as the same object."""
    mod = _module(pkg)
    subs = [_module(i.name) for i in pkgutil.iter_modules(mod.__path__, pkg + ".")]
    for name in mod.__all__:
        owners = [s for s in subs if name in getattr(s, "__all__", ())]
        assert owners, f"{pkg}.{name} is in no module's __all__"
        for s in owners:
            assert getattr(s, name) is getattr(mod, name), f"{pkg}.{name} is not {s.__name__}.{name}"


@pytest.mark.parametrize("pkg, module", FULLY_EXPORTED)
def test_new_modules_are_fully_exported(pkg, module):
    p, m = _module(pkg), _module(module)
    missing = [n for n in m.__all__ if n not in p.__all__]
    assert not missing, f"{pkg}.__all__ lacks {missing} from {module}"
    for n in m.__all__:
        assert getattr(p, n) is getattr(m, n), f"{pkg}.{n} is not {module}.{n}"


@pytest.mark.parametrize("name, module", sorted(TOP_LEVEL.items()))
def test_top_level_names_are_the_submodule_objects(name, module):
    assert name in tmcgraph.__all__
    obj = getattr(tmcgraph, name)
    assert obj is getattr(_module(module), name)
    assert obj.__module__ == module
    stage = ".".join(module.split(".")[:2])
    assert getattr(_module(stage), name) is obj, f"tmcgraph.{name} is not {stage}.{name}"


def test_every_top_level_name_comes_from_a_stage():
    """Every top-level name is the object its stage package (or defining module) exports."""
    stages = [_module(p) for p in ("tmcgraph.infer", "tmcgraph.sampling", "tmcgraph.ops", "tmcgraph.model",
                                   "tmcgraph.errors")]
    for name in tmcgraph.__all__:
        obj = getattr(tmcgraph, name)
        owners = [s for s in stages if getattr(s, name, None) is obj]
        assert owners, f"tmcgraph.{name} is not exported by any stage"
        assert getattr(sys.modules[obj.__module__], name) is obj


def test_module_named_functions_leave_their_modules_importable():
    fit_module = _module("tmcgraph.infer.fit")
    assert tmcgraph.infer.fit is fit_module.fit
    from tmcgraph.infer.fit import iteration_seed
    from tmcgraph.infer.subsample import plate_scales

    assert iteration_seed is fit_module.iteration_seed
    assert plate_scales is _module("tmcgraph.infer.subsample").plate_scales


def test_scan_functions_are_in_ops_scan():
    scan = _module("tmcgraph.ops.scan")
    for name in ("log_chain", "log_chain_vector", "log_chain_marginals", "naive_log_chain"):
        assert name in scan.__all__ and callable(getattr(scan, name))


def test_api_doc_names_every_top_level_name():
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in tmcgraph.__all__ if not re.search(rf"`tg\.{n}\b", text)]
    assert not missing, f"docs/api.md does not mention {missing} as tg.<name>"
