"""The cache of large CPU output buffers behind accel's bandwidth-bound kernels."""
import os
import subprocess
import sys

import torch

from accel.memory import cpu_cache_stats, empty_cpu_cache
from accel.ops import dilated_conv1d


def _big_conv():
    x = torch.randn(1, 64, 65536)  # 16 MiB output: served by the cache
    w = torch.randn(64, 1, 3)
    return x, w


def test_freed_output_is_reused_and_results_are_exact():
    x, w = _big_conv()
    y1 = dilated_conv1d(x, w, groups=64)
    ref = y1.clone()
    del y1
    before = cpu_cache_stats()
    assert before["cached_bytes"] >= 16 << 20
    y2 = dilated_conv1d(x, w, groups=64)
    after = cpu_cache_stats()
    assert after["hits"] == before["hits"] + 1
    assert torch.equal(y2, ref)  # a reused block is fully overwritten


def test_outputs_are_ordinary_tensors():
    x, w = _big_conv()
    y = dilated_conv1d(x, w, groups=64)
    head = y.reshape(-1)[:1000].clone()
    y.resize_(1, 64, 70000)  # storage from the cache is resizable; the data is kept
    assert torch.equal(y.reshape(-1)[:1000], head)
    y.add_(1.0)
    z = y.to(torch.float64)
    assert z.dtype == torch.float64
    del y, z
    empty_cpu_cache()
    assert cpu_cache_stats()["cached_bytes"] == 0


def test_cache_can_be_disabled():
    code = (
        "import torch; from accel.ops import dilated_conv1d; from accel.memory import cpu_cache_stats;"
        "x=torch.randn(1,64,65536); w=torch.randn(64,1,3);"
        "y=dilated_conv1d(x,w,groups=64); del y; print(cpu_cache_stats()['cached_bytes'])"
    )
    env = dict(os.environ, ACCEL_CPU_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
