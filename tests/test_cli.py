"""The command line as a user meets it: every bad input is one line on stderr and a non-zero exit, never a
traceback, and leaves no file behind; a misspelt command names the closest one; `--version`, help on every option;
`train` does not silently repeat a finished run; Ctrl-C says what it left, on its own line."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_export import told
from tiny_space import run_cli, tiny_space, write

import ackd_search.cli as cli
from ackd_search import __version__
from ackd_search.cli import build_parser, main, parse_args
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import open_study

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # studies made by ask/tell
WORKER_ONLY = {"--seed-offset", "--worker-tag", "--no-requeue"}  # set by the --workers parent, hidden from users




def run_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "search.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    """A valid space whose study, teacher cache, runs and artifacts would all be created under tmp_path."""
    return write(tmp_path / "space.yaml", tiny_space(tmp_path))


def created(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()} - {"space.yaml"}


# --- the command itself ---------------------------------------------------------------------------------------


def test_misspelt_command_names_the_closest_one(capsys) -> None:
    code, _, err = run_cli(["reprot", "--space", "x.yaml"], capsys)
    one_line_error(code, err)
    assert err.strip() == "error: unknown command 'reprot'; did you mean 'report'?"
    code, _, err = run_cli(["frobnicate"], capsys)
    one_line_error(code, err, "unknown command 'frobnicate'", "search, confirm, export, train, report, dashboard")
    code, _, err = run_cli(["spaces/digits.yaml"], capsys)
    one_line_error(code, err, "did you mean --space spaces/digits.yaml?")
    assert parse_args(["--space", "x.yaml"]).command == "search"  # the default command still needs no name


def test_version_prints_the_package_version(capsys) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"ackd-search {__version__}"


def _all_options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", a) for o, a in _all_options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "/".join(action.option_strings) or action.dest, action


def test_every_option_has_help() -> None:
    missing = [name for name, action in _all_options(build_parser())
               if name.split()[-1] not in WORKER_ONLY and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing


def test_top_level_help_says_what_the_tool_does_and_lists_the_commands(capsys) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "Parses arguments" not in out and "knowledge-distillation" in out
    commands = out[out.index("commands:"):]
    for name in ("search", "export", "train", "report", "dashboard"):
        assert f"    {name}" in commands


# --- bad input: one line, exit 2, nothing written --------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--n-trials", "0"], "--n-trials: must be >= 1"),
    (["--n-trials", "-3"], "--n-trials: must be >= 1"),
    (["--timeout", "-5"], "--timeout: must be > 0"),
    (["--timeout", "0"], "--timeout: must be > 0"),
    (["--timeout", "nan"], "--timeout: must be > 0"),
    (["--workers", "0"], "--workers: must be >= 1"),
    (["--workers", "-2"], "--workers: must be >= 1"),
    (["--workers", "2", "--backend", "ray"], "--workers is for --backend optuna"),
])
def test_bad_search_arguments_are_refused_before_any_work(space_file: Path, tmp_path: Path, args: list[str],
                                                           fragment: str, capsys) -> None:
    code, _, err = run_cli(["--space", str(space_file), *args], capsys)
    one_line_error(code, err, fragment)
    assert not created(tmp_path)


@pytest.mark.parametrize("epochs", ["-5", "0"])
def test_export_epochs_must_be_positive(space_file: Path, tmp_path: Path, epochs: str, capsys) -> None:
    code, _, err = run_cli(["export", "--space", str(space_file), "--epochs", epochs,
                            "--out", str(tmp_path / "best.yaml")], capsys)
    one_line_error(code, err, "--epochs: must be >= 1")
    assert not created(tmp_path)


def test_workers_with_zero_trials_is_one_line_in_a_process(space_file: Path, tmp_path: Path) -> None:
    cli_run = run_process("--space", str(space_file), "--workers", "3", "--n-trials", "0")
    one_line_error(cli_run.returncode, cli_run.stderr, "--n-trials: must be >= 1")
    assert not created(tmp_path)


@pytest.mark.parametrize("fault", ["not UTF-8", "duplicate key"])
def test_space_file_faults_are_one_line_in_a_process(space_file: Path, tmp_path: Path, fault: str) -> None:
    text = space_file.read_text()
    if fault == "not UTF-8":
        space_file.write_bytes(text.replace("name: tiny", "name: tiny-\xe9t\xe9").encode("latin-1"))
        expected = ("not UTF-8", "line 2")
    else:
        line = text.splitlines().index("  n_trials: 4") + 1
        space_file.write_text(text.replace("  n_trials: 4\n", "  n_trials: 4\n  n_trials: 40\n"))
        expected = (f"line {line + 1}: duplicate key 'n_trials' (first on line {line})",)
    cli_run = run_process("--space", str(space_file))
    one_line_error(cli_run.returncode, cli_run.stderr, str(space_file), *expected)
    assert not created(tmp_path)


def test_export_to_a_folder_is_one_line_in_a_process(space_file: Path, tmp_path: Path) -> None:
    space = load_space(space_file)
    told(open_study(space, make_storage(space), log=lambda _: None), space, 90.0)
    folder = tmp_path / "exports"
    folder.mkdir()
    cli_run = run_process("export", "--space", str(space_file), "--out", str(folder))
    one_line_error(cli_run.returncode, cli_run.stderr, f"--out {folder} is a folder")
    assert not list(folder.iterdir())


@pytest.mark.parametrize("command", ["export", "report"])
def test_a_missing_study_leaves_no_database_file(space_file: Path, tmp_path: Path, command: str, capsys) -> None:
    code, _, err = run_cli([command, "--space", str(space_file)], capsys)
    one_line_error(code, err, "no study 'tiny'", "run the search first")
    assert not (tmp_path / "tiny.db").exists()
    assert not created(tmp_path)


# --- train: a finished run is not repeated by accident -----------------------------------------------------------


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    """The student alone for one epoch on 200 digits: no teacher, about a second."""
    data = {"seed": 0, "student": "digits_cnn_small", "device": "cpu", "cpu_threads": 1,
            "data": {"name": "digits", "limit": 200, "val_fraction": 0.2},
            "optim": {"epochs": 1, "batch_size": 64}, "distill": {"method": "student"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def finished_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "final"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"test_acc": 91.5, "history": [{"epoch": 1}]}))
    return run_dir


def test_train_refuses_a_finished_run(run_config: Path, tmp_path: Path, capsys) -> None:
    run_dir = finished_run(tmp_path)
    before = (run_dir / "result.json").read_text()
    code, _, err = run_cli(["train", "--config", str(run_config), "--output-dir", str(run_dir)], capsys)
    one_line_error(code, err, f"{run_dir} already trained (test_acc 91.50)", "--output-dir", "--force")
    assert (run_dir / "result.json").read_text() == before


def test_train_force_retrains_from_scratch(run_config: Path, tmp_path: Path, capsys) -> None:
    run_dir = finished_run(tmp_path)
    code, out, err = run_cli(["train", "--config", str(run_config), "--output-dir", str(run_dir), "--force"], capsys)
    assert code == 0, err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["test_acc"] is not None and result["test_acc"] != 91.5
    assert "restored from checkpoint" not in out and len(result["history"]) == 1


# --- Ctrl-C -------------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interrupt_message_is_neutral_and_on_its_own_line(space_file: Path, monkeypatch) -> None:
    def interrupted(args):  # as if Ctrl-C struck while the teacher trains: no trial is running
        raise KeyboardInterrupt

    terminal = _Terminal("  trial 3: epoch 2/4  val_acc  91.00   ")
    terminal.seek(0, io.SEEK_END)
    monkeypatch.setattr(cli, "cmd_search", interrupted)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["--space", str(space_file)]) == 130
    written = terminal.getvalue()
    assert "val_acc  91.00   \ninterrupted: " in written  # not glued to the live epoch line
    assert "the running trial" not in written
