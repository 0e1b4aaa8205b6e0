"""The confirmation's statistics: intervals over seeds and validation images never claim certainty, a one-image gap
is never separable, a real gap is, the bootstrap is roughly calibrated, and the separability estimates behave."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ackd_search.searching.stats import (
    Difference,
    estimate_noise,
    paired_bootstrap,
    resolution,
    seed_difference,
    separability_warning,
    smallest_separable,
)


def one_image_ahead(rng: np.random.Generator, seeds: int = 3, n: int = 288) -> tuple[np.ndarray, np.ndarray]:
    """Per seed: B ~90% right; A equals B except 10 images A right/B wrong and 9 B right/A wrong (+1 image)."""
    a, b = np.zeros((seeds, n), np.uint8), np.zeros((seeds, n), np.uint8)
    for s in range(seeds):
        b[s] = rng.random(n) < 0.9
        a[s] = b[s]
        wrong, right = np.flatnonzero(b[s] == 0), np.flatnonzero(b[s] == 1)
        a[s, rng.choice(wrong, 10, replace=False)] = 1
        a[s, rng.choice(right, 9, replace=False)] = 0
    return a, b


def test_one_image_ahead_on_every_seed_is_not_separable() -> None:
    """The issue's table: the old t interval was [+0.35, +0.35]."""
    a, b = one_image_ahead(np.random.default_rng(0))
    diffs = (a.mean(axis=1) - b.mean(axis=1)) * 100
    assert np.allclose(diffs, resolution(288))  # every seed exactly one image ahead
    d = paired_bootstrap(a, b)
    assert d.mean == pytest.approx(100 / 288)
    assert d.low < 0 < d.high and not d.separable and d.width > 0
    assert (d.n_seeds, d.n_images, d.method) == (3, 288, "bootstrap seeds x images")
    assert d.text().startswith("+0.35 [-")


def test_one_image_without_any_other_disagreement_is_not_separable() -> None:
    """A right on one extra image per seed (a different one each seed), no other discordance, 10 seeds: the
    bootstrap alone would exclude 0; the one-image floor does not."""
    b = np.zeros((10, 288), np.uint8)
    a = b.copy()
    a[np.arange(10), np.arange(10)] = 1
    d = paired_bootstrap(a, b)
    assert d.low == 0.0 and not d.separable


@pytest.mark.parametrize("seeds", [1, 3])
def test_identical_configurations_get_one_image_either_side(seeds: int) -> None:
    a = (np.random.default_rng(1).random((seeds, 500)) < 0.8).astype(np.uint8)
    d = paired_bootstrap(a, a.copy())
    assert (d.mean, d.low, d.high) == (0.0, -resolution(500), resolution(500))
    assert not d.separable and d.n_seeds == seeds


def test_interval_is_never_of_width_zero() -> None:
    rng = np.random.default_rng(2)
    ones = np.ones((3, 288), bool)
    cases = [(ones, ones), (ones, ~ones), (ones[:1], ones[:1]), one_image_ahead(rng), one_image_ahead(rng, seeds=1)]
    for a, b in cases:
        d = paired_bootstrap(a, b)
        assert d.width >= 2 * resolution(288) - 1e-12, d
        assert d.low <= d.mean <= d.high
    single = paired_bootstrap(rng.random(288) < 0.9, rng.random(288) < 0.9)  # 1-D: one seed
    assert single.n_seeds == 1 and single.method == "bootstrap images (1 seed)" and single.width > 0


def test_a_clearly_better_configuration_is_separable() -> None:
    """Per seed, A fixes 40 of B's errors and breaks 10 of its right answers: +30 images in 1000, +3 points."""
    rng = np.random.default_rng(3)
    b = (rng.random((3, 1000)) < 0.85).astype(np.uint8)
    a = b.copy()
    for s in range(3):
        a[s, rng.choice(np.flatnonzero(b[s] == 0), 40, replace=False)] = 1
        a[s, rng.choice(np.flatnonzero(b[s] == 1), 10, replace=False)] = 0
    d = paired_bootstrap(a, b)
    assert d.mean == pytest.approx(3.0) and d.separable and d.low > 0
    assert paired_bootstrap(b, a).separable and paired_bootstrap(b, a).high < 0


