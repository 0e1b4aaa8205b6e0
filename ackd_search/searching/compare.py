"""The confirmation's results: each confirmed configuration's values (and per-image correctness) by seed, the paired
difference of two of them with an interval over both noises, the strongest baseline, and the winner `export` takes.

Differences are paired by seed and by validation image: `stats.paired_bootstrap` resamples both, so a gap of one
image is never significant and no interval has width 0. Runs that stored no per-image record (studies made before
0.1.0's confirmation kept it) fall back to `stats.seed_difference`, a t interval floored by the image noise."""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass, field

import numpy as np
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from ackd_search.searching.artifacts import CORRECT_ARTIFACT_ATTR
from ackd_search.searching.record import CONFIRMS, StudyPaths
from ackd_search.searching.stats import Difference, paired_bootstrap, resolution, seed_difference

CONFIDENCE = 0.95
BASELINES = ("student", "kd", "dkd")  # what a user would otherwise pick; `reference` is our ACKD reconstruction


@dataclass
class Confirmed:
    label: str
    method: str
    key: str
    source: str
    by_seed: dict[int, float] = field(default_factory=dict)
    correct: dict[int, np.ndarray] = field(default_factory=dict)  # per seed: each validation image right or not
    search_value: float | None = None
    n_images: int | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.by_seed.values()) if self.by_seed else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.by_seed.values()) if len(self.by_seed) > 1 else math.nan

    @property
    def is_baseline(self) -> bool:
        return self.source in {f"preset:{name}" for name in BASELINES}


def _correct(trial: FrozenTrial, paths: StudyPaths | None) -> np.ndarray | None:
    artifact_id = trial.user_attrs.get(CORRECT_ARTIFACT_ATTR)
    if not artifact_id or paths is None or not paths.artifacts.is_dir():
        return None
    try:
        with FileSystemArtifactStore(str(paths.artifacts)).open_reader(str(artifact_id)) as reader:
            return np.load(io.BytesIO(reader.read())).astype(bool)
    except (ArtifactNotFound, OSError, ValueError):
        return None  # the artifact folder was moved: the seeds-only interval stands in


def images_of(values: list[float]) -> int | None:
    """The validation set's size implied by accuracies (each k / n of 100): the smallest n they all fit, for runs
    that did not record it."""
    for n in range(10, 200_001):
        if all(abs(v * n / 100 - round(v * n / 100)) < 1e-6 for v in values):
            return n
    return None


def confirmed(runs: list[FrozenTrial], paths: StudyPaths | None = None) -> list[Confirmed]:
    """Every confirmed configuration with its complete runs by seed, best mean first."""
    found: dict[str, Confirmed] = {}
    for t in runs:
        a = t.user_attrs
        if CONFIRMS not in a or t.state != TrialState.COMPLETE:
            continue
        entry = found.setdefault(a["confirm_key"], Confirmed(a[CONFIRMS], "", a["confirm_key"], a["confirm_source"]))
        seed = int(a["confirm_seed"])
        entry.by_seed[seed] = t.values[0]
        entry.method = a.get("method") or entry.method
        entry.n_images = a.get("val_images") or entry.n_images
        right = _correct(t, paths)
        if right is not None:
            entry.correct[seed] = right
    for entry in found.values():
        entry.n_images = entry.n_images or images_of(list(entry.by_seed.values()))
    return sorted(found.values(), key=lambda c: -c.mean)


def paired_difference(a: Confirmed, b: Confirmed, confidence: float = CONFIDENCE) -> Difference | None:
    """a - b over the seeds both ran, paired by seed and (when both stored it) by validation image."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if not seeds:
        return None
    rows = [(a.correct.get(s), b.correct.get(s)) for s in seeds]
    if all(x is not None and y is not None and len(x) == len(y) for x, y in rows):
        return paired_bootstrap(np.stack([x for x, _ in rows]), np.stack([y for _, y in rows]), confidence=confidence)
    n_images = a.n_images or b.n_images
    if not n_images:
        return None
    return seed_difference(np.array([a.by_seed[s] for s in seeds]), np.array([b.by_seed[s] for s in seeds]),
                           n_images, confidence=confidence)


def baseline(results: list[Confirmed], preset: str) -> Confirmed | None:
    return next((c for c in results if c.source == f"preset:{preset}"), None)


def strongest_baseline(results: list[Confirmed], other_than: Confirmed | None = None) -> Confirmed | None:
    """The baseline (student alone, KD, DKD) with the best mean: what the winner has to beat."""
    ready = [c for c in results if c.is_baseline and (other_than is None or c.key != other_than.key)]
    return max(ready, key=lambda c: c.mean, default=None)


def winner_of(results: list[Confirmed], min_seeds: int = 2) -> Confirmed | None:
    """The configuration with the best mean over its confirmation seeds (at least `min_seeds` of them)."""
    ready = [c for c in results if len(c.by_seed) >= min_seeds]
    return ready[0] if ready else None


def image_resolution(results: list[Confirmed]) -> float | None:
    """One validation image, in points (None when unknown)."""
    sizes = [c.n_images for c in results if c.n_images]
    return resolution(sizes[0]) if sizes else None


def verdict(best: Confirmed, other: Confirmed, name: str) -> str:
    """`above dkd by +0.81 (95% CI +0.12 to +1.50)` or `NOT separable from dkd (+0.35 [-0.69, +1.39])`."""
    diff = paired_difference(best, other)
    if diff is None:
        return f"not compared with {name} (no common seed)"
    pct = round(CONFIDENCE * 100)
    if diff.separable:
        return (f"{'above' if diff.mean > 0 else 'below'} {name} by {diff.mean:+.2f} "
                f"({pct}% CI {diff.low:+.2f} to {diff.high:+.2f})")
    return f"NOT separable from {name} ({diff.text()}: the interval includes 0)"


def winner_line(results: list[Confirmed], min_seeds: int = 2) -> str:
    """The confirmation's answer in one line: the winner, and how it stands against the strongest baseline and
    against `reference` (or why there is no winner yet)."""
    best = winner_of(results, min_seeds)
    if best is None:
        return f"winner: none yet (each configuration needs at least {min_seeds} complete seed(s))"
    verdicts = []
    strongest = strongest_baseline(results, other_than=best)
    if strongest is not None:
        verdicts.append(verdict(best, strongest, f"{strongest.label} (the strongest baseline)"))
    ref = baseline(results, "reference")
    if ref is not None and ref.key != best.key:
        verdicts.append(verdict(best, ref, "reference"))
    spread = f" ± {best.std:.2f}" if len(best.by_seed) > 1 else ""
    return (f"winner: {best.label} (mean {best.mean:.2f}{spread} over {len(best.by_seed)} seeds)"
            + (f"; {'; '.join(verdicts)}" if verdicts else ""))
