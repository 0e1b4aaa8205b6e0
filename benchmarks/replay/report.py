"""The replay's settings, its rank correlations, the printed table and benchmarks/results/search-replay.json."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.replay.replay import EPOCH_FRACTIONS, TRIAL_BUDGETS, WITHIN, aggregate, setting_space
from benchmarks.replay.table import Table

TARGET_P, TARGET_FRACTION = 0.8, 0.3
GP_TRIALS = 30  # GP costs about half a CPU second per trial here


def first_decay(table: Table) -> int:
    """The first epoch trained at the decayed lr (1-based, as reported): MultiStepLR steps after each epoch, so a
    milestone m decays the lr from epoch m + 1 on; epoch m's value is still a high-lr value."""
    return int(table.data["lr_milestones"][0]) + 1


def warmups(table: Table) -> list[int]:
    e, d = table.epochs, first_decay(table)
    return sorted({2, e // 4, e // 2, d - 1, d, e - 2})


def pruner_label(spec: dict[str, Any]) -> str:
    name = spec["name"]
    if name == "percentile":
        return f"percentile{spec.get('percentile', 25.0):g} w{spec.get('n_warmup_steps', 0)}"
    if name == "median":
        return f"median w{spec.get('n_warmup_steps', 2)}"  # the product's median default: warm-up 2, 3 start-up
    if name == "successive_halving" and len(spec) > 1:
        return f"sh(min {spec.get('min_resource', 'auto')}, rf {spec.get('reduction_factor', 4)})"
    return name


def settings(table: Table, seeds: int, gp_seeds: int, max_trials: int) -> list[dict[str, Any]]:
    """grid: every sampler x pruner (the pruners as Optuna / the product default them, the percentile one as the
    recorded space shipped it); warmup: the cut epoch's own effect (random sampler, and TPE at the first decay);
    ladder: successive halving from the first post-decay epoch and from epoch 2, up to the full budget; no presets:
    TPE and random with the grid's pruners and no preset enqueued first (what the sampler finds by itself)."""
    shipped = dict(table.data["space"]["study"]["pruner"])
    d = first_decay(table)
    grid = [{"name": "none"}, {"name": "median"}, shipped, {"name": "successive_halving"}, {"name": "hyperband"}]
    out: list[dict[str, Any]] = []

    def add(group, sampler, pruner, n, trials=None, presets=None):
        label = f"{sampler} + {pruner_label(pruner)}" + (" (no presets)" if presets is False else "")
        if any(o["label"] == label for o in out):
            return
        # random search is cheap to replay: let it run until half the full cost is spent, however it prunes
        trials = trials or (4 * table.n if sampler == "random" else max_trials)
        out.append({"label": label, "group": group, "sampler": {"name": sampler}, "pruner": pruner,
                    "presets": presets, "seeds": list(range(n)), "max_trials": trials, "max_epoch_fraction": 0.5})

    for pruner in grid:
        add("grid", "tpe", pruner, seeds)
        add("grid", "random", pruner, seeds)
        add("grid", "gp", pruner, gp_seeds, trials=GP_TRIALS)
    half = max(seeds * 2 // 3, 1)
    for w in warmups(table):  # the pruner's own effect, with the cheap sampler
        add("warmup", "random", {**shipped, "n_warmup_steps": w}, seeds)
        add("warmup", "random", {"name": "median", "n_warmup_steps": w}, seeds)
    add("warmup", "tpe", {**shipped, "n_warmup_steps": d}, half)
    add("warmup", "tpe", {"name": "median", "n_warmup_steps": d}, half)
    for sampler in ("tpe", "random"):  # ladders up to the full budget
        add("ladder", sampler, {"name": "successive_halving", "min_resource": d, "reduction_factor": 2}, half)
        add("ladder", sampler, {"name": "successive_halving", "min_resource": 2, "reduction_factor": 2}, half)
    if table.data["space"]["study"].get("presets", True):  # the search's own worth: no preset enqueued first
        for pruner in (*grid, {"name": "successive_halving", "min_resource": 2, "reduction_factor": 2}):
            for sampler in ("tpe", "random"):
                add("no presets", sampler, pruner, seeds, presets=False)
    return out


# --- rank correlations over the table ---------------------------------------------------------------------------
def rank_correlations(table: Table) -> dict[str, Any]:
    from scipy.stats import spearmanr

    curves = table.curves.copy()
    for i in range(table.n):  # a failed seed keeps its last value (what a search would see from it)
        for s in range(table.n_seeds):
            n = table.lengths[i, s]
            curves[i, s, n:] = curves[i, s, n - 1] if n else 0.0
    final = curves[:, :, -1]
    fmean = final.mean(axis=1)
    top = np.argsort(-fmean)[:10]
    rows = []
    for e in range(table.epochs):
        single = [spearmanr(curves[:, s, e], fmean).statistic for s in range(table.n_seeds)]
        other = [spearmanr(curves[:, s, e], final[:, (s + 1) % table.n_seeds]).statistic
                 for s in range(table.n_seeds)] if table.n_seeds > 1 else [np.nan]
        mean_e = curves[:, :, e].mean(axis=1)
        kept = []
        for s in range(table.n_seeds):  # the table's 10 best (mean final): share in the top half at epoch e
            order = np.argsort(-curves[:, s, e], kind="stable")
            half = set(order[: table.n // 2].tolist())
            kept.append(np.mean([i in half for i in top]))
        rows.append({"epoch": e + 1, "rho_seed_vs_mean_final": _r(np.mean(single)),
                     "rho_seed_vs_other_seed_final": _r(np.mean(other)),
                     "rho_mean_vs_mean_final": _r(spearmanr(mean_e, fmean).statistic),
                     "top10_in_top_half": _r(np.mean(kept))})
    seed_ceiling = (_r(spearmanr(final[:, 0], final[:, 1]).statistic) if table.n_seeds > 1 else None)
    d = first_decay(table)
    return {"per_epoch": rows, "final_seed_vs_seed": seed_ceiling, "first_decay_epoch": d,
            "before_decay": rows[d - 2], "after_decay": rows[d - 1],
            "final_spread": {"best": _r(fmean.max(), 2), "p90": _r(np.percentile(fmean, 90), 2),
                             "median": _r(np.median(fmean), 2), "p10": _r(np.percentile(fmean, 10), 2),
                             "within_0.5_of_best": int((fmean >= fmean.max() - WITHIN).sum()),
                             "seed_sd": _r(np.mean(np.abs(final[:, 0] - final[:, 1])) / np.sqrt(2), 2)
                             if table.n_seeds > 1 else None}}


def pruner_cut_epochs(table: Table, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per grid/ladder setting, where its trials were actually cut, and the rank correlation at its first cut."""
    rho = {r["epoch"]: r["rho_seed_vs_mean_final"] for r in rank_correlations(table)["per_epoch"]}
    out = {}
    for r in results:
        cuts = r["pruned_at_epochs"]
        if cuts:
            first = min(int(e) for e in cuts)
            total = sum(cuts.values())
            weighted = sum(rho[int(e)] * c for e, c in cuts.items()) / total
            out[r["label"]] = {"first_cut_epoch": first, "rho_at_first_cut": rho[first],
                               "rho_at_cuts_weighted": round(weighted, 3), "cuts": {str(k): v for k, v in cuts.items()}}
    return out


# --- running ----------------------------------------------------------------------------------------------------
def _chunk(task: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]], float]:
    import torch

    from benchmarks.replay.replay import run_study, summarise_study

    torch.set_num_threads(1)
    if task["path"] not in _TABLES:
        _TABLES[task["path"]] = Table.load(task["path"])
    table = _TABLES[task["path"]]
    space = setting_space(table, task["sampler"], task["pruner"], task.get("presets"))
    started = time.process_time()  # CPU seconds of this worker on these studies
    out = []
    for seed in task["seeds"]:
        rows = run_study(table, space, seed, task["max_trials"], task["max_epoch_fraction"] * table.n * table.epochs)
        out.append(summarise_study(table, rows))
    return task["path"], task["label"], out, time.process_time() - started


_TABLES: dict[str, Table] = {}


def run_all(paths: list[str], args) -> dict[str, Any]:
    tasks, meta = [], {}
    for path in paths:
        table = Table.load(path)
        n_trials = args.n_trials or 2 * table.n
        specs = settings(table, args.seeds, args.gp_seeds or args.seeds, n_trials)
        if args.only:
            specs = [s for s in specs if s["label"] in args.only]
        meta[path] = (table, specs)
        for spec in specs:
            step = 2 if spec["sampler"]["name"] == "gp" else 10
            for k in range(0, len(spec["seeds"]), step):
                tasks.append({**spec, "path": path, "seeds": spec["seeds"][k:k + step]})
    tasks.sort(key=lambda t: t["sampler"]["name"] != "gp")  # the slow ones first, for balance
    collected: dict[tuple[str, str], list] = {}
    walls: dict[tuple[str, str], float] = {}
    started = time.perf_counter()
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    chunks = pool.imap_unordered(_chunk, tasks) if pool else map(_chunk, tasks)
    try:
        for k, (path, label, summaries, wall) in enumerate(chunks, 1):
            collected.setdefault((path, label), []).extend(summaries)
            walls[(path, label)] = walls.get((path, label), 0.0) + wall
            if k % 10 == 0 or k == len(tasks):
                print(f"replay: {k}/{len(tasks)} chunks, {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    out = {}
    for path, (table, specs) in meta.items():
        results = []
        for spec in specs:
            agg = aggregate(collected[(path, spec["label"])])
            agg.update({"label": spec["label"], "group": spec["group"], "sampler": spec["sampler"],
                        "pruner": spec["pruner"], "presets": spec["presets"] is not False,
                        "seeds": len(spec["seeds"]), "max_trials": spec["max_trials"],
                        "cpu_s": round(walls[(path, spec["label"])], 1)})
            results.append(agg)
        out[table.task] = {"table": path, "table_summary": table_summary(table), "results": results,
                           "rank_correlations": rank_correlations(table),
                           "pruner_cuts": pruner_cut_epochs(table, results)}
    return out


def table_summary(table: Table) -> dict[str, Any]:
    d = table.data
    return {"task": table.task, "n_configs": table.n, "seeds": d["seeds"], "epochs": table.epochs,
            "lr_milestones": d["lr_milestones"], "first_decay_epoch": first_decay(table), "student": d.get("student"),
            "teacher": d["data"].get("teacher"), "images": d["data"].get("images"), "runs": d.get("runs"),
            "failed_runs": int(table.failed.sum()), "full_cost_epochs": table.n * table.epochs,
            "best_mean_final": round(table.best, 2), "best_config": table.ids[int(np.argmax(table.final_mean))],
            "reference_mean_final": round(float(table.final_mean[0]), 2), "neighbour_scale": table.neighbour_scale}


# --- verdicts and printing --------------------------------------------------------------------------------------
def at(result: dict[str, Any], fraction: float) -> dict[str, Any] | None:
    return result["at_epochs"].get(fraction) or result["at_epochs"].get(str(fraction))


def default_label(table_summary: dict[str, Any], rule: str) -> str:
    """A default written with `{d}` for the task's first decayed epoch, e.g. 'tpe + percentile90 w{d}'."""
    return rule.format(d=table_summary["first_decay_epoch"])


def verdicts(task: dict[str, Any], rule: str) -> dict[str, Any]:
    """The target (issue #18): the default within 0.5 points of the table's best with probability >= 0.8 using
    <= 30% of the epochs of training every table configuration to the end, and better than random search without
    pruning at that cost; and, whether or not it meets it, the smallest budget at which it reaches 0.8."""
    res = {r["label"]: r for r in task["results"]}
    label = default_label(task["table_summary"], rule)
    if label not in res:
        raise SystemExit(f"default {label!r} was not replayed; replayed: {', '.join(res)}")
    chosen, random_none = res[label], res["random + none"]
    s, r = at(chosen, TARGET_FRACTION), at(random_none, TARGET_FRACTION)
    ranked = sorted((x for x in task["results"] if at(x, TARGET_FRACTION)),
                    key=lambda x: (-at(x, TARGET_FRACTION)["p_within"], at(x, TARGET_FRACTION)["regret"]))
    reaches = [f for f in EPOCH_FRACTIONS if at(chosen, f) and at(chosen, f)["p_within"] >= TARGET_P]
    alone = res.get(f"{label} (no presets)")
    a = alone and at(alone, TARGET_FRACTION)
    return {"default": label, "at_fraction": TARGET_FRACTION,
            "default_p_within": s["p_within"], "default_regret": s["regret"],
            "default_own_cost_fraction": s["own_cost_fraction"],
            "default_no_presets_p_within": a and a["p_within"], "default_no_presets_regret": a and a["regret"],
            "random_no_pruning_no_presets_p_within": at(res["random + none (no presets)"], TARGET_FRACTION)["p_within"]
            if "random + none (no presets)" in res else None,
            "default_p_within_confirmed": s["p_within_confirmed"],
            "meets_target": bool(s["p_within"] >= TARGET_P),
            "random_no_pruning_p_within": r["p_within"], "random_no_pruning_regret": r["regret"],
            "beats_random_no_pruning": bool(s["regret"] < r["regret"] and s["p_within"] >= r["p_within"]),
            "default_first_fraction_with_p_0.8": reaches[0] if reaches else None,
            "best_at_fraction": [{"label": x["label"], **{k: at(x, TARGET_FRACTION)[k] for k in
                                                          ("p_within", "regret", "regret_confirmed")}}
                                 for x in ranked[:8]],
            "p_within_by_fraction": {x["label"]: {str(f): at(x, f)["p_within"] for f in EPOCH_FRACTIONS if at(x, f)}
                                     for x in task["results"] if x["group"] == "grid"}}


def print_task(name: str, task: dict[str, Any]) -> None:
    t = task["table_summary"]
    print(f"\n== {name}: {t['n_configs']} configs x {len(t['seeds'])} seeds, {t['epochs']} epochs (first decayed "
          f"epoch {t['first_decay_epoch']}), best mean final {t['best_mean_final']}, reference "
          f"{t['reference_mean_final']}; full cost {t['full_cost_epochs']} epochs")
    rc = task["rank_correlations"]
    print(f"final spread {rc['final_spread']}; final seed-vs-seed rho {rc['final_seed_vs_seed']}")
    print("epoch  " + " ".join(f"{r['epoch']:>5}" for r in rc["per_epoch"]))
    print("rho    " + " ".join(f"{r['rho_seed_vs_mean_final']:>5.2f}" for r in rc["per_epoch"]))
    print("top10  " + " ".join(f"{r['top10_in_top_half']:>5.2f}" for r in rc["per_epoch"]))
    head = " ".join(f"{'@' + str(f):>12}" for f in EPOCH_FRACTIONS)
    print(f"\n{'setting':<38} {'seeds':>5} {'near':>5} {head} {'own@0.3':>8} {'conf@0.3':>9} {'rho@cut':>8}")
    cuts = task["pruner_cuts"]
    for r in task["results"]:
        cells = []
        for f in EPOCH_FRACTIONS:
            a = at(r, f)
            cells.append(f"{a['regret']:5.2f} {a['p_within']:4.2f}" + ("*" if a.get("ended_under_budget") else " ")
                         if a and a["regret"] is not None else "-")
        t30 = at(r, TARGET_FRACTION)
        rho = cuts.get(r["label"], {}).get("rho_at_cuts_weighted")
        print(f"{r['label']:<38} {r['seeds']:>5} {r['nearest'].get('median', 0):5.2f} "
              + " ".join(f"{c:>12}" for c in cells)
              + f" {t30['own_cost_fraction'] if t30 else float('nan'):>8.2f}"
              + f" {t30['p_within_confirmed'] if t30 else float('nan'):>9.2f} {'-' if rho is None else rho:>8}")
    print("(cells: regret of the pick (points, vs the table's best mean over seeds) and P(within 0.5) at each epoch\n"
          " budget, a fraction of training every table config to the end; * = some studies ended (trial cap) under\n"
          " it, their final pick counts; near: median distance of a proposal to its table neighbour; own@0.3: epochs\n"
          " spent / (trials x epochs) at 0.3; conf@0.3: P(within 0.5) after confirmation (best of top-3 + reference\n"
          " by table mean); rho@cut: Spearman of one seed's value at the epochs the pruner cut vs the mean final)")


def main(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    tasks = run_all(args.tables, args)
    import scipy
    import torch

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "optuna": optuna.__version__, "torch": torch.__version__, "scipy": scipy.__version__,
                          "numpy": np.__version__, "workers": args.workers, "load_average_before": load_before,
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]},
              "settings": {"seeds": args.seeds, "gp_seeds": args.gp_seeds or args.seeds, "gp_max_trials": GP_TRIALS,
                           "within": WITHIN, "trial_budgets": TRIAL_BUDGETS, "epoch_fractions": EPOCH_FRACTIONS,
                           "max_epoch_fraction": 0.5, "distance": "benchmarks/replay/table.py docstring",
                           "command": " ".join(["python", "benchmarks/search_replay.py", *sys.argv[1:]])},
              "tasks": tasks, "wall_s": round(time.perf_counter() - started, 1),
              "cpu_s": round(sum(r["cpu_s"] for t in tasks.values() for r in t["results"]), 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return finish(result, args.default, Path(args.out))


def finish(result: dict[str, Any], rule: str, out: Path) -> int:
    """Verdicts for the default `rule`, the printed tables, the JSON (also `report`: re-judge a saved replay)."""
    result["default_rule"] = rule
    for name, task in result["tasks"].items():
        task["verdict"] = verdicts(task, rule)
        print_task(name, task)
        v = task["verdict"]
        print(f"verdict ({v['default']}, at {v['at_fraction']:.0%} of the full cost): P(within 0.5) "
              f"{v['default_p_within']}, regret {v['default_regret']} (random without pruning: "
              f"{v['random_no_pruning_p_within']}, {v['random_no_pruning_regret']}); meets target: "
              f"{v['meets_target']}; beats random without pruning: {v['beats_random_no_pruning']}; reaches 0.8 at "
              f"{v['default_first_fraction_with_p_0.8']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=_json) + "\n")
    print(f"\nwrote {out}")
    return 0


def rejudge(path: Path, rule: str) -> int:
    result = json.loads(path.read_text())
    return finish(result, rule, path)


def _json(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _r(x: float, digits: int = 3) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), digits)