def null_table(rng: np.random.Generator, seeds: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A and B of equal true accuracy on a fresh validation sample: images vary in difficulty, each favours one
    of A or B a little (persistently, zero on average), and every seed flips images independently (churn)."""
    easy = rng.normal(2.0, 1.5, n)
    tilt = rng.normal(0.0, 2.0, n)
    a = rng.random((seeds, n)) < 1 / (1 + np.exp(-(easy + tilt / 2)))
    b = rng.random((seeds, n)) < 1 / (1 + np.exp(-(easy - tilt / 2)))
    return a, b


def test_bootstrap_is_roughly_calibrated_under_no_difference() -> None:
    """400 null tables: 2.25% false separations here (mildly conservative: churn is counted about twice)."""
    rng = np.random.default_rng(4)
    start = time.perf_counter()
    separable = [paired_bootstrap(*null_table(rng, 3, 500), seed=k).separable for k in range(400)]
    rate = float(np.mean(separable))
    assert 0.01 <= rate <= 0.12, rate
    assert time.perf_counter() - start < 10


def test_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random((3, 10_000)) < 0.9, rng.random((3, 10_000)) < 0.9
    start = time.perf_counter()
    paired_bootstrap(a, b, n_boot=4000)
    assert time.perf_counter() - start < 1.0


def test_mismatched_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="share seeds and images"):
        paired_bootstrap(np.ones((3, 10)), np.ones((2, 10)))


def test_smallest_separable_shrinks_with_images_and_seeds() -> None:
    sizes = [smallest_separable(n, 3) for n in (288, 1000, 5000, 50_000)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    by_seeds = [smallest_separable(1000, r) for r in (1, 3, 10)]
    assert by_seeds == sorted(by_seeds, reverse=True) and len(set(by_seeds)) == 3
    assert smallest_separable(288, 3) > 1.0  # the split cannot resolve a 1-point gap
    assert smallest_separable(10, 20, discordance=0.0, seed_std=0.0) == resolution(10)  # never below one image


def test_separability_warning_names_what_to_change() -> None:
    small = separability_warning(288, 3, 1.0, val_fraction=0.1)
    assert small is not None and "288 validation images x 3 seeds" in small
    assert "val_fraction" in small and "study.confirm.seeds" in small
    tight = separability_warning(5000, 3, 1.0, val_fraction=0.1)
    assert tight is not None and "run.data.val_fraction 0.1 -> " in tight and "study.confirm.seeds 3 -> " in tight
    assert separability_warning(50_000, 3, 1.0) is None
    assert separability_warning(288, 3, 10.0) is None  # a 10-point gap is visible on 288 images


def test_estimate_noise_reads_discordance_and_excess_seed_std() -> None:
    a, b = one_image_ahead(np.random.default_rng(6))
    noise = estimate_noise(a, b)
    assert noise.discordance == pytest.approx(19 / 288)
    assert noise.seed_std >= 0
    assert np.isnan(estimate_noise(a[:1], b[:1]).seed_std)
    shifted = np.zeros((4, 1000), np.uint8)  # seeds differ by whole blocks of images: a seed effect, churn-sized
    for s in range(4):
        shifted[s, : 800 + 50 * s] = 1
    assert estimate_noise(shifted, shifted).seed_std > 0


def test_fallback_without_per_image_data_is_never_zero_width() -> None:
    same = seed_difference([95.83, 95.83, 95.83], [95.49, 95.49, 95.49], 288)  # identical per-seed gaps
    assert isinstance(same, Difference) and same.width > 0 and not same.separable
    assert same.method == "t, floored by image noise"
    perfect = seed_difference([100.0, 100.0], [100.0, 100.0], 288)  # no binomial noise at 100%: one-image floor
    assert perfect.width == pytest.approx(2 * resolution(288)) and not perfect.separable
    one_image = seed_difference([276 / 2.88] * 3, [275 / 2.88] * 3, 288)  # float-rounded one-image gap
    assert not one_image.separable
    single = seed_difference([80.0], [70.0], 1000)
    assert single.n_seeds == 1 and single.method == "image noise only (1 seed)" and single.separable
