"""A trial's readable view in optuna-dashboard: a short markdown note (the configuration that matters, the final
loss terms, why it stopped) and a PNG of its loss terms and validation accuracy per epoch, as an image artifact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna_dashboard import save_note

from ackd_search.searching.artifacts import artifact_store
from ackd_search.searching.confirming import confirmation_results
from ackd_search.searching.params import (
    ACKD,
    ADVERSARY_KNOBS,
    ATTENTION_KNOBS,
    COLLAB_KNOBS,
    DKD_KNOBS,
    LEARNER_PARAM,
    TEACHER_KNOBS,
)
from ackd_search.searching.record import CONFIRMS, OBJECTIVE, StudyPaths, search_trials
from ackd_search.view.plots import PLOT_NAME, plot_history
from ackd_search.view.tables import confirmation_table

TRAINING_KNOBS = ("optim.epochs", "optim.batch_size", "optim.lr", "optim.weight_decay", "optim.schedule")
ACKD_ORDER = ("aux_width", "aux_weight", "aggregation", "attn_reduction", "attn_self", "student_target",
              "detach_target", "collab_weight", "collab_rampup_epochs", "adv_weight", "adv_warmup_epochs", "adv_real",
              "adv_input", "d_lr")


def annotate_trial(trial: optuna.Trial, history: list[dict[str, Any]], config_dict: dict[str, Any], run_dir: Path,
                   paths: StudyPaths) -> None:
    """Leave the note and upload the plot (`run_dir/loss_terms.png`) for `trial`, finished or stopped early."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plot = run_dir / PLOT_NAME
    if history:
        plot_history(history, plot, f"trial #{trial.number}")
        upload_artifact(artifact_store=artifact_store(paths, trial.study), file_path=str(plot), study_or_trial=trial,
                        mimetype="image/png")
    save_note(trial, trial_note(trial.number, trial.user_attrs, trial.params, history, config_dict))


def annotate_study(search: optuna.Study, confirm: optuna.Study | None, paths: StudyPaths,
                   min_seeds: int = 2) -> None:
    """The notes of both studies (the dashboard's Note page): the confirmed winner first, then where the search and
    its confirmation runs are and the confirmation table. The search study holds search points only, so its Best
    Trial (one seed of a short run) is the search's own; the winner is the one confirmed over seeds."""
    results = confirmation_results(search, paths)
    table = confirmation_table(results, min_seeds, confirm.study_name if confirm else "")
    best = search_trials(search)
    lines = [f"### {search.study_name}", ""]
    if table:
        lines += [f"**Confirmed {table[-1]}**", ""]
    if best:
        lines.append(f"Best search trial (one seed): #{best[0].number}, {OBJECTIVE} {best[0].values[0]:.2f}; "
                     "the dashboard's Best Trial is this one, not the confirmed winner.")
    if confirm is not None:
        lines.append(f"Confirmation runs: study `{confirm.study_name}` ({len(confirm.trials)} trials).")
    if table:
        lines += ["", "```", *table, "```"]
    save_note(search, "\n".join(lines) + "\n")
    if confirm is not None:
        save_note(confirm, "\n".join([f"### {confirm.study_name}", "",
                                      f"Confirmation runs of study `{search.study_name}`.", "", "```", *table,
                                      "```"]) + "\n")


# --- the note ---------------------------------------------------------------------------------------------------


def trial_note(number: int, attrs: dict[str, Any], params: dict[str, Any], history: list[dict[str, Any]],
               config: dict[str, Any]) -> str:
    distill = config.get("distill", {})
    method = distill.get("method") or attrs.get("method") or params.get("distill.method") or "?"
    last = history[-1] if history else {}
    head = f"### Trial {number} · {method}"
    if last:
        head += f" · {OBJECTIVE} {last['val_acc']:.2f} after epoch {last['epoch']}"
    lines = [head, ""]
    context = _context(attrs)
    if context:
        lines += [context, ""]
    lines += ["| setting | value |", "|---|---|"]
    if config.get("student"):
        lines.append(f"| student / teacher | {config['student']} / {config.get('teacher', {}).get('arch', '?')} |")
    if method == "ackd":
        lines.append(f"| learners | {learner_text(distill.get('ackd', {}).get('aux_placements'), params)} |")
    for path, value in acting_knobs(config, params):
        shown = _show(value)
        lines.append(f"| `{path}` | {'**' + shown + '**' if path in params else shown} |")
    lines += ["", "**bold**: searched in this trial; the others are fixed by the space or the method."]
    if last.get("terms"):
        lines += ["", f"Loss terms at epoch {last['epoch']} (train means; `{PLOT_NAME}` plots every epoch):", ""]
        lines += terms_table(last["terms"])
    return "\n".join(lines) + "\n"


