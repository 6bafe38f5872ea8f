"""Files of the Batch APIs under the batch directory (``--batch-dir``): the uploaded input
JSONL and the output / error / results files the executor writes.

``<dir>/files/<id>`` holds a file's bytes and ``<dir>/files/<id>.json`` its OpenAI file
object; both are written to a temporary name, flushed to disk and renamed, so a router killed
mid-write leaves either the whole file or none. Every router of a cluster must see the same
directory (one volume, ReadWriteMany with several replicas): the leader writes outputs that
another router may serve.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")  # NOTE: ids name paths: nothing else passes


def sync_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all, on disk when this returns."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def sync_move(src: Path, path: Path) -> None:
    """``src`` (a file on the same file system) renamed to ``path``, on disk when this
    returns."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, path)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


class FileStore:
    """The files folder of one batch directory (blocking calls: run them off the loop)."""

    def __init__(self, root: str | Path, retention_s: float = 0.0) -> None:
        self.root = Path(root)
        self.retention_s = retention_s  # files go this long after they were made; 0: kept
        self.dir = self.root / "files"
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id() -> str:
        return f"file-{uuid.uuid4().hex}"

    def create(
        self, content: bytes, filename: str, purpose: str, file_id: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Store ``content``; its file object (with its ``owner``: see ``public``).
        ``file_id``: a chosen id (an output file named after its batch, so a second writer
        replaces it instead of adding another)."""
        file_id = file_id or self.new_id()
        sync_write(self.dir / file_id, content)
        return self._describe(file_id, len(content), filename, purpose, owner)

    def adopt(self, path: Path, filename: str, purpose: str, owner: str | None) -> dict[str, Any]:
        """``create`` for content already in ``path`` (a file in this folder: moved, not
        copied; an upload streamed to disk, upload.py)."""
        file_id = self.new_id()
        size = path.stat().st_size
        sync_move(path, self.dir / file_id)
        return self._describe(file_id, size, filename, purpose, owner)

    def _describe(
        self, file_id: str, size: int, filename: str, purpose: str, owner: str | None
    ) -> dict[str, Any]:
        """Write the file object of the stored ``file_id``; it."""
        now = int(time.time())
        expires = now + int(self.retention_s) if self.retention_s else None  # retention.py
        meta = {
            "id": file_id, "object": "file", "bytes": size, "created_at": now,
            "filename": filename, "purpose": purpose, "status": "processed",
            "status_details": None, "expires_at": expires, "owner": owner,
        }  # fmt: skip
        sync_write(self.dir / f"{file_id}.json", json.dumps(meta).encode())
        return meta

    def get(self, file_id: str) -> dict[str, Any] | None:
        """The file object, or None (no such file, or not a file id)."""
        if not _ID.match(file_id):
            return None
        try:
            return json.loads((self.dir / f"{file_id}.json").read_bytes())
        except (OSError, ValueError):
            return None

    def read(self, file_id: str) -> bytes | None:
        if self.get(file_id) is None:
            return None
        try:
            return (self.dir / file_id).read_bytes()
        except OSError:
            return None

    @staticmethod
    def public(meta: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI file object: without the owner (who may read it) kept beside it."""
        return {k: v for k, v in meta.items() if k != "owner"}

    def list(self, owner: str | None, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every file object of ``owner`` (of ``purpose``), newest first."""
        out = [m for m in self.all()
               if m.get("owner") == owner and purpose in (None, m.get("purpose"))]  # fmt: skip
        out.sort(key=lambda m: (m.get("created_at", 0), m["id"]), reverse=True)
        return out

    def all(self) -> builtins.list[dict[str, Any]]:
        """Every file object, whoever owns it, in no order."""
        out = []
        for meta_path in self.dir.glob("file-*.json"):
            try:
                out.append(json.loads(meta_path.read_bytes()))
            except (OSError, ValueError):
                continue
        return out

    def remove_temporaries(self, older_than: float) -> int:
        """Delete the temporary files (an upload's ``.upload-*``, a write's ``.*.tmp``) last
        written before ``older_than`` (unix seconds): a router killed mid-request leaves
        them, and nothing else ever would; how many."""
        removed = 0
        for path in [*self.dir.glob(".upload-*"), *self.dir.glob(".*.tmp")]:
            try:
                if path.stat().st_mtime < older_than:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # its request ended since
                continue
        return removed

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        for path in (self.dir / f"{file_id}.json", self.dir / file_id):
            path.unlink(missing_ok=True)
        return True
