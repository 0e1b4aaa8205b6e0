"""Tests for ackd_search.teachers: the teacher cache (train once, then read; damaged entries are never used) and the
user's own teacher checkpoint (loaded with weights_only=True; every bad file is a one-line CheckpointError)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ackd_search.config import DataConfig, OptimConfig, RunConfig, TeacherConfig, kd_distill
from ackd_search.data import DataSplits, DeviceLoader
from ackd_search.data.sources import get_splits
from ackd_search.errors import CheckpointError
from ackd_search.models import create_model
from ackd_search.training import teachers
from ackd_search.training.loop import evaluate
from ackd_search.training.output_cache import MANIFEST
from ackd_search.training.teachers import WEIGHTS, cache_entry, get_teacher, teacher_recipe

CPU = torch.device("cpu")


def teacher_config(cache: Path, checkpoint: Path | None = None, seed: int = 0) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="digits", limit=400),
        teacher=TeacherConfig(arch="digits_cnn_large", cache_dir=str(cache), seed=seed,
                              checkpoint=str(checkpoint) if checkpoint else None, optim=OptimConfig(epochs=3)),
        distill=kd_distill(),
        device="cpu",
    )


@pytest.fixture
def splits() -> DataSplits:
    return get_splits(DataConfig(name="digits", limit=400))


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """Records every teacher training that get_teacher starts (and still trains)."""
    calls: list[RunConfig] = []
    real_train = teachers.train

    def counting_train(cfg: RunConfig, *args: Any, **kwargs: Any):
        calls.append(cfg)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(teachers, "train", counting_train)
    return calls


def forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: Any, **kwargs: Any):
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(teachers, "train", no_training)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# --- the cache -------------------------------------------------------------------------------------------------


def test_first_call_trains_and_writes_a_complete_entry(tmp_path: Path, splits: DataSplits,
                                                       train_calls: list[RunConfig]) -> None:
    cfg = teacher_config(tmp_path)
    teacher, info = get_teacher(cfg, splits, CPU)

    assert len(train_calls) == 1
    assert train_calls[0].student == "digits_cnn_large" and train_calls[0].distill.method == "student"
    entry = cache_entry(cfg)
    assert Path(info["cache_entry"]) == entry and entry.parent == tmp_path
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["sha256"] == hashlib.sha256((entry / WEIGHTS).read_bytes()).hexdigest()
    assert manifest["recipe"] == teacher_recipe(cfg)
    # The recorded accuracy is the cached teacher's own, and well above chance (10%): it was trained.
    loader = DeviceLoader(splits.val, 256, CPU, splits.mean, splits.std)
    assert manifest["val_acc"] == info["val_acc"] == pytest.approx(evaluate(teacher, loader, contextlib.nullcontext)[0])
    assert manifest["val_acc"] > 30.0
    assert not (entry / "run").exists()  # the training run's checkpoints are cleaned up
    assert not teacher.training
    assert_same_weights(weights(teacher), torch.load(entry / WEIGHTS, weights_only=True))


def test_second_call_is_a_cache_hit(tmp_path: Path, splits: DataSplits, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = teacher_config(tmp_path)
    first, first_info = get_teacher(cfg, splits, CPU)
    forbid_training(monkeypatch)
    second, second_info = get_teacher(cfg, splits, CPU)
    assert second_info == first_info
    assert_same_weights(weights(second), weights(first))


def test_another_recipe_gets_its_own_entry(tmp_path: Path, splits: DataSplits, train_calls: list[RunConfig]) -> None:
    get_teacher(teacher_config(tmp_path, seed=0), splits, CPU)
    _, info = get_teacher(teacher_config(tmp_path, seed=1), splits, CPU)
    assert len(train_calls) == 2
    assert info["cache_entry"] != str(cache_entry(teacher_config(tmp_path, seed=0)))
    assert len(list(tmp_path.glob(f"*/{MANIFEST}"))) == 2


def damage_weights(entry: Path) -> None:
    data = bytearray((entry / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a readable file, the hash no longer matches
    (entry / WEIGHTS).write_bytes(bytes(data))


def drop_manifest(entry: Path) -> None:
    (entry / MANIFEST).unlink()  # as if the process died between writing the weights and the manifest


def truncate_manifest(entry: Path) -> None:
    text = (entry / MANIFEST).read_text()
    (entry / MANIFEST).write_text(text[: len(text) // 2])


def drop_weights(entry: Path) -> None:
    (entry / WEIGHTS).unlink()


@pytest.mark.parametrize("damage", [damage_weights, drop_manifest, truncate_manifest, drop_weights])
def test_damaged_entry_is_never_used_and_is_retrained(tmp_path: Path, splits: DataSplits,
                                                      train_calls: list[RunConfig], damage, capsys) -> None:
    cfg = teacher_config(tmp_path)
    original, _ = get_teacher(cfg, splits, CPU)
    entry = cache_entry(cfg)
    damage(entry)
    capsys.readouterr()

    retrained, info = get_teacher(cfg, splits, CPU)
    assert len(train_calls) == 2
    said = capsys.readouterr().err
    assert f"teacher cache {entry} is incomplete or corrupt" in said and said.count("\n") == 1  # not in silence
    assert json.loads((entry / MANIFEST).read_text())["sha256"] == info["sha256"]
    assert info["sha256"] == hashlib.sha256((entry / WEIGHTS).read_bytes()).hexdigest()
    # Teacher training is seeded, so the repaired entry holds the same weights as the first one.
    assert_same_weights(weights(retrained), weights(original))


# --- the user's own checkpoint ---------------------------------------------------------------------------------


def test_user_checkpoint_is_loaded_without_training(tmp_path: Path, splits: DataSplits,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    mine = create_model("digits_cnn_large", 10, in_channels=1)
    torch.save(mine.state_dict(), tmp_path / "teacher.pt")
    torch.save({"state_dict": mine.state_dict(), "epoch": 7}, tmp_path / "wrapped.pt")
    forbid_training(monkeypatch)
    for name in ("teacher.pt", "wrapped.pt"):
        teacher, info = get_teacher(teacher_config(tmp_path / "cache", tmp_path / name), splits, CPU)
        assert_same_weights(weights(teacher), mine.state_dict())
        assert not teacher.training
        assert info["checkpoint"] == str(tmp_path / name)
        assert info["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert 0.0 <= info["val_acc"] <= 100.0
    assert not (tmp_path / "cache").exists()


def write_wrong_arch(path: Path) -> None:
    torch.save(create_model("digits_cnn_small", 10, in_channels=1).state_dict(), path)


def write_garbage(path: Path) -> None:
    path.write_bytes(b"\x80\x02 definitely not a checkpoint")


def write_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def write_nothing(path: Path) -> None:
    pass


@pytest.mark.parametrize(("write", "expected"), [
    (write_wrong_arch, "does not fit the model: shape mismatch: stem.0.weight is (4, 1, 3, 3) in it"),
    (write_garbage, "cannot read checkpoint"),
    (write_tensor, "holds a Tensor, not a state dict"),
    (write_nothing, "teacher.checkpoint: file not found"),
])
def test_bad_user_checkpoint_is_a_one_line_error(tmp_path: Path, splits: DataSplits, write, expected: str) -> None:
    path = tmp_path / "teacher.pt"
    write(path)
    with pytest.raises(CheckpointError) as info:
        get_teacher(teacher_config(tmp_path / "cache", path), splits, CPU)
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "\n" not in message and len(message) < 400


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_user_checkpoint_is_loaded_with_weights_only(tmp_path: Path, splits: DataSplits) -> None:
    """A pickle that runs code when loaded is refused, and its code never runs."""
    marker = tmp_path / "code-ran"
    state = create_model("digits_cnn_large", 10, in_channels=1).state_dict()
    state["payload"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        get_teacher(teacher_config(tmp_path / "cache", tmp_path / "teacher.pt"), splits, CPU)
    assert not marker.exists()
