"""The Ray backend's searcher and scheduler on the driver: OptunaSearch over our study, keeping every epoch, the true
end state and the artifacts of each trial, with heartbeats for the running ones; and a Tune scheduler that prunes
with the study's own Optuna pruner."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ackd_search.backends.ray_trainable import OUTCOME, history_row
from ackd_search.config import RunConfig, from_dict, to_dict, with_absolute_paths
from ackd_search.errors import one_line
from ackd_search.searching.artifacts import compact_history, upload_best_weights, upload_config
from ackd_search.searching.hooks import SearchHooks
from ackd_search.searching.objective import claim, frozen, record_curve, set_aside_foreign_checkpoint, trial_identity
from ackd_search.searching.record import OBJECTIVE, StudyPaths, root_trial_number
from ackd_search.searching.space import Space
from ackd_search.searching.study import rerun_later
from ackd_search.searching.trial_loop import fail_stale, is_rerun, rerun_is_next, tell
from ackd_search.training import CHECKPOINT
from ackd_search.training.checkpoints import OWNER_KEY, NotOwner, owned


class StudySearch(OptunaSearch):
    """OptunaSearch over our study, keeping what plain OptunaSearch drops: every epoch (the last included) as an
    intermediate value, the true end state (PRUNED when a scheduler stopped it, FAIL with a reason), attrs and
    artifacts."""

    def __init__(self, space: Space, study: optuna.Study, storage: RDBStorage, paths: StudyPaths, hooks: SearchHooks,
                 timeout_s: float | None = None, root: Path | None = None, n_trials: int | None = None):
        self.space, self.paths, self.hooks = space, paths, hooks
        self.root = root or Path.cwd()
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.budget, self.started_new = n_trials, 0  # new trials this run; re-runs of earlier ones come free
        self._history: dict[str, dict[int, dict[str, Any]]] = {}
        self._run_dirs: dict[str, Path] = {}
        self._owners: dict[str, str] = {}  # Tune trial id -> the owner token of its Optuna trial's run folder
        self.attempts: dict[str, list[dict[str, Any]]] = {}  # Tune trial id -> its lost attempts (Ray retried them)
        # Tune sees one metric; the study's own directions (one or two objectives) decide what is stored.
        super().__init__(space=space.suggest, metric=OBJECTIVE, mode="max", sampler=study.sampler,
                         study_name=study.study_name, storage=storage)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    # --- asking ---------------------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return Searcher.FINISHED  # like Optuna's timeout: start nothing new, let running trials finish
        self.heartbeat()  # ours are fresh, so only trials of dead workers or drivers count as stale
        fail_stale(self.study)
        if self.budget is not None and self.started_new >= self.budget and not rerun_is_next(self.study):
            return Searcher.FINISHED
        with warnings.catch_warnings():  # heartbeats come from this driver (see `heartbeat`), not from optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            super().suggest(trial_id)  # asks (enqueued presets and retries first) and samples through space.suggest
        ot_trial = self._ot_trials[trial_id]
        values = dict(ot_trial.params)
        record = frozen(ot_trial)
        self.started_new += not is_rerun(record)
        root = root_trial_number(record)
        run_dir = self.paths.run_dir(root)
        self._run_dirs[trial_id] = run_dir
        self.heartbeat([trial_id])
        self.hooks.trial_started(ot_trial.number, values)
        config: dict[str, Any] = {"optuna_trial": ot_trial.number}
        try:
            # Ray workers run in their own folders (maybe on other machines): every relative path is resolved here,
            # against the driver's folder, so the files land where the plain backend puts them.
            cfg = self.space.run_config(values, output_dir=str(run_dir))
            cfg = from_dict(RunConfig, with_absolute_paths(to_dict(cfg), self.root), source=self.space.source)
        except Exception as err:
            config["error"] = one_line(err)
            return config
        token = self._owners[trial_id] = claim(ot_trial, run_dir)
        with owned(run_dir, token):
            upload_config(ot_trial, cfg, run_dir, self.paths)
            set_aside_foreign_checkpoint(ot_trial, run_dir, trial_identity(ot_trial, root))
        config["run_config"] = json.dumps(to_dict(cfg))
        # Ray's own retries of this trial (a lost node) run as the same attempt: the same owner token.
        config["identity"] = {**trial_identity(ot_trial, root), OWNER_KEY: token}
        return config

    # --- per-epoch results ----------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.record(trial_id, result)

    def record(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Store a reported epoch as an intermediate value (the whole curve is an artifact at the end); False when
        not a new epoch."""
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return False
        epoch = int(result.get("epoch", 0))
        history = self._history.setdefault(trial_id, {})
        if epoch < 1 or epoch in history:  # epoch 0: failed before any epoch; repeats: Tune's closing duplicate
            return False
        history[epoch] = history_row(result)
        storage_id = self._ot_trials[trial_id]._trial_id
        # Through the storage: `Trial.report` refuses multi-objective studies, but their curves are worth keeping.
        self.study._storage.set_trial_intermediate_value(storage_id, epoch, float(result[OBJECTIVE]))
        return True

    def curve(self, trial_id: str) -> list[dict[str, Any]]:
        history = self._history.get(trial_id, {})
        return compact_history([history[epoch] for epoch in sorted(history)])

    def should_prune(self, trial_id: str, pruner: optuna.pruners.BasePruner) -> bool:
        ot_trial = self._ot_trials[trial_id]
        return pruner.prune(self.study, self.study._storage.get_trial(ot_trial._trial_id))

    # --- the end of a trial ---------------------------------------------------------------------------------
    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials or error:
            return  # an error is told by `fail`, which the callback calls next with the reason
        if not result:
            self.fail(trial_id, "stopped by Ray Tune before it reported an epoch", interrupted=True)
            return
        try:
            self.record(trial_id, result)  # the report that made a scheduler stop the trial reaches only here
            outcome = json.loads(result[OUTCOME]) if OUTCOME in result else None
            if outcome is None:
                self._finish_pruned(trial_id)
            elif outcome["state"] == "complete":
                self._finish_complete(trial_id, outcome)
            elif outcome.get("nonfinite") and not self.space.multi_objective:
                self._finish_pruned(trial_id, outcome["fail_reason"])  # as the plain backend: diverged = pruned
            else:
                self.fail(trial_id, outcome["fail_reason"])
        except Exception as err:
            self.fail(trial_id, f"recording the result failed: {one_line(err)}")

    def _finish_complete(self, trial_id: str, outcome: dict[str, Any]) -> None:
        ot_trial, run_dir = self._ot_trials[trial_id], self._run_dirs[trial_id]
        attrs = {**outcome["attrs"], **self._attempt_attrs(trial_id, outcome["attrs"].get("wall_time_s"))}
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
        with owned(run_dir, self._owners.get(trial_id)):
            record_curve(ot_trial, outcome["history"], run_dir, self.paths, self.hooks)
            upload_best_weights(ot_trial, self.space.multi_objective, outcome["final_val_acc"], run_dir, self.paths)
        values: float | list[float] = outcome["final_val_acc"]
        if self.space.multi_objective:
            values = [outcome["final_val_acc"], float(attrs[self.space.study.second_objective])]
        self._tell(trial_id, TrialState.COMPLETE, values)

    def _finish_pruned(self, trial_id: str, reason: str | None = None) -> None:
        ot_trial, run_dir = self._ot_trials[trial_id], self._run_dirs[trial_id]
        ot_trial.set_user_attr("prune_reason", reason or f"stopped by the Ray scheduler after epoch "
                               f"{max(self._history.get(trial_id, {0: None}))}")
        if reason:
            ot_trial.set_user_attr("fail_reason", reason)
        for key, value in self._attempt_attrs(trial_id).items():
            ot_trial.set_user_attr(key, value)
        with owned(run_dir, self._owners.get(trial_id)):
            record_curve(ot_trial, self.curve(trial_id), run_dir, self.paths, self.hooks)
        self._tell(trial_id, TrialState.PRUNED)

    def fail(self, trial_id: str, reason: str, interrupted: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            ot_trial.set_user_attr("fail_reason", reason)
            for key, value in self._attempt_attrs(trial_id).items():
                ot_trial.set_user_attr(key, value)
            if interrupted:  # `requeue_interrupted` re-runs it next time, resuming its checkpoint
                ot_trial.set_user_attr("interrupted", True)
        self._tell(trial_id, TrialState.FAIL)

    # --- attempts Ray lost and retried ----------------------------------------------------------------------
    def attempt_lost(self, trial_id: str, reason: str, wall_s: float) -> int:
        """Ray retries `trial_id` after its worker or node was lost: keep the attempt. Returns the attempts so far."""
        lost = self.attempts.setdefault(trial_id, [])
        lost.append({"attempt": len(lost) + 1, "reason": reason, "wall_time_s": round(wall_s, 3)})
        return len(lost)

    def requeue(self, trial_id: str, max_retry: int) -> int | None:
        """Queue a trial Ray gave up on again (`study.rerun_later`): this run or the next resumes it."""
        ot_trial = self._ot_trials.get(trial_id)
        return rerun_later(self.study, frozen(ot_trial), max_retry) if ot_trial is not None else None

    def _attempt_attrs(self, trial_id: str, last_wall_s: float | None = None) -> dict[str, Any]:
        """What a trial Ray retried records: its attempts, each lost one's reason and wall time, and its wall time
        over every attempt (not the last one's alone)."""
        lost = self.attempts.get(trial_id)
        if not lost:
            return {}
        walls = [a["wall_time_s"] for a in lost] + ([last_wall_s] if last_wall_s is not None else [])
        attrs: dict[str, Any] = {"attempts": len(lost) + 1, "lost_attempts": lost,
                                 "attempt_wall_times_s": walls}
        if last_wall_s is not None:
            attrs["wall_time_s"] = round(sum(walls), 3)
        return attrs

    def fail_unfinished(self, reason: str) -> None:
        """After the Tune run: no trial of ours may stay RUNNING in the study (Ctrl-C, a stopped run, ...)."""
        for trial_id in list(self._ot_trials):
            self.fail(trial_id, reason, interrupted=True)

    def _tell(self, trial_id: str, state: TrialState, values: float | list[float] | None = None) -> None:
        ot_trial = self._ot_trials[trial_id]
        try:
            ended = tell(self.study, ot_trial, state if state != TrialState.COMPLETE else None, values)
        except NotOwner:  # already failed as stale by another process, which re-runs it
            self._completed_trials.add(trial_id)
            return
        self._completed_trials.add(trial_id)
        if ended.state in (TrialState.COMPLETE, TrialState.PRUNED):  # told: nothing left to resume
            run_dir = self._run_dirs.get(trial_id)
            with contextlib.suppress(NotOwner, OSError), owned(run_dir, self._owners.get(trial_id)):
                if run_dir is not None:
                    (run_dir / CHECKPOINT).unlink(missing_ok=True)
        self.hooks.trial_finished(self.study, ended)

    def heartbeat(self, trial_ids: list[str] | None = None) -> None:
        """Heartbeats of our running trials, from the driver: a SIGKILLed driver's trials go stale and are retried."""
        storage = self.study._storage
        if not is_heartbeat_enabled(storage):
            return
        for trial_id in trial_ids if trial_ids is not None else list(self._ot_trials):
            if trial_id not in self._completed_trials:
                storage.record_heartbeat(self._ot_trials[trial_id]._trial_id)

    def save(self, checkpoint_path: str) -> None:
        """The study is this searcher's durable state; running the command again resumes it (no Tune restore)."""

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("resume a Ray search by running the same command again; the study holds its state")

    def __reduce__(self):
        # Tune pickles its searcher into the experiment folder (tuner.pkl) at the start: the study storage, and
        # its URL with any password, stays out of it. Nothing restores it (`restore` above).
        return (_Unpickled, ("StudySearch",))


class _Unpickled:
    """What Tune's experiment files hold in place of a searcher or callback bound to the study."""

    def __init__(self, name: str):
        self.name = name


# --- schedulers and callbacks ------------------------------------------------------------------------------------


class PrunerScheduler(FIFOScheduler):
    """A Tune scheduler that asks the study's own Optuna pruner after every epoch, so a Ray search prunes with the
    same rule (median, percentile, ...) and warm-up as the plain backend."""

    def __init__(self, searcher: StudySearch, pruner: optuna.pruners.BasePruner):
        super().__init__()
        self.searcher, self.pruner = searcher, pruner

    def __reduce__(self):
        return (_Unpickled, ("PrunerScheduler",))

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        new_epoch = self.searcher.record(trial.trial_id, result)
        if new_epoch and OUTCOME not in result and self.searcher.should_prune(trial.trial_id, self.pruner):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

