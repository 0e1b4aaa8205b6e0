"""What a search prints: off a terminal, plain lines (no carriage returns, no bars) with trial k of N, the counts,
the best so far and an ETA; confirmation runs labelled; a pruned trial's reason; the live line on a terminal."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from tiny_space import tiny_space, write

from ackd_search.searching.space import load_space
from ackd_search.searching.study import quiet_optuna
from ackd_search.view.progress import EpochBar, Progress, clock, end_live_lines

quiet_optuna()
LR = {"optim.lr": FloatDistribution(1e-4, 0.1, log=True)}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def finish(study: optuna.Study, progress: Progress, state: TrialState, value: float | None, attrs: dict,
           params: dict | None = None) -> str:
    """Run one trial's life through `progress` (start, two epochs, done); return what it printed."""
    before = progress.stream.getvalue()
    params = {} if params is None else params
    trial = create_trial(state=TrialState.RUNNING, params=params, distributions=LR if params else {},
                         user_attrs=attrs)
    study.add_trial(trial)
    number = len(study.trials) - 1
    progress.start(number, params)
    for epoch in (1, 2):
        progress.epoch(number, epoch, {"val_acc": 50.0 + epoch, "terms": {}})
    study._storage.set_trial_state_values(study.trials[number]._trial_id, state,
                                          None if value is None else [value])
    progress.trial_done(study, study.trials[number])
    return progress.stream.getvalue()[len(before):]


def make(tmp_path: Path, stream, **kwargs) -> tuple[optuna.Study, Progress]:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path, n_trials=3)))
    study = optuna.create_study(direction="maximize")
    return study, Progress(space, stream, study=study, **kwargs)


def test_off_a_terminal_lines_are_plain_with_trial_k_of_n_counts_best_and_eta(tmp_path: Path) -> None:
    study, progress = make(tmp_path, io.StringIO(), every_s=0.0)
    first = finish(study, progress, TrialState.COMPLETE, 91.5, {"preset": "reference"}, {"optim.lr": 0.01})
    second = finish(study, progress, TrialState.PRUNED, None,
                    {"prune_reason": "pruned at epoch 2: val_acc 52.00 below the pruner's cut"}, {"optim.lr": 0.02})
    out = first + second
    assert "\r" not in out and "\x1b" not in out  # no carriage return, no cursor movement: log-friendly
    lines = out.splitlines()
    assert any("#0 epoch 2/4" in line for line in lines)  # every_s=0: every epoch has a line
    done = [line for line in lines if line.startswith("trial ")]
    assert "1/3" in done[0] and "COMPLETE" in done[0] and "[reference]" in done[0]
    assert "complete 1 pruned 0 failed 0" in done[0] and "best #0 91.50" in done[0] and " eta " in done[0]
    assert "2/3" in done[1] and "PRUNED" in done[1] and "complete 1 pruned 1 failed 0" in done[1]
    assert done[1].endswith("pruned at epoch 2: val_acc 52.00 below the pruner's cut")


def test_confirmation_runs_are_labelled_with_what_they_confirm_and_their_seed(tmp_path: Path) -> None:
    study, progress = make(tmp_path, io.StringIO(), every_s=0.0)
    finish(study, progress, TrialState.COMPLETE, 90.0, {}, {"optim.lr": 0.01})
    attrs = {"confirms": "kd", "confirm_seed": 2, "confirm_epochs": 4, "confirm_key": "k", "confirm_source": "p"}
    out = finish(study, progress, TrialState.COMPLETE, 93.0, attrs)
    assert all("[confirm kd seed 2]" in line for line in out.splitlines())  # epoch lines and the finished line
    assert "c1/1" in out.splitlines()[-1]
    assert "best #0 90.00" in out  # a confirmation run is not a search trial: the best stays the search's


def test_without_the_study_the_first_lines_still_count_and_label(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path, n_trials=3)))
    study, stream = optuna.create_study(direction="maximize"), io.StringIO()
    out = finish(study, Progress(space, stream), TrialState.COMPLETE, 90.0, {}, {"optim.lr": 0.01})
    assert "1/3" in out and "complete 1 pruned 0 failed 0" in out


def test_on_a_terminal_the_epoch_is_one_live_line_closed_before_the_trial_line(tmp_path: Path) -> None:
    stream = Tty()
    study, progress = make(tmp_path, stream)
    out = finish(study, progress, TrialState.COMPLETE, 91.5, {}, {"optim.lr": 0.01})
    live, _, final = out.rpartition("\r")  # tqdm redraws with \r; its close clears the line
    assert "\n" not in live  # the bar never leaves lines behind: an interruption message is not glued to it
    assert "trial" in live and "1/3" in live
    assert final.strip().startswith("trial") and "COMPLETE" in final and final.endswith("\n")


def test_local_workers_never_draw_live_lines(tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    assert not Progress(space, Tty(), prefix="[w1] ").live


def test_epoch_bar_prints_plain_epoch_lines_with_eta_off_a_terminal() -> None:
    stream = io.StringIO()
    bar = EpochBar("teacher digits_cnn_large", 3, stream, every_s=0.0)
    for epoch in (1, 2, 3):
        bar(epoch, {"val_acc": 90.0 + epoch})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("teacher digits_cnn_large: epoch 3/3  val_acc  93.00")
    assert "eta 0:00" in lines[-1] and "\r" not in stream.getvalue()


def test_clock_formats_minutes_and_hours() -> None:
    assert (clock(65), clock(3723), clock(None)) == ("1:05", "1:02:03", "?")


def test_an_interruption_keeps_the_live_line_and_ends_it_with_a_newline(tmp_path: Path) -> None:
    stream = Tty()
    study, progress = make(tmp_path, stream)
    study.add_trial(create_trial(state=TrialState.RUNNING, params={}, distributions={}))
    progress.start(0, {"optim.lr": 0.01})
    progress.epoch(0, 2, {"val_acc": 52.0, "terms": {}})
    assert end_live_lines()  # what the command line does when it catches KeyboardInterrupt
    out = stream.getvalue()
    assert out.endswith("\n") and "2/4 ep" in out.rpartition("\r")[2]  # the last state stays, then a newline
    assert not end_live_lines()  # nothing left open: the caller prints its own newline if it wants one
