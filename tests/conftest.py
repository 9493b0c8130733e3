"""Shared test set-up: seeded RNGs, float64 helpers, paths to shared data."""

import os
import pathlib
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (reproducible CI);
# HYPOTHESIS_PROFILE=explore draws fresh ones each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = pathlib.Path(os.environ.get("TMCGRAPH_TEST_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Seed every RNG and restore torch's default dtype and thread count after each test."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def f64():
    """Run the test with float64 as torch's default dtype."""
    torch.set_default_dtype(torch.float64)
    yield torch.float64


@pytest.fixture
def mnist_dir():
    """The shared MNIST directory, or skip with the reason."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if not all((MNIST_DIR / n).exists() for n in names):
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR} (set TMCGRAPH_TEST_MNIST)")
    return MNIST_DIR
