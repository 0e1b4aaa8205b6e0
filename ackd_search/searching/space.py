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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna

from ackd_search.config import (
    ConfigError,
    DistillConfig,
    RunConfig,
    convert,
    dkd_distill,
    from_dict,
    kd_distill,
    load_yaml,
    reference_distill,
    set_path,
    to_dict,
)
from ackd_search.models import supports_width
from ackd_search.searching.params import (
    ACKD,
    ADVERSARY_KNOBS,
    ATTENTION_KNOBS,
    COLLAB_KNOBS,
    DKD_KNOBS,
    GATES,
    LEARNER_PARAM,
    TEACHER_KNOBS,
    Param,
)
from ackd_search.searching.settings import LearnerSpace, StudySettings
from ackd_search.searching.space_checks import (
    check_base,
    check_learners,
    check_second_objective,
    check_study,
    num_stages_of,
    walk_run,
)


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
                              "storage_outage_s", "confirm")
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
        gates = [by_path[g] for g in GATES if g in by_path and g != "distill.method"]
        ordered = gates + [p for p in self.params if p.path not in GATES]
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
        if path in DKD_KNOBS and self._value("distill.form", values) != "dkd":
            return False
        if path in COLLAB_KNOBS and n_learners == 0:
            return False
        if path == ACKD + "aux_width" and not supports_width(self._value("student", values)):
            return False  # a library or user model keeps its own width
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

    def preset_values(self, preset: Literal["reference", "kd", "dkd", "student"]) -> tuple[dict[str, Any], list[str]]:
        """Param values of a hand-set point, and the paths it cannot represent in this space (left to the sampler)."""
        cfg = from_dict(RunConfig, self.base, source=self.source)
        cfg.distill = PRESET_DISTILL[preset]()
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


# The hand-set points: our ACKD reconstruction, RepDistiller's KD, mdistiller's DKD, and the student alone.
PRESET_DISTILL = {"reference": reference_distill, "kd": kd_distill, "dkd": dkd_distill, "student": _student_distill}


_DEFAULTS = to_dict(RunConfig())


def _learner_stage(path: str) -> int | None:
    prefix = LEARNER_PARAM.format("")
    return int(path[len(prefix) :]) if path.startswith(prefix) else None


def _get(data: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data



def load_space(path: str | Path) -> Space:
    """Read and validate a whole space file; every problem is reported at once (file, key path, allowed values)."""
    return load_space_data(load_yaml(path), str(path))


def load_space_data(raw: Any, source: str) -> Space:
    """Validate a space given as plain data laid out as a file is (`study`, `run`, `learners`)."""
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: <top>: expected a mapping with keys study, run, learners"])
    problems: list[str] = []
    for key in raw:
        if key not in ("study", "run", "learners"):
            problems.append(f"{source}: {key}: unknown key; allowed: study, run, learners")
    study = convert(StudySettings, raw.get("study"), "study", source, problems)
    if not study.name:
        problems.append(f"{source}: study.name: required (a study name, e.g. digits-ackd)")
    check_study(study, source, problems)
    base: dict[str, Any] = {}
    params: list[Param] = []
    walk_run(raw.get("run") or {}, "", base, params, source, problems)
    learners = None
    if raw.get("learners") is not None:
        learners = convert(LearnerSpace, raw["learners"], "learners", source, problems)
    check_base(base, params, source, problems)
    num_stages = num_stages_of(base, params)
    if learners is not None:
        check_learners(learners, num_stages, base, params, source, problems)
    check_second_objective(study, base, params, source, problems)
    if problems:
        raise ConfigError(problems)
    return Space(source, study, base, params, learners, num_stages, raw)
