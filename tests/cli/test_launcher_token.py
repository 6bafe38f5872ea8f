"""The admin token a local cluster generates can be passed as `--admin-token TOKEN`."""

from __future__ import annotations

import os
import re

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from tests.local_http import QuietHandler, base_url, local_http


def test_generated_admin_tokens_never_look_like_an_option(tmp_path):
    # token_urlsafe gave "-..." one time in 64: `epdserve status --admin-token -x...` then
    # failed with "expected one argument" (3 cluster tests, 1 CI run).
    for _ in range(200):
        token = LocalCluster(ClusterSpec(admin_dir=str(tmp_path))).admin_token
        assert re.fullmatch(r"[0-9a-f]{64}", token), token


def test_two_clusters_sharing_the_cli_folder_keep_their_own_tokens(tmp_path) -> None:
    """Two `epdserve up` of one user share ~/.config/epdserve. Their routers read the admin
    token there, so a router restarted after the second `up` started took its token (and
    found none once that one stopped). Each cluster's routers now read a file of its own; the
    CLI's pointer names the latest cluster ready, and goes back to the one it replaced when
    that cluster stops, if the replaced one still answers."""
    from services.cli.admin_config import resolve_router, resolve_token

    cfg = tmp_path / "cfg"
    a, b = (LocalCluster(ClusterSpec(admin_dir=str(cfg))) for _ in range(2))

    class RouterA(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            ok = self.path == "/admin/status" and (
                self.headers.get("Authorization") == f"Bearer {a.admin_token}")  # fmt: skip
            self.send_response(200 if ok else 401)
            self.end_headers()

    with local_http(RouterA) as server:
        url_a = base_url(server)
        files: list[str] = []
        try:
            for c in (a, b):
                argv = c.router_argv()
                files.append(argv[argv.index("--admin-token-file") + 1])
                c.admin_files.write_token()
            assert files[0] != files[1] and not files[0].startswith(str(cfg))
            a.admin_files.point_cli([url_a])
            b.admin_files.point_cli(["http://127.0.0.1:9"])
            assert [open(f).read().strip() for f in files] == [a.admin_token, b.admin_token]
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("EPDSERVE_CONFIG_DIR", str(cfg))
                mp.delenv("EPDSERVE_ROUTER", raising=False)
                mp.delenv("EPDSERVE_ADMIN_TOKEN", raising=False)
                assert (resolve_router(None), resolve_token(None)) == (
                    "http://127.0.0.1:9",
                    b.admin_token,
                )
                b.stop()  # A still answers: the CLI points at it again
                assert (resolve_router(None), resolve_token(None)) == (url_a, a.admin_token)
                a.stop()
                assert sorted(p.name for p in cfg.iterdir()) == []
            # B stopping after A: A no longer answers, so the pointer is removed, not put back.
            a, b = (LocalCluster(ClusterSpec(admin_dir=str(cfg))) for _ in range(2))
            a.admin_files.point_cli([url_a])
            b.admin_files.point_cli(["http://127.0.0.1:9"])
            server.shutdown()
            b.stop()
            assert sorted(p.name for p in cfg.iterdir()) == []
        finally:
            a.stop()
            b.stop()
    assert not any(os.path.exists(f) for f in files)


def test_the_cli_goes_to_a_router_that_answers(tmp_path, monkeypatch) -> None:
    """`epdserve up --routers 2` with its first router stopped (or dead): `epdserve status`
    waited 30 s for it and failed, while the second answered (user13, session 20). The
    pointer now names every router, and the CLI takes the first whose /health answers."""
    import time

    from services.cli import admin_config
    from services.cli.admin_config import resolve_router
    from services.common.net import free_port
    from tests.silent_socket import silent_listener

    class Router(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(503)  # a router without workers is still one to ask
            self.end_headers()

    monkeypatch.setenv("EPDSERVE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("EPDSERVE_ROUTER", raising=False)
    monkeypatch.setattr(admin_config, "ROUTER_PROBE_TIMEOUT_S", 0.5)
    cluster = LocalCluster(ClusterSpec(admin_dir=str(tmp_path)))
    with local_http(Router) as server, silent_listener() as port:
        live = base_url(server)
        try:
            stopped, dead = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}"
            cluster.admin_files.point_cli([stopped, dead, live])
            start = time.monotonic()
            assert resolve_router(None) == live
            assert time.monotonic() - start < 10  # the probe's timeout for the stopped one
            cluster.admin_files.point_cli([dead, stopped])  # none answers: the first
            assert resolve_router(None) == dead
            cluster.admin_files.point_cli([dead])  # one router: named without a probe
            assert resolve_router(None) == dead
            assert resolve_router("http://x:1/") == "http://x:1"  # a flag wins
        finally:
            cluster.stop()
