"""Confirmation over seeds and a fair search: the right configurations retrained with the right seeds in a sibling
study, resumed after an interruption, the winner chosen by its mean with intervals over seeds and validation images;
distinct sampler seeds per process; presets that survive the creation race."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial
from tiny_space import interrupted_at_epoch, tiny_space, write

from ackd_search.backends.local import confirm_study, run_search
from ackd_search.searching.compare import Confirmed, confirmed, paired_difference, winner_of
from ackd_search.searching.confirm import config_key, confirmation_runs, preset_config, source_config
from ackd_search.searching.confirming import open_confirmation_if_any
from ackd_search.searching.record import CONFIRMS, StudyPaths
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
    """The confirmation runs of a search study: in its sibling `<study>-confirm`, none among its own trials."""
    assert not any(CONFIRMS in t.user_attrs for t in study.get_trials(deepcopy=False))
    return confirmation_runs(study, open_confirmation_if_any(study))


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
    assert all(t.user_attrs["val_images"] == 80 for t in runs)  # each stored its per-image record
    table = "\n".join(confirmation_table(confirmed(runs, StudyPaths.for_space(space))))
    assert "vs kd" in table and "winner:" in table and "one validation image = 1.25 points" in table
    # The dashboard's study page: the search study's attributes state the confirmed winner beside its Best Trial.
    assert study.user_attrs["confirmed winner"].startswith("winner: ")


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
    before = len(confirmations(study))
    confirm_study(space)
    assert len(confirmations(study)) == before  # nothing left to run, no trial created


def confirmed_config(label: str, source: str, correct: list[np.ndarray]) -> Confirmed:
    """A configuration confirmed over len(correct) seeds with these per-image records (True: image right)."""
    by_seed = {seed: 100.0 * right.mean() for seed, right in enumerate(correct, start=1)}
    return Confirmed(label, "kd", label, source, by_seed, dict(enumerate(correct, start=1)),
                     n_images=len(correct[0]))


def records(n_images: int, accuracy: float, seeds: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.random(n_images) < accuracy for _ in range(seeds)]


def test_one_image_ahead_on_every_seed_is_not_separable_and_no_interval_is_zero_width() -> None:
    """The issue's digits table: 288 images, KD exactly one image ahead of reference on each of 3 seeds."""
    rng = np.random.default_rng(0)
    reference = records(288, 0.96, 3, rng)
    kd = []
    for right in reference:
        ahead = right.copy()
        wrong = np.flatnonzero(~ahead)
        ahead[wrong[:10]] = True  # KD right where reference is wrong on 10 images...
        ahead[np.flatnonzero(right)[:9]] = False  # ...and wrong where it is right on 9: one image ahead
        kd.append(ahead)
    results = [confirmed_config("kd", "preset:kd", kd), confirmed_config("reference", "preset:reference", reference)]
    diff = paired_difference(results[0], results[1])
    assert diff.mean == pytest.approx(100 / 288) and diff.low <= 0 <= diff.high and not diff.separable
    assert diff.width > 0
    same = paired_difference(results[1], results[1])
    assert same.width > 0 and not same.separable
    text = "\n".join(confirmation_table(sorted(results, key=lambda c: -c.mean)))
    assert "NOT separable from reference" in text and "one validation image = 0.35 points" in text


def test_a_clearly_better_configuration_is_separable_from_the_strongest_baseline() -> None:
    rng = np.random.default_rng(1)
    base = records(1000, 0.80, 3, rng)
    better = []
    for right in base:
        up = right.copy()
        up[np.flatnonzero(~right)[:60]] = True  # 6 points better on every seed, on the same images
        better.append(up)
    results = sorted([confirmed_config("kd", "preset:kd", base), confirmed_config("dkd", "preset:dkd", base),
                      confirmed_config("#3", "trial:3", better)], key=lambda c: -c.mean)
    best = winner_of(results)
    assert best.label == "#3"
    text = "\n".join(confirmation_table(results))
    assert "above kd (the strongest baseline) by +6.00" in text or "above dkd (the strongest baseline) by +6.00" in text


def test_the_winner_is_the_best_mean_and_its_config_the_confirmed_one(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    rng = np.random.default_rng(2)
    results = sorted([confirmed_config("kd", "preset:kd", records(500, 0.90, 2, rng)),
                      confirmed_config("reference", "preset:reference", records(500, 0.95, 2, rng))],
                     key=lambda c: -c.mean)
    best = winner_of(results)
    cfg = source_config(space, optuna.create_study(), best.source)
    assert best.label == "reference" and cfg.distill.method == "ackd"
    assert config_key(cfg) == config_key(preset_config(space, "reference"))
    assert config_key(preset_config(space, "kd")) != config_key(preset_config(space, "student"))


def test_runs_without_per_image_records_get_an_interval_floored_by_image_noise() -> None:
    """Studies made before the records existed: seed values only, the split's size read from the values."""
    trials = []
    for label, values in {"kd": [90.0, 91.0, 92.0], "#7": [93.0, 92.0, 95.0]}.items():
        for seed, value in enumerate(values, start=1):
            trials.append(create_trial(value=value, params={}, distributions={}, user_attrs={
                CONFIRMS: label, "confirm_key": label, "confirm_seed": seed, "confirm_epochs": 2,
                "confirm_source": "preset:kd" if label == "kd" else "trial:7"}))
    results = confirmed(trials)
    assert [c.label for c in results] == ["#7", "kd"] and results[0].n_images == 100
    diff = paired_difference(results[0], results[1])
    assert diff.method.startswith("t") and diff.width > 0 and not diff.separable


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
    rng = np.random.default_rng(3)
    results = sorted([confirmed_config("kd", "preset:kd", records(2000, 0.97, 3, rng)),
                      confirmed_config("reference", "preset:reference", records(2000, 0.90, 3, rng))],
                     key=lambda c: -c.mean)
    line = confirmation_table(results)[-1]
    assert line.startswith("winner: kd") and "from kd" not in line and "kd by" not in line
    assert "above reference by" in line


def test_the_reference_preset_trial_is_folded_into_the_reference_baseline(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    values, outside = space.preset_values("reference")
    assert not outside
    assert config_key(space.run_config(values)) == config_key(preset_config(space, "reference"))
