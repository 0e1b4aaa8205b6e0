"""Confirmation: the search's best distinct configurations and the baselines (student alone, KD, DKD, `reference`)
retrained with fresh seeds, and the winner chosen by the mean over those seeds.

A single-seed short run often picks noise. Each candidate is trained again with `study.confirm.seeds` seeds that
no search trial used (the same seeds for every candidate, so differences are paired by seed), for
`study.confirm.epochs` epochs (default: the trial budget). The runs are trials of a sibling study,
`<study>-confirm`, tagged `confirms`: they resume after a crash and are never pruned, and the search study holds only
search points, so the dashboard's best trial, history and importances are the search's own. Studies made before the
sibling existed kept their runs in the search study: those still count (`confirmation_runs`). Their results are
read by `compare.py`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ackd_search.config import RunConfig, from_dict, get_path, set_path, to_dict
from ackd_search.searching.record import CONFIRMS, is_interrupted, search_trials
from ackd_search.searching.space import PRESET_DISTILL, Space

PRESETS = ("student", "kd", "dkd", "reference")
# Fields that do not make two configurations different: where a run writes, its seed and its length.
_NOT_IDENTITY = ("output_dir", "seed", "eval_test")
# Fields added since ackd-search 0.1.0: left out of a configuration's key while they hold their defaults, so the
# confirmation runs of an earlier study keep matching the configurations they retrain.
_ADDED_SINCE_0_1 = ("distill.form", "distill.standardize", "distill.dkd", "data.image_size", "data.channels",
                    "data.mean", "data.std", "data.num_classes", "data.augment", "data.cache_dir", "student_init",
                    "student_pretrained", "teacher.pretrained", "teacher.finetune")
_DEFAULTS = to_dict(RunConfig())


@dataclass
class ConfirmPlan:
    top_k: int = 3
    seeds: int = 3
    epochs: int | None = None
    presets: tuple[str, ...] = PRESETS


def plan_settings(space: Space) -> ConfirmPlan:
    """The space's `study.confirm` settings (defaults when the space has none)."""
    given = getattr(space.study, "confirm", None)
    if given is None:
        return ConfirmPlan()
    return ConfirmPlan(top_k=given.top_k, seeds=given.seeds, epochs=given.epochs,
                       presets=tuple(getattr(given, "presets", PRESETS)))


# --- configurations -------------------------------------------------------------------------------------------


def preset_config(space: Space, preset: str) -> RunConfig:
    """A baseline as the recipe sets it: the space's fixed run config, the preset's searched values where the space
    can hold them (else the recipe's), and the preset's distillation settings."""
    values, _ = space.preset_values("reference" if preset == "reference" else "kd")
    data = to_dict(from_dict(RunConfig, json.loads(json.dumps(space.base)), source=space.source))
    for path, value in values.items():
        if not path.startswith("distill."):
            set_path(data, path, value)
    data["distill"] = to_dict(PRESET_DISTILL[preset]())
    cfg = from_dict(RunConfig, data, source=f"{space.source}: preset {preset}")
    if cfg.distill.method == "ackd":  # explicit, as a search trial's config has it, so equal configs share a key
        cfg.distill.ackd.aux_placements = cfg.distill.ackd.resolved_placements(space.num_stages)
    return cfg


def source_config(space: Space, study: optuna.Study, source: str) -> RunConfig:
    """`preset:NAME` or `trial:N` as a run config (the space's fingerprint was checked when the study opened)."""
    kind, _, name = source.partition(":")
    if kind == "preset":
        return preset_config(space, name)
    trial = study.get_trials(deepcopy=False)[int(name)]
    return space.run_config(trial.params)


def confirmation_config(space: Space, search: optuna.Study, attrs: dict[str, Any]) -> RunConfig:
    """The run config of a confirmation trial, from its user attributes (`trial:N` is trial N of the search)."""
    cfg = source_config(space, search, attrs["confirm_source"])
    cfg.seed = int(attrs["confirm_seed"])
    cfg.optim.epochs = int(attrs["confirm_epochs"])
    return cfg


