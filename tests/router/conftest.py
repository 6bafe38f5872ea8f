"""Fixtures shared by the router tests."""

from __future__ import annotations

import pytest

from services.common.etcd_server import EtcdServer


@pytest.fixture(scope="module")
def etcd():
    """A real etcd on free loopback ports, one for the tests of a module."""
    with EtcdServer() as server:
        yield server
