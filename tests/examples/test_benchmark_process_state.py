"""Benchmarks' ``main`` leaves the process as it found it: thread count, RNG, argument validation.

The tests call benchmark ``main`` functions in the pytest process. A thread count left at
``--threads`` changes the summation order of every later test's matrix products (the
data-parallel MNIST test compares parameters to 1e-6 after Adam steps), so every benchmark
that sets process state must restore it.
"""
import ast
import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_state_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _main_decorators(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return [ast.unparse(d) for d in node.decorator_list]
    return None


SETTERS = ("set_threads(", "no_distribution_validation(", "torch.manual_seed(")


@pytest.mark.parametrize("path", sorted(p for p in BENCH.glob("*.py") if p.name != "_common.py"),
                         ids=lambda p: p.name)
def test_every_benchmark_main_that_sets_process_state_restores_it(path):
    text = path.read_text()
    if not any(s in text for s in SETTERS):
        pytest.skip("sets no process state")
    decorators = _main_decorators(path)
    assert decorators is not None, f"{path.name} sets process state but has no main()"
    assert "keeps_process_state" in decorators, (
        f"{path.name}: main() sets process state ({', '.join(s for s in SETTERS if s in text)}) "
        "and must be decorated with _common.keeps_process_state")


def test_keeps_process_state_restores_on_return_and_on_error():
    common = _load("_common")
    before_threads = torch.get_num_threads()
    before_rng = torch.get_rng_state()
    before_validate = torch.distributions.Distribution._validate_args

    @common.keeps_process_state
    def main(fail):
        common.set_threads(1 if before_threads != 1 else 2)
        common.no_distribution_validation()
        torch.manual_seed(123)
        torch.rand(3)
        if fail:
            raise RuntimeError("boom")
        return "done"

    assert main(False) == "done"
    assert torch.get_num_threads() == before_threads
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert torch.distributions.Distribution._validate_args == before_validate
    with pytest.raises(RuntimeError, match="boom"):
        main(True)
    assert torch.get_num_threads() == before_threads
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert torch.distributions.Distribution._validate_args == before_validate


def test_a_real_benchmark_main_restores_the_thread_count(tmp_path):
    bench = _load("perf_planning")
    before = torch.get_num_threads()
    rng = torch.get_rng_state()
    other = 1 if before != 1 else 2
    try:
        torch.set_num_threads(other)
        bench.main(["--quick", "--out", str(tmp_path), "--threads", str(1 if other != 1 else 2)])
        assert torch.get_num_threads() == other
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(before)