def config_key(cfg: RunConfig) -> str:
    """Identifies what a configuration trains (not where, with which seed, nor for how long)."""
    data = to_dict(cfg)
    for name in _NOT_IDENTITY:
        data.pop(name, None)
    data["optim"].pop("epochs", None)
    if data["distill"]["method"] != "ackd":
        data["distill"].pop("ackd")
    if data["distill"]["form"] != "dkd":
        data["distill"]["dkd"] = _DEFAULTS["distill"]["dkd"]  # DKD's knobs do not act on another form
    for dotted in _ADDED_SINCE_0_1:
        parent, _, leaf = dotted.rpartition(".")
        owner, defaults = (get_path(data, parent), get_path(_DEFAULTS, parent)) if parent else (data, _DEFAULTS)
        if leaf in owner and owner[leaf] == defaults.get(leaf):
            owner.pop(leaf)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Candidate:
    label: str  # "kd", "reference", "student", "#12", or "#12 = reference" when a trial equals a preset
    source: str  # preset:NAME or trial:N
    method: str
    key: str
    search_value: float | None = None  # the single-seed search trial's value, for the table


def candidates(space: Space, study: optuna.Study, plan: ConfirmPlan) -> list[Candidate]:
    """The presets, then the top-k distinct configurations of the search (a trial equal to a preset, or to a
    better trial, is folded into it)."""
    chosen: dict[str, Candidate] = {}
    for preset in plan.presets:
        cfg = preset_config(space, preset)
        chosen.setdefault(config_key(cfg), Candidate(preset, f"preset:{preset}", cfg.distill.method, config_key(cfg)))
    picked = 0
    for trial in search_trials(study):
        if picked >= plan.top_k:
            break
        cfg = space.run_config(trial.params)
        key = config_key(cfg)
        if key in chosen:
            same = chosen[key]
            if same.source.startswith("preset:") and "#" not in same.label:
                same.label, same.search_value = f"#{trial.number} = {same.label}", trial.values[0]
                picked += 1
            continue
        chosen[key] = Candidate(f"#{trial.number}", f"trial:{trial.number}", cfg.distill.method, key, trial.values[0])
        picked += 1
    return list(chosen.values())


# --- planning and running ---------------------------------------------------------------------------------------


def confirm_seeds(space: Space, plan: ConfirmPlan) -> list[int]:
    """Seeds no search trial used: the space's seed + 1 .. + n (the same for every candidate: paired)."""
    base = int(space.base.get("seed", 0))
    return [base + i for i in range(1, plan.seeds + 1)]


def confirm_epochs(space: Space, plan: ConfirmPlan) -> int:
    return plan.epochs or space.run_config(space.default_values()).optim.epochs


def confirmation_runs(search: optuna.Study, confirm: optuna.Study | None) -> list[FrozenTrial]:
    """Every confirmation run: the sibling study's, and those an older study kept among its own trials."""
    legacy = [t for t in search.get_trials(deepcopy=False) if CONFIRMS in t.user_attrs]
    return legacy + ([t for t in confirm.get_trials(deepcopy=False) if CONFIRMS in t.user_attrs] if confirm else [])


def covered(runs: list[FrozenTrial]) -> set[tuple[str, int]]:
    """(config key, seed) pairs that have a confirmation run that is done, queued, running, or was re-queued."""
    return {(t.user_attrs["confirm_key"], int(t.user_attrs["confirm_seed"])) for t in runs if not is_interrupted(t)}


def enqueue_confirmation(space: Space, search: optuna.Study, confirm: optuna.Study,
                         log: Callable[[str], None] = print) -> int:
    """Queue into `confirm` the confirmation runs still missing; returns how many were queued. Callers hold the
    study's confirmation lock, so processes starting at once queue each run once."""
    plan = plan_settings(space)
    if plan.seeds < 1 or (plan.top_k < 1 and not plan.presets):
        return 0
    done, epochs, queued = covered(confirmation_runs(search, confirm)), confirm_epochs(space, plan), 0
    chosen = candidates(space, search, plan)
    for cand in chosen:
        for seed in confirm_seeds(space, plan):
            if (cand.key, seed) in done:
                continue
            attrs = {CONFIRMS: cand.label, "confirm_key": cand.key, "confirm_seed": seed, "confirm_epochs": epochs,
                     "confirm_source": cand.source, "method": cand.method}
            confirm.enqueue_trial({}, user_attrs=attrs)
            queued += 1
    log(f"confirmation: {len(chosen)} configurations ({', '.join(c.label for c in chosen)}) x "
        f"{plan.seeds} seeds {confirm_seeds(space, plan)}, {epochs} epochs: {queued} runs queued in study "
        f"{confirm.study_name!r}")
    return queued


def waiting_confirmations(confirm: optuna.Study) -> int:
    return sum(CONFIRMS in t.user_attrs for t in confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def min_seeds(space: Space) -> int:
    """Seeds a configuration needs before it can win: 2, or 1 when the space confirms with one seed (its interval
    then covers the validation images only)."""
    return min(2, plan_settings(space).seeds)
