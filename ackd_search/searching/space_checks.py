"""Validation of a space file: the study settings (sampler and pruner options as Optuna accepts them), the `run:`
tree (fixed values vs searched ranges and choices), the learner section and the second objective; every problem is
one line naming the file, the key path and the allowed values."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import warnings
from typing import Any

from ackd_search.config import ConfigError, RunConfig, check_value, field_info, from_dict, set_path, strip_optional
from ackd_search.models import ModelError, built_elsewhere, create_model, model_name_problem, staging_problem
from ackd_search.searching.params import CHOICE_KEYS, FORBIDDEN_IN_SPACE, RANGE_KEYS, Param
from ackd_search.searching.samplers import PRUNER_DEFAULTS, PRUNERS, SAMPLER_DEFAULTS, SAMPLERS
from ackd_search.searching.settings import LearnerSpace, StudySettings


def check_study(study: StudySettings, source: str, problems: list[str]) -> None:
    for key, table, defaults in (("sampler", SAMPLERS, SAMPLER_DEFAULTS), ("pruner", PRUNERS, PRUNER_DEFAULTS)):
        spec = getattr(study, key)
        if not isinstance(spec, dict) or spec.get("name") not in table:
            got = spec.get("name") if isinstance(spec, dict) else spec
            problems.append(f"{source}: study.{key}.name: {got!r} is not allowed; allowed: {', '.join(table)}")
            continue
        allowed = [p for p in inspect.signature(table[spec["name"]]).parameters if p not in ("self", "seed")]
        unknown = [option for option in spec if option != "name" and option not in allowed]
        for option in unknown:
            problems.append(
                f"{source}: study.{key}.{option}: unknown option for {spec['name']}; allowed: {', '.join(allowed)}"
            )
        if key == "sampler" and spec["name"] == "cmaes" and importlib.util.find_spec("cmaes") is None:
            problems.append(f"{source}: study.sampler.name: cmaes needs the `cmaes` package, which is not installed "
                            f"(pip install cmaes); allowed: {', '.join(n for n in table if n != 'cmaes')}")
            continue
        if not unknown:
            options = {k: v for k, v in spec.items() if k != "name"}
            try:  # values Optuna itself rejects (wrong types, out of range) are reported with the rest
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    table[spec["name"]](**{**defaults.get(spec["name"], {}), **options})
            except Exception as err:
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                problems.append(f"{source}: study.{key}: {spec['name']} rejects {options}: {reason}")
    for key in ("n_trials", "heartbeat_interval_s", "grace_period_s"):
        value = getattr(study, key)
        if value is not None and value < 1:
            problems.append(f"{source}: study.{key}: {value!r} is out of range; allowed: >= 1")
    if study.timeout_s is not None and study.timeout_s <= 0:
        problems.append(f"{source}: study.timeout_s: {study.timeout_s!r} is out of range; allowed: > 0")
    if study.second_objective and study.pruner.get("name", "none") != "none":
        problems.append(
            f"{source}: study.pruner.name: a study with second_objective cannot prune (Optuna's multi-objective "
            "studies do not support pruning); allowed: none"
        )


def walk_run(node: Any, path: str, base: dict, params: list[Param], source: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{source}: run{'.' + path if path else ''}: expected a mapping, got {node!r}")
        return
    for key, value in node.items():
        dotted = f"{path}.{key}" if path else str(key)
        if dotted in FORBIDDEN_IN_SPACE:
            problems.append(f"{source}: run.{dotted}: a space cannot set it ({FORBIDDEN_IN_SPACE[dotted]}); "
                            "allowed: leave it out")
            continue
        try:
            tp, meta = field_info(RunConfig, dotted)
        except KeyError:
            parent_cls = _parent_class(path)
            allowed = ", ".join(f.name for f in dataclasses.fields(parent_cls)) if parent_cls else "?"
            problems.append(f"{source}: run.{dotted}: unknown key; allowed: {allowed}")
            continue
        inner = strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            walk_run(value, dotted, base, params, source, problems)
        elif isinstance(value, dict) and value and set(value) <= RANGE_KEYS | CHOICE_KEYS:
            param = _param(dotted, value, inner, source, problems)
            if param is not None:
                params.append(param)
        else:
            set_path(base, dotted, value)


def _parent_class(path: str) -> type | None:
    if not path:
        return RunConfig
    try:
        tp, _ = field_info(RunConfig, path)
    except KeyError:
        return None
    inner = strip_optional(tp)
    return inner if dataclasses.is_dataclass(inner) else None



def _param(path: str, spec: dict, tp: Any, source: str, problems: list[str]) -> Param | None:
    where = f"{source}: run.{path}"
    before = len(problems)
    if "choices" in spec:
        if set(spec) != {"choices"}:
            problems.append(f"{where}: use either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}.choices: expected a non-empty list of values")
            return None
        for i, choice in enumerate(choices):
            found = check_value(RunConfig, path, choice, source)
            problems += [p.replace(f": {path}:", f": run.{path}.choices[{i}]:") for p in found]
        return Param(path, "categorical", choices=tuple(choices)) if len(problems) == before else None
    if tp not in (int, float):
        problems.append(f"{where}: a range needs a numeric field; use choices for this field")
        return None
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        problems.append(f"{where}: a range needs {' and '.join(missing)}")
        return None
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for key, value in (("low", low), ("high", high)):
        found = check_value(RunConfig, path, value, source)
        problems += [p.replace(f": {path}:", f": run.{path}.{key}:") for p in found]
    if not isinstance(log, bool):
        problems.append(f"{where}.log: expected true or false, got {log!r}")
    if len(problems) > before:
        return None
    if low >= high:
        problems.append(f"{where}: empty range: low ({low}) must be < high ({high})")
    if log and low <= 0:
        problems.append(f"{where}: a log range must stay above 0; got low = {low}")
    if log and step is not None:
        problems.append(f"{where}: log and step cannot be combined")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        problems.append(f"{where}.step: expected a number > 0, got {step!r}")
    if len(problems) > before:
        return None
    return Param(path, "int" if tp is int else "float", low=low, high=high, log=log, step=step)


def check_base(base: dict, params: list[Param], source: str, problems: list[str]) -> None:
    # A `python:` builder of the Python API is not buildable in this process, but the study it made can still be
    # read (report, dashboard): every command that builds a run config refuses it there, in one line.
    elsewhere = {model_name_problem(n) for n in (base.get("student"), (base.get("teacher") or {}).get("arch"))
                 if built_elsewhere(n)}
    try:
        from_dict(RunConfig, base, source=f"{source}: run")
    except ConfigError as err:
        problems += [p.replace(f"{source}: run: ", f"{source}: run.") for p in err.problems
                     if not any(p.endswith(f": {why}") for why in elsewhere)]
    check_students_build(base, params, source, problems)
    searched = {p.path for p in params}
    if "distill.ackd.aux_placements" in searched:
        problems.append(f"{source}: run.distill.ackd.aux_placements: search learners with the `learners:` section")


def _students(base: dict, params: list[Param]) -> list[str]:
    param = next((p for p in params if p.path == "student"), None)
    return list(param.choices) if param else [base.get("student", RunConfig().student)]


def _stamp(name: str) -> tuple[int, int] | None:
    """A py: builder file's (mtime, size): an edited file is built again; library and zoo names never change."""
    if not name.startswith("py:"):
        return None
    try:
        stat = os.stat(name[3:].rpartition(":")[0])
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


