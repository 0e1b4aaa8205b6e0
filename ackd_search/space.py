"""Search spaces: a YAML file -> validated `Space` -> `trial.suggest_*` -> a typed `RunConfig`.

A leaf of `run:` is fixed when it is a scalar and searched when it is `{low, high[, log, step]}` or `{choices}`.
Parameter names are config paths (`distill.temperature`), so the dashboard and the exported config agree.

Learner structure: one integer per branch point, `distill.ackd.learners_after_stage_{k}`, ALWAYS in 0..max_per_stage
(one fixed distribution per parameter, so TPE's model of it never changes with the first trial and every value stays
reachable; importance tools see every count, see facts.md). A proposal over `max_total` is repaired
deterministically: learners are removed from the earliest branch point first (its learners copy the most stages, so
they cost the most). A legal proposal is its own structure, so every legal structure is reachable; the effective one
is in the run config (`aux_placements`) and in the trial's user attribute `aux_placements`. (A single categorical
over the legal structures was the alternative: it explodes for 5-stage students, e.g. 4^4 for VGG, and hides which
branch point matters from the importances.)

Knobs are sampled only where they act (ackd.py): collaboration knobs with >= 1 learner, the attention knobs under
`aggregation: attention`, the adversary's knobs when it exists (`adv_weight > 0`; `adv_real` only with learners,
since `ensemble` without them switches the adversary off), KD knobs unless the method is `student`. A knob not
sampled takes its fixed or default value in the run config."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
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
    DistillConfig,
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
from ackd_search.sampling import FairMethodSampler, MethodAwarePruner

RANGE_KEYS = {"low", "high", "log", "step"}
CHOICE_KEYS = {"choices"}
LEARNER_PARAM = "distill.ackd.learners_after_stage_{}"  # a learner count per branch point, always 0..max_per_stage
ACKD = "distill.ackd."
# Which knob acts when (see ackd_search/distill/ackd.py); a knob that does not act is not sampled.
COLLAB_KNOBS = {ACKD + k for k in ("aggregation", "attn_reduction", "attn_self", "detach_target", "student_target",
                                   "collab_weight", "collab_rampup_epochs", "aux_width", "aux_weight")}
ATTENTION_KNOBS = {ACKD + "attn_reduction", ACKD + "attn_self"}  # only under aggregation: attention
ADVERSARY_KNOBS = {ACKD + k for k in ("adv_real", "adv_input", "d_lr", "adv_warmup_epochs")}  # only with a D
TEACHER_KNOBS = {"distill.temperature", "distill.ce_weight", "distill.kd_weight"}  # unused by `student`
GATES = ("distill.method", ACKD + "aggregation", ACKD + "adv_weight", ACKD + "adv_real")  # sampled first
FORBIDDEN_IN_SPACE = {
    "eval_test": "trials never read the test set; `export` sets it for the final run",
    "output_dir": "each trial writes to study.runs_dir/trial-N",
}

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
class ConfirmSettings:
    """The confirmation stage (`study.confirm`): the top-k distinct configurations and the presets, retrained."""

    top_k: int = field(default=3, metadata=_bounds(ge=0))
    seeds: int = field(default=3, metadata=_bounds(ge=1, le=20))
    epochs: int | None = field(default=None, metadata=_bounds(ge=1))  # None: the trial budget
    presets: list[Literal["student", "kd", "reference"]] = field(default_factory=lambda: ["student", "kd", "reference"])


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
    max_retry: int = field(default=2, metadata=_bounds(ge=0))
    artifacts_dir: str | None = None  # default studies/<name>-artifacts
    runs_dir: str | None = None  # default studies/<name>-runs (per-trial checkpoints)
    ray: RayOptions = field(default_factory=RayOptions)
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    # Least share of the trials each method keeps when distill.method is searched; None: 1 / (2 * methods), 0: off
    method_floor: float | None = field(default=None, metadata=_bounds(ge=0, lt=1))


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

    def methods(self) -> list[str]:
        """The distillation methods the space's trials use: the searched choices, or the fixed one."""
        param = next((p for p in self.params if p.path == "distill.method"), None)
        return list(param.choices) if param else [self._value("distill.method", {})]

    def learner_stages(self) -> list[int]:
        return self.learners.stages or list(range(1, self.num_stages))

    def fingerprint(self) -> str:
        """Identifies what the search explores (not how long it runs), to refuse mixing spaces in one study."""
        how_long_and_where = ("n_trials", "timeout_s", "storage", "ray", "heartbeat_interval_s", "grace_period_s",
                              "confirm")
        keep = {k: v for k, v in (self.raw.get("study") or {}).items() if k not in how_long_and_where}
        text = json.dumps({**self.raw, "study": keep}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # --- trial -> run config ----------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample the parameters that act for this trial (see the module docstring); the gates come first."""
        values: dict[str, Any] = {}
        by_path = {p.path: p for p in self.params}
        if "distill.method" in by_path:
            values["distill.method"] = by_path["distill.method"].suggest(trial)
        placements = self._fixed_placements()
        if self.learners is not None and self._value("distill.method", values) == "ackd":
            counts = {}
            for stage in self.learner_stages():
                path = LEARNER_PARAM.format(stage)
                counts[stage] = values[path] = trial.suggest_int(path, 0, self.learners.max_per_stage)
            placements = self.capped_placements(counts)
            trial.set_user_attr("aux_placements", placements)
        ordered = [by_path[g] for g in GATES[1:] if g in by_path] + [p for p in self.params if p.path not in GATES]
        for param in ordered:
            if self.acts(param.path, values, len(placements)):
                values[param.path] = param.suggest(trial)
        return values

    def acts(self, path: str, values: dict[str, Any], n_learners: int) -> bool:
        """Whether the knob `path` changes training, given the values sampled so far and the number of learners."""
        method = self._value("distill.method", values)
        if path.startswith(ACKD) and method != "ackd":
            return False
        if path in TEACHER_KNOBS and method == "student":
            return False
        if path in COLLAB_KNOBS and n_learners == 0:
            return False
        if path in ATTENTION_KNOBS and self._value(ACKD + "aggregation", values) != "attention":
            return False
        no_adversary_possible = n_learners == 0 and self._value(ACKD + "adv_real", values) == "ensemble"
        if path == ACKD + "adv_weight":
            return not no_adversary_possible
        if path == ACKD + "adv_real" and n_learners == 0:
            return False  # `ensemble` without learners is the same as no adversary (adv_weight 0)
        if path in ADVERSARY_KNOBS:
            return self._value(ACKD + "adv_weight", values) > 0 and not no_adversary_possible
        return True

    def _value(self, path: str, values: dict[str, Any]) -> Any:
        """A knob's value for this trial: sampled, else fixed in the space, else the config default."""
        if path in values:
            return values[path]
        try:
            return _get(self.base, path)
        except (KeyError, TypeError):
            return _get(_DEFAULTS, path)

    def _fixed_placements(self) -> list[int]:
        fixed = self.base.get("distill", {}).get("ackd", {}).get("aux_placements")
        return list(fixed) if fixed is not None else [max(self.num_stages - 1, 1)] * 3

    def capped_placements(self, counts: dict[int, int]) -> list[int]:
        """The effective learner structure of per-branch-point counts: over `max_total`, learners are removed from
        the earliest branch point first; a legal structure is returned unchanged."""
        counts = {stage: int(n) for stage, n in counts.items()}
        excess = sum(counts.values()) - self.learners.max_total
        for stage in sorted(counts):
            removed = min(max(excess, 0), counts[stage])
            counts[stage] -= removed
            excess -= removed
        return [stage for stage in counts for _ in range(counts[stage])]

    def default_values(self) -> dict[str, Any]:
        """A legal value for every searched parameter (first choice, low end): a representative run config."""
        return {p.path: p.choices[0] if p.kind == "categorical" else p.low for p in self.params}

    def run_config(self, values: dict[str, Any], output_dir: str | None = None) -> RunConfig:
        """The run config for sampled (or exported) `values`; learner counts become the effective `aux_placements`
        (see `capped_placements`); a knob missing from `values` keeps its fixed or default value."""
        data = json.loads(json.dumps(self.base))  # deep copy of plain data
        counts: dict[int, int] = {}
        for path, value in values.items():
            stage = _learner_stage(path)
            if stage is None:
                set_path(data, path, value)
            else:
                counts[stage] = int(value)
        if self.learners is not None and counts:
            set_path(data, "distill.ackd.aux_placements", self.capped_placements(counts))
        data["output_dir"] = output_dir
        return from_dict(RunConfig, data, source=self.source)

    def preset_values(self, preset: Literal["reference", "kd", "student"]) -> tuple[dict[str, Any], list[str]]:
        """Param values of a hand-set point, and the paths it cannot represent in this space (left to the sampler)."""
        cfg = from_dict(RunConfig, self.base, source=self.source)
        cfg.distill = {"reference": reference_distill, "kd": kd_distill, "student": _student_distill}[preset]()
        flat = to_dict(cfg)
        values, outside = {}, []
        for param in self.params:
            if param.path.startswith(ACKD) and preset != "reference":
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


def _student_distill() -> DistillConfig:
    return DistillConfig(method="student")


_DEFAULTS = to_dict(RunConfig())


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
    _check_second_objective(study, base, params, source, problems)
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


def _walk_run(node: Any, path: str, base: dict, params: list[Param], source: str, problems: list[str]) -> None:
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


def _check_second_objective(study: StudySettings, base: dict, params: list[Param], source: str,
                            problems: list[str]) -> None:
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


# --- samplers and pruners ---------------------------------------------------------------------------------------


def make_sampler(space: Space, seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; wrapped in `FairMethodSampler` when the space searches several methods."""
    spec = dict(space.study.sampler)
    name = spec.pop("name")
    options = {**SAMPLER_DEFAULTS.get(name, {}), **spec}
    if "seed" in inspect.signature(SAMPLERS[name]).parameters:
        options["seed"] = seed
    sampler = SAMPLERS[name](**options)
    methods = space.methods()
    if len(methods) > 1 and space.study.method_floor != 0:
        return FairMethodSampler(sampler, methods, space.study.method_floor)
    return sampler


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    """The configured pruner, comparing a trial only with trials of its own method (never confirmation runs)."""
    spec = dict(space.study.pruner)
    name = spec.pop("name")
    inner = PRUNERS[name](**{**PRUNER_DEFAULTS.get(name, {}), **spec})
    return MethodAwarePruner(inner, default_method=space.methods()[0])
