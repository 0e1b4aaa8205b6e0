"""The errors a user can cause (bad files, values, data, storage, checkpoints, a command that would lose work) and
the one-line form of any error: what the command line prints instead of a traceback. Imports nothing of the package."""

from __future__ import annotations


class ConfigError(ValueError):
    """All problems found in one config, one line each: `source: key.path: problem; allowed: ...`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(ValueError):
    """A user-facing data problem; the message is one line."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (unreadable, another run config, study or code version): one line."""


class StudyError(RuntimeError):
    """A one-line, user-facing problem with the storage or the study."""


class UsageError(ValueError):
    """A command that would overwrite or repeat finished work (an earlier export, a finished training run)."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """`TypeName: the first non-empty line of the message`, at most `limit` characters of message."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__
