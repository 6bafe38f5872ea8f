"""Start a router: load the tokenizer, watch etcd, serve the HTTP gateway on uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

import uvicorn
from starlette.types import ASGIApp

from services.common import event_loop
from services.common.dataclass_cli import add_dataclass_args, from_args
from services.common.heap import freeze_startup_objects
from services.router.config import RouterConfig
from services.router.gateway import Gateway
from services.router.http_limits import KEEP_ALIVE_S
from services.router.http_protocol import bounded_protocol
from services.router.server import build_app
from services.router.shutdown import uvicorn_limit_s
from services.router.tokenization import Tokenizer, keep_torch_out

log = logging.getLogger("epdserve.router")

READY_PREFIX = "EPDSERVE_ROUTER_READY"  # the launcher waits for this line on stdout


def build_parser(prog: str = "epdserve router") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run the epdserve router / gateway.")
    add_dataclass_args(parser, RouterConfig)
    parser.add_argument("--log-level", default="INFO")
    return parser


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the gateway when its shutdown starts: requests in flight then
    get their grace period and a clean 503 after it (shutdown.py)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.shutdown.begin()
        await super().shutdown(sockets)


def server_config(app: ASGIApp, cfg: RouterConfig, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for the gateway: httptools with bounds on reading a request and on
    the connections open (http_protocol.py), idle connections kept KEEP_ALIVE_S."""
    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=log_level.lower(), access_log=False,
        timeout_graceful_shutdown=uvicorn_limit_s(cfg.shutdown_grace_s), http=bounded_protocol(cfg.http_limits),
        timeout_keep_alive=KEEP_ALIVE_S,
        ssl_certfile=cfg.ssl_certfile, ssl_keyfile=cfg.ssl_keyfile,
    )  # fmt: skip


def fit_open_files(max_connections: int) -> None:
    """Raise the soft open-files limit (up to the hard one) to hold ``max_connections`` plus the
    router's own files and gRPC channels: past the limit accept() fails for every client."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open-files limit %d is below --http-max-connections %d + 1024: past it "
                        "new connections fail", new, max_connections)  # fmt: skip


async def _serve_or_raise(server: uvicorn.Server, cfg: RouterConfig) -> None:
    """uvicorn ends with SystemExit when it cannot listen (it logged why: a port in use); an
    OSError instead, which main() reports in one line (SystemExit from a task escapes the
    event loop with a traceback)."""
    try:
        await server.serve()
    except SystemExit as exc:
        raise OSError(f"cannot serve on {cfg.host}:{cfg.port} (uvicorn exit {exc.code})") from None


async def serve(cfg: RouterConfig, log_level: str = "info") -> None:
    fit_open_files(cfg.http_max_connections)
    tokenizer = await asyncio.to_thread(Tokenizer.load, cfg.model)
    gateway = Gateway(cfg, tokenizer)
    server = GatewayServer(server_config(build_app(gateway), cfg, log_level), gateway)
    task = asyncio.create_task(_serve_or_raise(server, cfg))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        freeze_startup_objects()
        print(f"{READY_PREFIX} url={cfg.scheme}://{cfg.host}:{port}", flush=True)
    await task


def main(argv: list[str] | None = None, prog: str = "epdserve router") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s router %(name)s: %(message)s",
        stream=sys.stderr,
    )
    keep_torch_out()
    try:
        cfg = from_args(RouterConfig, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        event_loop.run(serve(cfg, "warning" if args.log_level.upper() != "DEBUG" else "debug"))
    except (ValueError, OSError) as exc:  # bad model path, port in use: say it in one line
        log.debug("start-up failed", exc_info=True)
        print(f"error: router failed to start: {exc}", file=sys.stderr)
        return 1
    return 0
