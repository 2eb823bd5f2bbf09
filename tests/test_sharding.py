"""Batch-sharded jit over 4 virtual CPU devices: equal results, no gathered activations."""

import os
import subprocess
import sys
from pathlib import Path


def test_batch_sharded_jit_runs_per_shard():
    script = Path(__file__).with_name("sharding_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
