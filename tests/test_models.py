"""Tests for the model zoo: exact benchmark parameter counts, the staged interface, width scaling, complexity.

Every registered model is walked on CPU with tiny batches so the file stays fast."""

from __future__ import annotations

import inspect
from functools import cache

import pytest
import torch
from torch import nn

from ackd_search.models import (
    StagedNet,
    UnknownModelError,
    count_flops,
    count_parameters,
    create_model,
    list_models,
)

# Parameter counts at num_classes=100 (digits nets with in_channels=1). The CIFAR entries were computed from a literal
# re-implementation of RepDistiller's models (vgg* = its *_bn variants, mobilenetv2 = mobile_half,
# shufflenetv1/v2 = ShuffleV1/V2).
EXPECTED_PARAMS: dict[str, int] = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    # Our own digits nets (not from the benchmark), pinned so accidental changes show up.
    "digits_cnn_small": 6_464,
    "digits_cnn_large": 80_852,
}

NUM_CLASSES = 100  # the counts above are pinned at 100 classes, so one cached build serves every test


def _is_digits(name: str) -> bool:
    return name.startswith("digits_")


def _build(name: str, width: float = 1.0) -> StagedNet:
    if width == 1.0:
        return _base_model(name)
    in_channels = 1 if _is_digits(name) else 3
    return create_model(name, NUM_CLASSES, width=width, in_channels=in_channels).eval()


@cache
def _base_model(name: str) -> StagedNet:
    """Width-1 builds are shared between tests, which only run eval-mode forwards on them."""
    in_channels = 1 if _is_digits(name) else 3
    return create_model(name, NUM_CLASSES, in_channels=in_channels).eval()


def _input(name: str, batch: int) -> torch.Tensor:
    torch.manual_seed(0)
    if _is_digits(name):
        return torch.randn(batch, 1, 8, 8)
    return torch.randn(batch, 3, 32, 32)


def test_every_model_has_a_pinned_count() -> None:
    assert set(EXPECTED_PARAMS) == set(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_exact_parameter_count(name: str) -> None:
    assert count_parameters(_build(name)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", list_models())
def test_forward_and_stage_shapes(name: str) -> None:
    model = _build(name)
    x = _input(name, batch=2)
    _, _, height, width = x.shape
    assert model.num_stages == len(model.stage_info) >= 3
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, NUM_CLASSES)

        h = model.stem(x)
        stem_out = h
        for stage, info in zip(model.stages, model.stage_info):
            h = stage(h)
            assert h.shape == (2, info.channels, height // info.reduction, width // info.reduction)

        torch.testing.assert_close(model.head(model.forward_stages(stem_out)), logits)
        torch.testing.assert_close(model.head(h), logits)
        # Running the stages in two pieces must compose to the whole (distillers cut at stage boundaries).
        middle = model.forward_stages(stem_out, 0, 1)
        torch.testing.assert_close(model.forward_stages(middle, 1), h)


@pytest.mark.parametrize("width", [0.5, 2.0])
@pytest.mark.parametrize("name", list_models())
def test_width_variants_build_run_and_rescale(name: str, width: float) -> None:
    model = _build(name, width)
    x = _input(name, batch=1)
    _, _, height, w = x.shape
    with torch.no_grad():
        h = model.forward_features(x)
        logits = model.head(h)
    last = model.stage_info[-1]
    assert h.shape == (1, last.channels, height // last.reduction, w // last.reduction)
    assert logits.shape == (1, NUM_CLASSES)

    channels = [info.channels for info in model.stage_info]
    base = [info.channels for info in _build(name).stage_info]
    if width > 1:
        assert all(c > b for c, b in zip(channels, base)), (channels, base)
    else:
        assert all(c < b for c, b in zip(channels, base)), (channels, base)


@pytest.mark.parametrize("width", [0.75, 1.5])
@pytest.mark.parametrize("name", ["mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_fractional_widths_keep_grouped_convs_valid(name: str, width: float) -> None:
    # Grouped/depthwise convs, channel splits and shuffles only build and run if the rounding kept divisibility.
    model = _build(name, width)
    with torch.no_grad():
        assert model(_input(name, batch=1)).shape == (1, NUM_CLASSES)


def test_width_one_is_the_default_and_the_published_architecture() -> None:
    assert inspect.signature(create_model).parameters["width"].default == 1.0
    counts = {w: count_parameters(create_model("resnet20", 100, width=w)) for w in (0.5, 1.0, 2.0)}
    assert counts[1.0] == EXPECTED_PARAMS["resnet20"]  # width 1.0 is RepDistiller's resnet20, not a scaled copy
    assert counts[0.5] < counts[1.0] < counts[2.0]


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_flops_positive_and_grow_with_width(name: str) -> None:
    flops = [count_flops(_build(name, w), (1, 3, 32, 32)) for w in (0.5, 1.0, 2.0)]
    assert 0 < flops[0] < flops[1] < flops[2]


def test_digits_flops_use_their_input_shape() -> None:
    small = count_flops(_build("digits_cnn_small"), (1, 1, 8, 8))
    large = count_flops(_build("digits_cnn_large"), (1, 1, 8, 8))
    assert 0 < small < large


def test_flops_counting_convention() -> None:
    # torch's counter charges 2 FLOPs per multiply-add: a Linear(8, 4) on one sample is 64.
    assert count_flops(nn.Linear(8, 4), (1, 8)) == 2 * 8 * 4


def test_count_flops_restores_training_modes() -> None:
    model = create_model("resnet8", NUM_CLASSES)
    model.train()
    model.stages[0].eval()  # a mixed state must survive, not be flattened by a blanket .train()
    count_flops(model)
    assert model.training and model.stem.training and model.head.training
    assert not model.stages[0].training and not any(m.training for m in model.stages[0].modules())
    assert model.stages[1].training
    assert torch.is_grad_enabled()


def test_count_parameters_matches_numel_sum_including_frozen() -> None:
    model = create_model("resnet8", NUM_CLASSES)
    model.stem.requires_grad_(False)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_unknown_model_error_names_value_and_allowed() -> None:
    with pytest.raises(UnknownModelError) as excinfo:
        create_model("nope", NUM_CLASSES)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "'nope'" in message
    assert all(name in message for name in list_models())
    assert isinstance(excinfo.value, ValueError)
