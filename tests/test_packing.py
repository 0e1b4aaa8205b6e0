"""`--workers auto`: worker slots from the visible GPUs and CPU cores (pure; no GPU needed)."""

from __future__ import annotations

import pytest

from ackd_search.backends.packing import (
    TRIALS_PER_GPU_WITH_MPS,
    TRIALS_PER_GPU_WITHOUT_MPS,
    WorkerSlot,
    plan_workers,
    visible_gpus,
)


def test_cpu_only_machine_runs_one_single_thread_worker_per_core() -> None:
    assert plan_workers(0, 2) == [WorkerSlot(0, None, 1), WorkerSlot(1, None, 1)]
    assert len(plan_workers([], 16)) == 16
    assert plan_workers(0, 0) == [WorkerSlot(0, None, 1)]  # os.cpu_count() may say nothing: still one worker


def test_one_gpu_packs_the_default_trials_and_shares_the_cores() -> None:
    slots = plan_workers(1, 16, mps=True)
    assert len(slots) == TRIALS_PER_GPU_WITH_MPS
    assert {s.cuda_device for s in slots} == {"0"} and all(s.threads == 16 // TRIALS_PER_GPU_WITH_MPS for s in slots)
    assert len(plan_workers(1, 16, mps=False)) == TRIALS_PER_GPU_WITHOUT_MPS


def test_several_gpus_get_workers_round_robin_each_pinned_to_one() -> None:
    slots = plan_workers(["2", "3"], 16, trials_per_gpu=3)
    assert [s.cuda_device for s in slots] == ["2", "3", "2", "3", "2", "3"]
    assert [s.index for s in slots] == list(range(6)) and all(s.threads == 2 for s in slots)
    assert slots[1].env() == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "3"}


def test_cores_cap_the_workers_but_every_gpu_keeps_one() -> None:
    assert len(plan_workers(1, 2, trials_per_gpu=8)) == 2  # a worker per core at most
    slots = plan_workers(4, 2, trials_per_gpu=8)
    assert [s.cuda_device for s in slots] == ["0", "1", "2", "3"] and all(s.threads == 1 for s in slots)


def test_trials_per_gpu_must_be_positive() -> None:
    with pytest.raises(ValueError, match="trials per GPU must be >= 1, got 0"):
        plan_workers(1, 8, trials_per_gpu=0)


def test_cpu_worker_env_pins_threads_and_no_gpu() -> None:
    assert WorkerSlot(0, None, 1).env() == {"OMP_NUM_THREADS": "1"}


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({}, device_count=2) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "5, 7"}, device_count=2) == ["5", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, device_count=0) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "5,7"}, device_count=0) == []  # listed but not usable


