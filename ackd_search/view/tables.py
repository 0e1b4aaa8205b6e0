"""The confirmation table as text: per configuration the mean ± std over seeds and the paired differences to the
baselines with their intervals, then the winner and whether it is separable from them."""

from __future__ import annotations

import optuna

from ackd_search.searching.compare import CONFIDENCE, baseline, confirmed, paired_difference, winner_of


def confirmation_table(study: optuna.Study) -> list[str]:
    """The closing table: per configuration mean ± std over seeds, and the paired difference to KD and to
    `reference` with its 95 % interval; then the winner and whether it is separable from them."""
    results = confirmed(study)
    if not results:
        return []
    kd, ref = baseline(results, "kd"), baseline(results, "reference")
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
    best = winner_of(results)
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
