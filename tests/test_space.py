"""Search spaces: parsing, fixed vs searched values, every validation error, conditional learner structures, presets.

No training here: trials are drawn with `study.ask()` on an in-memory storage."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from ackd_search.config import ConfigError, RunConfig
from ackd_search.distill.ackd import ACKD
from ackd_search.models import create_model
from ackd_search.space import LEARNER_PARAM, load_space, make_pruner, make_sampler

SPACES = Path(__file__).resolve().parent.parent / "spaces"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_space(tmp_path: Path, data: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def minimal(**run) -> dict:
    return {"study": {"name": "t"}, "run": run}


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_space(path)
    return info.value.problems


@pytest.mark.parametrize("name", ["digits.yaml", "cifar10.yaml", "cifar100.yaml"])
def test_shipped_spaces_load(name: str) -> None:
    space = load_space(SPACES / name)
    assert space.study.name
    assert {p.path for p in space.params} >= {"optim.lr", "distill.temperature", "distill.ackd.adv_weight"}
    assert space.learners is not None and space.learners.max_total == 4
    cfg = space.run_config({p.path: p.suggest(optuna.trial.FixedTrial(_midpoints(space))) for p in space.params})
    assert isinstance(cfg, RunConfig)


def _midpoints(space) -> dict:
    out = {}
    for p in space.params:
        if p.kind == "categorical":
            out[p.path] = p.choices[0]
        elif p.kind == "int":
            out[p.path] = int(p.low)
        else:
            out[p.path] = p.low
    return out


def test_shipped_cifar100_space_is_the_benchmark_pair() -> None:
    space = load_space(SPACES / "cifar100.yaml")
    assert space.base["student"] == "resnet8x4" and space.base["teacher"]["arch"] == "resnet32x4"
    assert space.base["data"]["name"] == "cifar100"
    assert space.num_stages == 3 and space.learner_stages() == [1, 2]


def test_scalar_is_fixed_and_range_is_searched(tmp_path: Path) -> None:
    path = write_space(tmp_path, minimal(
        optim={"epochs": 3, "lr": {"low": 0.01, "high": 0.1, "log": True}, "batch_size": {"choices": [32, 64]}},
        distill={"temperature": 4.0, "ackd": {"attn_reduction": {"low": 2, "high": 8, "step": 2}}},
    ))
    space = load_space(path)
    params = {p.path: p for p in space.params}
    assert set(params) == {"optim.lr", "optim.batch_size", "distill.ackd.attn_reduction"}
    assert params["optim.lr"].kind == "float" and params["optim.lr"].log
    assert params["optim.batch_size"].kind == "categorical" and params["optim.batch_size"].choices == (32, 64)
    assert params["distill.ackd.attn_reduction"].kind == "int"
    assert space.base == {"optim": {"epochs": 3}, "distill": {"temperature": 4.0}}
    cfg = space.run_config({"optim.lr": 0.02, "optim.batch_size": 32, "distill.ackd.attn_reduction": 4})
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.batch_size) == (3, 0.02, 32)
    assert cfg.distill.temperature == 4.0 and cfg.distill.ackd.attn_reduction == 4


def test_every_problem_is_reported_at_once_with_file_key_and_allowed(tmp_path: Path) -> None:
    path = write_space(tmp_path, {
        "study": {"name": "x", "sampler": {"name": "tpx"}, "pruner": {"name": "median", "bogus": 1},
                  "n_trials": 0, "colour": "red"},
        "run": {
            "student": "resnet9",
            "optim": {"lr": {"low": 0.1, "high": 0.01}, "weight_decay": {"low": 0, "high": 0.1, "log": True},
                      "momentum": {"choices": []}, "batch_size": {"low": 1.5, "high": 8}},
            "distill": {"temperature": "hot", "method": {"choices": ["ackd", "foo"]},
                        "ackd": {"aux_width": {"low": 1, "high": 1}}},
            "data": {"name": "imagenet"},
            "color": 3,
        },
        "extra": 1,
    })
    problems = problems_of(path)
    expected = {
        "extra: unknown key; allowed: study, run, learners",
        "study.colour: unknown key; allowed: name",
        "study.sampler.name: 'tpx' is not allowed; allowed: tpe, random",
        "study.pruner.bogus: unknown option for median; allowed: n_startup_trials",
        "study.n_trials: 0 is out of range; allowed: >= 1",
        "run.student: unknown value 'resnet9'; allowed: digits_cnn_large",
        "run.optim.lr: empty range: low (0.1) must be < high (0.01)",
        "run.optim.weight_decay: a log range must stay above 0",
        "run.optim.momentum.choices: expected a non-empty list",
        "run.optim.batch_size.low: expected an integer, got 1.5",
        "run.distill.temperature: expected a number, got 'hot'",
        "run.distill.method.choices[1]: 'foo' is not allowed; allowed: student, kd, ackd",
        "run.distill.ackd.aux_width: empty range: low (1) must be < high (1)",
        "run.data.name: 'imagenet' is not allowed; allowed: digits, cifar10, cifar100",
        "run.color: unknown key; allowed: seed, student",
    }
    for fragment in expected:
        assert any(fragment in p for p in problems), f"missing problem {fragment!r} in {problems}"
    assert all(p.startswith(f"{path}: ") for p in problems)
    assert len(problems) == len(expected)


@pytest.mark.parametrize("text, fragment", [
    ("study: {name: x\nrun: [", "malformed YAML (line 2"),
    ("- just\n- a list\n", "expected a mapping with keys study, run, learners"),
    ("run: {}\n", "study.name: required"),
    ("study: {name: x}\nrun: {optim: {lr: {low: 0.1}}}\n", "run.optim.lr: a range needs high"),
    ("study: {name: x}\nrun: {distill: {method: {low: 1, high: 2}}}\n", "use choices for this field"),
    ("study: {name: x}\nrun: {optim: {lr: {low: 0.01, high: 0.1, log: true, step: 0.01}}}\n", "log and step"),
    ("study: {name: x}\nrun: {optim: {lr: {low: -1.0, high: 0.1}}}\n", "run.optim.lr.low: -1.0 is out of range"),
    ("study: {name: x}\nrun: {optim: 5}\n", "run.optim: expected a mapping"),
    ("study: {name: x, pruner: {name: median, n_warmup_steps: abc}}\nrun: {}\n", "study.pruner: median rejects"),
    ("study: {name: x, second_objective: student_flops}\nrun: {}\n", "cannot prune"),
    ("study: {name: x}\nrun: {distill: {ackd: {aux_placements: [2]}}}\nlearners: {max_total: 2}\n",
     "conflicts with the fixed run.distill.ackd.aux_placements"),
    ("study: {name: x}\nrun: {student: resnet8}\nlearners: {stages: [0, 3]}\n",
     "learners.stages[0]: 0 is out of range"),
    ("study: {name: x}\nrun: {}\nlearners: {max_total: -1}\n", "learners.max_total: -1 is out of range"),
    ("study: {name: x}\nrun: {}\nlearners: {max_total: two}\n", "learners.max_total: expected an integer"),
])
def test_single_validation_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    problems = problems_of(path)
    assert any(fragment in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_missing_space_file(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("study: !!python/object/apply:os.system ['echo pwned']\n")
    assert any("malformed YAML" in p for p in problems_of(path))


def _learner_space(tmp_path: Path, student: str = "resnet8", **learners) -> object:
    return load_space(write_space(tmp_path, {
        "study": {"name": "t"},
        "run": {"student": student, "distill": {"method": "ackd"}},
        "learners": {"max_per_stage": 3, "max_total": 4, **learners},
    }))


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_conditional_learner_structures_are_always_legal(tmp_path: Path, sampler: str) -> None:
    space = _learner_space(tmp_path)
    space.study.sampler = {"name": sampler}
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, seed=1))
    student = create_model("resnet8", 10)
    teacher = create_model("resnet8", 10)
    seen = set()
    for i in range(40):
        trial = study.ask()
        values = space.suggest(trial)
        cfg = space.run_config(values)
        placements = cfg.distill.ackd.aux_placements
        assert len(placements) <= 4
        assert all(1 <= p <= 2 for p in placements)
        assert all(placements.count(p) <= 3 for p in placements)
        seen.add(tuple(placements))
        # Every learner-count parameter is always present (importance tools and GP/CMA-ES can see it).
        assert {LEARNER_PARAM.format(1), LEARNER_PARAM.format(2)} <= set(trial.params)
        if i < 5:  # the structure builds (ACKD validates placements against the student)
            ACKD(student, teacher, cfg.distill, cfg.optim, "resnet8")
        study.tell(trial, float(len(placements)))
    assert len(seen) >= 5  # the sampler explores different structures, including no learner at all
    assert () in seen or sampler == "tpe"


def test_learner_stages_restrict_branch_points(tmp_path: Path) -> None:
    space = _learner_space(tmp_path, student="vgg8", stages=[3, 4], max_total=2)
    assert space.num_stages == 5 and space.learner_stages() == [3, 4]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        placements = space.run_config(space.suggest(trial)).distill.ackd.aux_placements
        assert set(placements) <= {3, 4} and len(placements) <= 2
        study.tell(trial, 0.0)


def test_kd_trials_do_not_sample_ackd_knobs(tmp_path: Path) -> None:
    space = load_space(SPACES / "digits.yaml")
    trial = optuna.trial.FixedTrial({**_midpoints(space), "distill.method": "kd"})
    values = space.suggest(trial)
    assert values["distill.method"] == "kd"
    assert not any(k.startswith("distill.ackd.") for k in values)


def test_presets_are_the_reference_and_kd_points() -> None:
    space = load_space(SPACES / "digits.yaml")
    reference, outside = space.preset_values("reference")
    assert outside == []
    cfg = space.run_config({**reference, "distill.method": "ackd"})
    assert cfg.distill.ackd.aux_placements == [2, 2, 2]  # three learners before the last stage
    assert (cfg.distill.ce_weight, cfg.distill.kd_weight, cfg.distill.temperature) == (1.0, 1.0, 4.0)
    assert cfg.distill.ackd.adv_weight == 0.1 and cfg.distill.ackd.student_target == "aux_mean"
    kd, _ = space.preset_values("kd")
    cfg = space.run_config({**kd, "distill.method": "kd"})
    assert (cfg.distill.ce_weight, cfg.distill.kd_weight) == (0.1, 0.9)


def test_preset_outside_a_narrow_range_is_left_to_the_sampler(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, minimal(distill={"temperature": {"low": 5.0, "high": 8.0}})))
    values, outside = space.preset_values("reference")
    assert outside == ["distill.temperature"] and "distill.temperature" not in values


@pytest.mark.parametrize("name, options", [
    ("tpe", {}), ("random", {}), ("cmaes", {}), ("gp", {}), ("nsga2", {}), ("qmc", {}),
])
def test_every_sampler_builds(tmp_path: Path, name: str, options: dict) -> None:
    space = load_space(write_space(tmp_path, {"study": {"name": "t", "sampler": {"name": name, **options}}}))
    assert make_sampler(space, seed=0) is not None


def test_default_tpe_is_multivariate_and_grouped(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, {"study": {"name": "t"}}))
    sampler = make_sampler(space, seed=0)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._group


@pytest.mark.parametrize("name, cls", [
    ("median", optuna.pruners.MedianPruner),
    ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
    ("hyperband", optuna.pruners.HyperbandPruner),
    ("none", optuna.pruners.NopPruner),
])
def test_every_pruner_builds(tmp_path: Path, name: str, cls: type) -> None:
    space = load_space(write_space(tmp_path, {"study": {"name": "t", "pruner": {"name": name}}}))
    assert isinstance(make_pruner(space), cls)


def test_fingerprint_ignores_run_length_but_not_the_space(tmp_path: Path) -> None:
    base = {"study": {"name": "t", "n_trials": 5}, "run": {"optim": {"lr": {"low": 0.01, "high": 0.1}}}}
    a = load_space(write_space(tmp_path, base, "a.yaml"))
    base["study"]["n_trials"] = 50
    b = load_space(write_space(tmp_path, base, "b.yaml"))
    base["run"]["optim"]["lr"]["high"] = 0.2
    c = load_space(write_space(tmp_path, base, "c.yaml"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
