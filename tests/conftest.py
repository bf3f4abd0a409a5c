"""Test setup: 8 fake CPU devices (sharding tests), a persistent compile cache, no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "tfds"))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_threefry_partitionable", True)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def tfds_dir():
    """A data_dir holding the prepared embedded dataset, shared by the whole session."""
    from hybrid_distill_jax.data.embedded import ensure_prepared

    path = os.path.abspath(os.environ["TFDS_DATA_DIR"])
    ensure_prepared(path)
    return path
