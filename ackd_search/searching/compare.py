"""The confirmation's results: each confirmed configuration's values by seed, the paired difference of two of them
with its interval, and the winner (the best mean over its seeds), which `export` takes."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from scipy import stats

from ackd_search.config import RunConfig
from ackd_search.searching.confirm import source_config
from ackd_search.searching.record import CONFIRMS
from ackd_search.searching.space import Space

CONFIDENCE = 0.95



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


def baseline(results: list[Confirmed], preset: str) -> Confirmed | None:
    return next((c for c in results if c.source == f"preset:{preset}"), None)


def winner(study: optuna.Study, min_seeds: int = 2) -> Confirmed | None:
    """The configuration with the best mean over its confirmation seeds (at least `min_seeds` of them)."""
    return winner_of(confirmed(study), min_seeds)


def winner_of(results: list[Confirmed], min_seeds: int = 2) -> Confirmed | None:
    ready = [c for c in results if len(c.by_seed) >= min_seeds]
    return ready[0] if ready else None


def winner_config(space: Space, study: optuna.Study) -> tuple[Confirmed, RunConfig] | None:
    """The confirmed winner and its run config (seed: the space's), for `export`."""
    best = winner(study)
    if best is None:
        return None
    cfg = source_config(space, study, best.source)
    return best, cfg
