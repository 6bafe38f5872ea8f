"""The ``/metrics`` HTTP endpoint of a process's own Prometheus registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """Base of a process's metrics class: ``registry`` is set by the subclass."""

    registry: CollectorRegistry
    _server: Any = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a thread; returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
