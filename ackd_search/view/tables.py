"""The confirmation table as text: per configuration the mean ± std over seeds and its paired differences to KD, to
the strongest baseline and to `reference` (intervals over seeds and validation images), what one image is worth and
the smallest gap the split and seeds can separate, then the winner's line."""

from __future__ import annotations

import numpy as np

from ackd_search.searching.compare import (
    CONFIDENCE,
    Confirmed,
    baseline,
    image_resolution,
    paired_difference,
    strongest_baseline,
    winner_line,
    winner_of,
)
from ackd_search.searching.stats import estimate_noise, smallest_separable

_CELL = 24


def _columns(results: list[Confirmed], best: Confirmed | None) -> list[tuple[str, Confirmed]]:
    """The configurations every row is compared with: KD, the strongest baseline (when it is not KD), reference."""
    kd, ref = baseline(results, "kd"), baseline(results, "reference")
    strongest = strongest_baseline(results, other_than=best)
    columns = [("vs kd", kd)] if kd is not None else []
    if strongest is not None and strongest is not kd:
        columns.append((f"vs {strongest.label} (strongest)", strongest))
    if ref is not None:
        columns.append(("vs reference", ref))
    return columns


def noise_line(results: list[Confirmed], best: Confirmed | None) -> str:
    """What the split can tell apart: one image in points, and the smallest gap separable at 80% power (with the
    noise observed between the winner and the strongest baseline when both stored per-image records)."""
    sizes = [c.n_images for c in results if c.n_images]
    if not sizes:
        return "(validation images unknown: resolution not stated)"
    n_images, n_seeds = sizes[0], max(len(c.by_seed) for c in results)
    noise = {}
    other = strongest_baseline(results, other_than=best)
    if best is not None and other is not None:
        seeds = sorted(set(best.correct) & set(other.correct))
        if seeds:
            observed = estimate_noise(np.stack([best.correct[s] for s in seeds]),
                                      np.stack([other.correct[s] for s in seeds]))
            noise = {"discordance": observed.discordance}
            if np.isfinite(observed.seed_std):
                noise["seed_std"] = observed.seed_std
    gap = smallest_separable(n_images, n_seeds, **noise)
    return (f"one validation image = {image_resolution(results):.2f} points; {n_images:,} images x {n_seeds} seeds "
            f"separate gaps of about {gap:.2f} points or more (80% power"
            + (", noise as observed)" if noise else ", typical noise)"))


def confirmation_table(results: list[Confirmed], min_seeds: int = 2, study_name: str = "") -> list[str]:
    """The closing table (empty when nothing is confirmed yet)."""
    if not results:
        return []
    best = winner_of(results, min_seeds)
    columns = _columns(results, best)
    seeds = sorted({s for c in results for s in c.by_seed})
    pct = round(CONFIDENCE * 100)
    where = f" in study {study_name!r}" if study_name else ""
    lines = [f"confirmation over seeds {seeds}{where} (validation accuracy %, mean ± std; differences paired by "
             f"seed and validation image, {pct}% intervals):",
             f"  {'configuration':<20} {'n':>2} {'mean ± std':>14}  " + " ".join(f"{n:<{_CELL}}" for n, _ in columns)]
    for c in results:
        cells = []
        for _, other in columns:
            diff = paired_difference(c, other) if other.key != c.key else None
            cells.append(f"{diff.text() if diff else '-':<{_CELL}}")
        spread = f"{c.mean:6.2f} ± {c.std:4.2f}" if len(c.by_seed) > 1 else f"{c.mean:6.2f}"
        lines.append(f"  {c.label:<20} {len(c.by_seed):>2} {spread:>14}  " + " ".join(cells))
    return lines + [noise_line(results, best), winner_line(results, min_seeds)]
