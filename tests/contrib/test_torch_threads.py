"""torch_threads sets torch's thread count for a block and restores the caller's; the examples' main() use it."""

import importlib.util

import pytest
import torch
from conftest import ROOT

from tmcgraph.contrib.threads import torch_threads


def test_sets_and_restores_even_on_error():
    torch.set_num_threads(2)
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with torch_threads(None) as n:  # None: the count as it is
        assert n == 2
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_rejects_what_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="positive integer"):
        with torch_threads(bad):
            pass


def _example(name):
    spec = importlib.util.spec_from_file_location(f"{name}_threads", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name, argv", [
    ("gaussian_toy", ["--N", "8", "--K", "4", "--reps", "2", "--threads", "1"]),
    ("state_space", ["--quick", "--seeds", "1", "--threads", "1"]),
])
def test_example_main_leaves_the_callers_thread_count(name, argv, capsys):
    torch.set_num_threads(2)
    _example(name).main(argv)
    assert torch.get_num_threads() == 2
