"""Where the operator CLI finds a local cluster's router URL and admin token.

`epdserve up` writes both into one folder, readable by the user only: ``$EPDSERVE_CONFIG_DIR``,
else ``$XDG_CONFIG_HOME/epdserve``, else ``~/.config/epdserve``. The CLI reads them when no
``--router`` / ``--admin-token`` flag or ``EPDSERVE_ROUTER`` / ``EPDSERVE_ADMIN_TOKEN`` is set.
Every `up` of a user shares that folder: the latest cluster to be ready is the one it names
(AdminFiles).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from services.common.net import open_direct

# The operator commands (admin.py runs them): here, so that `epdserve` tells one from another
# command without importing admin.py's gRPC modules.
COMMANDS = ("status", "roles", "drain", "rebalance", "policy", "experts", "models", "poison")
TOKEN_FILE = "admin-token"
ROUTER_FILE = "router-url"
DEFAULT_ROUTER = "http://127.0.0.1:8000"
# How long the CLI waits for one router's /health when `up` named several.
ROUTER_PROBE_TIMEOUT_S = 2.0


def config_dir() -> Path:
    if os.environ.get("EPDSERVE_CONFIG_DIR"):
        return Path(os.environ["EPDSERVE_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "epdserve"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (the folder 0700), replacing it atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_first_line(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip() or None
    except (OSError, IndexError):
        return None


def read_lines(path: Path) -> list[str]:
    try:
        return [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    except OSError:
        return []


def resolve_router(flag: str | None) -> str:
    """The flag's, ``EPDSERVE_ROUTER``'s, else the local cluster's router: with several
    (`up --routers N`), the first whose ``/health`` answers, so that one dead or stopped
    router does not take the CLI with it; none answering: the first."""
    chosen = flag or os.environ.get("EPDSERVE_ROUTER")
    urls = [chosen] if chosen else read_lines(config_dir() / ROUTER_FILE)
    if len(urls) > 1:
        answering = (u for u in urls if health_answers(u, ROUTER_PROBE_TIMEOUT_S))
        urls = [next(answering, urls[0])]
    return (urls[0] if urls else DEFAULT_ROUTER).rstrip("/")


def resolve_token(flag: str | None) -> str | None:
    return (
        flag or os.environ.get("EPDSERVE_ADMIN_TOKEN") or read_first_line(config_dir() / TOKEN_FILE)
    )


class AdminFiles:
    """A local cluster's admin token and router URL on disk: the token file its routers read,
    in a private folder of the cluster's own, and the CLI's pointer to it in ``folder``.

    NOTE: two `epdserve up` of one user share ``folder``. The routers read the token there,
    so a router restarted after another `up` started took that cluster's token, and found
    none once that one stopped (the restart failed). The pointer is written once the routers
    are ready (token and URL together); the cluster stopping puts back the pointer it
    replaced, if that cluster still answers to its token, rather than leave none.
    """

    def __init__(self, folder: str | None, token: str) -> None:
        self.token = token
        self._folder = Path(folder) if folder else None  # None: the private folder
        self._private: Path | None = None  # made at first use (a cluster never started
        # would leave it behind), removed by forget()
        self._replaced: tuple[list[str], str] | None = None  # the pointer before ours: URLs, token

    @property
    def private(self) -> Path:
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="epdserve-admin-"))
        return self._private

    @property
    def folder(self) -> Path:
        """Where the CLI is pointed at this cluster."""
        return self._folder or self.private

    @property
    def token_file(self) -> Path:
        """The file the routers read their admin token from."""
        return self.private / TOKEN_FILE

    def write_token(self) -> None:
        write_private(self.token_file, self.token)

    def point_cli(self, urls: list[str]) -> None:
        """Point the CLI at this cluster's router ``urls`` (every router's, in order); the
        pointer it replaces is kept."""
        old = read_lines(self.folder / ROUTER_FILE), read_first_line(self.folder / TOKEN_FILE)
        self._replaced = (old[0], old[1]) if old[0] and old[1] and old[1] != self.token else None
        write_private(self.folder / TOKEN_FILE, self.token)
        write_private(self.folder / ROUTER_FILE, "\n".join(urls))

    def forget(self) -> None:
        """Take the CLI's pointer off this cluster (if it is still ours) and remove the
        private folder. Safe to call twice."""
        if self._folder is not None and read_first_line(self._folder / TOKEN_FILE) == self.token:
            urls, token = self._replaced or ([], "")
            if any(answers(url, token) for url in urls):
                write_private(self._folder / TOKEN_FILE, token)
                write_private(self._folder / ROUTER_FILE, "\n".join(urls))
            else:
                for name in (TOKEN_FILE, ROUTER_FILE):
                    (self._folder / name).unlink(missing_ok=True)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None


def health_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the router at ``url`` answers ``GET /health`` at all (a 503 too: it is up)."""
    try:
        with open_direct(url.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


def answers(url: str, token: str, timeout: float = 2.0) -> bool:
    """Whether the router at ``url`` is up and takes ``token`` as its admin token."""
    request = urllib.request.Request(
        url.rstrip("/") + "/admin/status", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with open_direct(request, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False
