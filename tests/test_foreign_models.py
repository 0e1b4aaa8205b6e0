"""Tests for timm / torchvision / py: models as StagedNets: forward equivalence, stage metadata, the unstaged
fallback, checkpoint files and key names, learner parts, name problems and the offline pretrained failure."""

from __future__ import annotations

import textwrap
from functools import cache
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from ackd_search.models import (
    ModelError,
    StagedNet,
    UnknownModelError,
    WeightsError,
    create_model,
    fresh_head,
    fresh_stages,
    head_mismatch,
    load_original_state_dict,
    model_name_problem,
    original_state_dict,
    read_state_dict,
    replace_head,
    staging_problem,
    supports_width,
)

NUM_CLASSES = 10
STAGED = [
    "timm:resnet18",
    "timm:mobilenetv3_small_050",
    "timm:convnext_atto",
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf",
    "torchvision:shufflenet_v2_x0_5",
]
# torchvision publishes no stage metadata: these are its architectures' stage widths and strides.
TORCHVISION_STAGES = {
    "torchvision:resnet18": [(64, 4), (128, 8), (256, 16), (512, 32)],
    "torchvision:mobilenet_v3_small": [(16, 4), (24, 8), (48, 16), (96, 32)],
    "torchvision:efficientnet_b0": [(24, 4), (40, 8), (112, 16), (320, 32)],
    "torchvision:regnet_x_400mf": [(32, 4), (64, 8), (160, 16), (400, 32)],
    "torchvision:shufflenet_v2_x0_5": [(48, 8), (96, 16), (192, 32)],
}


