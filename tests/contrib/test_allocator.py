"""``tmcgraph.runtime``: allocator tuning changes nothing but allocation.

Run in a child process, since the setting is process-wide and lasting.
"""

import json
import platform
import subprocess
import sys

import pytest
import torch

import tmcgraph as tg
from tmcgraph.contrib.allocator import allocator_settings, tune_allocator

CHILD = r"""
import json, torch, tmcgraph as tg
from tmcgraph.contrib import allocator
from tmcgraph.models.toys import gaussian_chain
m, q = gaussian_chain(6, "factorised")
est = tg.TMC(m, q, K=200)
before = float(est.log_evidence({"x": torch.tensor(0.5)}, seed=3))
ok = allocator.tune_allocator()
after = float(est.log_evidence({"x": torch.tensor(0.5)}, seed=3))
print(json.dumps({"ok": ok, "before": before, "after": after, "settings": allocator.allocator_settings()}))
"""


@pytest.mark.parametrize("bad", [0, -5, 2**31, 1.5, "1", True, None])
def test_tune_allocator_rejects_non_positive_integers_by_name(bad):
    with pytest.raises(tg.TMCGraphError, match="mmap_threshold"):
        tune_allocator(mmap_threshold=bad)
    with pytest.raises(tg.TMCGraphError, match="trim_threshold"):
        tune_allocator(trim_threshold=bad)


def test_allocator_settings_is_json_and_names_the_c_library():
    s = allocator_settings()
    json.dumps(s)
    assert set(s) >= {"libc", "tuned_by_tmcgraph", "environment"}


def test_tuning_in_a_child_process_leaves_estimates_unchanged():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] == r["after"]
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert r["ok"] is glibc
    assert r["settings"]["tuned_by_tmcgraph"] is glibc
    if glibc:
        assert r["settings"]["mmap_threshold"] == 1 << 30
    assert torch.isfinite(torch.tensor(r["after"]))
