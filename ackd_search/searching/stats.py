"""How far apart two confirmed configurations are, counting both noises (training seeds and validation images), and
how small a gap a validation split and seed count can separate. Pure numpy/scipy; accuracies are in points (%)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

N_BOOT = 4000  # percentile endpoints' Monte Carlo error ~0.04 standard errors (~1% of the width); costs milliseconds
DISCORDANCE = 0.10  # share of images two good configurations disagree on (see smallest_separable)
SEED_STD = 0.2  # points: seed-to-seed std of a configuration's accuracy beyond what its image churn explains
PERSISTENT = 0.5  # share of the disagreements that stay on the same images whatever the seed
EXPECTED_GAP = 1.0  # points: KD variants on a benchmark typically differ by 0.5-2; 1 is what the search must resolve
POWER = 0.8
MAX_SEEDS = 20  # study.confirm.seeds' upper bound
MAX_VAL_FRACTION = 0.5  # run.data.val_fraction's upper bound
_EPS = 1e-9  # points: absorbs float rounding of percent accuracies (276/288 - 275/288 != 100/288 exactly)


@dataclass(frozen=True)
class Difference:
    """A - B in points with its interval. The interval is never narrower than +-one image around the mean:
    accuracy on n images moves in steps of 100/n, so a gap of one image is never claimed (`separable` is False)."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_images: int
    method: str

    @property
    def separable(self) -> bool:
        return self.low > _EPS or self.high < -_EPS

    @property
    def width(self) -> float:
        return self.high - self.low

    def text(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


class Noise(NamedTuple):
    discordance: float  # fraction of images where A and B disagree, averaged over seeds
    seed_std: float  # points; nan with one seed


def resolution(n_images: int) -> float:
    """One validation image, in points."""
    return 100.0 / n_images


def _floored(total_images: float, low: float, high: float, n_seeds: int, n_images: int, method: str) -> Difference:
    # total_images: mean difference in images (sum over seeds / seeds), so mean -+ one image is exact (3/3 - 1 == 0).
    res = resolution(n_images)
    mean = total_images * res
    low, high = min(low, (total_images - 1.0) * res), max(high, (total_images + 1.0) * res)
    return Difference(float(mean), float(low), float(high), n_seeds, n_images, method)


def _as_table(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    x = x[None, :] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected per-seed per-image correctness of shape (n_seeds, n_images), got {x.shape}")
    return x.astype(np.int8)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = N_BOOT, confidence: float = 0.95,
                     seed: int = 0) -> Difference:
    """A - B (points) from per-image correctness of shape (n_seeds, n_images), seeds and images paired.

    Two-level paired bootstrap over a crossed design: each replicate draws one image set (with replacement) shared
    by all seeds, since every seed is scored on the same validation images, and one seed set (with replacement),
    the same indices for A and B. Its value is the resampled images' seed-averaged difference plus the resampled
    seeds' deviation from the grand mean, scaled by sqrt(R/(R-1)) so 3 seeds do not understate seed variance by a
    third. Additive rather than the product weighting (pigeonhole bootstrap, Owen 2007), which counts seed x image
    churn ~3x (measured 0-2% false separations at 5% nominal vs 1-5% here). Why a bootstrap: McNemar sees one
    seed only, a crossed binomial mixed model is heavy and unstable with 3 seeds; this keeps the 0/1 pairing and
    assumes nothing about shape. One seed: images only (n_seeds=1 in the result).
    """
    a, b = _as_table(a), _as_table(b)
    if a.shape != b.shape:
        raise ValueError(f"A and B must share seeds and images: {a.shape} vs {b.shape}")
    r, n = a.shape
    d = a - b  # -1, 0, +1 per seed and image
    rng = np.random.default_rng(seed)
    # Images enter only through their seed-averaged difference, which takes at most 2R+1 values: resampling n images
    # is one multinomial draw over those values, exact and O(n_boot * R) however many images there are.
    values, counts = np.unique(d.mean(axis=0), return_counts=True)
    image_part = rng.multinomial(n, counts / n, size=n_boot) @ values / n
    row = d.mean(axis=1)
    if r > 1:
        seeds = rng.multinomial(r, np.full(r, 1.0 / r), size=n_boot)
        seed_part = math.sqrt(r / (r - 1)) * (seeds @ (row - row.mean())) / r
        method = "bootstrap seeds x images"
    else:
        seed_part, method = 0.0, "bootstrap images (1 seed)"
    alpha = 1.0 - confidence
    low, high = np.quantile(100.0 * (image_part + seed_part), [alpha / 2, 1 - alpha / 2])
    return _floored(float(d.sum()) / r, float(low), float(high), r, n, method)


def seed_difference(acc_a: np.ndarray, acc_b: np.ndarray, n_images: int, *, confidence: float = 0.95) -> Difference:
    """A - B (points) from per-seed accuracies only (old records without per-image correctness), paired by seed.

    A t interval over the per-seed differences whose half-width is floored by the image-sampling noise the
    accuracies imply: z * sqrt((pA(100-pA) + pB(100-pB)) / n), i.e. independent errors on n images. That floor is
    conservative (trained nets share errors) and does not shrink with seeds (they reuse the same images).
    """
    acc_a, acc_b = np.atleast_1d(np.asarray(acc_a, float)), np.atleast_1d(np.asarray(acc_b, float))
    if acc_a.shape != acc_b.shape or acc_a.ndim != 1:
        raise ValueError(f"expected paired per-seed accuracies, got {acc_a.shape} vs {acc_b.shape}")
    r, diffs = len(acc_a), acc_a - acc_b
    mean = float(diffs.mean())
    pa, pb = float(acc_a.mean()), float(acc_b.mean())
    image_half = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt((pa * (100 - pa) + pb * (100 - pb)) / n_images)
    seed_half = stats.t.ppf(0.5 + confidence / 2, r - 1) * float(diffs.std(ddof=1)) / math.sqrt(r) if r > 1 else 0.0
    half = max(image_half, seed_half)
    method = "t, floored by image noise" if r > 1 else "image noise only (1 seed)"
    return _floored(mean / resolution(n_images), mean - half, mean + half, r, n_images, method)


def estimate_noise(a: np.ndarray, b: np.ndarray) -> Noise:
    """Observed discordance of A vs B and seed std (points) beyond churn, for smallest_separable and the table.

    On a fixed validation set a configuration's seed variance is churn/(2n) (per-image flips between seeds) plus
    the seed effect on its true accuracy; the churn part is already counted by the discordance, so it is removed.
    """
    a, b = _as_table(a), _as_table(b)
    r, n = a.shape
    discordance = float((a != b).mean())
    if r < 2:
        return Noise(discordance, math.nan)
    excess = []
    for x in (a, b):
        churn = np.mean([(x[s] != x[t]).mean() for s in range(r) for t in range(s + 1, r)])
        excess.append(max(0.0, float(np.var(100.0 * x.mean(axis=1), ddof=1)) - 1e4 * churn / (2 * n)))
    return Noise(discordance, math.sqrt(float(np.mean(excess))))


def _variance(n_images: float, n_seeds: int, discordance: float, seed_std: float, persistent: float) -> float:
    # Points^2. Disagreements: q/n per seed; the persistent share is shared by all seeds (same images), the rest
    # averages out over seeds. Seed effects: each of A and B has seed_std, independently, averaged over seeds.
    image = 1e4 * discordance / n_images * (persistent + (1 - persistent) / n_seeds)
    return image + 2 * seed_std**2 / n_seeds


def smallest_separable(n_images: int, n_seeds: int, *, discordance: float = DISCORDANCE, seed_std: float = SEED_STD,
                       persistent: float = PERSISTENT, confidence: float = 0.95, power: float = POWER) -> float:
    """The smallest true gap (points) separated with probability `power`: (z_conf + z_power) * sqrt(V), where
    V = 1e4*q/n * (p + (1-p)/R) + 2*s^2/R, normal approximation of the paired difference's variance, and never
    less than one image. Defaults: q = 0.10 (independent errors at 90% accuracy would disagree on 18%; trained
    nets share most errors, run-to-run churn is about one error rate); p = 0.5, between all-churn and
    all-persistent disagreements; s = 0.2 points, a seed's effect on true accuracy once image churn is removed
    (Jordan 2023: most run-to-run variance on a test set is that churn). estimate_noise gives q and s from data.
    """
    z = stats.norm.ppf(0.5 + confidence / 2) + stats.norm.ppf(power)
    return max(z * math.sqrt(_variance(n_images, n_seeds, discordance, seed_std, persistent)), resolution(n_images))


def separability_warning(n_images: int, n_seeds: int, expected_gap: float = EXPECTED_GAP, *,
                         val_fraction: float | None = None, discordance: float = DISCORDANCE,
                         seed_std: float = SEED_STD, persistent: float = PERSISTENT, confidence: float = 0.95,
                         power: float = POWER) -> str | None:
    """The line the search prints when the split cannot separate `expected_gap` points (None when it can), with
    the validation size at the current seeds and the seeds at the current size that would."""
    kw = dict(discordance=discordance, seed_std=seed_std, persistent=persistent, confidence=confidence, power=power)
    gap = smallest_separable(n_images, n_seeds, **kw)
    if gap <= expected_gap:
        return None
    z = stats.norm.ppf(0.5 + confidence / 2) + stats.norm.ppf(power)
    budget = (expected_gap / z) ** 2 - 2 * seed_std**2 / n_seeds  # variance left for the image term
    per_image = 1e4 * discordance * (persistent + (1 - persistent) / n_seeds)
    # ...and one image must be smaller than the gap, or the resolution floor alone hides it.
    needed = max(math.ceil(per_image / budget), math.floor(100 / expected_gap) + 1) if budget > 0 else None
    if needed is None:
        images = "more seeds: no run.data.val_fraction suffices at these seeds"
    elif val_fraction is not None:
        fraction = val_fraction * needed / n_images
        images = (f"run.data.val_fraction {val_fraction:g} -> {fraction:.2f} (~{needed:,} images)"
                  if fraction <= MAX_VAL_FRACTION else f"~{needed:,} validation images (run.data.val_fraction "
                  f"would be {fraction:.2f} > {MAX_VAL_FRACTION:g}: a larger dataset)")
    else:
        images = f"~{needed:,} validation images (run.data.val_fraction)"
    seeds = next((s for s in range(n_seeds + 1, MAX_SEEDS + 1)
                  if smallest_separable(n_images, s, **kw) <= expected_gap), None)
    seeds_text = (f"study.confirm.seeds {n_seeds} -> {seeds}" if seeds
                  else f"no study.confirm.seeds <= {MAX_SEEDS} suffices")
    return (f"{n_images:,} validation images x {n_seeds} seeds separate gaps of >= {gap:.2f} points "
            f"({power:.0%} power), not the ~{expected_gap:g}-point gaps KD variants differ by; "
            f"need {images}, or {seeds_text}")
