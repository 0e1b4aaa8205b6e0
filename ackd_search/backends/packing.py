"""How many local workers `--workers auto` starts and where each runs: trials packed on every visible GPU (each
worker pinned to one through CUDA_VISIBLE_DEVICES), CPU threads shared out; on a machine without CUDA, one
single-thread worker per core. `plan_workers` is pure (counts in, slots out); `detect` reads this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

# Trials per GPU, from the measurements in issue #10 on one NVIDIA H200 (torch 2.11; NOT re-measured in this
# repository, whose machine has no GPU; `benchmarks/bench_pack.py` measures it). With the CUDA MPS daemon running,
# four captured KD trials ran 43.6k images/s in all against 29.2k for one (concurrent kernels); without MPS, captured
# trials only take turns on the GPU (four gave 29.2k in all, no gain), while eager trials still gained from packing
# (KD: 4 workers 2.8x, 8 workers 3.6x the trials per minute of one). Two without MPS keeps the GPU busy between one
# trial's evaluation and checkpoint without much contention.
TRIALS_PER_GPU_WITH_MPS = 4
TRIALS_PER_GPU_WITHOUT_MPS = 2
MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_SETTING = "ACKD_SEARCH_MPS"  # on | off: what the user says wins over asking the daemon (allowed: on, off, auto)
MPS_ASK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    cuda_device: str | None  # the id the worker sees as its only GPU (CUDA_VISIBLE_DEVICES), None on a CPU
    threads: int  # torch intra-op threads (OMP_NUM_THREADS)

    def env(self) -> dict[str, str]:
        """The variables to set in this worker's environment."""
        out = {"OMP_NUM_THREADS": str(self.threads)}
        if self.cuda_device is not None:
            out["CUDA_VISIBLE_DEVICES"] = self.cuda_device
        return out


def plan_workers(gpus: int | list[str], cpu_cores: int, trials_per_gpu: int | None = None,
                 mps: bool = False) -> list[WorkerSlot]:
    """Worker slots for `--workers auto`.

    `gpus`: the visible GPUs, as a count or as the ids CUDA_VISIBLE_DEVICES gave the parent (workers are pinned with
    those ids). With GPUs: `trials_per_gpu` workers per GPU (default TRIALS_PER_GPU_WITH_MPS or _WITHOUT_MPS), but
    never more workers than cores, since every worker needs a core to launch its kernels; workers are dealt to the
    GPUs round-robin and share the cores evenly. Without GPUs: one worker per core, one thread each (on the 2-core
    machine two such workers gave 1.48x the trials per minute of one, four gave less: benchmarks/README.md)."""
    ids = [str(i) for i in range(gpus)] if isinstance(gpus, int) else [str(g) for g in gpus]
    cores = max(1, int(cpu_cores))
    if not ids:
        return [WorkerSlot(i, None, 1) for i in range(cores)]
    per_gpu = trials_per_gpu if trials_per_gpu is not None else (
        TRIALS_PER_GPU_WITH_MPS if mps else TRIALS_PER_GPU_WITHOUT_MPS)
    if per_gpu < 1:
        raise ValueError(f"trials per GPU must be >= 1, got {per_gpu}")
    total = max(len(ids), min(per_gpu * len(ids), cores))  # at least one worker per GPU, even on few cores
    threads = max(1, cores // total)
    return [WorkerSlot(i, ids[i % len(ids)], threads) for i in range(total)]


def visible_gpus(environ: dict[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES's entries when set (empty: none), else 0..count-1."""
    environ = os.environ if environ is None else environ
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(device_count)]
    ids = [part.strip() for part in listed.split(",") if part.strip()]
    return ids[:device_count]


def mps_running(environ: Mapping[str, str] | None = None, timeout_s: float = MPS_ASK_TIMEOUT_S) -> bool:
    """Whether a CUDA MPS control daemon answers: `ACKD_SEARCH_MPS=on|off` when set, else `get_server_list` asked
    of `nvidia-cuda-mps-control` (found on PATH; it reads CUDA_MPS_PIPE_DIRECTORY itself, so a custom pipe folder
    is seen), which exits 0 only when a daemon is listening. A pipe file alone proves nothing: a daemon killed
    without `quit` leaves it behind. No command, no answer within `timeout_s`, or a failure to run it: no MPS (a
    daemon this process cannot reach, e.g. on the host of a container, is named with ACKD_SEARCH_MPS=on)."""
    environ = os.environ if environ is None else environ
    setting = environ.get(MPS_SETTING, "auto").strip().lower() or "auto"
    if setting not in ("on", "off", "auto"):
        raise ValueError(f"{MPS_SETTING}={environ[MPS_SETTING]!r}; allowed: on, off, auto")
    if setting != "auto":
        return setting == "on"
    command = shutil.which(MPS_CONTROL, path=environ.get("PATH", os.defpath))
    if command is None:
        return False
    try:
        answer = subprocess.run([command], input="get_server_list\n", capture_output=True, text=True,
                                timeout=timeout_s, env=dict(environ), check=False)
    except (OSError, subprocess.SubprocessError):  # includes the timeout: a daemon that does not answer
        return False
    # Without a daemon the command says "Cannot find MPS control daemon process" (and exits non-zero).
    return answer.returncode == 0 and "cannot find" not in (answer.stdout + answer.stderr).lower()


def detect(trials_per_gpu: int | None = None) -> list[WorkerSlot]:
    """`plan_workers` for this machine."""
    return plan_workers(visible_gpus(), os.cpu_count() or 1, trials_per_gpu, mps=mps_running())
