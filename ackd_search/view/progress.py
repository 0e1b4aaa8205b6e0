"""What the user sees of a search: the teacher's and the running trial's epochs, one line per finished trial (k of N,
counts, best so far, elapsed and ETA), and the closing summary (counts, best trials or Pareto front, importances).

On a terminal the running epoch is a tqdm bar on ONE line (so an interruption message printed after a newline is
never glued to it); elsewhere (logs, CI, tests, local workers sharing a terminal) everything is plain lines."""

from __future__ import annotations

import math
import sys
import time
import weakref
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from ackd_search.notices import set_writer
from ackd_search.searching.record import (
    CONFIRMS,
    CONFIRMS_STUDY,
    bracket,
    is_interrupted,
    root_trial_number,
    stop_reason,
    trial_label,
    trial_line,
    trial_method,
)
from ackd_search.searching.space import Space
from ackd_search.view.summary import best_text

PLAIN_EPOCH_EVERY_S = 30.0  # off a terminal, an epoch line at most this often per run (and always the last epoch)
_BAR_FORMAT = "{desc} {bar:12} {n_fmt}/{total_fmt} ep{postfix}"  # tqdm prefixes a postfix with ", "
_RUN_FORMAT = "{desc} {bar:12} {n_fmt}/{total_fmt} ep [{elapsed}<{remaining}]{postfix}"  # one run: tqdm's own ETA


_OPEN_BARS: weakref.WeakSet[tqdm] = weakref.WeakSet()  # live lines on screen now (see end_live_lines)


def end_live_lines() -> bool:
    """Keep every live line on screen as it stands and end it with a newline, so that what is printed next (the
    interruption message) starts on a line of its own. Call it where KeyboardInterrupt is caught; True if it ended
    one."""
    bars = [bar for bar in list(_OPEN_BARS) if not bar.disable]  # tqdm disables a bar when it closes it
    for bar in bars:
        bar.leave = True
        bar.close()
    _OPEN_BARS.clear()
    return bool(bars)


