"""Docstring examples in the package run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import tmcgraph

MODULES = sorted(m.name for m in pkgutil.walk_packages(tmcgraph.__path__, "tmcgraph."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0, f"{res.failed} docstring example(s) failed in {name}"
