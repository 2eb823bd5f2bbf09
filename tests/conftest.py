import jax
import numpy as np
import pytest

# float64 parity needs x64; every test module shares the process.
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng(request):
    # Fresh inputs per test, reproducible from the test's name.
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
