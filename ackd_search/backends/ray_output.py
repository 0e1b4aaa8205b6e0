"""What Ray prints on the driver's terminal while a search runs: a lost node's dump (the raylet's last 20 log lines,
the GCS's own error lines) is dropped, and so is the traceback a worker of that node prints as Ray's SIGTERM
handler stops it (`Exception ignored in: ...` ending in `SystemExit`), because the search says the loss in one line
of its own (`StudyCallback`). Everything else, the trials' own lines and tracebacks included, passes through."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
from collections.abc import Iterator

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's prefixes for lines of its own processes, as its log monitor and error listener print them.
RAY_INTERNAL = re.compile(r"^\((raylet|gcs_server|pid=gcs_server|pid=raylet|autoscaler|monitor)[^)]*\)")
# A line a worker process printed: `(train_trial pid=7290) text`, `(pid=7290, ip=10.0.0.2) text`.
WORKER_LINE = re.compile(r"^(\([^)]*pid=\d+[^)]*\)) ?(.*)$")
# The last line of a traceback: the exception's name, then its message.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: |$)")
HELD_LINES_MAX = 60  # a block longer than this is no SIGTERM traceback: let it through


class RayDumpFilter(io.TextIOBase):
    """A text stream that drops Ray's internal lines (and their indented continuations), and a stopped worker's
    `SystemExit` traceback, on their way to `target`."""

    def __init__(self, target):
        super().__init__()
        self.target, self.pending, self.dropping = target, "", False
        self.held: dict[str, list[str]] = {}  # worker prefix -> the lines of an `Exception ignored` block so far
        self.lock = threading.Lock()  # Ray's listener threads and the search write at once

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self._line(line)
            if "\r" in self.pending:  # a live line redrawn in place: never held back
                self.target.write(self.pending)
                self.pending = ""
        return len(text)

    def _line(self, line: str) -> None:
        plain = ANSI.sub("", line)
        if RAY_INTERNAL.match(plain):
            self.dropping = True
            return
        if self.dropping and (not plain.strip() or plain[:1].isspace()):
            return
        self.dropping = False
        worker = WORKER_LINE.match(plain)
        if worker is None:
            self.target.write(line + "\n")
            return
        prefix, body = worker.groups()
        if prefix not in self.held:
            if body.startswith("Exception ignored in"):
                self.held[prefix] = [line]
            else:
                self.target.write(line + "\n")
            return
        block = self.held[prefix]
        block.append(line)
        ended = bool(body) and not body.startswith("Traceback") and EXCEPTION_LINE.match(body) is not None
        if ended or len(block) > HELD_LINES_MAX:
            del self.held[prefix]
            if not (ended and body.startswith("SystemExit")):  # only Ray's stop of the worker is dropped
                self.target.write("\n".join(block) + "\n")

    def release(self) -> None:
        """Whatever is still held or pending goes out (the search is over)."""
        with self.lock:
            for block in self.held.values():
                self.target.write("\n".join(block) + "\n")
            self.held.clear()
            if self.pending:
                self.target.write(self.pending + "\n")
                self.pending = ""

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.target, "encoding", "utf-8")


@contextlib.contextmanager
def without_ray_dumps() -> Iterator[None]:
    """Filter this process's stdout and stderr (Ray's listener threads look them up on each print)."""
    out, err = RayDumpFilter(sys.stdout), RayDumpFilter(sys.stderr)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            yield
        finally:
            for stream in (out, err):
                stream.release()
                stream.flush()