_STAGES: dict[tuple[str, tuple[int, int] | None], int | str] = {}


def stage_count(name: str) -> int | str:
    """The number of stages of the model `name` (a valid name), or why it cannot be built (a py: builder that
    raises, a library that refuses): built once per name (and py: file version) per process."""
    key = (name, _stamp(name))
    if key not in _STAGES:
        try:
            _STAGES[key] = create_model(name, 10).num_stages
        except ModelError as err:
            _STAGES[key] = str(err)
    return _STAGES[key]


def check_students_build(base: dict, params: list[Param], source: str, problems: list[str]) -> None:
    for name in _students(base, params):
        if isinstance(name, str) and model_name_problem(name) is None and isinstance(why := stage_count(name), str):
            problems.append(f"{source}: run.student: {why}")


def num_stages_of(base: dict, params: list[Param]) -> int:
    """Stages of the student (the fewest over searched students); 0 when no student name is valid (or buildable:
    `check_students_build` reports it) yet."""
    stages = [stage_count(n) for n in _students(base, params) if model_name_problem(n) is None]
    return min((n for n in stages if isinstance(n, int)), default=0)


def check_learners(learners: LearnerSpace, num_stages: int, base: dict, params: list[Param], source: str,
                   problems: list[str]) -> None:
    fixed = base.get("distill", {}).get("ackd", {}).get("aux_placements")
    if fixed is not None:
        problems.append(f"{source}: learners: conflicts with the fixed run.distill.ackd.aux_placements; keep one")
    unstaged = False
    for name in _students(base, params):
        if model_name_problem(name) is not None or isinstance(stage_count(name), str):
            continue  # an unknown name or a student that cannot be built: reported by check_base
        why = staging_problem(name)
        if why:
            unstaged = True
            problems.append(f"{source}: learners: {why}; allowed: no learners section (it still serves plain KD "
                            "and the student alone)")
    if unstaged:
        return  # the counts below would only restate it (no branch point can hold a learner)
    for i, stage in enumerate(learners.stages or []):
        if num_stages and isinstance(stage, int) and not 1 <= stage < num_stages:
            problems.append(f"{source}: learners.stages[{i}]: {stage} is out of range; allowed: 1..{num_stages - 1}")
        if stage in (learners.stages or [])[:i]:
            problems.append(f"{source}: learners.stages[{i}]: {stage} is listed twice; allowed: each branch point once")
    branch_points = len(set(learners.stages)) if learners.stages else max(num_stages - 1, 0)
    reachable = learners.max_per_stage * branch_points
    counts_ok = all(isinstance(v, int) for v in (learners.max_per_stage, learners.max_total))
    if num_stages and counts_ok and learners.max_total > reachable:
        problems.append(
            f"{source}: learners.max_total: {learners.max_total} is unreachable ({learners.max_per_stage} per branch "
            f"point x {branch_points} branch points = {reachable}); allowed: 0..{reachable}"
        )


def check_pruner_budget(study: StudySettings, base: dict, params: list[Param], source: str,
                        problems: list[str]) -> None:
    """A pruner whose first possible cut (epochs are reported 1-based), as the file writes it, is not before the
    trial's last epoch can never save an epoch: refused in one line with the budget it needs. (A warm-up the file
    leaves to the defaults is not refused: a 1- or 2-epoch trial with the default pruner simply never prunes.)"""
    spec = study.pruner if isinstance(study.pruner, dict) else {}
    name = spec.get("name")
    options = {**PRUNER_DEFAULTS.get(name, {}), **spec}
    if name in ("median", "percentile") and "n_warmup_steps" in spec:
        key, first = "n_warmup_steps", options["n_warmup_steps"]
    elif name in ("successive_halving", "hyperband") and "min_resource" in spec:
        key, first = "min_resource", options["min_resource"]
        rate, rf = options.get("min_early_stopping_rate", 0), options.get("reduction_factor", 4)
        if name == "successive_halving" and all(isinstance(v, int) for v in (first, rate, rf)):
            first = first * rf ** rate  # its first rung (Hyperband's most aggressive bracket cuts at min_resource)
    else:
        return
    epochs_param = next((p for p in params if p.path == "optim.epochs"), None)
    if epochs_param is not None:  # a searched budget: the pruner must act at its largest value at least
        epochs = max(epochs_param.choices) if epochs_param.choices else epochs_param.high
    else:
        epochs = (base.get("optim") or {}).get("epochs", RunConfig().optim.epochs)
    if isinstance(first, int) and not isinstance(first, bool) and isinstance(epochs, int) and first >= epochs:
        problems.append(f"{source}: study.pruner.{key}: {first} is not below the trial budget run.optim.epochs = "
                        f"{epochs}: the {name} pruner could never cut a trial before its end; allowed: {key} <= "
                        f"{epochs - 1}, or run.optim.epochs >= {first + 1}, or pruner none")


def check_second_objective(study: StudySettings, base: dict, params: list[Param], source: str,
                            problems: list[str]) -> None:
    check_pruner_budget(study, base, params, source, problems)  # the other study check that needs the run's budget
    if not study.second_objective:
        return
    students = {s for s in _students(base, params) if isinstance(s, str)}
    if len(students) < 2:
        problems.append(
            f"{source}: study.second_objective: {study.second_objective} needs a searched student: with run.student "
            f"fixed ({', '.join(sorted(students)) or '?'}) every trial has the same cost and the Pareto front would be "
            "one point; allowed: search `student` (e.g. {choices: [digits_cnn_small, resnet8]}) or drop "
            "second_objective"
        )
