"""The training layer: one run (loop, captured step, checkpoints), the teacher and its output cache, and the runner
that hands a run its data and teacher. This face re-exports the public names."""

from ackd_search.errors import CheckpointError
from ackd_search.training.checkpoints import CHECKPOINT, check_owner, load_checkpoint
from ackd_search.training.device import autocast_for, describe_device, resolve_device, seed_everything
from ackd_search.training.loop import NonFiniteLossError, Reporter, RunResult, evaluate, train
from ackd_search.training.runner import distiller_for, load_teacher, run_training

__all__ = ["CHECKPOINT", "CheckpointError", "NonFiniteLossError", "Reporter", "RunResult", "autocast_for",
           "check_owner", "describe_device", "distiller_for", "evaluate", "load_checkpoint", "load_teacher",
           "resolve_device", "run_training", "seed_everything", "train"]
