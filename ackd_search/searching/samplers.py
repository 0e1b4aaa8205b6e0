"""Optuna's samplers and pruners by the names a space file uses, our defaults on top of Optuna's, and the factories
that build them for a study (wrapped so methods are compared like with like: `sampling.py`)."""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import optuna

from ackd_search.searching.sampling import FairMethodSampler, MethodAwarePruner
from ackd_search.searching.settings import StudySettings

SAMPLERS: dict[str, Any] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
}
PRUNERS: dict[str, Any] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
# Our defaults on top of Optuna's: TPE models the conditional learner structure jointly (multivariate + group).
SAMPLER_DEFAULTS = {"tpe": {"multivariate": True, "group": True, "n_startup_trials": 5}}
PRUNER_DEFAULTS = {"median": {"n_startup_trials": 3, "n_warmup_steps": 2}}


class SearchedSpace(Protocol):
    """What the factories read of a `space.Space` (its study settings and the methods its trials use)."""

    study: StudySettings

    def methods(self) -> list[str]: ...


def make_sampler(space: SearchedSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; wrapped in `FairMethodSampler` when the space searches several methods."""
    settings, methods = space.study, space.methods()
    spec = dict(settings.sampler)
    name = spec.pop("name")
    options = {**SAMPLER_DEFAULTS.get(name, {}), **spec}
    if "seed" in inspect.signature(SAMPLERS[name]).parameters:
        options["seed"] = seed
    sampler = SAMPLERS[name](**options)
    if len(methods) > 1 and settings.method_floor != 0:
        return FairMethodSampler(sampler, methods, settings.method_floor)
    return sampler


def make_pruner(space: SearchedSpace) -> optuna.pruners.BasePruner:
    """The configured pruner, comparing a trial only with trials of its own method (never confirmation runs)."""
    spec = dict(space.study.pruner)
    name = spec.pop("name")
    inner = PRUNERS[name](**{**PRUNER_DEFAULTS.get(name, {}), **spec})
    return MethodAwarePruner(inner, default_method=space.methods()[0])
