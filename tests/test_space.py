"""Search spaces: parsing, fixed vs searched values, every validation error, conditional learner structures, presets.

No training here: trials are drawn with `study.ask()` on an in-memory storage."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import optuna
import pytest
import yaml

from ackd_search.config import ConfigError, RunConfig
from ackd_search.distill.ackd import ACKD
from ackd_search.models import create_model
from ackd_search.searching.params import LEARNER_PARAM
from ackd_search.searching.samplers import SAMPLERS, make_pruner, make_sampler
from ackd_search.searching.sampling import FairMethodSampler, MethodAwarePruner
from ackd_search.searching.space import load_space

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


@pytest.mark.parametrize("name", ["digits.yaml", "cifar10.yaml", "cifar100.yaml", "digits-pareto.yaml"])
def test_shipped_spaces_load(name: str) -> None:
    space = load_space(SPACES / name)
    assert space.study.name
    assert {p.path for p in space.params} >= {"optim.lr", "distill.temperature", "distill.ackd.adv_weight"}
    assert space.learners is not None and space.learners.max_total == 4
    cfg = space.run_config({p.path: p.suggest(optuna.trial.FixedTrial(_midpoints(space))) for p in space.params})
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("name", ["digits.yaml", "cifar10.yaml", "cifar100.yaml"])
def test_shipped_spaces_search_ackd_alone_and_reach_kd(name: str) -> None:
    """KD is ACKD with no learners and no adversary: both are reachable, so the search can find a tuned KD."""
    space = load_space(SPACES / name)
    assert space.methods() == ["ackd"]
    adv = next(p for p in space.params if p.path == "distill.ackd.adv_weight")
    assert adv.contains(0.0) and adv.contains(0.1)  # no adversary, and the reference's weight
    values = space.suggest(optuna.trial.FixedTrial({**_midpoints(space), "distill.ackd.adv_weight": 0.0,
                                                    LEARNER_PARAM.format(1): 0, LEARNER_PARAM.format(2): 0}))
    assert not any(k.startswith("distill.ackd.") and k != "distill.ackd.adv_weight" and "learners_after" not in k
                   for k in values)
    cfg = space.run_config(values)
    assert cfg.distill.ackd.aux_placements == [] and cfg.distill.ackd.adv_weight == 0.0
    reference, outside = space.preset_values("reference")
    assert outside == []


def test_pareto_space_searches_the_student() -> None:
    space = load_space(SPACES / "digits-pareto.yaml")
    assert space.study.second_objective == "student_params" and space.multi_objective
    students = next(p for p in space.params if p.path == "student").choices
    sizes = {sum(p.numel() for p in create_model(s, 10, in_channels=1).parameters()) for s in students}
    assert len(sizes) == len(students) >= 3  # every choice is its own point on the cost axis
    assert space.preset_values("reference")[1] == []  # the reference point runs first here too


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
        "run.student: unknown model 'resnet9'; allowed: digits_cnn_large",
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
    # issue #9: trials never read the test set nor choose their own folder, whether fixed or searched
    ("study: {name: x}\nrun: {eval_test: true}\n", "run.eval_test: a space cannot set it"),
    ("study: {name: x}\nrun: {eval_test: {choices: [true, false]}}\n", "run.eval_test: a space cannot set it"),
    ("study: {name: x}\nrun: {output_dir: /tmp/x}\n", "run.output_dir: a space cannot set it"),
    ("study: {name: x}\nrun: {output_dir: {choices: [a, b]}}\n", "run.output_dir: a space cannot set it"),
    # issue #13 item 6
    ("study: {name: x}\nrun: {student: resnet8}\nlearners: {max_per_stage: 2, max_total: 5}\n",
     "learners.max_total: 5 is unreachable (2 per branch point x 2 branch points = 4); allowed: 0..4"),
    ("study: {name: x}\nrun: {student: vgg8}\nlearners: {stages: [3], max_per_stage: 3, max_total: 4}\n",
     "learners.max_total: 4 is unreachable (3 per branch point x 1 branch points = 3)"),
    ("study: {name: x}\nrun: {student: vgg8}\nlearners: {stages: [3, 3]}\n", "learners.stages[1]: 3 is listed twice"),
    ("study: {name: x, max_retry: -1}\nrun: {}\n", "study.max_retry: -1 is out of range; allowed: >= 0"),
    # issue #11: a fixed student makes a one-point Pareto front
    ("study: {name: x, second_objective: student_params, pruner: {name: none}}\nrun: {student: resnet8}\n",
     "study.second_objective: student_params needs a searched student"),
    ("study: {name: x, second_objective: student_flops, pruner: {name: none}}\n"
     "run: {student: {choices: [resnet8]}}\n", "the Pareto front would be one point"),
    # the confirmation stage's settings
    ("study: {name: x, confirm: {top_k: -1}}\nrun: {}\n", "study.confirm.top_k: -1 is out of range; allowed: >= 0"),
    ("study: {name: x, confirm: {seeds: 0}}\nrun: {}\n", "study.confirm.seeds: 0 is out of range"),
    ("study: {name: x, confirm: {seeds: 21}}\nrun: {}\n", "allowed: >= 1 and <= 20"),
    ("study: {name: x, confirm: {epochs: 0}}\nrun: {}\n", "study.confirm.epochs: 0 is out of range"),
    ("study: {name: x, confirm: {presets: [kd, teacher]}}\nrun: {}\n",
     "study.confirm.presets[1]: 'teacher' is not allowed; allowed: student, kd, dkd, reference"),
    ("study: {name: x, confirm: {top: 3}}\nrun: {}\n", "study.confirm.top: unknown key; allowed: top_k"),
    ("study: {name: x, method_floor: 1.5}\nrun: {}\n", "study.method_floor: 1.5 is out of range"),
])
def test_single_validation_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    problems = problems_of(path)
    assert any(fragment in p for p in problems), problems
    assert all("\n" not in p and p.startswith(f"{path}: ") for p in problems)


def test_confirm_settings_default_and_parse(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, {"study": {"name": "t"}}))
    assert (space.study.confirm.top_k, space.study.confirm.seeds, space.study.confirm.epochs) == (3, 3, None)
    assert space.study.confirm.presets == ["student", "kd", "dkd", "reference"]
    space = load_space(write_space(tmp_path, {"study": {"name": "t", "confirm": {
        "top_k": 0, "seeds": 5, "epochs": 240, "presets": ["kd"]}}}))
    assert (space.study.confirm.top_k, space.study.confirm.seeds, space.study.confirm.epochs) == (0, 5, 240)
    assert space.study.confirm.presets == ["kd"]


def test_a_reachable_learner_cap_and_retry_zero_are_accepted(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, {"study": {"name": "t", "max_retry": 0}, "run": {"student": "resnet8"},
                                              "learners": {"max_per_stage": 2, "max_total": 4}}))
    assert space.learners.max_total == 4 and space.study.max_retry == 0


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


# Every legal structure for 2 branch points, at most 3 per point and 4 in all: 16 count pairs minus (2,3), (3,2), (3,3).
LEGAL_STRUCTURES = {tuple([1] * a + [2] * b) for a in range(4) for b in range(4) if a + b <= 4}


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_conditional_learner_structures_are_always_legal(tmp_path: Path, sampler: str) -> None:
    space = _learner_space(tmp_path)
    space.study.sampler = {"name": sampler}
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, seed=1))
    student = create_model("resnet8", 10)
    teacher = create_model("resnet8", 10)
    rng = random.Random(0)
    seen = set()
    for i in range(40):
        trial = study.ask()
        values = space.suggest(trial)
        cfg = space.run_config(values)
        placements = cfg.distill.ackd.aux_placements
        assert tuple(placements) in LEGAL_STRUCTURES
        assert trial.user_attrs["aux_placements"] == placements  # the effective structure is recorded
        seen.add(tuple(placements))
        # Every learner-count parameter is always present, with one fixed range (importance tools see it).
        for stage in (1, 2):
            assert trial.distributions[LEARNER_PARAM.format(stage)] == optuna.distributions.IntDistribution(0, 3)
        if i < 5:  # the structure builds (ACKD validates placements against the student)
            ACKD(student, teacher, cfg.distill, cfg.optim, "resnet8")
        study.tell(trial, rng.random())
    assert () in seen and (1, 1, 1, 2) in seen and (2, 2, 2) in seen  # none, a full cap, the reference
    assert len(seen) >= 10


@pytest.mark.parametrize("first", [(3, 1), (3, 0), (2, 2), (0, 0), (1, 3)])
def test_tpe_reaches_every_legal_structure_after_any_first_trial(tmp_path: Path, first: tuple[int, int]) -> None:
    """Issue #9: with ranges that depended on earlier counts, grouped TPE kept the first trial's range, so a first
    trial with 3 learners at stage 1 hid 3 learners at stage 2 for the whole study."""
    space = _learner_space(tmp_path)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, seed=1))
    study.enqueue_trial({LEARNER_PARAM.format(1): first[0], LEARNER_PARAM.format(2): first[1]})
    rng = random.Random(1)
    seen = set()
    for _ in range(61):
        trial = study.ask()
        seen.add(tuple(space.run_config(space.suggest(trial)).distill.ackd.aux_placements))
        study.tell(trial, rng.random())  # an uninformative objective: reachability, not preference
    assert seen == LEGAL_STRUCTURES


def test_over_the_cap_is_repaired_from_the_earliest_branch_point(tmp_path: Path) -> None:
    space = _learner_space(tmp_path, student="vgg8", max_per_stage=3, max_total=5)  # 4 branch points
    assert space.capped_placements({1: 3, 2: 3, 3: 1, 4: 0}) == [1, 2, 2, 2, 3]  # 7 -> 5: two fewer at stage 1
    assert space.capped_placements({1: 3, 2: 3, 3: 3, 4: 3}) == [3, 3, 4, 4, 4]
    assert space.capped_placements({1: 1, 2: 0, 3: 2, 4: 2}) == [1, 3, 3, 4, 4]  # legal: unchanged
    raw = {LEARNER_PARAM.format(k): n for k, n in {1: 3, 2: 3, 3: 1, 4: 0}.items()}
    assert space.run_config(raw).distill.ackd.aux_placements == [1, 2, 2, 2, 3]  # export sees the same structure


def test_learner_stages_restrict_branch_points(tmp_path: Path) -> None:
    space = _learner_space(tmp_path, student="vgg8", stages=[3, 4], max_total=2)
    assert space.num_stages == 5 and space.learner_stages() == [3, 4]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        placements = space.run_config(space.suggest(trial)).distill.ackd.aux_placements
        assert set(placements) <= {3, 4} and len(placements) <= 2
        study.tell(trial, 0.0)


def _knob_space(tmp_path: Path, **ackd) -> object:
    knobs = {
        "aggregation": {"choices": ["attention", "mean"]}, "attn_reduction": {"choices": [4, 8]},
        "attn_self": {"choices": [True, False]}, "student_target": {"choices": ["attention", "aux_mean"]},
        "collab_weight": {"low": 0.1, "high": 2.0}, "collab_rampup_epochs": {"choices": [0, 40]},
        "aux_width": {"choices": [0.5, 1.0]}, "aux_weight": {"low": 0.1, "high": 1.0},
        "adv_weight": {"choices": [0.0, 0.1]}, "adv_real": {"choices": ["teacher", "ensemble"]},
        "adv_input": {"choices": ["probs", "features"]}, "d_lr": {"low": 1e-5, "high": 1e-3, "log": True},
        "adv_warmup_epochs": {"choices": [0, 10]}, **ackd,
    }
    return load_space(write_space(tmp_path, {
        "study": {"name": "t"},
        "run": {"student": "resnet8", "distill": {"method": {"choices": ["ackd", "kd", "student"]},
                                                  "temperature": {"low": 1.0, "high": 8.0}, "ackd": knobs}},
        "learners": {"max_per_stage": 2, "max_total": 2},
    }))


COLLAB = {"aggregation", "attn_reduction", "attn_self", "student_target", "collab_weight", "collab_rampup_epochs",
          "aux_width", "aux_weight"}
ADVERSARY = {"adv_real", "adv_input", "d_lr", "adv_warmup_epochs"}


def _sampled_knobs(space, **fixed) -> set[str]:
    values = space.suggest(optuna.trial.FixedTrial({**_midpoints(space), **fixed}))
    space.run_config(values)  # what is not sampled takes its default in the run config
    return {k.removeprefix("distill.ackd.") for k in values if k.startswith("distill.ackd.") and "learners" not in k}


@pytest.mark.parametrize("fixed, expected", [
    # one learner, attention, an adversary: every knob acts
    ({"aggregation": "attention", "adv_weight": 0.1, "n": (1, 0)}, COLLAB | ADVERSARY | {"adv_weight"}),
    # mean aggregation: no attention knobs
    ({"aggregation": "mean", "adv_weight": 0.1, "n": (0, 1)},
     (COLLAB - {"attn_reduction", "attn_self"}) | ADVERSARY | {"adv_weight"}),
    # no adversary: none of its knobs
    ({"aggregation": "attention", "adv_weight": 0.0, "n": (1, 1)}, COLLAB | {"adv_weight"}),
    # no learner: no collaboration knob, and no adv_real (`ensemble` without learners means no adversary)
    ({"aggregation": "attention", "adv_weight": 0.1, "n": (0, 0)}, (ADVERSARY - {"adv_real"}) | {"adv_weight"}),
    # no learner and no adversary: plain KD through ACKD
    ({"aggregation": "attention", "adv_weight": 0.0, "n": (0, 0)}, {"adv_weight"}),
])
def test_knobs_are_sampled_only_where_they_act(tmp_path: Path, fixed: dict, expected: set) -> None:
    space = _knob_space(tmp_path)
    n1, n2 = fixed.pop("n")
    given = {f"distill.ackd.{k}": v for k, v in fixed.items()}
    sampled = _sampled_knobs(space, **given, **{LEARNER_PARAM.format(1): n1, LEARNER_PARAM.format(2): n2})
    assert sampled == expected


def test_unsampled_knobs_take_their_defaults(tmp_path: Path) -> None:
    space = _knob_space(tmp_path)
    fixed = {**_midpoints(space), "distill.ackd.aggregation": "mean", "distill.ackd.attn_reduction": 4,
             "distill.ackd.adv_weight": 0.0, "distill.ackd.d_lr": 1e-3, LEARNER_PARAM.format(1): 1,
             LEARNER_PARAM.format(2): 0}
    cfg = space.run_config(space.suggest(optuna.trial.FixedTrial(fixed)))
    assert cfg.distill.ackd.attn_reduction == 8 and cfg.distill.ackd.d_lr == 2e-4  # AckdConfig's defaults


def test_a_fixed_ensemble_real_without_learners_leaves_no_adversary_to_tune(tmp_path: Path) -> None:
    space = _knob_space(tmp_path, adv_real="ensemble")
    assert _sampled_knobs(space, **{LEARNER_PARAM.format(1): 0, LEARNER_PARAM.format(2): 0}) == set()
    assert "adv_weight" in _sampled_knobs(space, **{LEARNER_PARAM.format(1): 1, LEARNER_PARAM.format(2): 0})


def test_kd_and_student_trials_sample_only_their_knobs(tmp_path: Path) -> None:
    space = _knob_space(tmp_path)
    kd = space.suggest(optuna.trial.FixedTrial({**_midpoints(space), "distill.method": "kd"}))
    assert set(kd) == {"distill.method", "distill.temperature"}
    student = space.suggest(optuna.trial.FixedTrial({**_midpoints(space), "distill.method": "student"}))
    assert set(student) == {"distill.method"}


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


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "nsga2", "qmc"])
def test_every_sampler_builds_with_the_seed(tmp_path: Path, name: str) -> None:
    run = {"optim": {"lr": {"low": 0.01, "high": 0.1, "log": True}},
           "distill": {"temperature": {"low": 1.0, "high": 8.0}}}
    path = write_space(tmp_path, {"study": {"name": "t", "sampler": {"name": name}}, "run": run})
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:  # not a dependency: refused up front
        assert any("cmaes needs the `cmaes` package" in p for p in problems_of(path))
        return
    space = load_space(path)

    def draws(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(space, seed=seed))
        out = []
        for _ in range(3):
            trial = study.ask()
            out.append(space.suggest(trial))
            study.tell(trial, 0.5)
        return out

    assert type(make_sampler(space, seed=0)) is SAMPLERS[name]  # one method: no wrapper
    assert draws(0) == draws(0)
    if name != "qmc":  # an unscrambled Sobol sequence starts at the same point whatever the seed
        assert draws(0) != draws(1)


def test_a_space_with_several_methods_gets_the_fair_method_sampler(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, {"study": {"name": "t"}, "run": {
        "distill": {"method": {"choices": ["ackd", "kd", "student"]}}}}))
    sampler = make_sampler(space, seed=0)
    assert isinstance(sampler, FairMethodSampler) and isinstance(sampler.inner, optuna.samplers.TPESampler)
    assert sampler.methods == ["ackd", "kd", "student"] and sampler.floor == pytest.approx(1 / 6)
    space.study.method_floor = 0.0
    assert isinstance(make_sampler(space, seed=0), optuna.samplers.TPESampler)


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
    pruner = make_pruner(space)
    assert isinstance(pruner, MethodAwarePruner) and type(pruner.inner) is cls
    assert pruner.default_method == "ackd"


def test_fingerprint_ignores_run_length_but_not_the_space(tmp_path: Path) -> None:
    base = {"study": {"name": "t", "n_trials": 5}, "run": {"optim": {"lr": {"low": 0.01, "high": 0.1}}}}
    a = load_space(write_space(tmp_path, base, "a.yaml"))
    base["study"]["n_trials"] = 50
    b = load_space(write_space(tmp_path, base, "b.yaml"))
    base["study"]["confirm"] = {"top_k": 5, "seeds": 4}  # confirmation settings do not change what is searched
    b2 = load_space(write_space(tmp_path, base, "b2.yaml"))
    base["run"]["optim"]["lr"]["high"] = 0.2
    c = load_space(write_space(tmp_path, base, "c.yaml"))
    assert a.fingerprint() == b.fingerprint() == b2.fingerprint() != c.fingerprint()
