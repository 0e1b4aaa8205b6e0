"""Search spaces: a YAML file -> validated `Space` -> `trial.suggest_*` -> a typed `RunConfig`.

A leaf of `run:` is fixed when it is a scalar and searched when it is `{low, high[, log, step]}` or `{choices}`.
Parameter names are config paths (`distill.temperature`), so the dashboard and the exported config agree."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from ackd_search.config import (
    ConfigError,
    RunConfig,
    _bounds,
    _convert,
    check_value,
    field_info,
    from_dict,
    kd_distill,
    load_yaml,
    reference_distill,
    set_path,
    to_dict,
)
from ackd_search.models import create_model, list_models

RANGE_KEYS = {"low", "high", "log", "step"}
CHOICE_KEYS = {"choices"}
LEARNER_PARAM = "distill.ackd.learners_after_stage_{}"  # a learner count per branch point, always present

SAMPLERS: dict[str, Any] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
}
PRUNERS: dict[str, Any] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
# Our defaults on top of Optuna's: TPE models the conditional learner structure jointly (multivariate + group).
SAMPLER_DEFAULTS = {"tpe": {"multivariate": True, "group": True, "n_startup_trials": 5}}
PRUNER_DEFAULTS = {"median": {"n_startup_trials": 3, "n_warmup_steps": 2}}


@dataclass
class RayOptions:
    """How a study runs with `--backend ray` (`study.ray` in a space file); the plain backend ignores it."""

    cpus_per_trial: float = field(default=1.0, metadata=_bounds(gt=0))
    gpus_per_trial: float | None = field(default=None, metadata=_bounds(ge=0))  # None: 1 with GPUs, else 0;
    # 0.25 packs four trials on one GPU (a scheduling unit, not a memory limit)
    max_concurrent: int | None = field(default=None, metadata=_bounds(ge=1))  # None: what the cluster holds
    scheduler: Literal["asha", "pruner", "fifo"] | None = None  # None: asha, or fifo when the study cannot prune
    grace_period: int | None = field(default=None, metadata=_bounds(ge=1))  # ASHA's first rung (epochs)
    reduction_factor: float | None = field(default=None, metadata=_bounds(gt=1))  # ASHA's; None: the pruner's or 4
    max_failures: int | None = field(default=None, metadata=_bounds(ge=0))  # Ray retries; None: study.max_retry

    def for_cluster(self, resources: dict[str, float]) -> RayOptions:
        """Fill the defaults that depend on what the cluster holds."""
        gpus = resources.get("GPU", 0)
        per_gpu = self.gpus_per_trial if self.gpus_per_trial is not None else (1 if gpus else 0)
        fits = [resources.get("CPU", 1) / self.cpus_per_trial] + ([gpus / per_gpu] if per_gpu else [])
        concurrent = self.max_concurrent or max(1, int(min(fits)))
        return dataclasses.replace(self, gpus_per_trial=per_gpu, max_concurrent=concurrent)


@dataclass
class StudySettings:
    name: str = ""
    storage: str | None = None  # any SQLAlchemy URL; default sqlite:///studies/<name>.db
    n_trials: int | None = None
    timeout_s: float | None = None
    second_objective: Literal["student_flops", "student_params"] | None = None
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    presets: bool = True  # enqueue the reference ACKD and the plain-KD points before sampling
    final_epochs: int | None = None  # the full budget written by `export` (default: the trial budget)
    heartbeat_interval_s: int = 60
    grace_period_s: int = 180
    max_retry: int = 2
    artifacts_dir: str | None = None  # default studies/<name>-artifacts
    runs_dir: str | None = None  # default studies/<name>-runs (per-trial checkpoints)
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass
class LearnerSpace:
    """Auxiliary-learner structure: a count per branch point (1..K-1) and a cap on the total."""

    stages: list[int] | None = None  # branch points searched; default every boundary 1..K-1
    max_per_stage: int = field(default=3, metadata=_bounds(ge=0, le=16))
    max_total: int = field(default=4, metadata=_bounds(ge=0, le=32))


@dataclass(frozen=True)
class Param:
    path: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return value is not None and self.low <= value <= self.high


@dataclass
class Space:
    source: str
    study: StudySettings
    base: dict[str, Any]  # the fixed part of the run config
    params: list[Param]
    learners: LearnerSpace | None
    num_stages: int  # of the (fixed) student, or the fewest over the searched students
    raw: dict[str, Any]

    @property
    def storage_url(self) -> str:
        return self.study.storage or f"sqlite:///studies/{self.study.name}.db"

    @property
    def multi_objective(self) -> bool:
        return self.study.second_objective is not None

    def learner_stages(self) -> list[int]:
        return self.learners.stages or list(range(1, self.num_stages))

    def fingerprint(self) -> str:
        """Identifies what the search explores (not how long it runs), to refuse mixing spaces in one study."""
        how_long_and_where = ("n_trials", "timeout_s", "storage", "ray", "heartbeat_interval_s", "grace_period_s")
        keep = {k: v for k, v in (self.raw.get("study") or {}).items() if k not in how_long_and_where}
        text = json.dumps({**self.raw, "study": keep}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # --- trial -> run config ----------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter; ACKD knobs are asked only when the trial's method is ACKD."""
        values: dict[str, Any] = {}
        method_param = next((p for p in self.params if p.path == "distill.method"), None)
        if method_param is not None:
            values[method_param.path] = method_param.suggest(trial)
        method = values.get("distill.method", self.base.get("distill", {}).get("method", "ackd"))
        for param in self.params:
            if param is method_param or (param.path.startswith("distill.ackd.") and method != "ackd"):
                continue
            values[param.path] = param.suggest(trial)
        if self.learners is not None and method == "ackd":
            used = 0
            for stage in self.learner_stages():
                high = min(self.learners.max_per_stage, self.learners.max_total - used)
                used += trial.suggest_int(LEARNER_PARAM.format(stage), 0, high)
                values[LEARNER_PARAM.format(stage)] = trial.params[LEARNER_PARAM.format(stage)]
        return values

    def default_values(self) -> dict[str, Any]:
        """A legal value for every searched parameter (first choice, low end): a representative run config."""
        return {p.path: p.choices[0] if p.kind == "categorical" else p.low for p in self.params}

    def run_config(self, values: dict[str, Any], output_dir: str | None = None) -> RunConfig:
        """The run config for sampled (or exported) `values`; learner counts become `aux_placements`."""
        data = json.loads(json.dumps(self.base))  # deep copy of plain data
        placements: list[int] = []
        for path, value in values.items():
            stage = _learner_stage(path)
            if stage is None:
                set_path(data, path, value)
            else:
                placements += [stage] * int(value)
        if self.learners is not None and any(_learner_stage(p) is not None for p in values):
            set_path(data, "distill.ackd.aux_placements", placements)
        data["output_dir"] = output_dir
        return from_dict(RunConfig, data, source=self.source)

    def preset_values(self, preset: Literal["reference", "kd"]) -> tuple[dict[str, Any], list[str]]:
        """Param values of a hand-set point, and the paths it cannot represent in this space (left to the sampler)."""
        cfg = from_dict(RunConfig, self.base, source=self.source)
        cfg.distill = reference_distill() if preset == "reference" else kd_distill()
        flat = to_dict(cfg)
        values, outside = {}, []
        for param in self.params:
            if param.path.startswith("distill.ackd.") and preset == "kd":
                continue
            value = _get(flat, param.path)
            if param.contains(value):
                values[param.path] = value
            else:
                outside.append(param.path)
        if self.learners is not None and preset == "reference":
            reference = cfg.distill.ackd.resolved_placements(self.num_stages)
            counts = {stage: reference.count(stage) for stage in self.learner_stages()}
            legal = (sum(counts.values()) == len(reference) <= self.learners.max_total
                     and max(counts.values(), default=0) <= self.learners.max_per_stage)
            if legal:
                values.update({LEARNER_PARAM.format(stage): n for stage, n in counts.items()})
            else:
                outside.append(f"distill.ackd.aux_placements {reference}")
        return values, outside


