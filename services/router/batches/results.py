"""Each finished line of a batch, recorded on disk before it counts.

Every run of the executor on a batch (a router that leads, for as long as it leads) appends
to its own part file, ``<dir>/results/<batch id>/<run id>.jsonl``: one ``LineResult`` per
line, flushed to disk before the line counts. A run that resumes a batch reads every part:
the custom_ids found there are done and never sent again. A line cut short by a crash is
ignored (it was never counted). Two runs that overlapped (a leader that had not yet noticed
its loss) may both have answered a line: the first record of a custom_id wins, so every
custom_id appears once in the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO

from services.router.batches.records import LineResult


class Results:
    """The part files of one batch (blocking calls: run them off the loop)."""

    def __init__(self, root: str | Path, batch_id: str) -> None:
        self.dir = Path(root) / "results" / batch_id
        self._out: IO[str] | None = None

    def read(self) -> dict[str, LineResult]:
        """custom_id -> its first recorded result, over every part."""
        found: dict[str, LineResult] = {}
        if not self.dir.is_dir():
            return found
        for part in sorted(self.dir.glob("*.jsonl")):
            for line in part.read_text(errors="replace").splitlines():
                try:
                    result = LineResult.loads(line)
                except (ValueError, TypeError):
                    continue  # NOTE: a record torn by a crash; its line was never counted
                found.setdefault(result.custom_id, result)
        return found

    def open(self, run_id: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.dir / f"{run_id}.jsonl", "a", encoding="utf-8")
        # A torn last record of an earlier run with this id must not swallow the next one.
        self._out.write("\n")

    def append(self, result: LineResult) -> None:
        """Record ``result``; it is on disk when this returns."""
        assert self._out is not None, "open() first"
        self._out.write(result.dumps() + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def remove(self) -> None:
        """Drop the parts (the batch's output files hold everything now)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()
