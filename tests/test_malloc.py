"""$QATUNE_MALLOC chooses what glibc does with the memory a CPU run frees: `keep` it mapped (no
mmap, no trim) or glibc's own policy. Process-wide, so each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qatune.errors import UserError
from qatune.utils import malloc

# A 64 MB tensor is above glibc's largest mmap threshold (32 MB): glibc's policy maps it on its own
# and unmaps it when freed; `keep` takes it from the heap and keeps it there once freed.
CODE = """
import json, torch
from qatune.utils.malloc import configure_cpu_allocator, heap_info
mode = configure_cpu_allocator()
before = heap_info()
x = torch.ones(16 * 2**20)  # 64 MB
during = heap_info()
del x
after = heap_info()
print(json.dumps({"mode": mode, "before": before, "during": during, "after": after}))
"""


def run_with(mode: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
    if mode is not None:
        env[malloc.ENV] = mode
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.splitlines()[-1])


MB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc.heap_info() is None, reason="glibc >= 2.33")
def test_keep_holds_freed_memory_in_the_heap_and_glibc_returns_it():
    keep, glibc = run_with("keep"), run_with("glibc")
    assert keep["mode"] == "keep" and glibc["mode"] == "glibc"
    # keep: served from the heap, and still there (free, mapped) after `del`
    assert keep["during"]["mmapped"] - keep["before"]["mmapped"] < MB
    assert keep["after"]["free_in_heap"] - keep["before"]["free_in_heap"] >= 64 * MB
    # glibc: a mapping of its own, unmapped on free
    assert glibc["during"]["mmapped"] - glibc["before"]["mmapped"] >= 64 * MB
    assert glibc["after"]["mmapped"] - glibc["before"]["mmapped"] < MB
    assert run_with(None)["mode"] == malloc.DEFAULT


def test_an_unknown_mode_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(malloc.ENV, "never")
    with pytest.raises(UserError, match=r"\$QATUNE_MALLOC='never' is not one of keep, glibc"):
        malloc.allocator_mode()


# bf16 linear layers at 100 new shapes (as packed rows of varying length give): how much the live
# heap grew over the last 30, after any cache of 64 entries would be full.
SHAPES = """
import json, torch, torch.nn.functional as F
from qatune.utils.malloc import bound_kernel_caches, heap_info
bound_kernel_caches()
torch.set_num_threads(1)
w = torch.randn(3072, 768, requires_grad=True)
def live():
    h = heap_info()
    return h["in_use"] + h["mmapped"]
for i, m in enumerate(range(200, 700, 5)):
    if i == 70:
        at_70 = live()
    x = torch.randn(m, 768, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w)
    y.float().sum().backward()
    w.grad = None
print(json.dumps({"growth": live() - at_70}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc.heap_info() is None, reason="glibc >= 2.33")
def test_bf16_matmul_caches_stop_growing_at_their_bound():
    def growth(capacity: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k not in malloc.KERNEL_CACHE_ENV}
        env |= dict.fromkeys(malloc.KERNEL_CACHE_ENV, capacity) if capacity else {}
        out = subprocess.run([sys.executable, "-c", SHAPES], capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.splitlines()[-1])["growth"]

    unbounded, bounded = growth("1024"), growth(None)  # the libraries' default, and ours
    if unbounded < 10 * MB:
        pytest.skip(f"bf16 matmuls keep no per-shape cache here (+{unbounded / MB:.1f} MB over 30 shapes)")
    assert bounded < unbounded / 4, (bounded / MB, unbounded / MB)