def _learner_stage(path: str) -> int | None:
    prefix = LEARNER_PARAM.format("")
    return int(path[len(prefix) :]) if path.startswith(prefix) else None


def _get(data: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data


# --- loading and validation -----------------------------------------------------------------------------------


def load_space(path: str | Path) -> Space:
    """Read and validate a whole space file; every problem is reported at once (file, key path, allowed values)."""
    source = str(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: <top>: expected a mapping with keys study, run, learners"])
    problems: list[str] = []
    for key in raw:
        if key not in ("study", "run", "learners"):
            problems.append(f"{source}: {key}: unknown key; allowed: study, run, learners")
    study = _convert(StudySettings, raw.get("study"), "study", source, problems)
    if not study.name:
        problems.append(f"{source}: study.name: required (a study name, e.g. digits-ackd)")
    _check_study(study, source, problems)
    base: dict[str, Any] = {}
    params: list[Param] = []
    _walk_run(raw.get("run") or {}, "", base, params, source, problems)
    learners = None
    if raw.get("learners") is not None:
        learners = _convert(LearnerSpace, raw["learners"], "learners", source, problems)
    _check_base(base, params, source, problems)
    num_stages = _num_stages(base, params)
    if learners is not None:
        _check_learners(learners, num_stages, base, source, problems)
    if problems:
        raise ConfigError(problems)
    return Space(source, study, base, params, learners, num_stages, raw)


def _check_study(study: StudySettings, source: str, problems: list[str]) -> None:
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


def _walk_run(node: Any, path: str, base: dict, params: list[Param], source: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{source}: run{'.' + path if path else ''}: expected a mapping, got {node!r}")
        return
    for key, value in node.items():
        dotted = f"{path}.{key}" if path else str(key)
        try:
            tp, meta = field_info(RunConfig, dotted)
        except KeyError:
            parent_cls = _parent_class(path)
            allowed = ", ".join(f.name for f in dataclasses.fields(parent_cls)) if parent_cls else "?"
            problems.append(f"{source}: run.{dotted}: unknown key; allowed: {allowed}")
            continue
        inner = _optional_inner(tp)
        if dataclasses.is_dataclass(inner):
            _walk_run(value, dotted, base, params, source, problems)
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
    inner = _optional_inner(tp)
    return inner if dataclasses.is_dataclass(inner) else None


def _optional_inner(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else tp


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


def _check_base(base: dict, params: list[Param], source: str, problems: list[str]) -> None:
    try:
        from_dict(RunConfig, base, source=f"{source}: run")
    except ConfigError as err:
        problems += [p.replace(f"{source}: run: ", f"{source}: run.") for p in err.problems]
    searched = {p.path for p in params}
    if "distill.ackd.aux_placements" in searched:
        problems.append(f"{source}: run.distill.ackd.aux_placements: search learners with the `learners:` section")


def _students(base: dict, params: list[Param]) -> list[str]:
    param = next((p for p in params if p.path == "student"), None)
    return list(param.choices) if param else [base.get("student", RunConfig().student)]


def _num_stages(base: dict, params: list[Param]) -> int:
    """Stages of the student (the fewest over searched students); 0 when no student name is valid yet."""
    names = [n for n in _students(base, params) if isinstance(n, str) and n in list_models()]
    return min((create_model(name, 10).num_stages for name in names), default=0)


def _check_learners(learners: LearnerSpace, num_stages: int, base: dict, source: str, problems: list[str]) -> None:
    fixed = base.get("distill", {}).get("ackd", {}).get("aux_placements")
    if fixed is not None:
        problems.append(f"{source}: learners: conflicts with the fixed run.distill.ackd.aux_placements; keep one")
    for i, stage in enumerate(learners.stages or []):
        if num_stages and isinstance(stage, int) and not 1 <= stage < num_stages:
            problems.append(f"{source}: learners.stages[{i}]: {stage} is out of range; allowed: 1..{num_stages - 1}")


# --- samplers and pruners ---------------------------------------------------------------------------------------


def make_sampler(space: Space, seed: int) -> optuna.samplers.BaseSampler:
    spec = dict(space.study.sampler)
    name = spec.pop("name")
    options = {**SAMPLER_DEFAULTS.get(name, {}), **spec}
    if "seed" in inspect.signature(SAMPLERS[name]).parameters:
        options["seed"] = seed
    return SAMPLERS[name](**options)


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    spec = dict(space.study.pruner)
    name = spec.pop("name")
    return PRUNERS[name](**{**PRUNER_DEFAULTS.get(name, {}), **spec})
