"""The Ray Tune trainable: the plain backend's `run_training(cfg, reporter)` on a Ray worker, reporting every epoch
to Tune and its outcome in the last report. It never touches the study: the driver's searcher is its only writer."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ackd_search.config import RunConfig, from_dict
from ackd_search.errors import one_line
from ackd_search.searching.artifacts import compact_history, trial_attrs, write_traceback
from ackd_search.searching.record import OBJECTIVE
from ackd_search.training import NonFiniteLossError, run_training
from ackd_search.training.checkpoints import NotOwner, owned, owner_token

OUTCOME = "ackd_outcome"  # key of a trial's last report: how it ended, as JSON (Tune flattens nested dicts)
NODE = "ackd_node"  # key of every report: the Ray node id the trial runs on


class TuneReporter:
    """`train`'s per-epoch hook on a worker. Every epoch goes to Tune at once except the last, which waits for the run's
    result: a scheduler may stop a trial at any report, so the final report must carry everything the study keeps."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        # Which node runs the trial: the driver names it when Ray loses the trial with it.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.last: dict[str, Any] = {"epoch": 0, OBJECTIVE: math.nan, NODE: self.node}

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        keep = ("val_loss", "lr", "images_per_s", "train_s")
        self.last = {"epoch": epoch, OBJECTIVE: metrics["val_acc"], **{k: metrics[k] for k in keep},
                     "terms": dict(metrics["terms"]), NODE: self.node}
        if epoch < self.epochs:
            tune.report(dict(self.last))

    def finish(self, outcome: dict[str, Any]) -> None:
        tune.report({**self.last, OUTCOME: json.dumps(outcome)})


def train_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: the plain backend's `train(cfg, reporter)`; a failure is reported, not raised, because Ray
    would retry a raised error and a bad config fails the same way every time (a dead worker is still retried)."""
    if "error" in config:  # the driver could not build this trial's run config
        TuneReporter(0).finish({"state": "fail", "fail_reason": config["error"]})
        return
    cfg = from_dict(RunConfig, json.loads(config["run_config"]), source=f"trial {config['optuna_trial']}")
    run_dir = Path(cfg.output_dir)
    reporter = TuneReporter(cfg.optim.epochs)
    try:
        result = run_training(cfg, reporter, identity=config.get("identity"))
    except NotOwner as err:  # a later driver re-ran this trial meanwhile: its folder is not ours to write
        reporter.finish({"state": "fail", "fail_reason": one_line(err)})
        return
    except Exception as err:
        if not isinstance(err, NonFiniteLossError):
            with contextlib.suppress(NotOwner), owned(run_dir, owner_token(config.get("identity"))):
                write_traceback(run_dir)
        reporter.finish({"state": "fail", "fail_reason": one_line(err),
                         "nonfinite": isinstance(err, NonFiniteLossError)})
        return
    # The checkpoint stays until the driver has stored the result (StudySearch._tell): a result the study could
    # not take is resumed from it, not trained again.
    reporter.finish({"state": "complete", "final_val_acc": result.final_val_acc, "attrs": trial_attrs(result),
                     "history": compact_history(result.history)})


def history_row(result: dict[str, Any]) -> dict[str, Any]:
    """One epoch of a (flattened) Tune result, in `compact_history`'s shape."""
    terms = {key.split("/", 1)[1]: value for key, value in result.items() if key.startswith("terms/")}
    return {"epoch": int(result["epoch"]), "val_acc": result[OBJECTIVE], "val_loss": result["val_loss"],
            "lr": result["lr"], "images_per_s": result["images_per_s"], "terms": terms}

