"""Tests for the teacher-output cache (ackd_search/output_cache.py) and the loader's view indexing, on CPU.

Pinned: every one of CIFAR's 162 views is reachable and a view's image is the loader's own augmented image; the cache
equals the live teacher; a KD step reads the same teacher logits from it; a short KD run's curve matches the live
run's; the cache is computed once for two runs and for two worker processes; a changed or unenumerable augmentation
is never served from it; `auto` follows its rule."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_data import write_fake_cifar10

from ackd_search.config import DataConfig, OptimConfig, RunConfig, TeacherConfig, kd_distill
from ackd_search.data import Augment, DataSplits, DeviceLoader, load_splits
from ackd_search.data.sources import get_splits
from ackd_search.distill import KD
from ackd_search.models import create_model
from ackd_search.training import output_cache
from ackd_search.training.output_cache import teacher_outputs_for
from ackd_search.training.runner import load_teacher, run_training

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> DataSplits:
    """Fake CIFAR-10 files (5 x 8 training images): the 162-view augmentation on 36 images."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, per_batch=8, n_test=10)
    return load_splits("cifar10", root, val_fraction=0.1, download=False)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's teacher checkpoint (random weights: equality does not need a trained teacher)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    torch.save(create_model("digits_cnn_small", 10).state_dict(), path)
    return path


def cifar_config(cache: Path, teacher_file: Path, setting: str = "on") -> RunConfig:
    return RunConfig(student="digits_cnn_small", data=DataConfig(name="cifar10"), optim=OptimConfig(epochs=1),
                     teacher=TeacherConfig(arch="digits_cnn_small", checkpoint=str(teacher_file), cache_dir=str(cache),
                                           output_cache=setting),
                     distill=kd_distill(), device="cpu")


def cached(cfg: RunConfig, splits: DataSplits):
    teacher, info = load_teacher(cfg, splits)
    outputs, status = teacher_outputs_for(cfg, splits, teacher, info, CPU)
    return teacher, outputs, status


# --- view indexing -----------------------------------------------------------------------------------------------


def test_cifar_views_are_numbered_one_to_one() -> None:
    aug = Augment(pad=4, flip=True)
    assert aug.num_views == 9 * 9 * 2
    dy, dx, f = torch.meshgrid(torch.arange(9), torch.arange(9), torch.arange(2), indexing="ij")
    offsets, flips = torch.stack([dy.flatten(), dx.flatten()], 1), f.flatten().bool()
    views = aug.view_index(offsets, flips)
    assert sorted(views.tolist()) == list(range(162))
    back_offsets, back_flips = aug.decode(views)
    assert torch.equal(back_offsets, offsets) and torch.equal(back_flips, flips)
    assert Augment(pad=1, flip=False).num_views == 9  # digits: crop only