def terms_table(terms: dict[str, float]) -> list[str]:
    """One row for the student's terms (and the discriminator's), one per auxiliary learner (`aux1/ce`, ...); the
    schedule weights (`*_w`) on a line of their own."""
    rows: dict[str, dict[str, float]] = {"student": {}}
    weights = {}
    for name, value in terms.items():
        if name.endswith("_w"):
            weights[name] = value
        elif "/" in name:
            learner, term = name.split("/", 1)
            rows.setdefault(learner, {})[term] = value
        else:
            rows["student"][name] = value
    columns = list(dict.fromkeys(["loss", *(term for row in rows.values() for term in row)]))
    columns = [c for c in columns if any(c in row for row in rows.values())]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.4g}" if c in row else "" for c in columns) + " |")
    if weights:
        lines += ["", "Schedule weights at that epoch: " + ", ".join(f"{k} {v:.4g}" for k, v in weights.items())]
    return lines


def _context(attrs: dict[str, Any]) -> str:
    parts = []
    if CONFIRMS in attrs:
        parts.append(f"Confirmation run of **{attrs['confirms']}**, seed {attrs.get('confirm_seed')}, "
                     f"{attrs.get('confirm_epochs')} epochs.")
    elif attrs.get("preset"):
        parts.append(f"Preset **{attrs['preset']}**.")
    for key, text in (("prune_reason", "Pruned"), ("fail_reason", "Failed")):
        if attrs.get(key):
            parts.append(f"{text}: {attrs[key]}")
    return " ".join(parts)


def learner_text(placements: list[int] | None, params: dict[str, Any]) -> str:
    """`3: after stage 1: 1, after stage 2: 2 (aux_placements [1, 2, 2])`: counts per branch point, and the list
    the run config and `export` use. Branch points searched with 0 learners are listed too."""
    if placements is None:
        return "reference (3 before the last stage)"
    counts = Counter(placements)
    prefix, suffix = LEARNER_PARAM.split("{}")
    for name in params:
        if name.startswith(prefix) and name.endswith(suffix):
            counts.setdefault(int(name[len(prefix):len(name) - len(suffix)]), 0)
    per_point = ", ".join(f"after stage {k}: {counts[k]}" for k in sorted(counts)) or "none"
    return f"{len(placements)}: {per_point} (aux_placements {list(placements)})"


def acting_knobs(config: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    """The config paths that change training for this method and learner structure (the rules of space.acts)."""
    distill = config.get("distill", {})
    method = distill.get("method")
    knobs = [(path, _get(config, path)) for path in TRAINING_KNOBS]
    if method in ("kd", "ackd"):
        dkd = distill.get("form") == "dkd"
        knobs += [(path, _get(config, path)) for path in sorted(TEACHER_KNOBS) if dkd or path not in DKD_KNOBS]
    if method != "ackd":
        return [(p, v) for p, v in knobs if v is not None]
    ackd = distill.get("ackd", {})
    placements = ackd.get("aux_placements")
    n_learners = 3 if placements is None else len(placements)
    adversary = ackd.get("adv_weight", 0) > 0 and not (n_learners == 0 and ackd.get("adv_real") == "ensemble")
    for name in ACKD_ORDER:
        path = ACKD + name
        if ((path in COLLAB_KNOBS and n_learners == 0)
                or (path in ATTENTION_KNOBS and ackd.get("aggregation") != "attention")
                or (path in ADVERSARY_KNOBS and not adversary)
                or (path == ACKD + "adv_real" and n_learners == 0)):
            continue
        knobs.append((path, ackd.get(name)))
    return [(p, v) for p, v in knobs if v is not None]


def _get(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
