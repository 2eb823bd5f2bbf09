import os
import pathlib
import secrets
import sys
import zlib

import jax
import numpy as np
import pytest

# examples/ is user code to copy, not a package: its modules (resnet, data, train) are imported by
# name, as examples/train.py imports its neighbours.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

# float64 parity needs x64; every test module shares the process.
jax.config.update("jax_enable_x64", True)


# Fresh inputs every session, reproducible: each test's generator is seeded from this session
# seed and the test's id; the header prints the seed, DEFT_TEST_SEED=<it> replays a session
# (with pytest-xdist, the controller's seed reaches the workers through the environment).
SESSION_SEED = int(os.environ.setdefault("DEFT_TEST_SEED", str(secrets.randbits(32))))


def pytest_report_header(config):
    return f"deft_jax test inputs: DEFT_TEST_SEED={SESSION_SEED} replays this session's"


def pytest_terminal_summary(terminalreporter):
    # Also under -q, which hides the header.
    terminalreporter.write_line(f"DEFT_TEST_SEED={SESSION_SEED} replays this session's inputs")


@pytest.fixture
def rng(request):
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture
def on_cpu():
    """Run the test's computations and lowerings on the CPU whatever jax's default backend (for
    tests of the CPU route: on a GPU machine they would otherwise test the GPU's route)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield
