"""Distillation forms where the methods distil (#18): KD and ACKD score their teacher and peer terms in the configured
form, DKD's warm-up scales the teacher's term, the knobs of a form are sampled only where it acts, and DKD is a
confirmation baseline."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml

from ackd_search.config import DistillConfig, DkdConfig, OptimConfig, dkd_distill
from ackd_search.distill import ACKD, KD, Form
from ackd_search.distill.forms import distill_term, dkd_term, kd_term
from ackd_search.models import create_model
from ackd_search.searching.confirm import candidates, plan_settings, preset_config
from ackd_search.searching.space import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def nets(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return create_model("digits_cnn_small", 10, in_channels=1), create_model("digits_cnn_large", 10, in_channels=1)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def test_kd_in_the_dkd_form_is_ce_plus_the_warmed_up_dkd_term() -> None:
    student, teacher = nets()
    x, y = batch()
    form = Form(name="dkd", alpha=1.0, beta=8.0, warmup_epochs=20.0)
    kd = KD(student, teacher, 4.0, 1.0, 1.0, form=form, budget_scale=0.5)  # warm-up: 10 epochs of this run
    kd.train()
    logits, loss, terms = kd.forward_train(x, y, epoch=1)
    with torch.no_grad():
        expected_term = dkd_term(student(x), teacher(x), y, 1.0, 8.0, 4.0)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert terms["form_w"].item() == pytest.approx(2 / 10)  # 0-based epoch 1: 2 of 10 warm-up epochs
    assert loss.item() == pytest.approx((ce + 0.2 * expected_term).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(expected_term.item(), rel=1e-5)


def test_kd_in_the_kd_form_is_unchanged_bit_for_bit() -> None:
    student, teacher = nets()
    x, y = batch()
    kd = KD(student, teacher, 4.0, 0.1, 0.9)
    _, loss, terms = kd.forward_train(x, y, epoch=0)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(student(x), y)
        expected = 0.1 * ce + 0.9 * kd_term(student(x), teacher(x), 4.0)
    assert loss.item() == expected.item() and "form_w" not in terms


def test_ackd_scores_teacher_and_peer_terms_in_its_form() -> None:
    student, teacher = nets()
    x, y = batch()
    cfg = DistillConfig(method="ackd", form="dkd", standardize=True, dkd=DkdConfig(warmup_epochs=0.0))
    cfg.ackd.aux_placements, cfg.ackd.adv_weight = [1], 0.0
    ackd = ACKD(student, teacher, cfg, OptimConfig(epochs=4), "digits_cnn_small")
    ackd.train()
    _, _, terms = ackd.forward_train(x, y, epoch=0)
    form = Form(name="dkd", standardize=True, warmup_epochs=0.0)
    with torch.no_grad():
        pooled, logits = ackd._learner_outputs(x)
        targets = ackd.collaborative_targets(pooled, logits)
        assert terms["kd"].item() == pytest.approx(distill_term(form, logits[0], teacher(x), y, 4.0).item(), rel=1e-5)
        assert terms["aux1/collab"].item() == pytest.approx(
            distill_term(form, logits[1], targets[:, 1], y, 4.0).item(), rel=1e-5)
    assert terms["form_w"].item() == 1.0  # no warm-up


def space_file(tmp_path: Path, **distill) -> Path:
    data = {"study": {"name": "forms"},
            "run": {"student": "digits_cnn_small", "data": {"name": "digits"},
                    "distill": {"method": {"choices": ["ackd", "kd"]}, **distill}}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dkd_knobs_are_sampled_only_under_the_dkd_form(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, form={"choices": ["kd", "dkd"]}, standardize={"choices": [False, True]},
                                  dkd={"beta": {"low": 1.0, "high": 8.0}, "alpha": {"low": 0.5, "high": 2.0}}))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    seen = {"kd": 0, "dkd": 0}
    for _ in range(40):
        trial = study.ask()
        values = space.suggest(trial)
        form = values["distill.form"]
        seen[form] += 1
        assert ("distill.dkd.beta" in values) == (form == "dkd") == ("distill.dkd.alpha" in values)
        assert "distill.standardize" in values
        study.tell(trial, 0.0)
    assert seen["kd"] and seen["dkd"]


def test_aux_width_is_not_sampled_for_a_library_student(tmp_path: Path) -> None:
    data = {"study": {"name": "w"}, "learners": {"max_per_stage": 1, "max_total": 1},
            "run": {"student": "timm:resnet18", "data": {"name": "digits"},
                    "distill": {"ackd": {"aux_width": {"choices": [0.5, 1.0]}}}}}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    trial = optuna.create_study().ask()
    values = space.suggest(trial)
    assert "distill.ackd.aux_width" not in values


def test_dkd_is_a_confirmation_baseline_with_mdistillers_setting(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    assert "dkd" in plan_settings(space).presets
    cfg = preset_config(space, "dkd")
    expected = dkd_distill()
    assert (cfg.distill.method, cfg.distill.form, cfg.distill.ce_weight, cfg.distill.kd_weight) == ("kd", "dkd", 1, 1)
    assert (cfg.distill.dkd.alpha, cfg.distill.dkd.beta, cfg.distill.dkd.warmup_epochs) == (1.0, 8.0, 20.0)
    assert cfg.distill.temperature == expected.temperature == 4.0
    labels = [c.label for c in candidates(space, optuna.create_study(), plan_settings(space))]
    assert labels == ["student", "kd", "dkd", "reference"]
