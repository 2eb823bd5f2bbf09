"""Batch-sharded jit over 4 virtual CPU devices: equal results, no gathered activations."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deft_jax import _ffi


@pytest.mark.parametrize("impl", [
    None, pytest.param("fused", marks=pytest.mark.skipif(_ffi.load_blas() != "",
                                                        reason="no BLAS for the CPU fused forward"))],
    ids=["native", "cpu-fused"])
def test_batch_sharded_jit_runs_per_shard(impl):
    script = Path(__file__).with_name("sharding_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", SHARDING_IMPL=impl or "")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