def _library_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    library, arch = name.split(":", 1)
    if library == "timm":
        return timm.create_model(arch, num_classes=num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


@cache
def _pair(name: str) -> tuple[nn.Module, StagedNet]:
    """The library's own model and the staged net, built from the same seed (so with the same weights)."""
    torch.manual_seed(0)
    original = _library_model(name).eval()
    torch.manual_seed(0)
    return original, create_model(name, NUM_CLASSES).eval()


def _x(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def _write(tmp_path: Path, source: str, name: str = "builders.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# --- staging -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STAGED)
def test_staged_forward_equals_the_library_forward(name: str) -> None:
    original, net = _pair(name)
    assert net.staging_problem is None and net.num_stages >= 3
    with torch.no_grad():
        torch.testing.assert_close(net(_x()), original(_x()))
        # ACKD's path: stem, stages one by one, pooled, then the head's own final Linear.
        h = net.forward_stages(net.stem(_x()))
        torch.testing.assert_close(net.head.fc(net.head.pooled(h)), original(_x()))
    assert isinstance(net.head.fc, nn.Linear) and net.head.fc.out_features == NUM_CLASSES


@pytest.mark.parametrize("name", STAGED)
def test_stage_info_matches_the_library_metadata_and_the_maps(name: str) -> None:
    original, net = _pair(name)
    got = [(info.channels, info.reduction) for info in net.stage_info]
    if name.startswith("timm:"):
        levels = [(level["num_chs"], level["reduction"]) for level in original.feature_info]
        assert got == (levels[1:] if levels[0][1] <= 2 else levels)  # a reduction-2 first level is the stem
    else:
        assert got == TORCHVISION_STAGES[name]
    with torch.no_grad():
        h = net.stem(_x(64))
        for stage, info in zip(net.stages, net.stage_info):
            h = stage(h)
            assert h.shape[1:] == (info.channels, 64 // info.reduction, 64 // info.reduction)


def test_mobilenet_v3_head_is_the_final_linear_and_pooled_its_input() -> None:
    original, net = _pair("torchvision:mobilenet_v3_small")
    assert net.head.fc is not original.classifier[0] and net.head.fc.in_features == 1024
    with torch.no_grad():
        pooled = net.head.pooled(net.forward_features(_x()))
    assert pooled.shape == (2, 1024)  # after Linear(576, 1024) + Hardswish + Dropout


def test_a_model_without_stages_is_one_stage_with_a_reason() -> None:
    net = create_model("timm:vit_tiny_patch16_224", NUM_CLASSES)
    assert net.num_stages == 1
    assert net.staging_problem.startswith("timm:vit_tiny_patch16_224 cannot carry auxiliary learners: its stages")
    assert "\n" not in net.staging_problem
    assert staging_problem("resnet8") is None


def test_a_custom_module_that_is_not_a_chain_is_unstaged_but_exact(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        import torch
        from torch import nn

        class Residual(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 3, padding=1)
                self.fc = nn.Linear(3, num_classes)

            def forward(self, x):
                return self.fc((x + self.conv(x)).mean((2, 3)))  # a residual the children order cannot express

        def build(num_classes):
            return Residual(num_classes)
    """)
    net = create_model(f"py:{path}:build", 4)
    assert net.num_stages == 1 and "cannot carry auxiliary learners" in net.staging_problem
    assert net.head.fc.out_features == 4 and net(_x()).shape == (2, 4)


def test_staging_does_not_consume_the_global_rng() -> None:
    torch.manual_seed(0)
    _library_model("torchvision:resnet18")
    after_library = torch.get_rng_state()
    torch.manual_seed(0)
    create_model("torchvision:resnet18", NUM_CLASSES)
    assert torch.equal(torch.get_rng_state(), after_library)


# --- py: builders ------------------------------------------------------------------------------------------------
BUILDERS = """
    from torch import nn
    from ackd_search.models import create_model

    def sequential(num_classes, in_channels=3):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
        )

    def staged(num_classes):
        return create_model("resnet8", num_classes)

    NOT_A_FUNCTION = 3
"""


def test_py_builder_of_a_sequential_is_staged(tmp_path: Path) -> None:
    path = _write(tmp_path, BUILDERS)
    net = create_model(f"py:{path}:sequential", 5, in_channels=1)
    assert net.staging_problem is None
    assert [(i.channels, i.reduction) for i in net.stage_info] == [(8, 1), (16, 2), (32, 4)]
    assert net(_x(channels=1)).shape == (2, 5)
    assert set(original_state_dict(net)) == {f"{i}.{p}" for i in (0, 2, 4, 8) for p in ("weight", "bias")}


def test_py_builder_of_a_staged_net_is_used_as_is(tmp_path: Path) -> None:
    net = create_model(f"py:{_write(tmp_path, BUILDERS)}:staged", 5)
    assert isinstance(net, StagedNet) and net.num_stages == 3 and net.original_keys is None


def test_py_name_problems_are_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, BUILDERS)
    problems = {
        f"py:{tmp_path}/absent.py:build": "file not found",
        f"py:{path}:absent": "has no function 'absent'; it defines: sequential, staged",
        f"py:{path}:NOT_A_FUNCTION": "is a int, not callable",
        f"py:{path}": "py:<file.py>:<function>",
        f"py:{tmp_path}:build": "is not a file",
    }
    for name, expected in problems.items():
        problem = model_name_problem(name)
        assert problem is not None and expected in problem and "\n" not in problem, (name, problem)
    with pytest.raises(UnknownModelError, match="has no function"):
        create_model(f"py:{path}:absent", 5)


# --- names -------------------------------------------------------------------------------------------------------
def test_unknown_names_give_close_matches() -> None:
    assert "timm:resnet18" in model_name_problem("timm:resnet181")
    assert "torchvision:resnet18" in model_name_problem("torchvision:resnet181")
    assert "torchvision:" in model_name_problem("torchvision:fasterrcnn_resnet50_fpn")  # not a classifier
    zoo = model_name_problem("resnet9")
    assert "resnet8" in zoo and "timm:<name>" in zoo and "py:<file.py>:<function>" in zoo
    assert model_name_problem("timm:resnet18") is None and model_name_problem("timm:resnet18.a1_in1k") is None
    assert model_name_problem("torchvision:resnet18") is None and model_name_problem("resnet8") is None


def test_width_acts_on_zoo_models_only() -> None:
    assert supports_width("resnet8") and not supports_width("timm:resnet18")
    with pytest.raises(ModelError, match="only scales zoo models"):
        create_model("timm:resnet18", NUM_CLASSES, width=0.5)


def test_in_channels_reach_timm_and_swap_torchvision_first_conv() -> None:
    for name in ("timm:resnet18", "torchvision:resnet18"):
        net = create_model(name, NUM_CLASSES, in_channels=1).eval()
        with torch.no_grad():
            assert net(_x(channels=1)).shape == (2, NUM_CLASSES)
        assert original_state_dict(net)["conv1.weight"].shape[1] == 1


def test_pretrained_without_network_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # torchvision's real download fails at once here (no DNS). huggingface_hub would retry for ~46 s before timm
    # gives up, so its own offline mode is switched on: the same failure timm reports, without the retries.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights, and the download attempt writes here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("torchvision:resnet18", "timm:resnet18"):
        with pytest.raises(ModelError) as excinfo:
            create_model(name, NUM_CLASSES, pretrained=True)
        message = str(excinfo.value)
        assert "\n" not in message and message.startswith(name) and "give a checkpoint" in message
        assert message.endswith("give a checkpoint file of its weights instead")


# --- checkpoints -------------------------------------------------------------------------------------------------
@cache
def _torchvision_resnet18() -> nn.Module:
    torch.manual_seed(3)
    return torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()


def _saved_forms(tmp_path: Path) -> list[Path]:
    state = _torchvision_resnet18().state_dict()
    plain, tensors, wrapped = tmp_path / "plain.pt", tmp_path / "plain.safetensors", tmp_path / "wrapped.pth"
    torch.save(state, plain)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tensors)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    return [plain, tensors, wrapped]


def test_library_checkpoints_load_into_the_staged_net(tmp_path: Path) -> None:
    original = _torchvision_resnet18()
    with torch.no_grad():
        expected = original(_x())
    for path in _saved_forms(tmp_path):
        net = create_model("torchvision:resnet18", NUM_CLASSES)
        load_original_state_dict(net, read_state_dict(path))
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(_x()), expected)


def test_original_state_dict_round_trips_into_the_library_model() -> None:
    net = create_model("torchvision:resnet18", NUM_CLASSES).eval()
    mine = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    mine.load_state_dict(original_state_dict(net))  # strict: every library key, nothing else
    with torch.no_grad():
        torch.testing.assert_close(mine(_x()), net(_x()))
    load_original_state_dict(net, net.state_dict())  # the staged names load too


def test_a_mismatched_checkpoint_names_its_first_keys_in_one_line() -> None:
    net = create_model("torchvision:resnet18", 3)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    assert head_mismatch(net, state, 3) == "head has 1000 outputs, the data set has 3 classes"
    assert head_mismatch(net, net.state_dict(), 3) is None
    with pytest.raises(WeightsError) as excinfo:
        load_original_state_dict(net, state, "teacher.checkpoint t.pt")
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("teacher.checkpoint t.pt does not fit the model")
    assert "shape mismatch: fc.weight is (1000, 512) in it, (3, 512) in the model" in message
    del state["layer1.0.bn1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    message = str(pytest.raises(WeightsError, load_original_state_dict, net, state).value)
    assert "missing keys: layer1.0.bn1.running_mean" in message and "unexpected keys: extra.weight" in message


def test_a_pickled_model_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    message = str(pytest.raises(WeightsError, read_state_dict, path).value)
    assert "\n" not in message and "pickled model (torch.nn.modules.container.Sequential)" in message
    assert "torch.save(model.state_dict(), path)" in message


def test_unreadable_checkpoints_are_one_line(tmp_path: Path) -> None:
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    cases = {
        tmp_path / "absent.pt": "checkpoint not found",
        tmp_path: "is a directory",
        tmp_path / "tensor.pt": "holds a Tensor, not a state dict",
        tmp_path / "list.pt": "'weights' is a list",
        tmp_path / "junk.safetensors": "cannot read safetensors file",
    }
    for path, expected in cases.items():
        message = str(pytest.raises(WeightsError, read_state_dict, path).value)
        assert expected in message and "\n" not in message, message


# --- learners and heads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm:convnext_atto", "torchvision:mobilenet_v3_small"])
def test_fresh_stages_and_head_have_the_shapes_but_new_values(name: str) -> None:
    _, net = _pair(name)
    stages, head = fresh_stages(net, 2), fresh_head(net)
    assert len(stages) == net.num_stages - 2
    for copy, source in ((stages, net.stages[2:]), (head, net.head)):
        pairs = list(zip(copy.parameters(), source.parameters(), strict=True))
        assert all(a.shape == b.shape for a, b in pairs)
        assert any(not torch.equal(a, b) for a, b in pairs if a.numel() > 1)
    with torch.no_grad():
        h = net.forward_stages(net.stem(_x()), 0, 2)
        for stage in stages:
            h = stage.eval()(h)
        assert head.eval()(h).shape == (2, NUM_CLASSES)


def test_replace_head_keeps_the_library_names() -> None:
    net = replace_head(create_model("torchvision:resnet18", 1000), 3)
    assert net.head.fc.out_features == 3
    assert original_state_dict(net)["fc.weight"].shape == (3, 512)
