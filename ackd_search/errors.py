"""The errors a user can cause (bad files, values, storage, checkpoints, a command that would lose work): printed
as one line, never a traceback."""

from ackd_search.config import ConfigError
from ackd_search.data import DataError
from ackd_search.models import UnknownModelError
from ackd_search.storage import StudyError
from ackd_search.trainer import CheckpointError


class UsageError(ValueError):
    """A command that would overwrite or repeat finished work (an earlier export, a finished training run)."""


USER_ERRORS = (ConfigError, DataError, UnknownModelError, StudyError, CheckpointError, UsageError)
