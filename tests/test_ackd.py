"""ACKD distiller: KD equivalence, gradients and alternation with D, every zoo student and placement, schedules,
named terms, every option, and a short real training on digits. Tiny CPU inputs throughout."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ackd_search.config import AckdConfig, DistillConfig, OptimConfig, RunConfig, TeacherConfig
from ackd_search.distill import KD
from ackd_search.distill.ackd import ACKD
from ackd_search.distill.base import kd_loss
from ackd_search.models import StagedNet, count_parameters, create_model, list_models

NUM_CLASSES = 10
STUDENT, TEACHER = "digits_cnn_small", "digits_cnn_large"

# Tiny nets: one intra-op thread (a second one spins against other jobs on the shared 2-core machine).


def distill_cfg(ce: float = 1.0, kd: float = 1.0, temperature: float = 4.0, **ackd) -> DistillConfig:
    return DistillConfig(
        method="ackd", temperature=temperature, ce_weight=ce, kd_weight=kd, ackd=AckdConfig(**ackd)
    )


def digits_net(arch: str = STUDENT) -> StagedNet:
    return create_model(arch, NUM_CLASSES, in_channels=1)


def build(cfg: DistillConfig, epochs: int = 20, student: StagedNet | None = None, teacher: nn.Module | None = None):
    torch.manual_seed(0)
    student = student if student is not None else digits_net()
    teacher = teacher if teacher is not None else digits_net(TEACHER)
    return ACKD(student, teacher, cfg, OptimConfig(epochs=epochs), STUDENT).train()


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# --- plain KD as a special case ----------------------------------------------------------------------------------


def test_without_learners_collaboration_and_adversary_the_loss_and_sgd_step_equal_kd():
    torch.manual_seed(0)
    student, teacher = digits_net(), digits_net(TEACHER)
    cfg = distill_cfg(ce=0.3, kd=0.7, temperature=3.0, aux_placements=[], collab_weight=0.0, adv_weight=0.0)
    ackd = ACKD(copy.deepcopy(student), teacher, cfg, OptimConfig(epochs=20), STUDENT).train()
    kd = KD(copy.deepcopy(student), teacher, temperature=3.0, ce_weight=0.3, kd_weight=0.7).train()
    assert ackd.discriminator is None and ackd.attention is None
    x, y = batch()
    results = []
    for distiller in (ackd, kd):
        params = list(distiller.trainable_parameters())
        assert len(params) == len(list(student.parameters()))  # nothing trains beside the student
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        logits, loss, terms = distiller.forward_train(x, y, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        results.append((logits, loss, terms, distiller.export_student()))
    (a_logits, a_loss, a_terms, a_state), (k_logits, k_loss, k_terms, k_state) = results
    torch.testing.assert_close(a_logits, k_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a_loss, k_loss, rtol=0, atol=1e-6)
    assert a_terms["ce"] == pytest.approx(k_terms["ce"].item()) and a_terms["kd"] == pytest.approx(k_terms["kd"].item())
    assert a_state.keys() == k_state.keys()
    for key in a_state:
        torch.testing.assert_close(a_state[key], k_state[key], rtol=0, atol=1e-6)
    assert changed(snapshot(student), a_state)  # the step really moved the student


# --- gradients, the frozen teacher and the alternation with D -----------------------------------------------------


@pytest.mark.parametrize(
    "adv_input, aux_width, student_target",
    [("probs", 1.0, "aux_mean"), ("features", 0.5, "aux_mean"), ("features", 1.5, "attention")],
)
def test_every_trainable_part_gets_a_gradient_and_the_teacher_none(adv_input, aux_width, student_target):
    d = build(distill_cfg(aux_placements=[1, 2, 2], aux_width=aux_width, adv_input=adv_input,
                          student_target=student_target))
    assert d.teacher.training is False  # train() on the distiller leaves the frozen teacher in eval mode
    x, y = batch()
    _, loss, _ = d.forward_train(x, y, epoch=10)
    loss.backward()
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    groups = {"student": d.student, "learners": d.learners, "attention": d.attention, "discriminator": d.discriminator}
    if adv_input == "features":
        groups["connectors"] = d.connectors
    for group, module in groups.items():
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{group}.{name} got no gradient"
    for p in d.teacher.parameters():
        assert not p.requires_grad and p.grad is None
    trainable = {id(p) for p in d.trainable_parameters()}
    adversary = {id(p) for p in d.adversary_parameters()}
    assert not trainable & teacher_ids and not trainable & adversary and not adversary & teacher_ids
    assert adversary == {id(p) for group in d.adversary_optimizer.param_groups for p in group["params"]}
    every = {id(p) for p in d.parameters()}
    assert trainable | adversary | teacher_ids == every


def test_discriminator_step_touches_only_d_and_the_learner_step_leaves_d_alone():
    d = build(distill_cfg(aux_placements=[2, 2]))
    x, _y = batch()
    pooled, logits = d._learner_outputs(x)
    real, fakes = d.adversarial_inputs(logits, pooled, d.teacher_logits(x), None, None)
    before = snapshot(d)
    d.discriminator_step(real, fakes)
    after = snapshot(d)
    d_keys = {k for k in before if k.startswith("discriminator.")}
    assert changed(before, after) == d_keys  # every D weight moved, nothing else did
    d_grads = [p.grad.clone() for p in d.discriminator.parameters()]
    d.generator_losses(fakes).sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(d_grads, d.discriminator.parameters()))
    assert d.student.head.fc.weight.grad.abs().sum() > 0  # the non-saturating loss reaches the learners
    assert all(p.requires_grad for p in d.discriminator.parameters())


def test_forward_train_steps_d_first_and_scores_the_learners_with_the_updated_d():
    d = build(distill_cfg(aux_placements=[2]))
    old_d = copy.deepcopy(d.discriminator)
    x, y = batch()
    _, _, terms = d.forward_train(x, y, epoch=0)
    with torch.no_grad():  # train-mode BN uses batch statistics: the same outputs again
        pooled, logits = d._learner_outputs(x)
        _real, fakes = d.adversarial_inputs(logits, pooled, d.teacher_logits(x), None, None)
        with_new_d = d.generator_losses(fakes)
        d.discriminator = old_d
        with_old_d = d.generator_losses(fakes)
    assert terms["adv_g"].item() == pytest.approx(with_new_d[0].item(), abs=1e-6)
    assert terms["aux1/adv_g"].item() == pytest.approx(with_new_d[1].item(), abs=1e-6)
    assert abs(with_old_d[0].item() - with_new_d[0].item()) > 1e-6


@pytest.mark.parametrize("adv_real", ["teacher", "ensemble"])
@pytest.mark.parametrize("adv_input", ["probs", "features"])
def test_discriminator_sees_softened_probabilities_or_connected_features_against_the_chosen_real(adv_real, adv_input):
    d = build(distill_cfg(aux_placements=[2, 2], adv_real=adv_real, adv_input=adv_input, temperature=3.0))
    x, _ = batch()
    with torch.no_grad():
        pooled, logits = d._learner_outputs(x)
        teacher_pooled = d.teacher.head.pooled(d.teacher.forward_features(x))
        teacher_logits = d.teacher.head.fc(teacher_pooled)
        targets = d.collaborative_targets(pooled, logits)
        real, fakes = d.adversarial_inputs(logits, pooled, teacher_logits, teacher_pooled, targets)
    if adv_input == "probs":
        expected_fakes = [F.softmax(z / 3.0, dim=1) for z in logits]
        expected_real = F.softmax(teacher_logits / 3.0, dim=1) if adv_real == "teacher" else (
            F.softmax(targets / 3.0, dim=2).mean(1))
    else:
        expected_fakes = [connector(h) for connector, h in zip(d.connectors, pooled)]
        expected_real = teacher_pooled if adv_real == "teacher" else torch.stack(expected_fakes).mean(0)
    assert len(fakes) == 3
    for fake, expected in zip(fakes, expected_fakes):
        torch.testing.assert_close(fake, expected)
    torch.testing.assert_close(real, expected_real)


def test_discriminator_architecture_and_optimiser():
    d = build(distill_cfg(aux_placements=[2], d_lr=3e-4))
    layers = list(d.discriminator.mlp)
    linear = [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)]
    assert linear == [(NUM_CLASSES, 256), (256, 128), (128, 1)]
    assert [type(m) for m in layers] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
    assert all(m.negative_slope == 0.2 for m in layers if isinstance(m, nn.LeakyReLU))
    opt = d.adversary_optimizer
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.5, 0.999)
    # features: D sees the teacher's pooled width; the learners' connectors map into it
    f = build(distill_cfg(aux_placements=[1, 2], aux_width=0.5, adv_input="features"))
    teacher_width = f.teacher.head.fc.in_features
    assert f.discriminator.mlp[0].in_features == teacher_width
    assert [(c.in_features, c.out_features) for c in f.connectors] == [
        (w, teacher_width) for w in f.pooled_widths()
    ]


@pytest.mark.parametrize("adv_input", ["probs", "features"])  # features: the teacher's pooled features too
def test_the_shared_trunk_and_the_teacher_run_once_per_batch_and_the_teacher_without_grad(adv_input):
    d = build(distill_cfg(aux_placements=[1, 2, 2], adv_input=adv_input))
    calls: dict[str, int] = {}
    grad_in_teacher: list[bool] = []

    def count(name: str):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if name == "teacher.stem":
                grad_in_teacher.append(torch.is_grad_enabled())

        return hook

    d.student.stem.register_forward_hook(count("student.stem"))
    for i, stage in enumerate(d.student.stages):
        stage.register_forward_hook(count(f"student.stage{i}"))
    d.teacher.stem.register_forward_hook(count("teacher.stem"))
    x, y = batch()
    d.forward_train(x, y, epoch=0)
    once = {"student.stem": 1, "student.stage0": 1, "student.stage1": 1, "student.stage2": 1, "teacher.stem": 1}
    assert calls == once
    assert grad_in_teacher == [False]


# --- every zoo student, every placement, export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher() -> StagedNet:
    torch.manual_seed(0)
    return create_model(STUDENT, 3)


@pytest.mark.parametrize("arch", list_models())
def test_every_zoo_student_takes_learners_at_every_legal_placement_and_exports_the_plain_student(arch, tiny_teacher):
    torch.manual_seed(0)
    student = create_model(arch, 3)
    k = student.num_stages
    placements = [*range(1, k), k - 1]  # every legal branch point, and a repeat
    cfg = distill_cfg(aux_placements=placements, adv_input="features")
    d = ACKD(student, tiny_teacher, cfg, OptimConfig(epochs=20), arch).train()
    assert [learner.placement for learner in d.learners] == placements
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    logits, loss, terms = d.forward_train(x, y, epoch=0)
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    assert {f"aux{i}/ce" for i in range(1, k + 1)} <= terms.keys()
    loss.backward()

    exported = d.export_student()
    fresh = create_model(arch, 3)
    fresh.load_state_dict(exported, strict=True)
    assert exported.keys() == fresh.state_dict().keys()
    # The export is the student the distiller trained, learners, attention and D left out.
    assert count_parameters(fresh) == count_parameters(d.student) < sum(p.numel() for p in d.trainable_parameters())
    assert sum(exported[name].numel() for name, _ in fresh.named_parameters()) == count_parameters(fresh)
    d.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), d(x))

    for bad in (0, k):
        with pytest.raises(ValueError) as err:
            ACKD(student, tiny_teacher, distill_cfg(aux_placements=[1, bad]), OptimConfig(epochs=20), arch)
        message = str(err.value)
        assert "\n" not in message and f"aux_placements[1]: {bad}" in message and f"allowed: 1..{k - 1}" in message


def test_the_reference_places_three_learners_before_the_last_stage():
    d = build(distill_cfg())
    assert [learner.placement for learner in d.learners] == [2, 2, 2]


# --- schedules ------------------------------------------------------------------------------------------------


def test_collab_weight_ramps_as_a_sigmoid_scaled_to_the_budget():
    d = build(distill_cfg(collab_weight=2.0, collab_rampup_epochs=80), epochs=24)  # 80 recipe epochs -> 8 here
    assert d.collab_weight(0) == pytest.approx(2.0 * math.exp(-5.0))
    assert d.collab_weight(4) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert d.collab_weight(8) == pytest.approx(2.0) and d.collab_weight(23) == pytest.approx(2.0)
    full_budget = build(distill_cfg(collab_weight=2.0, collab_rampup_epochs=80), epochs=240)
    assert full_budget.collab_weight(40) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    no_ramp = build(distill_cfg(collab_weight=2.0, collab_rampup_epochs=0), epochs=24)
    assert no_ramp.collab_weight(0) == 2.0


def test_adversarial_term_starts_after_the_scaled_warmup_and_d_is_not_stepped_before():
    d = build(distill_cfg(aux_placements=[2], adv_weight=0.5, adv_warmup_epochs=20), epochs=24)  # 20 -> 2 epochs
    assert [d.adv_weight(e) for e in range(4)] == [0.0, 0.0, 0.5, 0.5]
    x, y = batch()
    before = snapshot(d.discriminator)
    _, _, terms = d.forward_train(x, y, epoch=1)
    assert "adv_d" not in terms and "adv_g" not in terms and terms["adv_w"] == 0.0
    assert not changed(before, snapshot(d.discriminator))
    _, _, terms = d.forward_train(x, y, epoch=2)
    assert terms["adv_w"] == 0.5 and {"adv_d", "adv_g", "aux1/adv_g"} <= terms.keys()
    assert changed(before, snapshot(d.discriminator))


# --- the loss and its named terms --------------------------------------------------------------------------------


def test_terms_are_named_and_recompose_the_loss_with_aux_weight():
    weights = {"ce": 0.3, "kd": 0.7, "collab_weight": 1.5, "adv_weight": 0.2, "aux_weight": 0.5}
    d = build(distill_cfg(aux_placements=[1, 2], collab_rampup_epochs=0, **weights))
    x, y = batch()
    _, loss, terms = d.forward_train(x, y, epoch=0)
    per_learner = ["ce", "kd", "collab", "adv_g"]
    expected = {*per_learner, "adv_d", "collab_w", "adv_w"} | {f"aux{i}/{t}" for i in (1, 2) for t in per_learner}
    assert terms.keys() == expected
    assert all(not v.requires_grad and torch.isfinite(v) for v in terms.values())

    def learner_loss(prefix: str) -> torch.Tensor:
        t = {name: terms[prefix + name] for name in per_learner}
        return 0.3 * t["ce"] + 0.7 * t["kd"] + 1.5 * t["collab"] + 0.2 * t["adv_g"]

    recomposed = learner_loss("") + 0.5 * (learner_loss("aux1/") + learner_loss("aux2/"))
    torch.testing.assert_close(loss.detach(), recomposed, rtol=1e-5, atol=1e-6)
    assert terms["collab_w"] == 1.5 and terms["adv_w"] == pytest.approx(0.2)


def test_kd_and_collab_terms_are_temperature_scaled_kl_to_the_teacher_and_the_target():
    d = build(distill_cfg(aux_placements=[2, 2], temperature=2.0, adv_weight=0.0))
    x, y = batch()
    _, _, terms = d.forward_train(x, y, epoch=0)
    with torch.no_grad():
        pooled, logits = d._learner_outputs(x)
        targets = d.collaborative_targets(pooled, logits)
        teacher = d.teacher(x)
    p_teacher = F.softmax(teacher / 2.0, dim=1)
    by_hand = 4.0 * (p_teacher * (p_teacher.log() - F.log_softmax(logits[1] / 2.0, dim=1))).sum(1).mean()
    assert terms["aux1/kd"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert terms["aux2/collab"].item() == pytest.approx(kd_loss(logits[2], targets[:, 2], 2.0).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits[0], y).item(), rel=1e-6)


# --- collaboration: attention and the targets ---------------------------------------------------------------------


def test_attention_is_softmax_of_query_key_products_with_bias_free_projections():
    d = build(distill_cfg(aux_placements=[2, 2, 2], student_target="attention", attn_reduction=4))
    x, _ = batch()
    with torch.no_grad():
        pooled, logits = d._learner_outputs(x)
        weights = d.attention(pooled)
        (query,), (key,) = d.attention.query.values(), d.attention.key.values()  # one width: one shared pair
        assert query.bias is None and key.bias is None and query.out_features == 16 // 4
        h = torch.stack(pooled, dim=1)
        by_hand = torch.softmax(query(h) @ key(h).transpose(1, 2), dim=-1)
        torch.testing.assert_close(weights, by_hand)
        assert weights.shape == (16, 4, 4)
        targets = d.collaborative_targets(pooled, logits)
        torch.testing.assert_close(targets, weights @ torch.stack(logits, dim=1))


def test_attention_without_self_spreads_each_row_over_the_peers_only():
    d = build(distill_cfg(aux_placements=[2, 2], student_target="aux_mean", attn_self=False))
    x, _ = batch()
    with torch.no_grad():
        pooled, _ = d._learner_outputs(x)
        weights = d.attention(pooled)  # rows: auxiliaries 1 and 2, columns: all three learners
    assert weights.shape == (16, 2, 3)
    assert torch.all(weights[:, 0, 1] == 0) and torch.all(weights[:, 1, 2] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(16, 2))
    assert torch.all(weights[:, 0, 0] > 0) and torch.all(weights[:, 0, 2] > 0)


def test_aux_mean_gives_the_student_the_auxiliaries_mean_and_mean_aggregation_the_peers_mean():
    d = build(distill_cfg(aux_placements=[1, 2, 2], aggregation="mean", student_target="aux_mean"))
    assert d.attention is None
    x, _ = batch()
    with torch.no_grad():
        pooled, logits = d._learner_outputs(x)
        targets = d.collaborative_targets(pooled, logits)
    torch.testing.assert_close(targets[:, 0], torch.stack(logits[1:]).mean(0))
    torch.testing.assert_close(targets[:, 1], (logits[0] + logits[2] + logits[3]) / 3)
    torch.testing.assert_close(targets[:, 3], (logits[0] + logits[1] + logits[2]) / 3)
    # with attention and aux_mean, only the auxiliaries query: the student needs no query projection
    a = build(distill_cfg(aux_placements=[2, 2], aux_width=0.5, student_target="aux_mean"))
    assert a.attention.query_rows == [1, 2] and len(a.attention.query) == 1 and len(a.attention.key) == 2


@pytest.mark.parametrize("aggregation", ["attention", "mean"])
def test_detach_target_stops_gradients_into_the_peers_logits(aggregation):
    for detach in (True, False):
        d = build(distill_cfg(aux_placements=[2, 2], aggregation=aggregation, detach_target=detach))
        x, _ = batch()
        pooled, logits = d._learner_outputs(x)
        targets = d.collaborative_targets(pooled, logits)
        if not targets.requires_grad:  # mean of detached peers: nothing to differentiate
            assert detach and aggregation == "mean"
            continue
        grads = torch.autograd.grad(targets.sum(), logits, allow_unused=True)
        assert all(g is None for g in grads) == detach, (aggregation, detach)


# --- every option trains ------------------------------------------------------------------------------------------

OPTIONS = [
    {"aggregation": "attention", "student_target": "attention"},
    {"aggregation": "attention", "student_target": "aux_mean"},
    {"aggregation": "mean", "student_target": "attention"},
    {"aggregation": "mean", "student_target": "aux_mean", "detach_target": False},
    {"adv_real": "teacher", "adv_input": "probs"},
    {"adv_real": "teacher", "adv_input": "features"},
    {"adv_real": "ensemble", "adv_input": "probs"},
    {"adv_real": "ensemble", "adv_input": "features"},
    {"aux_width": 0.5},
    {"aux_width": 1.5, "adv_input": "features"},
    {"aux_placements": [], "adv_real": "teacher"},
    {"aux_placements": [], "adv_real": "ensemble"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_runs_a_training_step_with_a_finite_loss(options):
    options = {"aux_placements": [1, 2], **options}
    d = build(distill_cfg(**options))
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9)
    x, y = batch()
    before = snapshot(d.student)
    for epoch in range(2):
        _, loss, terms = d.forward_train(x, y, epoch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert changed(before, snapshot(d.student))
    has_d = not (options["aux_placements"] == [] and options.get("adv_real") == "ensemble")
    assert ("adv_d" in terms) == has_d and ("collab" in terms) == bool(options["aux_placements"])
    restored = build(distill_cfg(**options))
    restored.load_trained_state(d.trained_state())  # a checkpoint round-trips
    assert not changed(snapshot(d), snapshot(restored))


# --- a real run through the trainer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def digits_run(teacher_cache: Path, output_dir: Path, epochs: int, **ackd) -> RunConfig:
    return RunConfig(
        seed=0,
        optim=OptimConfig(epochs=epochs, lr=0.05),
        teacher=TeacherConfig(cache_dir=str(teacher_cache), optim=OptimConfig(epochs=10)),
        distill=distill_cfg(**ackd),  # the reference configuration (our reconstruction) unless overridden
        device="cpu",
        output_dir=str(output_dir),
    )


def test_short_ackd_training_on_digits_lowers_the_loss_and_beats_chance(tmp_path: Path, teacher_cache: Path):
    from ackd_search.training.runner import run_training

    cfg = digits_run(teacher_cache, tmp_path / "run", epochs=6)
    result = run_training(cfg)
    losses = [h["terms"]["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.final_val_acc > 50.0  # chance is 10 %
    assert {"ce", "kd", "collab", "adv_g", "adv_d", "aux3/collab"} <= result.history[-1]["terms"].keys()
    student = create_model(cfg.student, NUM_CLASSES, in_channels=1)
    student.load_state_dict(result.student_state, strict=True)
    assert count_parameters(student) == result.student_params


def test_an_interrupted_ackd_run_resumes_to_the_same_student(tmp_path: Path, teacher_cache: Path):
    """The checkpoint must hold the learners, projections, connectors, D and D's Adam state, not only the student."""
    from ackd_search.training.runner import run_training

    options = {"aux_placements": [1, 2], "adv_input": "features", "aggregation": "attention"}
    straight = run_training(digits_run(teacher_cache, tmp_path / "straight", epochs=3, **options))

    def stop_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 1 and not metrics.get("resumed"):
            raise KeyboardInterrupt

    interrupted = digits_run(teacher_cache, tmp_path / "interrupted", epochs=3, **options)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, stop_after_first_epoch)
    resumed = run_training(interrupted)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for key, value in straight.student_state.items():
        torch.testing.assert_close(resumed.student_state[key], value, rtol=0, atol=1e-6)


# --- the collaborative terms move each learner through its own logits only ---------------------------------------


@pytest.mark.parametrize("student_target", ["aux_mean", "attention"])
def test_auxiliaries_collaborative_terms_leave_the_students_last_stage_alone_but_train_the_attention(student_target):
    d = build(distill_cfg(aux_placements=[1, 1], student_target=student_target, adv_weight=0.0))
    x, _ = batch()
    pooled, logits = d._learner_outputs(x)
    targets = d.collaborative_targets(pooled, logits)
    aux_collab = sum(kd_loss(logits[i], targets[:, i], d.temperature) for i in (1, 2))
    last_stage = list(d.student.stages[-1].parameters()) + list(d.student.head.parameters())
    projections = list(d.attention.parameters())
    grads = torch.autograd.grad(aux_collab, last_stage + projections, allow_unused=True)
    for grad in grads[: len(last_stage)]:
        assert grad is None or torch.count_nonzero(grad) == 0  # no learner is moved through the attention
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads[len(last_stage):])


def test_without_detach_target_the_attention_moves_the_peers_as_okddip_does():
    d = build(distill_cfg(aux_placements=[1, 1], student_target="attention", adv_weight=0.0, detach_target=False))
    x, _ = batch()
    pooled, logits = d._learner_outputs(x)
    targets = d.collaborative_targets(pooled, logits)
    aux_collab = sum(kd_loss(logits[i], targets[:, i], d.temperature) for i in (1, 2))
    (grad,) = torch.autograd.grad(aux_collab, [d.student.head.fc.weight])
    assert grad.abs().sum() > 0


