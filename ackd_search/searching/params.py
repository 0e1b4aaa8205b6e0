"""The vocabulary of a search space: a searched parameter (`Param`, which suggests itself to an Optuna trial) and the
config paths grouped by when they act, so a knob is sampled only where it changes training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import optuna

RANGE_KEYS = {"low", "high", "log", "step"}
CHOICE_KEYS = {"choices"}
LEARNER_PARAM = "distill.ackd.learners_after_stage_{}"  # a learner count per branch point, always 0..max_per_stage
ACKD = "distill.ackd."
# Which knob acts when (see ackd_search/distill/ackd.py); a knob that does not act is not sampled.
COLLAB_KNOBS = {ACKD + k for k in ("aggregation", "attn_reduction", "attn_self", "detach_target", "student_target",
                                   "collab_weight", "collab_rampup_epochs", "aux_width", "aux_weight")}
ATTENTION_KNOBS = {ACKD + "attn_reduction", ACKD + "attn_self"}  # only under aggregation: attention
ADVERSARY_KNOBS = {ACKD + k for k in ("adv_real", "adv_input", "d_lr", "adv_warmup_epochs")}  # only with a D
DKD = "distill.dkd."
DKD_KNOBS = {DKD + k for k in ("alpha", "beta", "warmup_epochs")}  # only under distill.form: dkd
# Unused by `student`: the temperature, the loss weights and how the distillation terms are scored (forms.py).
TEACHER_KNOBS = {"distill.temperature", "distill.ce_weight", "distill.kd_weight", "distill.form",
                 "distill.standardize"} | DKD_KNOBS
GATES = ("student", "distill.method", "distill.form", ACKD + "aggregation", ACKD + "adv_weight",
         ACKD + "adv_real")  # sampled first, in this order
FORBIDDEN_IN_SPACE = {
    "eval_test": "trials never read the test set; `export` sets it for the final run",
    "output_dir": "each trial writes to study.runs_dir/trial-N",
}



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

