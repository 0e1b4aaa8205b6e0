"""The study's artifact store: every artifact written atomically (a full disk leaves no half file), and a store
folder deleted during a search recreated with one line, its trials' artifacts rewritten from their run folders
(`config.json`, `curve.json`, `loss_terms.png`, `student.pt`, `val_correct.npy`) or their loss recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial

from ackd_search.files import write_atomic
from ackd_search.notices import notice
from ackd_search.searching.record import StudyPaths, root_trial_number
from ackd_search.searching.storage import annotate_finished

ARTIFACTS_PREFIX = "artifacts:"  # Optuna's system attribute of each artifact's metadata
LOST_ATTR = "artifacts_lost"  # user attribute: the artifacts of a trial that are gone, and why


class AtomicArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system store, with each artifact written to a temporary file and renamed into place."""

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        write_atomic(Path(self._get_filepath(artifact_id)), lambda out: shutil.copyfileobj(content_body, out))


def artifact_store(paths: StudyPaths, study: optuna.Study | None = None) -> AtomicArtifactStore:
    """The store in `paths.artifacts`, created when missing; when `study` already has artifacts there, the folder
    was deleted under it: recreated, said in one line, and the study's artifacts rewritten (`restore_artifacts`)."""
    missing = not paths.artifacts.is_dir()
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    store = AtomicArtifactStore(str(paths.artifacts))
    if missing and study is not None:
        restored, lost = restore_artifacts(study, paths, store)
        if restored or lost:
            notice(f"the artifact folder {paths.artifacts} was deleted during the search; recreated: {restored} "
                   f"artifacts rewritten from the trials' run folders"
                   + (f", {lost} lost (recorded in the trials' {LOST_ATTR})" if lost else ""))
    return store


def artifact_metas(trial: FrozenTrial) -> list[dict]:
    metas = []
    for key, value in trial.system_attrs.items():
        if key.startswith(ARTIFACTS_PREFIX):
            try:
                metas.append(json.loads(value))
            except (TypeError, ValueError):
                continue
    return metas


def restore_artifacts(study: optuna.Study, paths: StudyPaths, store: FileSystemArtifactStore) -> tuple[int, int]:
    """Rewrite, under their own ids, the study's artifacts missing from `store` from the trials' run folders;
    record on each trial what could not be (`artifacts_lost`). Returns (rewritten, lost)."""
    restored = lost = 0
    for trial in study.get_trials(deepcopy=False):
        gone = []
        for meta in artifact_metas(trial):
            target = Path(store._get_filepath(meta["artifact_id"]))
            if target.exists():
                continue
            source = paths.run_dir(root_trial_number(trial)) / meta["filename"]
            try:
                with open(source, "rb") as handle:
                    store.write(meta["artifact_id"], handle)
                restored += 1
            except OSError:
                gone.append(meta["filename"])
        if gone:
            lost += len(gone)
            record_lost(study, trial, sorted(set(gone)))
    return restored, lost


def record_lost(study: optuna.Study, trial: FrozenTrial, names: list[str]) -> None:
    value = f"{', '.join(names)}: the artifact folder was deleted and the run folder no longer holds them"
    if trial.state.is_finished():
        annotate_finished(study, trial, LOST_ATTR, value)
    else:
        study._storage.set_trial_user_attr(trial._trial_id, LOST_ATTR, value)
