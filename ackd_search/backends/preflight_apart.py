"""The search's preflight before local workers that train on CUDA, run in a spawned child process: the child reads
the data and trains or loads the teacher on the GPU, then exits, so the parent, which only waits for its workers
(and confirms at the end, once they are done), holds no CUDA context and no teacher while they run. A CUDA context
alone keeps about half a GiB of the GPU and, without MPS, a time slice that the packed workers would otherwise get."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ackd_search.errors import ConfigError, one_line
from ackd_search.notices import notice
from ackd_search.searching.preflight import preflight
from ackd_search.searching.space import Space
from ackd_search.training.device import resolve_device
from ackd_search.training.teachers import ProgressFactory


def uses_cuda(space: Space) -> bool:
    """Whether the space's runs resolve to a CUDA device (asks torch whether CUDA exists: creates no context)."""
    try:
        return resolve_device(space.run_config(space.default_values()).device).type == "cuda"
    except (ValueError, ConfigError):
        return False  # preflight says what is wrong, in this process


def preflight_for_workers(space: Space, progress: ProgressFactory | None = None, apart: bool | None = None) -> None:
    """`preflight(space, progress=progress)`, in a spawned child when `apart` (None: when the runs use CUDA).
    Its lines and progress bars reach this terminal; an error it raises is raised here (a ConfigError whole)."""
    if not (uses_cuda(space) if apart is None else apart):
        preflight(space, progress=progress)
        return
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            failure = pool.submit(_child, space, progress).result()
    except BrokenProcessPool as err:  # the child died (killed, or no start): the preflight still has to happen
        notice(f"preflight: its child process ended early ({one_line(err)}); running it in this process")
        preflight(space, progress=progress)
        return
    if failure is not None:
        raise _rebuilt(failure)


def _say(line: str) -> None:
    print(line, flush=True)  # in order with the parent's lines, which follow once the child has exited


def _child(space: Space, progress: ProgressFactory | None) -> tuple[str, Any] | None:
    try:
        preflight(space, log=_say, progress=progress)
    except ConfigError as err:  # its pickled form would rebuild it from the joined message, char by char
        return "config", err.problems
    except Exception as err:
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:
            return "text", one_line(err)
        return "raise", err
    return None


def _rebuilt(failure: tuple[str, Any]) -> BaseException:
    kind, payload = failure
    if kind == "config":
        return ConfigError(payload)
    if kind == "raise":
        return payload
    return RuntimeError(payload)
