"""Shared fixtures: one embedded Ray instance on loopback for the whole session."""

from __future__ import annotations

import os

import pytest

# Before Ray starts: keep every Ray process on 127.0.0.1 (REFERENCE.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def ray_local():
    """Embedded Ray bound to loopback, dashboard off; shut down at the end of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level="ERROR",
        )
    yield ray
    ray.shutdown()


def gfootball_available() -> bool:
    try:
        import gfootball  # noqa: F401
    except ImportError:
        return False
    return True
