"""The admin token a local cluster generates can be passed as `--admin-token TOKEN`."""

from __future__ import annotations

import os
import re

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster


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
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from services.cli.admin_config import resolve_router, resolve_token

    cfg = tmp_path / "cfg"
    a, b = (LocalCluster(ClusterSpec(admin_dir=str(cfg))) for _ in range(2))

    class RouterA(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            ok = self.path == "/admin/status" and (
                self.headers.get("Authorization") == f"Bearer {a.admin_token}")  # fmt: skip
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), RouterA)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url_a = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        files = []
        for c in (a, b):
            argv = c.router_argv()
            files.append(argv[argv.index("--admin-token-file") + 1])
            c.admin_files.write_token()
        assert files[0] != files[1] and not files[0].startswith(str(cfg))
        a.admin_files.point_cli(url_a)
        b.admin_files.point_cli("http://127.0.0.1:9")
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
        a.admin_files.point_cli(url_a)
        b.admin_files.point_cli("http://127.0.0.1:9")
        server.shutdown()
        b.stop()
        assert sorted(p.name for p in cfg.iterdir()) == []
    finally:
        server.shutdown()
        a.stop()
        b.stop()
    assert not any(os.path.exists(f) for f in files)
