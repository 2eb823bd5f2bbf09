import pathlib
import sys

import jax
import numpy as np
import pytest

# examples/ is user code to copy, not a package: its modules (resnet, data, train) are imported by
# name, as examples/train.py imports its neighbours.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

# float64 parity needs x64; every test module shares the process.
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng(request):
    # Fresh inputs per test, reproducible from the test's name.
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture
def on_cpu():
    """Run the test's computations and lowerings on the CPU whatever jax's default backend (for
    tests of the CPU route: on a GPU machine they would otherwise test the GPU's route)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield
