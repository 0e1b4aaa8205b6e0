"""Confirmation: the search's best distinct configurations and the baselines (student alone, KD, `reference`)
retrained with fresh seeds, as trials of the same study, and the winner chosen by the mean over those seeds.

A single-seed short run often picks noise. Each candidate is trained again with `study.confirm.seeds` seeds that
no search trial used (the same seeds for every candidate, so differences are paired by seed), for
`study.confirm.epochs` epochs (default: the trial budget). They are ordinary trials tagged `confirms`, so they
resume after a crash, show in the dashboard, and are never pruned nor used to prune. The table gives mean ± std
per configuration and the paired difference to KD and to `reference` with a 95 % t interval."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from ackd_search.config import DistillConfig, RunConfig, from_dict, kd_distill, reference_distill, set_path, to_dict
from ackd_search.objective import CONFIRMS
from ackd_search.space import Space

PRESETS = ("student", "kd", "reference")
CONFIDENCE = 0.95
# Fields that do not make two configurations different: where a run writes, its seed and its length.
_NOT_IDENTITY = ("output_dir", "seed", "eval_test")


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
    distill = {"student": DistillConfig(method="student"), "kd": kd_distill(), "reference": reference_distill()}
    data["distill"] = to_dict(distill[preset])
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


def confirmation_config(space: Space, study: optuna.Study, attrs: dict[str, Any]) -> RunConfig:
    """The run config of a confirmation trial, from its user attributes."""
    cfg = source_config(space, study, attrs["confirm_source"])
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
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Candidate:
    label: str  # "kd", "reference", "student", "#12", or "#12 = reference" when a trial equals a preset
    source: str  # preset:NAME or trial:N
    method: str
    key: str
    search_value: float | None = None  # the single-seed search trial's value, for the table


def search_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete search trials (not confirmation runs, not duplicates), best first by the first objective."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if CONFIRMS not in t.user_attrs and "duplicate_of" not in t.user_attrs]
    return sorted(done, key=lambda t: -t.values[0])


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


def _covered(study: optuna.Study) -> set[tuple[str, int]]:
    """(config key, seed) pairs that have a confirmation run that is done, queued, running, or was re-queued."""
    covered = set()
    for t in study.get_trials(deepcopy=False):
        if CONFIRMS in t.user_attrs and not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            covered.add((t.user_attrs["confirm_key"], int(t.user_attrs["confirm_seed"])))
    return covered


def enqueue_confirmation(space: Space, study: optuna.Study, log: Callable[[str], None] = print) -> int:
    """Queue the confirmation runs still missing; returns how many were queued."""
    plan = plan_settings(space)
    if plan.seeds < 1 or (plan.top_k < 1 and not plan.presets):
        return 0
    covered, epochs, queued = _covered(study), confirm_epochs(space, plan), 0
    chosen = candidates(space, study, plan)
    for cand in chosen:
        for seed in confirm_seeds(space, plan):
            if (cand.key, seed) in covered:
                continue
            attrs = {CONFIRMS: cand.label, "confirm_key": cand.key, "confirm_seed": seed, "confirm_epochs": epochs,
                     "confirm_source": cand.source}
            study.enqueue_trial({}, user_attrs=attrs)
            queued += 1
    log(f"confirmation: {len(chosen)} configurations ({', '.join(c.label for c in chosen)}) x "
        f"{plan.seeds} seeds {confirm_seeds(space, plan)}, {epochs} epochs: {queued} runs queued")
    return queued


def waiting_confirmations(study: optuna.Study) -> int:
    return sum(CONFIRMS in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# --- results ------------------------------------------------------------------------------------------------------


@dataclass
class Confirmed:
    label: str
    method: str
    key: str
    source: str
    by_seed: dict[int, float] = field(default_factory=dict)
    search_value: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.by_seed.values()) if self.by_seed else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.by_seed.values()) if len(self.by_seed) > 1 else math.nan


def confirmed(study: optuna.Study) -> list[Confirmed]:
    """Every confirmed configuration with its complete runs' values by seed, best mean first."""
    found: dict[str, Confirmed] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if CONFIRMS not in a:
            continue
        entry = found.setdefault(a["confirm_key"], Confirmed(a[CONFIRMS], "", a["confirm_key"], a["confirm_source"]))
        entry.by_seed[int(a["confirm_seed"])] = t.values[0]
        entry.method = (a.get("method") or entry.method)
    return sorted(found.values(), key=lambda c: -c.mean)


