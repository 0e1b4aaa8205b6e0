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

from ackd_search.progress import summary
from ackd_search.space import Space
from ackd_search.storage import check_storage, make_storage
from ackd_search.study import open_study, preflight, requeue_interrupted, run_confirmation


def shares(n_trials: int | None, workers: int) -> list[int | None]:
    """Split `n_trials` as evenly as possible (None: every worker runs until the timeout or Ctrl-C)."""
    if n_trials is None:
        return [None] * workers
    base, extra = divmod(n_trials, workers)
    return [base + (i < extra) for i in range(workers)]


def worker_command(args: argparse.Namespace, index: int, n_trials: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "ackd_search.cli", "search", "--space", args.space,
           "--worker-tag", f"w{index + 1}", "--no-requeue", "--no-confirm"]
    if n_trials is not None:
        cmd += ["--n-trials", str(n_trials)]
    if args.timeout is not None:
        cmd += ["--timeout", str(args.timeout)]
    if args.storage:
        cmd += ["--storage", args.storage]
    return cmd


def run_workers(args: argparse.Namespace, space: Space) -> int:
    url = args.storage or space.storage_url
    check_storage(url)
    preflight(space)
    study = open_study(space, make_storage(space, url))
    requeue_interrupted(study)
    n_trials = args.n_trials if args.n_trials is not None else space.study.n_trials
    plan = [n for n in shares(n_trials, args.workers) if n != 0]
    print(f"{len(plan)} workers on {space.study.name!r}: trials per worker {plan}", flush=True)
    # Share the cores: torch would give every worker all of them, and tiny CPU trials then spin against each other.
    threads = str(max(1, (os.cpu_count() or 1) // len(plan)))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    procs = [subprocess.Popen(worker_command(args, i, n), env=env) for i, n in enumerate(plan)]
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
    failed = [c for c in codes if c != 0]
    if not args.no_confirm:
        run_confirmation(space, study)  # the parent alone: a worker that died left its share to the retry above
    print(summary(study))
    return max(failed) if failed else 0
