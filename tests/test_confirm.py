"""Confirmation over seeds and a fair search: the right configurations retrained with the right seeds, resumed
after an interruption, the winner chosen by its mean with honest intervals; distinct sampler seeds per process;
presets that survive the creation race."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from tiny_space import interrupted_at_epoch, tiny_space, write

from ackd_search.backends.local import confirm_study, run_search
from ackd_search.searching.compare import Confirmed, paired_difference, winner, winner_config
from ackd_search.searching.confirm import config_key, preset_config
from ackd_search.searching.record import CONFIRMS
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import enqueue_presets, open_study, quiet_optuna
from ackd_search.view.tables import confirmation_table

quiet_optuna()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def confirm_space(tmp: Path, teacher_cache: Path, **confirm):
    data = tiny_space(tmp, teacher_cache=teacher_cache, n_trials=4,
                      confirm={"top_k": 1, "seeds": 2, "epochs": 2, **confirm})
    return load_space(write(tmp / "space.yaml", data))


def stored_config(space, trial) -> dict:
    store = optuna.artifacts.FileSystemArtifactStore(space.study.artifacts_dir)
    storage = optuna.storages.get_storage(space.storage_url)
    metas = optuna.artifacts.get_all_artifact_meta(trial, storage=storage)
    meta = next(m for m in metas if m.filename == "config.json")
    with store.open_reader(meta.artifact_id) as f:
        return json.load(f)


def confirmations(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if CONFIRMS in t.user_attrs]


def test_confirmation_retrains_presets_and_the_best_with_fresh_seeds(tmp_path: Path, teacher_cache: Path) -> None:
    space = confirm_space(tmp_path, teacher_cache)
    study = run_search(space)
    runs = confirmations(study)
    assert runs and all(t.state == TrialState.COMPLETE for t in runs)
    by_label: dict[str, set[int]] = {}
    for t in runs:
        by_label.setdefault(t.user_attrs[CONFIRMS], set()).add(t.user_attrs["confirm_seed"])
        cfg = stored_config(space, t)
        assert cfg["seed"] == t.user_attrs["confirm_seed"] and cfg["optim"]["epochs"] == 2
        assert sorted(t.intermediate_values) == [1, 2]
    assert all(seeds == {1, 2} for seeds in by_label.values())  # the search used seed 0; these are fresh
    labels = set(by_label)
    assert {"student", "reference"} <= {label.split(" = ")[-1] for label in labels}
    assert any("kd" in label for label in labels)
    methods = {t.user_attrs[CONFIRMS]: stored_config(space, t)["distill"]["method"] for t in runs}
    assert methods[next(label for label in labels if label.endswith("student"))] == "student"
    # The best search trial (top_k 1) is confirmed with its own configuration.
    best = max((t for t in study.trials if CONFIRMS not in t.user_attrs and t.state == TrialState.COMPLETE),
               key=lambda t: t.value)
    best_runs = [t for t in runs if t.user_attrs["confirm_source"] in (f"trial:{best.number}",)
                 or t.user_attrs[CONFIRMS].startswith(f"#{best.number}")]
    assert len(best_runs) == 2
    expected = stored_config(space, best)
    got = stored_config(space, best_runs[0])
    for cfg in (expected, got):
        cfg.pop("seed"), cfg.pop("output_dir"), cfg["optim"].pop("epochs")
    assert got == expected
    # Confirmation runs are never pruned nor used to prune, and the summary ends with the table.
    assert all("prune_reason" not in t.user_attrs for t in runs)
    table = "\n".join(confirmation_table(study))
    assert "vs KD" in table and "winner:" in table


def test_an_interrupted_confirmation_resumes_with_its_labels(tmp_path: Path, teacher_cache: Path,
                                                            monkeypatch) -> None:
    space = confirm_space(tmp_path, teacher_cache, top_k=0, presets=["kd"], epochs=3)
    study = run_search(space, n_trials=2, confirm=False)  # both presets: nothing else is waiting
    first_confirmation = lambda reporter: CONFIRMS in reporter.trial.user_attrs  # noqa: E731
    with interrupted_at_epoch(monkeypatch, 2, first_confirmation), pytest.raises(KeyboardInterrupt):
        confirm_study(space)
    study = confirm_study(space)
    runs = confirmations(study)
    interrupted = [t for t in runs if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state == TrialState.FAIL
    done = [t for t in runs if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["confirm_seed"] for t in done) == [1, 2]  # each seed once, none lost
    resumed = next(t for t in done if t.user_attrs.get("retry_of") == interrupted[0].number)
    assert resumed.user_attrs[CONFIRMS] == interrupted[0].user_attrs[CONFIRMS]
    assert resumed.user_attrs["resumed_from_epoch"] == 2  # from its checkpoint, not from scratch
    assert confirm_study(space).trials[-1].number == study.trials[-1].number  # nothing left to run


def _confirmed_trial(label: str, source: str, seed: int, value: float):
    return create_trial(value=value, params={}, distributions={}, user_attrs={
        CONFIRMS: label, "confirm_key": label, "confirm_seed": seed, "confirm_epochs": 2, "confirm_source": source})


def test_winner_is_the_best_mean_and_intervals_are_paired() -> None:
    study = optuna.create_study(direction="maximize")
    values = {"kd": [90.0, 91.0, 92.0], "reference": [91.0, 91.5, 92.5], "#7": [93.0, 92.0, 95.0]}
    for label, vals in values.items():
        source = f"preset:{label}" if label in ("kd", "reference") else "trial:7"
        for seed, v in enumerate(vals, start=1):
            study.add_trial(_confirmed_trial(label, source, seed, v))
    best = winner(study)
    assert best.label == "#7" and best.mean == pytest.approx(280 / 3)
    kd = Confirmed("kd", "kd", "kd", "preset:kd", {1: 90.0, 2: 91.0, 3: 92.0})
    diff = paired_difference(best, kd)
    assert diff.mean == pytest.approx(2.333333, abs=1e-5)
    # paired differences 3, 1, 3: sd 1.1547, t(0.975, 2) = 4.3027 -> half width 2.8684
    assert diff.low == pytest.approx(2.333333 - 2.8684, abs=1e-3) and not diff.separable
    text = "\n".join(confirmation_table(study))
    assert "winner: #7" in text and "NOT separable from KD" in text


def test_a_clear_winner_is_reported_as_separable() -> None:
    study = optuna.create_study(direction="maximize")
    for seed, (kd, best) in enumerate([(90.0, 95.0), (91.0, 96.2), (92.0, 96.8)], start=1):
        study.add_trial(_confirmed_trial("kd", "preset:kd", seed, kd))
        study.add_trial(_confirmed_trial("#3", "trial:3", seed, best))
    text = "\n".join(confirmation_table(study))
    assert "above KD by +5.00" in text and "NOT separable" not in text


def test_winner_config_is_the_confirmed_configuration(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    study = optuna.create_study(direction="maximize")
    for seed, (kd, ref) in enumerate([(90.0, 95.0), (91.0, 96.0)], start=1):
        study.add_trial(_confirmed_trial("kd", "preset:kd", seed, kd))
        study.add_trial(_confirmed_trial("reference", "preset:reference", seed, ref))
    best, cfg = winner_config(space, study)
    assert best.label == "reference" and cfg.distill.method == "ackd"
    assert config_key(cfg) == config_key(preset_config(space, "reference"))
    assert config_key(preset_config(space, "kd")) != config_key(preset_config(space, "student"))


def test_processes_joining_a_study_never_propose_the_same_parameters(tmp_path: Path) -> None:
    """Four workers (and two started with the same offset) on one study: distinct sampler seeds, distinct draws."""
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path, presets=False)))
    storage = make_storage(space)
    studies = [open_study(space, storage, seed_offset=0, log=lambda _: None) for _ in range(4)]
    assert len({s.sampler_seed for s in studies}) == 4
    proposals = []
    for _ in range(4):  # TPE's random start-up: where identical seeds replay identical draws
        for study in studies:
            trial = study.ask()
            trial.suggest_float("optim.lr", 1e-4, 0.1, log=True)
            proposals.append(trial.params["optim.lr"])
            study.tell(trial, 50.0)
    assert len(set(proposals)) == len(proposals)


def test_presets_survive_a_trial_created_before_they_are_queued(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    study = optuna.create_study(study_name="race", storage=f"sqlite:///{tmp_path / 'race.db'}", direction="maximize")
    other = study.ask()  # another process took a trial between the creation and the enqueue
    other.suggest_float("optim.lr", 1e-4, 0.1, log=True)
    enqueue_presets(study, space, log=lambda _: None)
    enqueue_presets(study, space, log=lambda _: None)  # twice: still queued once
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["preset"] for t in waiting) == ["kd", "reference"]


def test_a_preset_winner_is_not_compared_with_itself() -> None:
    study = optuna.create_study(direction="maximize")
    for seed, (kd, ref) in enumerate([(96.0, 95.0), (96.5, 95.2), (97.0, 95.1)], start=1):
        study.add_trial(_confirmed_trial("kd", "preset:kd", seed, kd))
        study.add_trial(_confirmed_trial("reference", "preset:reference", seed, ref))
    text = "\n".join(confirmation_table(study))
    winner_line = text.splitlines()[-1]
    assert winner_line.startswith("winner: kd") and "from KD" not in winner_line and "KD by" not in winner_line
    assert "above reference by +1.40" in winner_line


def test_the_reference_preset_trial_is_folded_into_the_reference_baseline(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    values, outside = space.preset_values("reference")
    assert not outside
    assert config_key(space.run_config(values)) == config_key(preset_config(space, "reference"))
