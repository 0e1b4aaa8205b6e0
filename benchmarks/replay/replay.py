"""REPLAY: the product's own samplers and pruners against a recorded table, many seeds, milliseconds per trial.

One study = the product's pieces on an in-memory storage: `make_sampler(space, seed)` and `make_pruner(space)`
(MethodAwarePruner around Optuna's pruner) on a copy of the task's space whose `study.sampler` / `study.pruner`
spec is the setting's, the presets enqueued by the product's `enqueue_presets`, each trial sampled by
`space.suggest(trial)`, a proposal equal to an earlier trial answered by the product's duplicate rule (not trained
twice). A trial "trains" by reading the curve of the nearest recorded configuration (table.py's distance) for one
of its recorded seeds, drawn at random per trial; it reports every epoch (`trial.report(val_acc, epoch)`, epochs
1-based as the trainer reports them) and stops when `trial.should_prune()` says so; a recorded failure is pruned at
the failing epoch, as the product prunes a non-finite loss. Cost = epochs actually read.

The pick is the product's: the complete, non-duplicate search trial with the best reported final value (earliest
on ties). Its regret is measured on the table's MEAN over seeds of the final val_acc, against the table's best mean.
`confirmed` approximates the confirmation stage: among the reference preset and the top-3 distinct picks, the one
with the best table mean (the product retrains them on fresh seeds; the table has only the recorded ones)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import optuna

from benchmarks.replay.table import Table

TRIAL_BUDGETS = (10, 20, 30, 50, 75, 100, 150, 200)
EPOCH_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
WITHIN = 0.5  # points of val_acc
WITHIN_WIDE = 1.0


def setting_space(table: Table, sampler: dict[str, Any], pruner: dict[str, Any], presets: bool | None = None):
    """The task's space with the setting's sampler and pruner (and, given, study.presets)."""
    from ackd_search.searching.space import load_space_data

    raw = copy.deepcopy(table.data["space"])
    raw["study"]["sampler"] = dict(sampler)
    raw["study"]["pruner"] = dict(pruner)
    if presets is not None:
        raw["study"]["presets"] = presets
    raw["run"]["optim"]["epochs"] = table.epochs  # a fixture cut to fewer epochs keeps its space consistent
    return load_space_data(raw, f"replay:{table.task}")


def run_study(table: Table, space, seed: int, max_trials: int, max_epochs: float) -> list[dict[str, Any]]:
    """One replayed search; a row per trial: table index, distance, seed drawn, epochs read, state, value."""
    from ackd_search.searching.objective import copy_duplicate, find_duplicate
    from ackd_search.searching.samplers import make_pruner, make_sampler
    from ackd_search.searching.study import enqueue_presets

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=make_sampler(space, seed),
                                pruner=make_pruner(space), direction="maximize")
    enqueue_presets(study, space, log=lambda *_: None)
    rng = np.random.default_rng([seed, 20260])
    rows: list[dict[str, Any]] = []
    spent = [0]

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        twin = find_duplicate(trial)
        if twin is not None:
            rows.append({"i": -1, "d": 0.0, "s": -1, "epochs": 0, "state": "duplicate", "value": twin.value})
            return copy_duplicate(trial, twin, space)
        i, dist = table.nearest(values)
        s = int(rng.integers(table.n_seeds))
        row = {"i": i, "d": dist, "s": s, "epochs": 0, "state": "complete", "value": None}
        rows.append(row)
        length = int(table.lengths[i, s])
        for e in range(length):
            value = float(table.curves[i, s, e])
            row["epochs"], row["value"] = e + 1, value
            spent[0] += 1
            trial.report(value, e + 1)
            if trial.should_prune():
                row["state"] = "pruned"
                raise optuna.TrialPruned()
        if length < table.epochs:
            row["state"] = "failed"  # the product prunes a non-finite loss at its epoch
            raise optuna.TrialPruned()
        return row["value"]

    def stop(study: optuna.Study, _trial) -> None:
        if len(rows) >= max_trials or spent[0] >= max_epochs:
            study.stop()

    study.optimize(objective, n_trials=max_trials, callbacks=[stop], catch=())
    return rows


def summarise_study(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Regret / within / epochs at each trial budget and each epoch budget (fraction of training every table
    config to the end once), for the product's pick and the confirmed pick."""
    full = table.n * table.epochs
    best_value, best_i = -np.inf, None
    complete: list[tuple[float, int, int]] = []  # (value, order, table index)
    cum = trained = 0
    at_trials: dict[int, dict[str, float]] = {}
    at_epochs: dict[float, dict[str, float]] = {}
    pending = list(EPOCH_FRACTIONS)

    def snapshot() -> dict[str, float]:
        own = cum / (trained * table.epochs) if trained else float("nan")  # vs training those trials to the end
        if best_i is None:
            return {"regret": float("nan"), "confirmed": float("nan"), "epochs": cum / full, "own": own}
        top = sorted(complete, key=lambda t: (-t[0], t[1]))
        distinct: list[int] = []
        for _, _, i in top:
            if i not in distinct:
                distinct.append(i)
            if len(distinct) == 3:
                break
        cands = set(distinct) | ({0} if table.configs[0].get("preset") else set())
        confirmed = max(cands, key=lambda i: table.final_mean[i])
        return {"regret": table.regret(best_i), "confirmed": table.regret(confirmed), "epochs": cum / full,
                "own": own}

    for k, row in enumerate(rows, 1):
        # an epoch budget that this trial would overrun: the pick is what the trials before it found
        while pending and (cum + row["epochs"]) > pending[0] * full:
            at_epochs[pending.pop(0)] = {**snapshot(), "trials": k - 1}
        cum += row["epochs"]
        trained += row["state"] != "duplicate"
        if row["state"] == "complete":
            complete.append((row["value"], k, row["i"]))
            if row["value"] > best_value:
                best_value, best_i = row["value"], row["i"]
        if k in TRIAL_BUDGETS:
            at_trials[k] = snapshot()
    for f in pending:  # the study ended under this budget (trial cap): its final pick stands, with fewer epochs
        at_epochs[f] = {**snapshot(), "trials": len(rows), "ended": float(cum < f * full - 1e-9)}
    proposals = [r for r in rows if r["state"] != "duplicate"]
    dists = np.array([r["d"] for r in proposals]) if proposals else np.zeros(0)
    pruned_at = [r["epochs"] for r in rows if r["state"] == "pruned"]
    return {"at_trials": at_trials, "at_epochs": at_epochs, "n_trials": len(rows), "epochs": cum,
            "distances": dists.round(3).tolist(), "pruned_at": pruned_at,
            "states": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "duplicate")},
            "distinct": len({r["i"] for r in proposals})}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(points: list[dict[str, float]]) -> dict[str, Any]:
        reg = np.array([p["regret"] for p in points])
        conf = np.array([p["confirmed"] for p in points])
        ok = ~np.isnan(reg)
        out = {"n": len(points), "regret": _r(np.nanmean(reg)) if ok.any() else None,
               "regret_se": _r(np.nanstd(reg) / np.sqrt(max(ok.sum(), 1))) if ok.any() else None,
               "p_within": _r(float(np.mean(reg[ok] <= WITHIN + 1e-9)) * ok.mean()) if ok.any() else 0.0,
               "p_within_1": _r(float(np.mean(reg[ok] <= WITHIN_WIDE + 1e-9)) * ok.mean()) if ok.any() else 0.0,
               "regret_confirmed": _r(np.nanmean(conf)) if ok.any() else None,
               "p_within_confirmed": _r(float(np.mean(conf[ok] <= WITHIN + 1e-9)) * ok.mean()) if ok.any() else 0.0,
               "epochs_fraction": _r(np.mean([p["epochs"] for p in points])),
               "own_cost_fraction": _r(np.nanmean([p["own"] for p in points]))}
        if "trials" in points[0]:
            out["trials"] = _r(np.mean([p["trials"] for p in points]), 1)
            out["ended_under_budget"] = _r(np.mean([p.get("ended", 0.0) for p in points]))
        return out

    at_trials = {k: stats([s["at_trials"][k] for s in per_seed]) for k in TRIAL_BUDGETS
                 if all(k in s["at_trials"] for s in per_seed)}
    at_epochs = {}
    for f in EPOCH_FRACTIONS:
        points = [s["at_epochs"][f] for s in per_seed if f in s["at_epochs"]]
        if points:
            at_epochs[f] = stats(points)
    dists = np.concatenate([np.array(s["distances"]) for s in per_seed])
    pruned = np.concatenate([np.array(s["pruned_at"], dtype=int) for s in per_seed])
    return {
        "at_trials": at_trials, "at_epochs": at_epochs,
        "n_trials_mean": _r(np.mean([s["n_trials"] for s in per_seed]), 1),
        "states_mean": {k: _r(np.mean([s["states"][k] for s in per_seed]), 2) for k in per_seed[0]["states"]},
        "distinct_configs_mean": _r(np.mean([s["distinct"] for s in per_seed]), 1),
        "nearest": nn_stats(dists),
        "pruned_at_epochs": {int(e): int(c) for e, c in zip(*np.unique(pruned, return_counts=True))},
    }


def nn_stats(d: np.ndarray) -> dict[str, Any]:
    if not len(d):
        return {}
    return {"proposals": int(len(d)), "exact": _r(float(np.mean(d == 0))), "le_0.5": _r(float(np.mean(d <= 0.5))),
            "le_1": _r(float(np.mean(d <= 1))), "le_2": _r(float(np.mean(d <= 2))),
            "median": _r(float(np.median(d))), "p90": _r(float(np.percentile(d, 90)))}


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)