def test_loader_views_are_its_own_images_and_all_reachable(cifar: DataSplits) -> None:
    loader = DeviceLoader(cifar.train, 16, CPU, cifar.mean, cifar.std, augment=cifar.augment, shuffle=True, seed=3)
    seen: set[int] = set()
    for epoch in range(120):
        loader.set_epoch(epoch)
        plain = list(loader)
        with_views = list(loader.iter_views())
        assert len(plain) == len(with_views)
        for (x, y), (xv, yv, views) in zip(plain, with_views):
            assert torch.equal(x, xv) and torch.equal(y, yv)  # the same draws as today's loader
            assert torch.equal(loader.view_images(views), x)  # a view's crop and flip = the loader's own image
            assert torch.equal(cifar.train.y[views // 162], y)
            seen.update((views % 162).tolist())
    assert seen == set(range(162))


# --- the cache ---------------------------------------------------------------------------------------------------


def test_cache_equals_the_live_teacher(cifar: DataSplits, teacher_file: Path, tmp_path: Path) -> None:
    cfg = cifar_config(tmp_path, teacher_file)
    teacher, outputs, status = cached(cfg, cifar)
    assert status == "used" and outputs.num_views == 162 and outputs.on_device
    loader = DeviceLoader(cifar.train, 1, CPU, cifar.mean, cifar.std, augment=cifar.augment)
    views = torch.randperm(len(cifar.train) * 162, generator=torch.Generator().manual_seed(0))[:500]
    with torch.no_grad():
        live = teacher(loader.view_images(views))
    logits, pooled = outputs.gather(views)
    assert pooled is None
    torch.testing.assert_close(logits, live, rtol=1e-5, atol=1e-5)  # float32 storage (small data)
    manifest = json.loads((outputs.directory / "manifest.json").read_text())
    assert manifest["arrays"]["logits"]["dtype"] == "float32"
    assert manifest["arrays"]["logits"]["shape"] == [len(cifar.train) * 162, 10]


def test_kd_step_with_the_cache_equals_the_live_step(cifar: DataSplits, teacher_file: Path, tmp_path: Path) -> None:
    cfg = cifar_config(tmp_path, teacher_file)
    teacher, outputs, _ = cached(cfg, cifar)
    loader = DeviceLoader(cifar.train, 16, CPU, cifar.mean, cifar.std, augment=cifar.augment, shuffle=True)
    x, y, views = next(loader.iter_views())
    losses, grads = [], []
    for teacher_out in (None, outputs.gather(views)):
        torch.manual_seed(1)
        kd = KD(create_model("digits_cnn_small", 10), teacher, 4.0, 0.1, 0.9)
        _, loss, terms = kd.forward_train(x, y, 0, teacher_out)
        loss.backward()
        losses.append((loss.detach(), terms["kd"]))
        grads.append([p.grad.clone() for p in kd.student.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_changed_or_unenumerable_augmentation_is_never_served(cifar: DataSplits, teacher_file: Path,
                                                              tmp_path: Path, capsys) -> None:
    cfg = cifar_config(tmp_path, teacher_file)
    _, first, _ = cached(cfg, cifar)
    _, other, status = cached(cfg, dataclasses.replace(cifar, augment=Augment(pad=2, flip=True)))
    assert status == "used" and other.num_views == 50 and other.directory != first.directory

    @dataclasses.dataclass(frozen=True)
    class Cutout(Augment):
        size: int = 8

    capsys.readouterr()
    _, outputs, status = cached(cfg, dataclasses.replace(cifar, augment=Cutout(pad=4, flip=True)))
    assert outputs is None and status.startswith("off: augmentation Cutout")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot enumerate" in lines[0] and "running the teacher" in lines[0]


def test_off_and_student_alone_never_build_it(cifar: DataSplits, teacher_file: Path, tmp_path: Path) -> None:
    cfg = cifar_config(tmp_path, teacher_file, setting="off")
    assert cached(cfg, cifar)[1:] == (None, "off")
    assert teacher_outputs_for(cfg, cifar, None, None, CPU) == (None, "off")
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*/outputs"))


def test_auto_rule_on_the_cpu(cifar: DataSplits, teacher_file: Path, tmp_path: Path) -> None:
    cfg = cifar_config(tmp_path, teacher_file, setting="auto")  # 1 epoch: 36 forwards < 5,832 views
    _, outputs, status = cached(cfg, cifar)
    assert outputs is None and status.startswith("off: on the CPU, 5,832 views cost more")
    long = dataclasses.replace(cfg, optim=OptimConfig(epochs=200))  # 7,200 forwards >= 5,832 views
    assert cached(long, cifar)[2] == "used"


# --- runs: the curve, reuse across runs and processes ---------------------------------------------------------


def digits_config(cache: Path, setting: str, epochs: int = 4) -> RunConfig:
    return RunConfig(student="digits_cnn_small", data=DataConfig(name="digits"), optim=OptimConfig(epochs=epochs),
                     teacher=TeacherConfig(arch="digits_cnn_large", cache_dir=str(cache), optim=OptimConfig(epochs=3),
                                           output_cache=setting),
                     distill=kd_distill(), device="cpu")


def test_kd_run_curve_with_the_cache_matches_and_it_is_computed_once(tmp_path: Path, monkeypatch) -> None:
    calls = []
    compute = output_cache.compute
    monkeypatch.setattr(output_cache, "compute", lambda *a, **k: calls.append(1) or compute(*a, **k))
    live = run_training(digits_config(tmp_path, "off"))
    first = run_training(digits_config(tmp_path, "on"))
    manifest = next(tmp_path.glob("*/outputs/*/manifest.json"))
    mtime = manifest.stat().st_mtime_ns
    second = run_training(digits_config(tmp_path, "on"))
    assert (live.teacher_output_cache, first.teacher_output_cache) == ("off", "used")
    assert len(calls) == 1 and manifest.stat().st_mtime_ns == mtime  # the second run read it
    assert [h["val_acc"] for h in first.history] == [h["val_acc"] for h in second.history]
    for a, b in zip(live.history, first.history):
        assert abs(a["val_acc"] - b["val_acc"]) <= 1.0  # percentage points: storage-precision noise only
        assert a["terms"]["kd"] == pytest.approx(b["terms"]["kd"], rel=1e-3)


WORKER = textwrap.dedent("""
    import sys
    from ackd_search.config import DataConfig, OptimConfig, RunConfig, TeacherConfig, kd_distill
    from ackd_search.training.output_cache import teacher_outputs_for
    from ackd_search.training.runner import load_teacher
    from ackd_search.data.sources import get_splits
    from ackd_search.training.device import resolve_device
    cfg = RunConfig(student="digits_cnn_small", data=DataConfig(name="digits"), optim=OptimConfig(epochs=2),
                    teacher=TeacherConfig(arch="digits_cnn_large", cache_dir=sys.argv[1], optim=OptimConfig(epochs=1),
                                          output_cache="on"), distill=kd_distill(), device="cpu", cpu_threads=1)
    splits = get_splits(cfg.data)
    teacher, info = load_teacher(cfg, splits)
    outputs, status = teacher_outputs_for(cfg, splits, teacher, info, resolve_device("cpu"))
    print(status, outputs.directory)
""")


def test_two_worker_processes_compute_it_once(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [out.strip().splitlines()[-1].split() for out, _ in outs]  # after the teacher's progress lines
    assert len({directory for _, directory in results}) == 1 and all(status == "used" for status, _ in results)
    computing = [err.count("teacher output cache: computing") for _, err in outs]
    assert sorted(computing) == [0, 1]
    splits = get_splits(DataConfig(name="digits"))
    manifest = json.loads(next(tmp_path.glob("*/outputs/*/manifest.json")).read_text())
    assert manifest["num_views"] == 9 and manifest["images"] == len(splits.train)
