"""The errors a user can cause (bad files, values, storage, checkpoints): printed as one line, never a traceback."""

from ackd_search.config import ConfigError
from ackd_search.data import DataError
from ackd_search.models import UnknownModelError
from ackd_search.study import StudyError
from ackd_search.trainer import CheckpointError

USER_ERRORS = (ConfigError, DataError, UnknownModelError, StudyError, CheckpointError)
