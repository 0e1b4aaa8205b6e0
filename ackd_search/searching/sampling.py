"""Like-with-like comparison of distillation methods: a pruner that compares a trial only with trials of its own
method, and a sampler that keeps every method of a space above a floor share of the trials.

Both wrap Optuna's own pruner and sampler (built by `space.make_pruner` / `space.make_sampler`) and change only
which trials they see or the one `distill.method` value; everything else is the inner object's work.

Confirmation runs (trials with the user attribute `confirms`) retrain known configurations with extra seeds: they
are never pruned, never used as a pruning reference, and do not count towards a method's share.

Why a floor of 1 / (2 M) for M methods (`default_floor`): random start-up gives every method 1 / M of the trials in
expectation; after it, TPE follows the early leader. Measured with the project's TPE on the digits space as it was
before it became ACKD-only (method ackd | kd; tests/test_sampling.py pins a smaller copy), with an objective where
ACKD scores 10 points below KD for the first 20 trials and as well after: plain TPE gave ACKD 2-8 of 40 trials
(mean 3.1 over seeds 0-7) and in 7 of 8 seeds never noticed that it had caught up (in issue #9's real run it
sampled no ACKD trial in 18 after start-up). With the floor, ACKD got >= 10 of 40 (mean 11.6), and in one seed
TPE then chose it on its own (23 of 40). Half the uninformed share keeps a slow starter sampled, from its own TPE
model (see `FairMethodSampler`), while leaving the sampler free to spend up to (M + 1) / (2 M) of the trials
(75 % for two methods) on the method it prefers. `study.method_floor` overrides it (0 turns it off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from ackd_search.searching.record import is_confirmation

METHOD_PARAM = "distill.method"

# Trials that count towards a method's share: run or running, not failed (a failed trial is retried as a new one).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def trial_method(trial: FrozenTrial, default: str) -> str:
    """The trial's `distill.method`: its parameter when the space searches it, else the space's fixed method."""
    return str(trial.params.get(METHOD_PARAM, default))


class _FilteredStorage:
    """A storage that answers `get_all_trials` with only the trials `keep` accepts and passes every other call
    (writes included) to the real storage. Filtering at the storage keeps every route Optuna reads trials by
    (`Study.get_trials`, `Study.trials`, `_get_trials(use_cache=True)`, Hyperband's bracket studies) consistent."""

    def __init__(self, storage: Any, keep: Callable[[FrozenTrial], bool]):
        self._inner = storage
        self._keep = keep

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [t for t in trials if self._keep(t)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def study_view(study: optuna.Study, keep: Callable[[FrozenTrial], bool],
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """A study object on the same storage that sees only the trials `keep` accepts (a read filter, not a copy)."""
    return optuna.study.Study(study_name=study.study_name, storage=_FilteredStorage(study._storage, keep),
                              sampler=study.sampler, pruner=pruner or optuna.pruners.NopPruner())


class MethodAwarePruner(optuna.pruners.BasePruner):
    """Prunes a trial as `inner` would in a study holding only the trials of the same `distill.method`.

    Optuna's Median/Percentile pruners read `study.get_trials(states=COMPLETE)` and `study.direction`;
    SuccessiveHalving reads `study.get_trials()` and writes its rung through `study._storage`; Hyperband builds a
    bracket study from `study.study_name` and `study._storage` and reads trials through it. The view filters at
    the storage, so all of them see only same-method, non-confirmation trials. Confirmation trials are never
    pruned. (Optuna shows Hyperband's brackets to the sampler only when `study.pruner` IS a HyperbandPruner; with
    this wrapper the sampler sees the whole study.)"""

    def __init__(self, inner: optuna.pruners.BasePruner, default_method: str = "ackd"):
        self.inner = inner
        self.default_method = default_method

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if is_confirmation(trial):
            return False
        if isinstance(self.inner, optuna.pruners.NopPruner):
            return False
        method = trial_method(trial, self.default_method)

        def same_method(other: FrozenTrial) -> bool:
            return not is_confirmation(other) and trial_method(other, self.default_method) == method

        return self.inner.prune(study_view(study, same_method, self.inner), trial)


def default_floor(n_methods: int) -> float:
    """Each of M methods keeps at least 1 / (2 M) of the trials (see the module docstring)."""
    return 1.0 / (2 * n_methods) if n_methods > 1 else 0.0


class FairMethodSampler(optuna.samplers.BaseSampler):
    """`inner`, except that a method whose share of the study's trials has fallen below `floor` is given the next
    trial: after N counted trials, each method has at least floor(floor * N) of them (one worker; with several,
    trials started at the same moment may each take the same starved method, which only raises its share).

    The override happens wherever Optuna samples `distill.method`: in `sample_relative` (multivariate TPE after its
    start-up, where the method sits in the relative search space of every trial) or in `sample_independent`
    (start-up, random, CMA-ES's categorical fallback). When the inner sampler is TPE, the relative sample of a
    forced trial is drawn from a view of the study holding only that method's trials, so its other parameters come
    from the starved method's own model rather than from the leader's good region. Presets count; confirmation
    runs and failed trials do not. `before_trial`, `after_trial` and `reseed_rng` go to the inner sampler."""

    def __init__(self, inner: optuna.samplers.BaseSampler, methods: Sequence[str], floor: float | None = None):
        self.inner = inner
        self.methods = list(methods)
        self.floor = default_floor(len(self.methods)) if floor is None else floor

    def __str__(self) -> str:
        return f"FairMethodSampler({self.inner}, floor={self.floor:.3g})"

    # --- which method is owed the next trial ---------------------------------------------------------------
    def starved_method(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        """The method furthest below its floor once this trial is counted, or None when every method is at it."""
        counts = dict.fromkeys(self.methods, 0)
        total = 0
        for other in study._storage.get_all_trials(study._study_id, deepcopy=False, states=COUNTED_STATES):
            if other.number == trial.number or is_confirmation(other) or METHOD_PARAM not in other.params:
                continue
            total += 1
            if other.params[METHOD_PARAM] in counts:
                counts[other.params[METHOD_PARAM]] += 1
        owed = math.floor(self.floor * (total + 1) + 1e-9)
        short = [(counts[m] - owed, i, m) for i, m in enumerate(self.methods) if counts[m] < owed]
        return min(short)[2] if short else None

    # --- the sampler interface -----------------------------------------------------------------------------
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if METHOD_PARAM not in search_space or self.floor <= 0:
            return self.inner.sample_relative(study, trial, search_space)
        method = self.starved_method(study, trial)
        if method is None:
            return self.inner.sample_relative(study, trial, search_space)
        source = study
        if isinstance(self.inner, optuna.samplers.TPESampler):
            source = study_view(study, lambda t: t.number == trial.number or (
                not is_confirmation(t) and t.params.get(METHOD_PARAM) == method))
        params = self.inner.sample_relative(source, trial, search_space)
        if params:  # empty: the inner sampler is in its start-up; sample_independent then sets the method
            params[METHOD_PARAM] = method
        return params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name == METHOD_PARAM and self.floor > 0:
            method = self.starved_method(study, trial)
            if method is not None:
                return method
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
