"""Several local worker processes sharing one study through its storage URL (`search.py --workers N`).

The parent checks the storage, trains or reads the teacher and opens the study once; each worker then runs its
share of the trials with its own random sampler seed (logged), and the parent confirms the candidates at the end.
Workers on other machines join by running the same command."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from ackd_search.backends.local import logger, run_search
from ackd_search.backends.packing import WorkerSlot, detect, visible_gpus
from ackd_search.backends.preflight_apart import preflight_for_workers
from ackd_search.searching.confirming import run_confirmation
from ackd_search.searching.space import Space
from ackd_search.searching.storage import WORKER_STORAGE_ENV, check_storage, make_storage
from ackd_search.searching.study import open_study, requeue_interrupted
from ackd_search.searching.trial_loop import is_rerun
from ackd_search.view.hooks import UserView
from ackd_search.view.progress import EpochBar
from ackd_search.view.summary import summary


def shares(n_trials: int | None, workers: int) -> list[int | None]:
    """Split `n_trials` as evenly as possible (None: every worker runs until the timeout or Ctrl-C)."""
    if n_trials is None:
        return [None] * workers
    base, extra = divmod(n_trials, workers)
    return [base + (i < extra) for i in range(workers)]


def worker_command(args: argparse.Namespace, index: int, n_trials: int | None) -> list[str]:
    """The worker's command line. Never the storage URL: with a password it would show in `ps` and in
    /proc/<pid>/cmdline to every user of the machine; it goes in the worker's environment (`worker_env`)."""
    cmd = [sys.executable, "-m", "ackd_search.cli", "search", "--space", args.space,
           "--worker-tag", f"w{index + 1}", "--no-requeue", "--no-confirm"]
    if n_trials is not None:
        cmd += ["--n-trials", str(n_trials)]
    if args.timeout is not None:
        cmd += ["--timeout", str(args.timeout)]
    return cmd


def worker_env(args: argparse.Namespace, slot: WorkerSlot) -> dict[str, str]:
    """The worker's environment: the slot's device and threads, and `--storage` (readable only by its own user,
    /proc/<pid>/environ being mode 0400), which `run_search` reads when it is given no URL."""
    env = {**os.environ, **slot.env()}
    if "OMP_NUM_THREADS" in os.environ:  # the user's own setting wins
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    env.pop(WORKER_STORAGE_ENV, None)
    if args.storage:
        env[WORKER_STORAGE_ENV] = args.storage
    return env


def worker_slots(workers: int | str) -> list[WorkerSlot]:
    """`auto`: as many workers as the visible GPUs and cores can feed (packing.detect); N: N workers sharing the
    cores, dealt to the visible GPUs round-robin."""
    if workers == "auto":
        return detect()
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    return [WorkerSlot(i, gpus[i % len(gpus)] if gpus else None, threads) for i in range(int(workers))]


def run_workers(args: argparse.Namespace, space: Space) -> int:
    url = args.storage or space.storage_url
    check_storage(url)
    preflight_for_workers(space, progress=EpochBar)  # on CUDA in a child: the parent keeps no context, no teacher
    study = open_study(space, make_storage(space, url))
    requeue_interrupted(study)
    n_trials = args.n_trials if args.n_trials is not None else space.study.n_trials
    slots = worker_slots(args.workers)
    plan = [(slot, n) for slot, n in zip(slots, shares(n_trials, len(slots))) if n != 0]
    where = {slot.cuda_device for slot, _ in plan} - {None}
    print(f"{len(plan)} workers on {space.study.name!r}: trials per worker {[n for _, n in plan]}"
          f"{f', on GPUs {sorted(where)}' if where else ''}", flush=True)
    # Share the cores: torch would give every worker all of them, and tiny CPU trials then spin against each other.
    procs = [subprocess.Popen(worker_command(args, slot.index, n), env=worker_env(args, slot)) for slot, n in plan]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group, SIGTERM only us: pass it on to workers still running (each
        # ignores a second signal), then let every worker record its running trial before we leave.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    failed = run_what_dead_workers_left(args, space, plan, procs, codes)
    if not args.no_confirm:
        run_confirmation(space, study, UserView(space), logger())  # the parent alone, after every search trial
    print(summary(study, space))
    return failed


def run_what_dead_workers_left(args: argparse.Namespace, space: Space, plan: list, procs: list,
                               codes: list[int]) -> int:
    """Name each worker that died, and run its unfinished share here (its running trial is retried from its
    checkpoint once the heartbeat grace period has passed). The exit code: 0 when the share was made up."""
    left = 0
    for (slot, n), proc, code in zip(plan, procs, codes):
        if code == 0:
            continue
        done = _finished_by(space, args.storage, proc.pid)
        missing = max(0, n - done) if n is not None else 0
        print(f"worker w{slot.index + 1} (pid {proc.pid}) exited with code {code} after {done} of {n} trials"
              f"{f'; running its {missing} remaining trials here' if missing else ''}", flush=True)
        left += missing
    if left == 0:
        return 0
    run_search(space, n_trials=left, storage_url=args.storage, tag="parent", requeue=False, confirm=False)
    return 0


def _finished_by(space: Space, storage_url: str | None, pid: int) -> int:
    """New trials a worker process finished (each trial records the pid of the process that ran it); its re-runs of
    earlier trials were not part of its share."""
    study = open_study(space, make_storage(space, storage_url), log=lambda _: None)
    return sum(t.user_attrs.get("pid") == pid for t in study.get_trials(deepcopy=False)
               if t.state.is_finished() and not is_rerun(t))
