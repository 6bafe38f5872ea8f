"""A /v1/files upload streamed to disk: the body goes to a temporary file as it arrives (cut
off past the size limit), its multipart form is split from there with the file's part
written to a file of its own, and the lines are checked one at a time (validate.py), so
the router never holds more of an upload than a chunk and a line.

NOTE: the temporary files live in the files folder (named ``.upload-*``, which no file id
matches), so the checked file is renamed into place on the same file system; ``Upload``
removes what is left of them however the request ends.
"""

from __future__ import annotations

import email.parser
import email.policy
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from services.router.errors import bad_request

CHUNK = 1 << 16
MAX_PART_HEADERS = 16 * 1024  # bytes of one part's headers
MAX_FIELD = 4096  # bytes of a form field other than the file (``purpose``)
# Parts of one form (it needs two: ``file`` and ``purpose``). NOTE: each part's headers cost
# a pure-Python parse (~0.1 ms), and a 64 MiB body holds a million tiny parts.
MAX_PARTS = 16
_UNREADABLE = "the multipart body could not be read"


class Upload:
    """The temporary files of one upload; a context manager that removes them at exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []

    def new_path(self) -> Path:
        path = self.folder / f".upload-{uuid.uuid4().hex}"
        self.paths.append(path)
        return path

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


async def receive(chunks: AsyncIterator[bytes], path: Path, max_bytes: int) -> None:
    """Write the body's ``chunks`` to ``path``; a 400 (``file_too_large``) past ``max_bytes``.
    NOTE: blocking writes of at most a chunk each, on the event loop: a chunk is what the
    server read from the socket, so each write is short."""
    size = 0
    with open(path, "wb") as f:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise bad_request(f"the upload exceeds the limit of {max_bytes} bytes",
                                  param="file", code="file_too_large")  # fmt: skip
            f.write(chunk)


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a ``multipart/form-data`` content type; 400 without one."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("the body must be multipart/form-data with 'file' and 'purpose'")
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    msg = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head)
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise bad_request(_UNREADABLE)
    return boundary.encode("latin-1")


def _read(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def split_form(
    body: Path, boundary: bytes, file_path: Path
) -> tuple[dict[str, bytes], str | None, bool]:
    """Split the multipart ``body``: the fields other than ``file`` (at most MAX_FIELD bytes
    each), the file part's file name, and whether there was a file part (its bytes go to
    ``file_path``). Blocking; 400 when the body is not a well-formed form."""
    delim = b"--" + boundary
    sep = b"\r\n" + delim
    chunks = _read(body)
    buf = b""

    def more() -> bool:
        nonlocal buf
        chunk = next(chunks, b"")
        buf += chunk
        return bool(chunk)

    while (i := buf.find(delim)) < 0:  # the preamble, up to the first delimiter
        buf = buf[-len(delim) :]
        if not more():
            raise bad_request(_UNREADABLE)
    buf = buf[i + len(delim) :]
    fields: dict[str, bytes] = {}
    filename, has_file = None, False
    for _ in range(MAX_PARTS + 1):
        while len(buf) < 2 and more():
            pass
        if buf.startswith(b"--"):
            return fields, filename, has_file  # the closing delimiter
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_PART_HEADERS or not more():
                raise bad_request(_UNREADABLE)
        head = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(
            buf[:end].lstrip(b"\r\n") + b"\r\n\r\n"
        )
        name = head.get_param("name", header="content-disposition")
        buf = buf[end + 4 :]
        is_file = name == "file"
        out = open(file_path, "wb") if is_file else None  # noqa: SIM115 - closed below
        kept = b""
        try:
            while (j := buf.find(sep)) < 0:  # the part's content, up to the next delimiter
                ready, buf = buf[: -len(sep)] if len(buf) > len(sep) else b"", buf[-len(sep) :]
                if out is not None:
                    out.write(ready)
                elif len(kept) + len(ready) <= MAX_FIELD:
                    kept += ready
                if not more():
                    raise bad_request(_UNREADABLE)
            if out is not None:
                out.write(buf[:j])
            else:
                kept += buf[:j]
        finally:
            if out is not None:
                out.close()
        buf = buf[j + len(sep) :]
        if is_file:
            has_file, filename = True, head.get_filename()
        elif isinstance(name, str) and len(kept) <= MAX_FIELD:
            fields[name] = kept
    raise bad_request(f"the multipart body has more than {MAX_PARTS} parts")


def lines_of(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` (without their ends), one at a time."""
    with open(path, "rb") as f:
        for raw in f:
            yield raw.rstrip(b"\r\n")
