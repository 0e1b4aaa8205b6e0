"""`export`: the trial's own stored config (artifact, then attribute), the final budget, refusal of an edited space,
a readable file (what acts for the method, the learner structure, the milestone scaling) that loads back into the
same run config. Studies are built with ask/tell, so nothing here trains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from tiny_space import run_cli, tiny_space, write

from ackd_search.config import load_run_config, to_dict
from ackd_search.errors import StudyError
from ackd_search.searching.artifacts import stored_config
from ackd_search.searching.record import CONFIRMS, StudyPaths
from ackd_search.searching.space import Space, load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import open_study, quiet_optuna
from ackd_search.view.export import export_config, select_trial

quiet_optuna()
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask/tell, no optimize loop


def told(study: optuna.Study, space: Space, value: float, artifact: bool = False, attrs: dict | None = None,
         **changes) -> optuna.Study:
    """One COMPLETE trial as the objective records it, its stored config changed by `changes` (a__b paths)."""
    trial = study.ask()
    for key, attr in (attrs or {}).items():
        trial.set_user_attr(key, attr)
    values = space.suggest(trial)
    run_dir = Path(space.study.runs_dir) / f"trial-{trial.number:05d}"
    cfg = to_dict(space.run_config(values, output_dir=str(run_dir)))
    for dotted, new in changes.items():
        *parents, leaf = dotted.split("__")
        owner = cfg
        for key in parents:
            owner = owner[key]
        owner[leaf] = new
    if artifact:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg))
        store = FileSystemArtifactStore(str(StudyPaths.for_space(space).artifacts))
        StudyPaths.for_space(space).artifacts.mkdir(parents=True, exist_ok=True)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(run_dir / "config.json"),
                                      study_or_trial=trial)
        trial.set_user_attr("config_artifact_id", artifact_id)
    else:
        trial.set_user_attr("config", cfg)
    study.tell(trial, value)
    return study


@pytest.fixture
def made(tmp_path: Path):
    """A study whose presets ran: trial 0 the ACKD reference (three learners after stage 2), trial 1 plain KD."""
    data = tiny_space(tmp_path, n_trials=2)
    path = write(tmp_path / "space.yaml", data)
    space = load_space(path)
    study = open_study(space, make_storage(space), log=lambda _: None)
    told(study, space, 90.0)
    told(study, space, 95.0)
    return space, study, path, data




def refused(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err and "Traceback" not in err, err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_trial_config_reads_the_artifact_then_the_attribute(made, tmp_path: Path) -> None:
    space, study, _, _ = made
    told(study, space, 80.0, artifact=True, optim__batch_size=17)
    plain, old, stored = study.trials[0], study.trials[1], study.trials[2]
    paths = StudyPaths.for_space(space)
    assert stored_config(stored, paths)["optim"]["batch_size"] == 17
    assert stored_config(old, paths) == old.user_attrs["config"]
    bare = optuna.trial.create_trial(params=plain.params, distributions=plain.distributions, value=1.0)
    assert stored_config(bare, paths) is None


def test_export_writes_the_trials_own_config_not_the_space_values(made, tmp_path: Path) -> None:
    space, study, _, _ = made
    told(study, space, 99.0, artifact=True, optim__batch_size=32, seed=3)
    cfg = export_config(space, study.best_trial, study=study)
    assert cfg.optim.batch_size == 32 and cfg.seed == 3  # what the trial trained, not the space's 64 and 0


def test_export_refuses_a_space_edited_after_the_study(made, tmp_path: Path, capsys) -> None:
    _, _, _, data = made
    data["run"]["optim"].update(batch_size=128, epochs=5)
    edited = write(tmp_path / "edited.yaml", data)
    out = tmp_path / "best.yaml"
    code, _, err = run_cli(["export", "--space", str(edited), "--out", str(out)], capsys)
    refused(code, err, "created from a different space")
    assert not out.exists()


def test_export_budget_eval_test_output_dir_and_seed(made, tmp_path: Path) -> None:
    space, study, _, data = made
    best = study.best_trial
    assert export_config(space, best, study=study).optim.epochs == 4  # the trial's budget
    assert export_config(space, best, 7, study=study).optim.epochs == 7  # --epochs
    final = load_space(write(tmp_path / "final.yaml", {**data, "study": {**data["study"], "final_epochs": 12}}))
    cfg = export_config(final, best)  # the stored config needs no space check
    assert cfg.optim.epochs == 12 and cfg.eval_test is True and cfg.output_dir is None
    assert cfg.seed == best.user_attrs["config"]["seed"]


def test_kd_export_omits_the_ackd_block_and_loads_back_the_same(made, tmp_path: Path, capsys) -> None:
    space, study, path, _ = made
    kd = study.trials[1]
    assert kd.params["distill.method"] == "kd"
    out = tmp_path / "kd.yaml"
    code, _, err = run_cli(["export", "--space", str(path), "--trial", "1", "--out", str(out)], capsys)
    assert code == 0, err
    text = out.read_text()
    assert "ackd:" not in yaml.safe_dump(yaml.safe_load(text)) and "distill.ackd is omitted" in text
    loaded = load_run_config(out)
    assert loaded == export_config(space, kd, study=study)
    stored = kd.user_attrs["config"]
    differs = {k for k, v in to_dict(loaded).items() if v != stored[k]}
    assert differs <= {"optim", "eval_test", "output_dir"}
    assert {k for k, v in to_dict(loaded)["optim"].items() if v != stored["optim"][k]} <= {"epochs"}


def comment_above(text: str, key: str) -> str:
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(key + ":"))
    above = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        above.insert(0, line.strip().lstrip("# "))
    return " ".join(above)


def test_ackd_export_links_learners_and_states_the_milestone_scaling(made, tmp_path: Path, capsys) -> None:
    space, study, path, _ = made
    reference = study.trials[0]
    out = tmp_path / "ackd.yaml"
    code, _, err = run_cli(["export", "--space", str(path), "--trial", "0", "--out", str(out), "--epochs", "20"],
                           capsys)
    assert code == 0, err
    text = out.read_text()
    cfg = load_run_config(out)
    assert cfg == export_config(space, reference, 20, study=study)
    assert cfg.distill.ackd.aux_placements == [2, 2, 2]
    learners = comment_above(text, "aux_placements")
    assert "distill.ackd.learners_after_stage_2=3" in learners and "learners_after_stage_1=0" in learners
    milestones = comment_above(text, "milestones")
    assert "recipe epochs" in milestones and "20/240" in milestones
    assert str(cfg.optim.scaled_milestones()) in milestones  # [12, 15, 18]


def test_export_refuses_to_overwrite_unless_forced(made, tmp_path: Path, capsys) -> None:
    _, _, path, _ = made
    out = tmp_path / "best.yaml"
    assert run_cli(["export", "--space", str(path), "--out", str(out)], capsys)[0] == 0
    out.write_text(out.read_text() + "# my notes\n")
    before = sha(out)
    code, _, err = run_cli(["export", "--space", str(path), "--out", str(out)], capsys)
    refused(code, err, "--force")
    assert sha(out) == before
    assert run_cli(["export", "--space", str(path), "--out", str(out), "--force"], capsys)[0] == 0
    assert "# my notes" not in out.read_text()


def test_a_trial_without_a_stored_config_is_rebuilt_only_after_the_space_check(made, tmp_path: Path) -> None:
    space, study, _, data = made
    bare = study.trials[1]
    bare = optuna.trial.create_trial(params=bare.params, distributions=bare.distributions, value=bare.value)
    study.add_trial(bare)
    bare = study.trials[-1]
    cfg = export_config(space, bare, study=study)
    assert cfg == export_config(space, study.trials[1], study=study)  # the same point, rebuilt from the space
    with pytest.raises(StudyError, match="stored no config"):
        export_config(space, bare)  # no study: the space cannot be checked
    data["run"]["optim"]["batch_size"] = 128
    with pytest.raises(StudyError, match="created from a different space"):
        export_config(load_space(write(tmp_path / "edited.yaml", data)), bare, study=study)


def confirmation(study: optuna.Study, space: Space, label: str, source: str, seed: int, value: float) -> None:
    attrs = {CONFIRMS: label, "confirm_key": label, "confirm_source": source, "confirm_seed": seed,
             "confirm_epochs": 4}
    told(study, space, value, attrs=attrs, seed=seed)


def test_export_picks_the_confirmed_winner_never_a_lucky_confirmation_run(made) -> None:
    space, study, _, _ = made
    told(study, space, 99.0)  # trial 2: the best single-seed search trial
    confirmation(study, space, "#2", "trial:2", 1, 100.0)  # one seed so far: no winner yet
    assert select_trial(study).trial.number == 2  # not the confirmation run's 100
    confirmation(study, space, "#2", "trial:2", 2, 80.0)
    assert select_trial(study).trial.number == 2  # the winner confirms trial 2 (mean 90)
    for seed, value in ((2, 97.0), (1, 96.0)):
        confirmation(study, space, "kd", "preset:kd", seed, value)
    chosen = select_trial(study).trial  # kd wins (mean 96.5): its confirmation run with the lowest seed
    assert chosen.user_attrs[CONFIRMS] == "kd" and chosen.user_attrs["confirm_seed"] == 1
    assert export_config(space, chosen, study=study).seed == 1