@dataclass
class Difference:
    mean: float
    low: float
    high: float
    n: int

    @property
    def separable(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (n={self.n})"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(a: Confirmed, b: Confirmed, confidence: float = CONFIDENCE) -> Difference | None:
    """Mean of a - b over the seeds both ran, with a t interval on the paired differences."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if not seeds:
        return None
    diffs = [a.by_seed[s] - b.by_seed[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Difference(mean, math.nan, math.nan, len(diffs))
    half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Difference(mean, mean - half, mean + half, len(diffs))


def _base(results: list[Confirmed], preset: str) -> Confirmed | None:
    return next((c for c in results if c.source == f"preset:{preset}"), None)


def winner(study: optuna.Study, min_seeds: int = 2) -> Confirmed | None:
    """The configuration with the best mean over its confirmation seeds (at least `min_seeds` of them)."""
    return _winner_of(confirmed(study), min_seeds)


def _winner_of(results: list[Confirmed], min_seeds: int = 2) -> Confirmed | None:
    ready = [c for c in results if len(c.by_seed) >= min_seeds]
    return ready[0] if ready else None


def confirmation_table(study: optuna.Study) -> list[str]:
    """The closing table: per configuration mean ± std over seeds, and the paired difference to KD and to
    `reference` with its 95 % interval; then the winner and whether it is separable from them."""
    results = confirmed(study)
    if not results:
        return []
    kd, ref = _base(results, "kd"), _base(results, "reference")
    seeds = sorted({s for c in results for s in c.by_seed})
    pct = round(CONFIDENCE * 100)
    lines = [f"confirmation over seeds {seeds} (validation accuracy %, mean ± std; paired differences with "
             f"{pct}% t intervals):",
             f"  {'configuration':<20} {'n':>2} {'mean ± std':>14}  {'vs KD':<24} {'vs reference':<24}"]
    for c in results:
        vs_kd = paired_difference(c, kd) if kd is not None and c.key != kd.key else None
        vs_ref = paired_difference(c, ref) if ref is not None and c.key != ref.key else None
        spread = f"{c.mean:6.2f} ± {c.std:4.2f}" if len(c.by_seed) > 1 else f"{c.mean:6.2f}"
        lines.append(f"  {c.label:<20} {len(c.by_seed):>2} {spread:>14}  {vs_kd.text() if vs_kd else '-':<24} "
                     f"{vs_ref.text() if vs_ref else '-':<24}")
    best = _winner_of(results)
    if best is None:
        return lines + ["winner: none yet (each configuration needs at least 2 complete seeds)"]
    verdicts = []
    for name, base in (("KD", kd), ("reference", ref)):
        diff = paired_difference(best, base) if base is not None and base.key != best.key else None
        if diff is None:
            continue
        if diff.separable:
            verdicts.append(f"{'above' if diff.mean > 0 else 'below'} {name} by {diff.mean:+.2f} "
                            f"({pct}% CI {diff.low:+.2f} to {diff.high:+.2f})")
        else:
            verdicts.append(f"NOT separable from {name} ({diff.text()}: the interval includes 0)")
    lines.append(f"winner: {best.label} (mean {best.mean:.2f} over {len(best.by_seed)} seeds)"
                 + (f"; {'; '.join(verdicts)}" if verdicts else ""))
    return lines


def winner_config(space: Space, study: optuna.Study) -> tuple[Confirmed, RunConfig] | None:
    """The confirmed winner and its run config (seed: the space's), for `export`."""
    best = winner(study)
    if best is None:
        return None
    cfg = source_config(space, study, best.source)
    return best, cfg