# --- the epoch's weights as device tensors -------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 3, 7, 19])
def test_device_tensor_weights_give_exactly_the_loss_of_python_float_weights(epoch):
    """The loss the step builds with the epoch's weights in tensors, bit for bit the one built with floats."""
    cfg = distill_cfg(ce=0.3, kd=0.7, aux_placements=[1, 2], collab_weight=1.5, collab_rampup_epochs=120.0,
                      adv_weight=0.2, adv_warmup_epochs=60.0, aux_weight=0.5)
    d = build(cfg, epochs=20)  # ramp over 10 epochs, adversary from epoch 5
    x, y = batch()
    _, loss, terms = d.forward_train(x, y, epoch=epoch)
    collab_w, adv_w = d.collab_weight(epoch), d.adv_weight(epoch)
    assert terms["collab_w"].item() == pytest.approx(collab_w, rel=1e-6)  # fp32 on the device
    assert terms["adv_w"].item() == pytest.approx(adv_w, rel=1e-6)
    assert ("adv_d" in terms) == (adv_w > 0)

    def learner_loss(prefix: str) -> torch.Tensor:
        total = 0.3 * terms[prefix + "ce"] + 0.7 * terms[prefix + "kd"]
        total = total + collab_w * terms[prefix + "collab"]
        if adv_w > 0:
            total = total + adv_w * terms[prefix + "adv_g"]
        return total

    floats = learner_loss("") + 0.5 * torch.stack([learner_loss("aux1/"), learner_loss("aux2/")]).sum()
    assert torch.equal(loss.detach(), floats)


def test_epoch_weights_are_filled_in_place_once_per_epoch():
    d = build(distill_cfg(aux_placements=[2], collab_rampup_epochs=240.0), epochs=20)
    buffer = d.collab_w
    x, y = batch()
    d.forward_train(x, y, epoch=0)
    first = buffer.item()
    d.forward_train(x, y, epoch=10)
    assert d.collab_w is buffer and buffer.item() > first  # the same tensor, refilled for the new epoch
    assert buffer.item() == pytest.approx(d.collab_weight(10), rel=1e-6)
    assert "collab_w" not in d.state_dict()  # recomputed per epoch, never checkpointed
