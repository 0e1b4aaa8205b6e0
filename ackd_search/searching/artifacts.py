"""What a trial leaves behind: its user attributes from a run's result, its curve, config and best weights as
artifacts, its traceback in the run folder; and the stored config read back (for `export` and the notes). Every
file is written atomically: a full disk fails the write, never leaves half a file."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from ackd_search.config import RunConfig, to_dict
from ackd_search.files import write_atomic, write_text_atomic
from ackd_search.searching.artifact_store import artifact_store
from ackd_search.searching.record import CONFIG_ARTIFACT_ATTR, StudyPaths
from ackd_search.training import RunResult

CONFIG_ATTR = "config"  # user attr of studies made before the config moved into an artifact
CORRECT_ARTIFACT_ATTR = "val_correct_artifact_id"  # user attr of a confirmation run: its per-image record


def trial_attrs(result: RunResult) -> dict[str, Any]:
    teacher = result.teacher or {}
    return {
        "student_params": result.student_params,
        "student_flops": result.student_flops,
        "teacher_val_acc": teacher.get("val_acc"),
        "teacher_arch": teacher.get("arch"),
        "wall_time_s": round(result.wall_time_s, 3),
        "images_per_s": round(result.images_per_s, 1),
        "device": result.device,
        "version": result.version,
        "seed": result.config["seed"],
        "best_val_acc": result.best_val_acc,
        "method": result.config["distill"]["method"],
        "teacher_output_cache": result.teacher_output_cache,  # used | off | off: <why>
        "cuda_graphs": result.cuda_graphs,  # captured | off | eager: <why>
    }


def compact_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("epoch", "val_acc", "val_loss", "lr", "images_per_s")
    return [{**{k: h[k] for k in keep}, "terms": {k: round(v, 6) for k, v in h["terms"].items()}} for h in history]


def upload_config(trial: optuna.Trial, cfg: RunConfig, run_dir: Path, paths: StudyPaths) -> None:
    """The trial's complete run config, as evaluated, is an artifact (`export` reads it back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    write_text_atomic(path, json.dumps(to_dict(cfg), indent=1))
    artifact_id = upload_artifact(artifact_store=artifact_store(paths, trial.study), file_path=str(path),
                                  study_or_trial=trial, mimetype="application/json")
    trial.set_user_attr(CONFIG_ARTIFACT_ATTR, artifact_id)


def upload_curve(trial: optuna.Trial, history: list[dict], run_dir: Path, paths: StudyPaths) -> list[dict]:
    """The whole curve with its loss terms as `curve.json`; returns it in its compact, stored form."""
    if not history:
        return []
    run_dir.mkdir(parents=True, exist_ok=True)
    curve = run_dir / "curve.json"
    compact = compact_history(history)
    write_text_atomic(curve, json.dumps(compact, indent=1))
    upload_artifact(artifact_store=artifact_store(paths, trial.study), file_path=str(curve), study_or_trial=trial,
                    mimetype="application/json")
    return compact


def upload_val_correct(trial: optuna.Trial, correct: np.ndarray | None, run_dir: Path, paths: StudyPaths) -> None:
    """A confirmation run's per-image record (`val_correct.npy`, one bool per validation image in the split's
    order): what two configurations are paired on beside their seeds."""
    if correct is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "val_correct.npy"
    write_atomic(path, lambda handle: np.save(handle, np.asarray(correct, dtype=bool)))
    artifact_id = upload_artifact(artifact_store=artifact_store(paths, trial.study), file_path=str(path),
                                  study_or_trial=trial, mimetype="application/octet-stream")
    trial.set_user_attr(CORRECT_ARTIFACT_ATTR, artifact_id)
    trial.set_user_attr("val_images", int(len(correct)))


def write_traceback(run_dir: Path) -> bool:
    """The whole traceback of a failed trial goes to its run folder; the study keeps the one-line reason. A folder
    that cannot be written (a full disk, the likely reason the trial failed) is no second failure: False."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "error.log", traceback.format_exc())
    except OSError:
        return False
    return True


def upload_best_weights(trial: optuna.Trial, multi_objective: bool, final_val_acc: float, run_dir: Path,
                        paths: StudyPaths) -> None:
    """Keep the student's weights of every trial that improves on the best so far (every trial when multi-objective);
    skipped when they are not on this machine's disk (a Ray worker elsewhere without a shared file system)."""
    if not multi_objective:
        done = [t.value for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if done and final_val_acc <= max(done):
            return
    weights = run_dir / "student.pt"
    if weights.exists():
        upload_artifact(artifact_store=artifact_store(paths, trial.study), file_path=str(weights),
                        study_or_trial=trial, mimetype="application/octet-stream")
        trial.set_user_attr("weights_artifact", True)


def stored_config(trial: optuna.Trial | FrozenTrial, paths: StudyPaths,
                  run_dir: Path | None = None) -> dict[str, Any] | None:
    """The run config a trial trained with, as plain data: `run_dir/config.json` when given and there, else its
    `config.json` artifact, else its `config` user attribute (older studies), else None."""
    if run_dir is not None and (run_dir / "config.json").is_file():
        return json.loads((run_dir / "config.json").read_text())
    artifact_id = trial.user_attrs.get(CONFIG_ARTIFACT_ATTR)
    if artifact_id and paths.artifacts.is_dir():
        try:
            with FileSystemArtifactStore(str(paths.artifacts)).open_reader(str(artifact_id)) as reader:
                return json.loads(reader.read())
        except (ArtifactNotFound, OSError, ValueError):
            pass  # the artifact folder was moved or deleted: the attribute (or the checked space) stands in
    stored = trial.user_attrs.get(CONFIG_ATTR)
    return dict(stored) if isinstance(stored, dict) else None
