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


class ModelError(ValueError):
    """A model the user named cannot be built (bad builder, no network for weights, no classifier): one line."""


class UnknownModelError(ModelError):
    """The model name itself is invalid (unknown, misspelt, a missing file or function)."""


class WeightsError(ValueError):
    """A weights file that cannot be read as a state dict, or does not fit the model: one line."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (unreadable, another run config, study or code version): one line."""


class StudyError(RuntimeError):
    """A one-line, user-facing problem with the storage or the study."""


class UsageError(ValueError):
    """A command that would overwrite or repeat finished work (an earlier export, a finished training run)."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """`TypeName: the first non-empty line of the message`: a line longer than `limit` is cut to its first sentence,
    or at a word boundary, never mid-word (library messages run to paragraphs)."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if len(text) > limit:
        sentence = text.split(". ", 1)[0]
        text = sentence if len(sentence) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
