"""The search replay (benchmarks/search_replay.py): the tabular benchmark of our samplers and pruners.

The committed fixture tests/fixtures/replay-small.json is a table of 40 configurations x 2 seeds x 8 epochs over a
one-knob space (`optim.lr`, a categorical of 40 values, method kd, no presets), each value its own recorded
configuration (so a proposal's nearest neighbour is itself, at distance 0), with curves from a known function
whose final value is the same for both seeds. Random search with n trials then draws n values uniformly WITH
replacement (a repeat is answered by the product's duplicate rule), and the product's pick is the best drawn
final, so the expected regret is exact combinatorics: E[max of n draws] = sum_k v_(k) ((k/N)^n - ((k-1)/N)^n).
Regenerate with `python tests/test_search_replay.py` (a test pins the file to the generator). The whole
`replay` command also runs on it (one worker, in process) with a fixed-seed regret pinned. Last, the space check
that refuses a pruner that can never act (ackd_search/searching/space_checks.py `check_pruner_budget`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.replay import replay as R  # noqa: E402
from benchmarks.replay.table import Table  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "replay-small.json"
N, EPOCHS = 40, 8


def synthetic_table() -> dict:
    choices = [round(0.01 + 0.002 * k, 4) for k in range(N)]
    rng = np.random.default_rng(7)
    finals = np.round(70 + 25 * rng.permutation(np.linspace(0, 1, N)) ** 2, 2)  # distinct, unknown order
    space = {"study": {"name": "replay-small", "sampler": {"name": "random"}, "pruner": {"name": "none"},
                       "presets": False},
             "run": {"seed": 0, "student": "digits_cnn_small", "cpu_threads": 1, "data": {"name": "digits"},
                     "optim": {"epochs": EPOCHS, "lr": {"choices": choices}}, "distill": {"method": "kd"}}}
    configs = []
    for k, (lr, final) in enumerate(zip(choices, finals)):
        curves = []
        for _seed in range(2):
            rise = final - (final - 10) * np.exp(-np.arange(1, EPOCHS + 1) / 1.5) + rng.normal(0, 3, EPOCHS)
            rise[-1] = final  # the same final value for both seeds: the pick is the best drawn config
            curves.append([round(float(v), 2) for v in rise])
        configs.append({"id": k, "params": {"optim.lr": lr}, "aux_placements": [], "curves": curves,
                        "status": ["ok", "ok"]})
    dist = {"name": "CategoricalDistribution", "attributes": {"choices": choices}}
    return {"task": "synthetic", "space": space, "epochs": EPOCHS, "lr_milestones": [5, 6, 7], "seeds": [0, 1],
            "distributions": {"optim.lr": json.dumps(dist)}, "n_configs": N, "data": {}, "runs": {},
            "configs": configs}


def exact_random_regret(finals: np.ndarray, n: int) -> tuple[float, float]:
    """Mean and standard deviation of best - max(n uniform draws with replacement)."""
    v = np.sort(finals)
    k = np.arange(1, len(v) + 1)
    p = (k / len(v)) ** n - ((k - 1) / len(v)) ** n
    regret = v[-1] - v
    mean = float((p * regret).sum())
    return mean, float(np.sqrt((p * regret ** 2).sum() - mean ** 2))


@pytest.fixture(scope="module")
def table() -> Table:
    return Table.load(FIXTURE)


def test_fixture_is_the_generator_s():
    assert json.loads(FIXTURE.read_text()) == json.loads(json.dumps(synthetic_table()))


@pytest.mark.parametrize("n", [3, 10])
def test_random_search_reproduces_the_exact_regret(table, n):
    space = R.setting_space(table, {"name": "random"}, {"name": "none"})
    seeds = 150
    regrets, epochs = [], []
    for seed in range(seeds):
        rows = R.run_study(table, space, seed, max_trials=n, max_epochs=1e9)
        summary = R.summarise_study(table, rows)
        regrets.append(summary["at_trials"][n]["regret"] if n in summary["at_trials"] else
                       table.regret(max((r for r in rows if r["state"] == "complete"), key=lambda r: r["value"])["i"]))
        epochs.append(summary["epochs"])
        assert all(r["d"] == 0.0 for r in rows if r["state"] != "duplicate")  # every proposal is in the table
        trained = sum(r["state"] == "complete" for r in rows)
        assert summary["epochs"] == trained * EPOCHS  # no pruner: every new proposal to the end, repeats free
    mean, sd = exact_random_regret(table.final_mean, n)
    assert abs(np.mean(regrets) - mean) < 4 * sd / np.sqrt(seeds) + 0.01, (np.mean(regrets), mean)


def test_a_pruner_spends_fewer_epochs_and_cuts_after_its_warm_up(table):
    pruner = {"name": "percentile", "percentile": 50.0, "n_startup_trials": 3, "n_warmup_steps": 4}
    space = R.setting_space(table, {"name": "random"}, pruner)
    rows = R.run_study(table, space, 0, max_trials=30, max_epochs=1e9)
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned and all(r["epochs"] >= 4 for r in pruned)
    assert sum(r["epochs"] for r in rows) < sum(r["state"] != "duplicate" for r in rows) * EPOCHS


def test_epoch_budgets_and_aggregate(table):
    space = R.setting_space(table, {"name": "tpe"}, {"name": "median", "n_warmup_steps": 3})
    per_seed = [R.summarise_study(table, R.run_study(table, space, s, max_trials=30, max_epochs=0.5 * N * EPOCHS))
                for s in range(3)]
    for s in per_seed:
        assert s["epochs"] <= 0.5 * N * EPOCHS + EPOCHS  # stops once the budget is spent
        for f, point in s["at_epochs"].items():
            assert point["epochs"] <= f + 1e-9
    agg = R.aggregate(per_seed)
    assert agg["nearest"]["exact"] == 1.0 and 0.0 <= agg["at_epochs"][0.2]["p_within"] <= 1.0


def test_nearest_neighbour_on_the_shipped_space():
    """Every recorded config of the real digits space is its own nearest neighbour; distance rules hold."""
    from benchmarks.replay import record

    raw = record.task_space("digits", Path("/nonexistent-replay"))
    configs = record.sample_configs(raw, 12, seed=3)
    dists = {}
    for c in configs:
        dists.update(c["distributions"])
        c["curves"], c["status"] = [[50.0] * 4], ["ok"]
    data = {"task": "t", "space": raw, "epochs": 4, "lr_milestones": [2], "seeds": [0], "distributions": dists,
            "configs": configs}
    t = Table(data)
    for i, c in enumerate(configs):
        assert t.nearest(c["params"]) == (i, 0.0)
    a = dict(configs[1]["params"])
    b = dict(a, **{"distill.standardize": not a["distill.standardize"]})
    assert t.distances(b)[1] == pytest.approx(1.0)  # one categorical mismatch
    lr = t.dists["optim.lr"]
    low, high = dict(a, **{"optim.lr": lr.low}), dict(a, **{"optim.lr": lr.high})
    assert t._distances(t.encode(low), t.encode(high)[None, :])[0] == pytest.approx(1.0)  # full log range = 1
    absent = {k: v for k, v in a.items() if k != "optim.lr"}
    assert t._distances(t.encode(absent), t.encode(a)[None, :])[0] == pytest.approx(1.0)  # absent vs present
    over = dict(a, **{"distill.ackd.learners_after_stage_1": 3, "distill.ackd.learners_after_stage_2": 3})
    capped = dict(a, **{"distill.ackd.learners_after_stage_1": 1, "distill.ackd.learners_after_stage_2": 3})
    assert t._distances(t.encode(over), t.encode(capped)[None, :])[0] == 0.0  # same effective structure



def test_the_whole_replay_on_the_fixture_pins_random_search_s_regret(tmp_path, capsys):
    """`search_replay.py replay` end to end (one worker, in process), and its numbers pinned: random search
    without pruning after 10 trials, sampler seeds 0-29, has a mean regret of 2.9747 points (a fixed-seed value of
    Optuna 5's RandomSampler, measured once: any change to sampling, duplicates, the pick or the regret moves it;
    the exact expectation is 3.7055 and the 30-seed standard error 3.63 / sqrt(30) = 0.66), and a study capped at
    half the full cost (0.5 x 40 configs x 8 epochs) ends after 20 trained trials."""
    import argparse

    from benchmarks.replay import report

    out = tmp_path / "replay.json"
    args = argparse.Namespace(tables=[str(FIXTURE)], seeds=30, gp_seeds=None, n_trials=None, workers=1,
                              only=["random + none", "random + median w2"], out=str(out), default="random + median w2")
    assert report.main(args) == 0
    result = json.loads(out.read_text())
    task = result["tasks"]["synthetic"]
    res = {r["label"]: r for r in task["results"]}
    rnd = res["random + none"]
    assert rnd["seeds"] == 30 and rnd["at_trials"]["10"]["regret"] == pytest.approx(2.9747, abs=1e-3)
    assert rnd["states_mean"]["complete"] == 20.0  # 0.5 x 40 x 8 epochs = 20 trained trials (repeats are free)
    mean, sd = exact_random_regret(table_of(FIXTURE).final_mean, 10)
    assert (round(mean, 4), round(sd, 2)) == (3.7055, 3.63)
    assert abs(rnd["at_trials"]["10"]["regret"] - mean) < 3 * sd / np.sqrt(30)
    verdict = task["verdict"]
    assert verdict["default"] == "random + median w2" and 0 <= verdict["default_p_within"] <= 1
    assert "verdict (random + median w2" in capsys.readouterr().out


def table_of(path: Path) -> Table:
    return Table.load(path)


@pytest.mark.parametrize("pruner, epochs, line", [
    ({"name": "median", "n_startup_trials": 8, "n_warmup_steps": 15}, 6,
     "spaces/cifar10.yaml: study.pruner.n_warmup_steps: 15 is not below the trial budget run.optim.epochs = 6: the "
     "median pruner could never cut a trial before its end; allowed: n_warmup_steps <= 5, or run.optim.epochs >= 16, "
     "or pruner none"),
    ({"name": "percentile", "percentile": 90.0, "n_warmup_steps": 6}, 6, "n_warmup_steps: 6 is not below"),
    ({"name": "median", "n_warmup_steps": 2}, 2, "n_warmup_steps: 2 is not below"),
    ({"name": "successive_halving", "min_resource": 3, "reduction_factor": 2, "min_early_stopping_rate": 1}, 6,
     "min_resource: 6 is not below the trial budget run.optim.epochs = 6"),  # its first rung: 3 x 2^1
    ({"name": "hyperband", "min_resource": 8}, 6, "min_resource: 8 is not below"),
], ids=["cifar10-at-6-epochs", "percentile", "median", "successive-halving-rung", "hyperband"])
def test_a_pruner_that_can_never_act_is_refused_in_one_line(pruner, epochs, line):
    import yaml

    from ackd_search.config import ConfigError
    from ackd_search.searching.space import load_space_data

    raw = yaml.safe_load((ROOT / "spaces" / "cifar10.yaml").read_text())
    raw["study"]["pruner"], raw["run"]["optim"]["epochs"] = pruner, epochs
    with pytest.raises(ConfigError) as err:
        load_space_data(raw, "spaces/cifar10.yaml")
    assert len(err.value.problems) == 1 and line in err.value.problems[0], err.value.problems
    raw["run"]["optim"]["epochs"] = {"choices": [epochs, 40]}  # a searched budget: it acts at 40
    load_space_data(raw, "spaces/cifar10.yaml")
    defaults = {k: v for k, v in pruner.items() if k not in ("n_warmup_steps", "min_resource")}
    raw["study"]["pruner"], raw["run"]["optim"]["epochs"] = defaults, 1
    load_space_data(raw, "spaces/cifar10.yaml")  # a warm-up left to the defaults is not refused


@pytest.mark.parametrize("path", sorted((ROOT / "spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pruner_can_act(path):
    from ackd_search.searching.space import load_space

    load_space(path)  # refused (ConfigError) if its pruner's first cut is not before the trial's last epoch


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(synthetic_table(), separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE}")
