"""Export a trial of a study (the best, a chosen one, or a Pareto point) as a complete run config YAML.

What is exported is the config the trial itself trained with (stored with the trial), at the final budget; a space
file that is not the study's is refused, as `search` refuses it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ackd_search import __version__
from ackd_search.config import AckdConfig, OptimConfig, RunConfig, from_dict, save_run_config
from ackd_search.errors import StudyError, UsageError
from ackd_search.searching.artifacts import stored_config
from ackd_search.searching.compare import Confirmed, winner_of
from ackd_search.searching.confirm import confirmation_runs
from ackd_search.searching.confirming import confirmation_results, open_confirmation_if_any
from ackd_search.searching.params import LEARNER_PARAM
from ackd_search.searching.record import CONFIRMS, StudyPaths, search_trials
from ackd_search.searching.space import Space


def check_same_space(study: optuna.Study, space: Space) -> None:
    """Refuse a space file edited since the study was created: its values are not what the trials ran."""
    if study.user_attrs.get("space_fingerprint") != space.fingerprint():
        made_from = study.user_attrs.get("space_source", "not by ackd-search")
        raise StudyError(f"study {space.study.name!r} was created from a different space ({made_from}) than "
                         f"{space.source}; export with the original space file")


@dataclass
class Selection:
    """The trial `export` writes and why that one (said in one line when it is not the confirmed winner)."""

    trial: FrozenTrial
    why: str


def select_trial(study: optuna.Study, number: int | None = None, paths: StudyPaths | None = None,
                 min_seeds: int = 2) -> Selection:
    """Trial `number`, else the confirmed winner's trial, else the best search trial (single objective), each with
    why it was chosen; a Pareto front needs `number`."""
    if number is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not match:
            raise StudyError(f"study {study.study_name!r} has no trial #{number}")
        if match[0].state != TrialState.COMPLETE:
            raise StudyError(f"trial #{number} is {match[0].state.name}; only COMPLETE trials can be exported")
        return Selection(match[0], f"trial #{number}, as asked (--trial)")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StudyError(f"study {study.study_name!r} has no COMPLETE trial to export")
    searched = search_trials(study)  # confirmation runs are never picked for one lucky seed
    if len(study.directions) > 1:
        front = ", ".join(f"#{t.number} ({t.values[0]:.2f}, {t.values[1]:.4g})" for t in study.best_trials
                          if CONFIRMS not in t.user_attrs)
        raise StudyError(f"multi-objective study: choose a Pareto point with --trial N; front: {front}")
    results = confirmation_results(study, paths)
    found = _winner_trial(study, results, min_seeds)
    if found is not None:
        return Selection(found[0], found[1])
    best = searched[0] if searched else study.best_trial
    why = ("no confirmation runs yet (run `search.py confirm`)" if not results else
           f"no configuration has {min_seeds} complete confirmation seeds yet")
    return Selection(best, f"the best search trial #{best.number} (one seed), not a confirmed winner: {why}")


def _winner_trial(study: optuna.Study, results: list[Confirmed],
                  min_seeds: int) -> tuple[FrozenTrial, str] | None:
    """A trial that trained the confirmed winner's configuration: the search trial it confirms, or for a preset
    (whose search trial may have sampled some values) its confirmation run with the lowest seed."""
    best = winner_of(results, min_seeds)
    if best is None:
        return None
    why = f"the confirmed winner {best.label} (mean {best.mean:.2f} over {len(best.by_seed)} seeds)"
    kind, _, name = best.source.partition(":")
    if kind == "trial":
        match = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number == int(name)]
        if match:
            return match[0], why
    confirm = open_confirmation_if_any(study)
    runs = [t for t in confirmation_runs(study, confirm) if t.state == TrialState.COMPLETE
            and t.user_attrs.get("confirm_key") == best.key]
    run = min(runs, key=lambda t: int(t.user_attrs["confirm_seed"])) if runs else None
    return (run, why) if run is not None else None


def describe(trial: FrozenTrial) -> str:
    """How `export` names the trial it wrote: its number, and for a confirmation run what it confirms."""
    if CONFIRMS in trial.user_attrs:
        return (f"trial #{trial.number} (confirmation run of {trial.user_attrs[CONFIRMS]}, "
                f"seed {trial.user_attrs.get('confirm_seed')})")
    return f"trial #{trial.number}"


def trial_run_config(space: Space, trial: FrozenTrial, study: optuna.Study | None = None) -> tuple[RunConfig, str]:
    """The config the trial trained with and where it came from. Without a stored config it is rebuilt from the
    space, which is only the trial's own when the space is the study's: `study` is then required and checked."""
    if study is not None:
        check_same_space(study, space)
    stored = stored_config(trial, StudyPaths.for_space(space))
    if stored is not None:
        cfg = from_dict(RunConfig, stored, source=f"trial #{trial.number}'s stored config")
        return cfg, "the trial's stored config"
    if study is None:
        raise StudyError(f"trial #{trial.number} stored no config; the study is needed to check the space file")
    return space.run_config(trial.params), f"{space.source} (the trial stored no config)"


def export_config(space: Space, trial: FrozenTrial, epochs: int | None = None,
                  study: optuna.Study | None = None) -> RunConfig:
    """The trial's own run config for the final training: the full budget (`epochs`, else `study.final_epochs`,
    else the trial's), the test set read once at the end, no output folder (train picks one), the trial's seed.
    ACKD knobs are reset to their defaults when the method is not ACKD: they do not act and are not written."""
    cfg, _ = trial_run_config(space, trial, study)
    return _final(cfg, epochs or space.study.final_epochs)


def _final(cfg: RunConfig, epochs: int | None) -> RunConfig:
    cfg.optim.epochs = epochs or cfg.optim.epochs
    cfg.eval_test = True
    cfg.output_dir = None
    if cfg.distill.method != "ackd":
        cfg.distill.ackd = AckdConfig()
    return cfg


def write_export(space: Space, study: optuna.Study, trial: FrozenTrial, out: Path, epochs: int | None,
                 force: bool = False) -> RunConfig:
    """Write the trial's config to `out`, with comments on what acts and how budgets scale; an earlier export
    is kept unless `force`."""
    trained, source = trial_run_config(space, trial, study)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / (space.study.name + '-best.yaml')}")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists (an earlier export); use --force to overwrite it or --out for "
                         "another file")
    trial_epochs = trained.optim.epochs
    cfg = _final(trained, epochs or space.study.final_epochs)
    values = ", ".join(f"{v:.4g}" for v in trial.values)
    header = (f"# exported by ackd-search {__version__} on {time.strftime('%Y-%m-%d %H:%M')} from {source}\n"
              f"# study {study.study_name!r}, {describe(trial)} (values {values}; trained {trial_epochs} epochs, "
              f"this config {cfg.optim.epochs})\n"
              f"# train it with: python search.py train --config {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, out, header=header, notes=export_notes(cfg, trial, trial_epochs),
                        omit=() if cfg.distill.method == "ackd" else ("distill.ackd",))
    except OSError as err:
        raise StudyError(f"cannot write {out}: {err.strerror or err}") from None
    return cfg


# --- comments that make the exported file readable ------------------------------------------------------------


def export_notes(cfg: RunConfig, trial: FrozenTrial, trial_epochs: int) -> dict[str, str]:
    """Comments keyed by config path: what the budget means, how recipe epochs scale, which knobs act."""
    notes = {
        "optim.epochs": f"the final budget; the trial trained {trial_epochs} epochs",
        "optim.milestones": _milestone_note(cfg.optim),
        "teacher.optim.milestones": _milestone_note(cfg.teacher.optim),
        "output_dir": "set by `train --output-dir` (default studies/final/<this file's name>)",
    }
    method = cfg.distill.method
    if method == "ackd":
        notes.update(_ackd_notes(cfg, trial))
    else:
        unused = "distill.ackd is omitted: its knobs act only with method ackd (loading gives their defaults)"
        if method == "student":
            unused += "; the student trains alone, so teacher, temperature and kd_weight do not act either"
        notes["distill.method"] = unused
    return notes


def _milestone_note(optim: OptimConfig) -> str:
    if optim.schedule != "step":
        return f"not used: schedule is {optim.schedule}"
    scaled = optim.scaled_milestones()
    repeated = " (a repeated epoch decays once per entry)" if len(set(scaled)) < len(scaled) else ""
    return (f"in recipe epochs (recipe_epochs {optim.recipe_epochs}), scaled by epochs/recipe_epochs = "
            f"{optim.epochs}/{optim.recipe_epochs}: the learning rate is multiplied by {optim.lr_decay} after "
            f"epochs {scaled} of this run{repeated}")


def _ackd_notes(cfg: RunConfig, trial: FrozenTrial) -> dict[str, str]:
    ackd, scale = cfg.distill.ackd, cfg.optim.budget_scale
    prefix = LEARNER_PARAM.format("")
    searched = {k: v for k, v in trial.params.items() if k.startswith(prefix)}
    if ackd.aux_placements is None:
        placements = "null: the reference structure, three learners branching before the student's last stage"
    else:
        counts = searched or {LEARNER_PARAM.format(k): n for k, n in sorted(Counter(ackd.aux_placements).items())}
        placements = (
            "one entry per auxiliary learner: the student stage after which it branches (a fresh copy of the later "
            f"stages). The search parameters {LEARNER_PARAM.format('k')} (as in the dashboard) count the entries "
            "equal to k; this trial: " + (", ".join(f"{k}={v}" for k, v in counts.items()) or "no learners")
        )
    return {
        "distill.ackd.aux_placements": placements,
        "distill.ackd.collab_rampup_epochs": f"recipe epochs, scaled like the milestones: "
                                             f"{ackd.collab_rampup_epochs * scale:.4g} epochs of this run",
        "distill.ackd.adv_warmup_epochs": f"recipe epochs, scaled like the milestones: "
                                          f"{ackd.adv_warmup_epochs * scale:.4g} epochs of this run",
    }
