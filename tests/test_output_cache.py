"""Tests for the teacher-output cache (ackd_search/output_cache.py) and the loader's view indexing, on CPU.

Pinned: every one of CIFAR's 162 views is reachable and a view's image is the loader's own augmented image, and an
epoch's views are known at its start; the cache equals the live teacher; a KD step reads the same teacher logits
from it; every placement gives the same rows; a process maps the cache once and its trials share the map and the
device copy; a run that needs the pooled features adds that array alone; a short KD run's curve matches the live
run's; the cache is computed once for two runs and for two worker processes; a changed or unenumerable augmentation
is never served from it; `auto` follows its rule."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_fake_cifar10

from ackd_search.config import (
    AckdConfig,
    DataConfig,
    DistillConfig,
    OptimConfig,
    RunConfig,
    TeacherConfig,
    kd_distill,
)
from ackd_search.data import Augment, DataSplits, DeviceLoader, load_splits
from ackd_search.data.sources import get_splits
from ackd_search.distill import KD
from ackd_search.models import create_model
from ackd_search.training import output_cache, teacher_outputs
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


def cached(cfg: RunConfig, splits: DataSplits, placement: str = "auto"):
    teacher, info = load_teacher(cfg, splits)
    outputs, status = teacher_outputs_for(cfg, splits, teacher, info, CPU, placement)
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


def test_an_epochs_views_are_known_at_its_start(cifar: DataSplits) -> None:
    loader = DeviceLoader(cifar.train, 16, CPU, cifar.mean, cifar.std, augment=cifar.augment, shuffle=True, seed=3)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = [views for _, _, views in loader.iter_views()]
        assert torch.equal(loader.epoch_views(), torch.cat(batches))


# --- the cache ---------------------------------------------------------------------------------------------------


def test_cache_equals_the_live_teacher(cifar: DataSplits, teacher_file: Path, tmp_path: Path) -> None:
    cfg = cifar_config(tmp_path, teacher_file)
    teacher, outputs, status = cached(cfg, cifar)
    assert status == "used" and outputs.num_views == 162 and outputs.placement == "mapped"  # a CPU run
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


def test_auto_budget_is_a_share_of_the_hosts_memory(cifar: DataSplits, teacher_file: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    long = dataclasses.replace(cifar_config(tmp_path, teacher_file, setting="auto"), optim=OptimConfig(epochs=200))
    monkeypatch.setattr(output_cache, "host_memory_bytes", lambda: 100_000)  # the 5,832 x 10 fp32 rows: 233 kB
    _, outputs, status = cached(long, cifar)
    assert outputs is None and "exceed the auto budget" in status and "50% of this machine's memory" in status
    monkeypatch.undo()
    assert cached(long, cifar)[2] == "used"


def test_where_the_rows_live_on_cuda_follows_the_gpus_free_memory(monkeypatch) -> None:
    """The whole arrays go to the GPU when they take at most GPU_FRACTION of its free memory, else the epoch's rows
    are gathered per epoch; on a 139 GB H200 (130 GB free) CIFAR-100's logits and resnet32x4's pooled features
    (1.46 + 3.73 GB in fp16) go to the device, where the old fixed 2 GiB cap kept them on the host."""
    class Arrays:
        nbytes = 5_190_000_000

    class Fake:
        device = torch.device("cuda")
        files: dict = {}
        arrays = {"logits": Arrays()}

    for free, placement in ((130e9, "device"), (15e9, "epoch")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (int(free), int(139e9)))
        assert teacher_outputs.TeacherOutputs._choose(Fake(), "auto") == placement
    assert teacher_outputs.TeacherOutputs._choose(Fake(), "epoch") == "epoch"


def test_every_placement_gives_the_same_rows(cifar: DataSplits, teacher_file: Path, tmp_path: Path) -> None:
    """Whole arrays on the device, the epoch's rows gathered at its start, the memory map read directly: the same
    values for every batch; the epoch buffer is the same memory every epoch (a captured graph indexes it)."""
    cfg = cifar_config(tmp_path, teacher_file)
    placed = {p: cached(cfg, cifar, p)[1] for p in ("mapped", "device", "epoch")}
    assert {p: o.in_graph for p, o in placed.items()} == {"mapped": False, "device": True, "epoch": True}
    buffer = placed["epoch"].tensors["logits"].data_ptr()
    loader = DeviceLoader(cifar.train, 16, CPU, cifar.mean, cifar.std, augment=cifar.augment, shuffle=True, seed=5)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for outputs in placed.values():
            outputs.begin_epoch(loader)
        for step, (_, _, views) in enumerate(loader.iter_views()):
            got = {p: o.gather(o.rows(views, step * 16))[0] for p, o in placed.items()}
            assert torch.equal(got["device"], got["mapped"]) and torch.equal(got["epoch"], got["mapped"])
    assert placed["epoch"].tensors["logits"].data_ptr() == buffer


def test_trials_of_a_process_share_the_map_and_the_device_copy(cifar: DataSplits, teacher_file: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    teacher_outputs.forget_shared()
    copies = []
    to_device = teacher_outputs._to_device
    monkeypatch.setattr(teacher_outputs, "_to_device", lambda a, d: copies.append(a.shape) or to_device(a, d))
    cfg = cifar_config(tmp_path, teacher_file)
    first, second = cached(cfg, cifar, "device")[1], cached(cfg, cifar, "device")[1]
    assert first is not second and first.arrays["logits"] is second.arrays["logits"]  # one map per process
    assert isinstance(first.arrays["logits"], np.memmap)
    assert first.tensors["logits"] is second.tensors["logits"] and len(copies) == 1  # one device copy


def test_a_run_needing_pooled_features_computes_them_alone(cifar: DataSplits, teacher_file: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """KD's entry holds the logits; ACKD with the adversary on the teacher's features needs the pooled features
    too: that array alone is computed (under the lock) and added to the manifest, the logits file left as it is."""
    computed = []
    compute = output_cache.compute
    monkeypatch.setattr(output_cache, "compute", lambda t, loader, names, *a: computed.append(list(names))
                        or compute(t, loader, names, *a))
    kd = cifar_config(tmp_path, teacher_file)
    teacher, kd_outputs, _ = cached(kd, cifar)
    logits_file = kd_outputs.directory / "logits.npy"
    before = logits_file.stat()
    ackd = dataclasses.replace(kd, distill=DistillConfig(method="ackd", ackd=AckdConfig(adv_input="features")))
    _, outputs, status = cached(ackd, cifar)
    assert status == "used" and computed == [["logits"], ["pooled"]] and outputs.directory == kd_outputs.directory
    after = logits_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    manifest = json.loads((outputs.directory / "manifest.json").read_text())
    assert sorted(manifest["arrays"]) == ["logits", "pooled"]
    loader = DeviceLoader(cifar.train, 1, CPU, cifar.mean, cifar.std, augment=cifar.augment)
    views = torch.randperm(len(cifar.train) * 162, generator=torch.Generator().manual_seed(1))[:300]
    with torch.no_grad():
        live_pooled = teacher.head.pooled(teacher.forward_features(loader.view_images(views)))
    logits, pooled = outputs.gather(views)
    torch.testing.assert_close(pooled, live_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, kd_outputs.gather(views)[0], rtol=0, atol=0)
    assert cached(ackd, cifar)[2] == "used" and len(computed) == 2  # complete now: nothing more to compute


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
