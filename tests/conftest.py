"""Shared test settings: every test trains tiny nets on one CPU thread (in this process and in the search processes
the tests start)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """8x8 digits nets gain nothing from a second thread, and on a shared 2-core machine the threads spin against
    other jobs: one KD test took 14 s on 2 threads and 1.7 s on 1 while another test suite was running."""
    previous, previous_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by `search.py` subprocesses and Ray workers
    yield
    torch.set_num_threads(previous)
    if previous_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous_env
