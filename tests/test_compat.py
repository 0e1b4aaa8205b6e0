"""What an earlier ackd-search (0.1.0, before the package was laid out in layers) left on disk keeps working: its
study database (report, export, a resumed search), its teacher cache entry and its exported config.

`tests/fixtures/study-0.1.0/` was written by that version (commit 062e5fa) from `before.yaml`: a 3-trial digits search
with its confirmation, then `export`. The database is kept as its SQL dump, the artifacts as their JSON files; the
teacher's weights are not kept (a test writes weights of the same architecture and re-signs the manifest)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from tiny_space import run_cli

from ackd_search.config import load_run_config, to_dict
from ackd_search.data import get_splits
from ackd_search.files import sha256_file
from ackd_search.models import create_model
from ackd_search.searching.confirm import enqueue_confirmation
from ackd_search.searching.confirming import open_confirmation
from ackd_search.searching.record import StudyPaths
from ackd_search.searching.space import load_space
from ackd_search.searching.study import open_existing_study, quiet_optuna
from ackd_search.training import teachers
from ackd_search.view.export import export_config, select_trial

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "study-0.1.0"
quiet_optuna()


@pytest.fixture
def before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The old study restored into a fresh folder, which becomes the working directory (its paths are relative)."""
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    with sqlite3.connect(tmp_path / "before.db") as conn:
        conn.executescript((tmp_path / "before.sql").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cached_teacher(folder: Path) -> Path:
    """Weights of the old entry's architecture in its model.pt, the manifest re-signed for them."""
    entry = next(p for p in (folder / "teachers").iterdir() if p.is_dir())
    torch.manual_seed(0)
    torch.save(create_model("digits_cnn_large", 10, in_channels=1).state_dict(), entry / teachers.WEIGHTS)
    manifest = json.loads((entry / teachers.MANIFEST).read_text())
    manifest["sha256"] = sha256_file(entry / teachers.WEIGHTS)
    (entry / teachers.MANIFEST).write_text(json.dumps(manifest))
    return entry


def test_the_old_teacher_cache_entry_is_found_under_the_same_name(before: Path, monkeypatch) -> None:
    entry = cached_teacher(before)
    cfg = load_space("before.yaml").run_config({})
    assert teachers.cache_entry(cfg).name == entry.name
    monkeypatch.setattr(teachers, "train", lambda *a, **k: pytest.fail("the cached teacher was trained again"))
    _, info = teachers.get_teacher(cfg, get_splits(cfg.data), torch.device("cpu"))
    assert info["cache_entry"] == str(teachers.cache_entry(cfg))


def test_the_old_study_reports_and_exports_its_confirmed_winner(before: Path, capsys) -> None:
    code, out, err = run_cli(["report", "--space", "before.yaml", "--out", "report"], capsys)
    assert code == 0, err
    assert "winner: #0" in out and (before / "report" / "trials.csv").is_file()
    space = load_space("before.yaml")
    study = open_existing_study(space)
    trial = select_trial(study, paths=StudyPaths.for_space(space)).trial
    assert trial.number == 0  # the confirmed winner, as the old version exported it
    exported_then = load_run_config("before-best.yaml")
    assert to_dict(export_config(space, trial, study=study)) == to_dict(exported_then)


def test_the_old_confirmation_runs_still_cover_their_configurations(before: Path) -> None:
    """Fields added since 0.1.0 do not change a configuration's key: only the baseline added since (DKD) is new."""
    space = load_space("before.yaml")
    study = open_existing_study(space)
    confirm = open_confirmation(space, study)  # new runs go to the sibling study; the old ones still count
    assert enqueue_confirmation(space, study, confirm, log=lambda _: None) == 2  # dkd x 2 seeds
    queued = [t for t in confirm.get_trials(deepcopy=False) if t.state.name == "WAITING"]
    assert {t.user_attrs["confirms"] for t in queued} == {"dkd"}


def test_the_old_export_loads_and_the_old_study_resumes(before: Path, capsys) -> None:
    cached_teacher(before)
    cfg = load_run_config("before-best.yaml")
    assert cfg.student == "digits_cnn_small" and cfg.eval_test
    code, _, err = run_cli(["search", "--space", "before.yaml", "--n-trials", "1", "--no-confirm"], capsys)
    assert code == 0, err
    study = open_existing_study(load_space("before.yaml"))
    assert len(study.trials) == 1 + 3 + 8  # one new trial after 3 search trials and 4 x 2 confirmation runs
    assert study.trials[-1].state.name in ("COMPLETE", "PRUNED")
