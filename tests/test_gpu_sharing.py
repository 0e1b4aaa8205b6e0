"""How local workers share a GPU: whether a CUDA MPS daemon runs (asked of `nvidia-cuda-mps-control`, a fake one on
PATH here; `ACKD_SEARCH_MPS` wins), and the parent's preflight in a spawned child so the parent holds no CUDA
context and no teacher while the workers run (the CUDA check is skipped without CUDA)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_space import tiny_space, write

from ackd_search.backends import packing
from ackd_search.backends.packing import MPS_CONTROL, mps_running
from ackd_search.backends.preflight_apart import preflight_for_workers, uses_cuda
from ackd_search.errors import ConfigError
from ackd_search.searching.space import load_space

# A stand-in for nvidia-cuda-mps-control's client mode: a daemon "listens" on a pipe folder holding `daemon-up`.
FAKE_CONTROL = """#!/bin/sh
read command
echo "$command" >> "${FAKE_MPS_LOG:-/dev/null}"
[ -n "$FAKE_MPS_HANG" ] && sleep 30
if [ -e "${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}/daemon-up" ]; then exit 0; fi
echo "Cannot find MPS control daemon process"
exit 1
"""


@pytest.fixture
def fake_control(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / MPS_CONTROL
    tool.write_text(FAKE_CONTROL)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
            "FAKE_MPS_LOG": str(tmp_path / "asked")}


def test_a_stale_pipe_is_not_a_daemon(fake_control: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "pipe" / "control").touch()  # what a daemon killed without `quit` leaves
    assert not mps_running(fake_control)
    assert (tmp_path / "asked").read_text().split() == ["get_server_list"]


def test_a_daemon_on_a_custom_pipe_folder_is_found(fake_control: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "pipe" / "daemon-up").touch()
    assert mps_running(fake_control)
    assert not mps_running({**fake_control, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "elsewhere")})


def test_no_command_or_no_answer_is_no_mps(fake_control: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "pipe" / "daemon-up").touch()
    assert not mps_running({**fake_control, "PATH": str(tmp_path / "empty")})
    assert not mps_running({**fake_control, "FAKE_MPS_HANG": "1"}, timeout_s=0.5)


def test_the_setting_wins(fake_control: dict[str, str], tmp_path: Path) -> None:
    assert mps_running({**fake_control, "ACKD_SEARCH_MPS": "on"})  # no daemon: the user says there is one
    (tmp_path / "pipe" / "daemon-up").touch()
    assert not mps_running({**fake_control, "ACKD_SEARCH_MPS": "off"})
    assert mps_running({**fake_control, "ACKD_SEARCH_MPS": "auto"})
    with pytest.raises(ValueError, match="ACKD_SEARCH_MPS='yes'; allowed: on, off, auto"):
        mps_running({**fake_control, "ACKD_SEARCH_MPS": "yes"})


def test_detect_packs_by_the_answer(monkeypatch) -> None:
    monkeypatch.setattr(packing, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("ACKD_SEARCH_MPS", "on")
    assert len(packing.detect()) == packing.TRIALS_PER_GPU_WITH_MPS
    monkeypatch.setenv("ACKD_SEARCH_MPS", "off")
    assert len(packing.detect()) == packing.TRIALS_PER_GPU_WITHOUT_MPS


# --- the parent's preflight ------------------------------------------------------------------------------------


def test_preflight_apart_trains_the_teacher_in_a_child(tmp_path: Path, capfd) -> None:
    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path)))
    assert not uses_cuda(space) or torch.cuda.is_available()
    preflight_for_workers(space, apart=True)
    out = capfd.readouterr().out
    assert "data digits:" in out and "teacher digits_cnn_large: val_acc" in out  # the child's lines reach us
    assert list((tmp_path / "teachers").glob("*/manifest.json"))  # cached by the child for the workers


def test_preflight_apart_raises_the_childs_config_error_whole(tmp_path: Path) -> None:
    data = tiny_space(tmp_path)
    data["run"]["data"]["name"] = "cifar10"
    data["run"]["data"]["data_root"] = str(tmp_path / "missing")
    data["run"]["data"]["download"] = False
    space = load_space(write(tmp_path / "space.yaml", data))
    with pytest.raises(Exception) as apart:
        preflight_for_workers(space, apart=True)
    with pytest.raises(Exception) as here:
        preflight_for_workers(space, apart=False)
    assert type(apart.value) is type(here.value) and str(apart.value) == str(here.value)
    if isinstance(here.value, ConfigError):
        assert apart.value.problems == here.value.problems


CHILDLESS_PARENT = """
import sys, torch
from ackd_search.backends.preflight_apart import preflight_for_workers
from ackd_search.searching.space import load_space
preflight_for_workers(load_space(sys.argv[1]))  # decides by the device: apart, on CUDA
print("cuda initialized in the parent:", torch.cuda.is_initialized())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_parent_holds_no_cuda_context_after_preflight(tmp_path: Path) -> None:
    data = tiny_space(tmp_path)
    data["run"]["device"] = "cuda"
    space_file = write(tmp_path / "space.yaml", data)
    assert uses_cuda(load_space(space_file))
    # A fresh process: this test process may have used CUDA in other tests.
    done = subprocess.run([sys.executable, "-c", CHILDLESS_PARENT, str(space_file)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "teacher digits_cnn_large: val_acc" in done.stdout
    assert done.stdout.strip().endswith("cuda initialized in the parent: False"), done.stdout