def _above_bars(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # clears the live bar, writes the line, redraws the bar below it


def _open_bar(bar_format: str = _BAR_FORMAT, **kwargs: Any) -> tqdm:
    bar = tqdm(leave=False, bar_format=bar_format, dynamic_ncols=True, **kwargs)
    _OPEN_BARS.add(bar)
    set_writer(_above_bars)  # notices (a cache being built, ...) print above the live line, never inside it
    return bar


def _rerun_of(trial: FrozenTrial) -> int | None:
    """The trial a re-run (of an interrupted or heartbeat-failed trial) resumes; None for a new trial."""
    root = root_trial_number(trial)
    return root if root != trial.number else None


def clock(seconds: float | None) -> str:
    """1:05, 1:02:03; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _close_bar(bar: tqdm | None) -> None:
    """Close a live bar (if any) and forget it; returns None, the bar's new value."""
    if bar is not None:
        _OPEN_BARS.discard(bar)
        bar.close()


class EpochBar:
    """A reporter for one training run (`train(cfg, EpochBar(...))`): a one-line bar on a terminal, else a plain
    line at most every `every_s` seconds and at the last epoch. Used for the teacher and for long final trainings."""

    def __init__(self, desc: str, total: int, stream=None, every_s: float = PLAIN_EPOCH_EVERY_S,
                 live: bool | None = None):
        self.desc, self.total, self.stream, self.every_s = desc, total, stream or sys.stdout, every_s
        self.live = _is_tty(self.stream) if live is None else live
        self.started = time.perf_counter()
        self.last_line = -math.inf
        self.bar: tqdm | None = None

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        text = f"val_acc {metrics['val_acc']:6.2f}" if "val_acc" in metrics else ""
        if self.live:
            if self.bar is None:
                self.bar = _open_bar(_RUN_FORMAT, total=self.total, desc=self.desc, file=self.stream)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(epoch - self.bar.n)
            if epoch >= self.total:
                self.close()
            return
        now = time.perf_counter()
        if epoch >= self.total or now - self.last_line >= self.every_s:
            self.last_line = now
            elapsed = now - self.started
            eta = elapsed / epoch * (self.total - epoch) if epoch else None
            self.stream.write(f"{self.desc}: epoch {epoch}/{self.total}  {text}  elapsed {clock(elapsed)} "
                              f"eta {clock(eta)}\n")
            self.stream.flush()

    def close(self) -> None:
        self.bar = _close_bar(self.bar)


class Progress:
    """The search's progress. `start`, `epoch` and `trial_done` are called by the objective (or the Ray backend) and
    by `study.optimize`'s callback. `study` and `total` (this run's n_trials) come from the caller when it has them;
    without them N is the space's `study.n_trials` and a confirmation run is named once its trial is known."""

    def __init__(self, space: Space, stream=None, prefix: str = "", *, study: optuna.Study | None = None,
                 total: int | None = None, timeout_s: float | None = None, every_s: float = PLAIN_EPOCH_EVERY_S,
                 live: bool | None = None, costs: dict[str, list[float]] | None = None):
        self.space, self.stream, self.prefix, self.study = space, stream or sys.stdout, prefix, study
        # Local workers share one terminal: live lines of several processes would overwrite each other.
        self.live = (_is_tty(self.stream) and not prefix) if live is None else live
        self.total = total if total is not None else space.study.n_trials
        self.timeout_s = timeout_s if timeout_s is not None else space.study.timeout_s
        self.epochs = int(space.base.get("optim", {}).get("epochs", 0))
        self.every_s = every_s
        self.run_started = time.perf_counter()
        self.started: dict[int, float] = {}
        self.running: dict[int, dict[str, Any]] = {}  # trial number -> kind, counter, label, epochs
        self.search_started = 0  # search trials started in this run: "trial k/N"
        self.done = {"search": 0, "confirm": 0}
        self.last_line: dict[int, float] = {}
        self.bar: tqdm | None = None
        # Read from the study when a trial starts or ends, not per epoch (a storage query per epoch would cost a
        # tiny trial several percent of its time): counts and best search trial, confirmation runs done / queued.
        self.study_text = ""
        self.confirm_done_queued = (0, 0)
        # Seconds per epoch of finished trials, by method (shared across a process's phases): what the runs still
        # queued will cost, for the confirmation's ETA (a student-alone run is several times cheaper than ACKD's).
        self.costs = costs if costs is not None else {}
        self.unfinished: list[tuple[str, int]] = []  # (method, epochs) of confirmation runs queued or running
        self.counted: set[int] = set()

    # --- called during a trial --------------------------------------------------------------------------------
    def start(self, number: int, values: dict[str, Any]) -> None:
        self.started[number] = time.perf_counter()
        self._refresh()
        frozen = self._frozen(number)
        attrs = frozen.user_attrs if frozen is not None else {}
        confirming = CONFIRMS in attrs if frozen is not None else not values  # a confirmation run samples nothing
        rerun = frozen is not None and not confirming and _rerun_of(frozen) is not None
        if confirming:
            info = {"kind": "confirm", "counter": self._confirm_counter(running=True),
                    "epochs": int(attrs.get("confirm_epochs", self.epochs))}
        elif rerun:  # resumes an earlier trial's budget: not one of this run's N
            info = {"kind": "search", "counter": "re-run", "epochs": self.epochs, "rerun": True}
        else:
            self.search_started += 1
            info = {"kind": "search", "counter": f"{self.search_started}/{self.total or '?'}", "epochs": self.epochs}
        info["label"] = trial_label(attrs) if frozen is not None else ("confirm" if confirming else "")
        info["method"] = values.get("distill.method") or attrs.get("method") or self._fixed_method()
        self.running[number] = info
        if self.live:
            self._close_bar()
            desc = f"{self.prefix}trial {info['counter']} #{number} {info['method']}{bracket(info['label'])}"
            self.bar = _open_bar(total=info["epochs"] or None, desc=desc, file=self.stream)

    def epoch(self, number: int, epoch: int, metrics: dict[str, Any]) -> None:
        info = self.running.get(number, {"kind": "search", "label": "", "epochs": self.epochs})
        fraction = epoch / info["epochs"] if info["epochs"] else 0.0
        if self.live and self.bar is not None:
            status = f"val_acc {metrics['val_acc']:6.2f} | {self._status(info['kind'], fraction)}"
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(epoch - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last_line.get(number, self.started.get(number, now)) < self.every_s:
            return  # off a terminal a short trial shows only its finished line
        self.last_line[number] = now
        status = f"val_acc {metrics['val_acc']:6.2f} | {self._status(info['kind'], fraction)}"
        self._line(f"  #{number} epoch {epoch}/{info['epochs'] or '?'}{bracket(info['label'])}  {status}")

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.study = self.study or study
        if self.bar is not None:
            self._close_bar()
        self._refresh()
        now = time.perf_counter()
        began = self.started.pop(trial.number, None)
        seconds = now - began if began is not None else (trial.duration.total_seconds() if trial.duration else 0.0)
        info = self.running.pop(trial.number, None)
        self.last_line.pop(trial.number, None)
        a = trial.user_attrs
        kind = "confirm" if CONFIRMS in a else "search"
        rerun = kind == "search" and (info.get("rerun", False) if info else _rerun_of(trial) is not None)
        if kind == "confirm":
            counter = "c{}/{}".format(*self.confirm_done_queued)
        elif rerun:
            counter = "re-run"
        else:
            if info is None:  # a duplicate of an earlier trial: answered without training, never started
                self.search_started += 1
            counter = info["counter"] if info else f"{self.search_started}/{self.total or '?'}"
        self.done[kind] += not rerun
        reason = stop_reason(trial)
        line = (trial_line(trial, counter, seconds, (info or {}).get("method") or "")
                + f" | {self._status(kind, 0.0)}" + (f" | {reason}" if reason else ""))
        self._line(line)

    def close(self) -> None:
        """End a live line (before printing anything else, e.g. after an interruption)."""
        self._close_bar()

    # --- helpers ----------------------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        self.stream.write(self.prefix + text + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        self.bar = _close_bar(self.bar)

    def _fixed_method(self) -> str:
        method = self.space.base.get("distill", {}).get("method", "")
        return method if isinstance(method, str) else ""

    def _frozen(self, number: int) -> FrozenTrial | None:
        if self.study is None:
            return None
        try:
            storage, study_id = self.study._storage, self.study._study_id
            return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
        except Exception:  # a storage hiccup must never stop a trial for the sake of a progress line
            return None

    def _refresh(self) -> None:
        """Read the study's counts, best search trial and confirmation runs (done, queued) once."""
        if self.study is None:
            return
        try:
            trials = self.study.get_trials(deepcopy=False)
        except Exception:  # a storage hiccup must never stop a trial for the sake of a progress line
            return
        counts = {state.name: 0 for state in TrialState}
        for t in trials:
            counts[t.state.name] += 1
            self._learn_cost(t)
        confirming = CONFIRMS_STUDY in self.study.user_attrs
        runs = [t for t in trials if CONFIRMS in t.user_attrs and not is_interrupted(t)]
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in runs)
        self.confirm_done_queued = (finished, len(runs))
        self.study_text = (f"complete {counts['COMPLETE']} pruned {counts['PRUNED']} failed {counts['FAIL']} | "
                           + (f"confirmation runs done {finished}/{len(runs)}" if confirming
                              else best_text(self.study, trials)))
        self.unfinished = [(trial_method(t, self._fixed_method()), int(t.user_attrs.get("confirm_epochs", self.epochs)))
                           for t in runs if t.state in (TrialState.WAITING, TrialState.RUNNING)]

    def _learn_cost(self, trial: FrozenTrial) -> None:
        seconds, epochs = trial.user_attrs.get("wall_time_s"), len(trial.intermediate_values)
        if trial.state.is_finished() and seconds and epochs and trial.number not in self.counted:
            self.counted.add(trial.number)
            self.costs.setdefault(trial_method(trial, self._fixed_method()), []).append(seconds / epochs)

    def _seconds_per_epoch(self, method: str) -> float | None:
        own = self.costs.get(method)
        if own:
            return sum(own) / len(own)
        every = [v for values in self.costs.values() for v in values]
        return sum(every) / len(every) if every else None

    def _confirm_counter(self, running: bool) -> str:
        if self.study is None:
            return f"c{self.done['confirm'] + running}/?"
        finished, queued = self.confirm_done_queued
        return f"c{finished + running}/{queued}"

    def _status(self, kind: str, fraction: float) -> str:
        """Study counts, best search trial, this run's elapsed time and ETA (`fraction`: of the running trial)."""
        elapsed = time.perf_counter() - self.run_started
        parts = [self.study_text] if self.study_text else []
        return " | ".join(parts + [f"{clock(elapsed)} eta {clock(self._eta(kind, elapsed, fraction))}"])

    def _eta(self, kind: str, elapsed: float, fraction: float) -> float | None:
        done = self.done[kind] + fraction
        if kind == "confirm" and self.study is not None:
            # The measured cost of what is still queued, per method; the running run counts what it has left.
            costs = [self._seconds_per_epoch(method) for method, _ in self.unfinished]
            if self.unfinished and all(c is not None for c in costs):
                work = [c * epochs for c, (_, epochs) in zip(costs, self.unfinished)]
                running = max(work[:1], default=0.0) * fraction if fraction else 0.0
                return max(0.0, sum(work) - running)
            finished, queued = self.confirm_done_queued
            remaining = queued - finished - fraction
        elif kind == "confirm":
            remaining = None
        else:
            remaining = self.total - done if self.total else None
        eta = elapsed / done * remaining if remaining is not None and done > 0 else None
        if kind == "search" and self.timeout_s:
            left = max(0.0, self.timeout_s - elapsed)
            eta = left if eta is None else min(eta, left)
        return eta
