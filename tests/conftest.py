"""Shared pytest set-up."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU")
    config.addinivalue_line("markers", "slow: slower integration tests (still run by `make test`)")
    config.addinivalue_line("markers", "entry: runs a real experiment script on tiny sizes")


def _has_gpu() -> bool:
    import jax

    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none present); CPU covers the same code in interpret mode")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled-program caches after each test module. One pytest process compiles
    thousands of XLA:CPU executables over the suite; each keeps memory mappings alive, and past a
    few thousand modules' worth the process hit the kernel's map limit and aborted inside XLA's
    compiler (seen twice, in different tests, late in the suite)."""
    yield
    import jax

    jax.clear_caches()
