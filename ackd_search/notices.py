"""One-line notices the product prints on stderr (a cache being built, a capture falling back to eager, weights a
model starts from): written through a function the terminal's view may replace, so a notice never lands inside
a live progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_writer: Callable[[str], None] = _to_stderr
_said: set[str] = set()


def notice(text: str, once: bool = False) -> None:
    """`ackd-search: text` on its own line; with `once`, only the first time this process says it (a setting that
    holds for every trial, said once, not before each of them)."""
    if once:
        if text in _said:
            return
        _said.add(text)
    _writer(f"ackd-search: {text}")


def set_writer(writer: Callable[[str], None] | None) -> None:
    """Route notices through `writer` (None: plain stderr again)."""
    global _writer
    _writer = writer or _to_stderr
