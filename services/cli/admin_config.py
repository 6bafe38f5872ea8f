"""Where the operator CLI finds a local cluster's router URL and admin token.

`epdserve up` writes both into one folder, readable by the user only: ``$EPDSERVE_CONFIG_DIR``,
else ``$XDG_CONFIG_HOME/epdserve``, else ``~/.config/epdserve``. The CLI reads them when no
``--router`` / ``--admin-token`` flag or ``EPDSERVE_ROUTER`` / ``EPDSERVE_ADMIN_TOKEN`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_FILE = "admin-token"
ROUTER_FILE = "router-url"
DEFAULT_ROUTER = "http://127.0.0.1:8000"


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


def resolve_router(flag: str | None) -> str:
    return (
        flag
        or os.environ.get("EPDSERVE_ROUTER")
        or read_first_line(config_dir() / ROUTER_FILE)
        or DEFAULT_ROUTER
    ).rstrip("/")


def resolve_token(flag: str | None) -> str | None:
    return (
        flag or os.environ.get("EPDSERVE_ADMIN_TOKEN") or read_first_line(config_dir() / TOKEN_FILE)
    )
