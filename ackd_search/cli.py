"""ackd-search command line: search / export / train / report / dashboard. Parses arguments, calls the package.

`search.py` at the repository root and `python -m ackd_search.cli` (how local workers are started) both run `main`."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import signal
import socket
import sys
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore
from optuna_dashboard import run_server

from ackd_search import __version__
from ackd_search.backends.local import confirm_study, run_search
from ackd_search.backends.workers import run_workers
from ackd_search.config import load_run_config
from ackd_search.errors import CheckpointError, ConfigError, DataError, ModelError, StudyError, UsageError, WeightsError
from ackd_search.searching.confirm import min_seeds
from ackd_search.searching.confirming import interrupted_here
from ackd_search.searching.record import StudyPaths, confirm_study_name
from ackd_search.searching.space import load_space
from ackd_search.searching.study import open_existing_study, quiet_optuna
from ackd_search.training import run_training
from ackd_search.view.export import describe, select_trial, write_export
from ackd_search.view.progress import EpochBar, end_live_lines
from ackd_search.view.report import write_report
from ackd_search.view.summary import summary

# The errors a user can cause: printed as one line on stderr with exit code 2, never a traceback.
USER_ERRORS = (ConfigError, DataError, ModelError, WeightsError, StudyError, CheckpointError, UsageError)

COMMANDS = {
    "search": "run or resume the study a space file names (the default command)",
    "confirm": "retrain the study's best configurations and the baselines over seeds (resumable)",
    "export": "write the confirmed winner's (or a trial's) run config, at the full budget, for train",
    "train": "train a run config to the end and read the test set once",
    "report": "print a study's summary and write its plots, confirmation table and trials CSV into a folder",
    "dashboard": "serve optuna-dashboard for the study and its confirmation (127.0.0.1:8080)",
}
DESCRIPTION = ("Search knowledge-distillation configurations (ACKD and KD hyperparameters and the student's\n"
               "auxiliary learners) with Optuna, then export the best one and train it to the end.")
EPILOG = ("with no command, search is meant: search.py --space spaces/digits.yaml\n"
          "search.py COMMAND --help lists the options of a command")


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive(kind: type):
    """An argparse type for counts (int, >= 1) and durations (float, > 0): 0, negatives, nan and inf refused."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be {'>= 1' if kind is int else '> 0'}, got {text}")
        return value

    return parse


POSITIVE_INT, POSITIVE_SECONDS = _positive(int), _positive(float)


def _workers(text: str) -> int | str:
    """`auto` or a count >= 1."""
    return "auto" if text == "auto" else POSITIVE_INT(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="search.py", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ackd-search {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("search", help=COMMANDS["search"], description=COMMANDS["search"])
    s.add_argument("--space", required=True, help="search-space YAML file")
    s.add_argument("--n-trials", type=POSITIVE_INT,
                   help="trials to add in this run, >= 1 (default: study.n_trials; if unset, until --timeout or "
                        "Ctrl-C)")
    s.add_argument("--timeout", type=POSITIVE_SECONDS, help="stop starting trials after this many seconds (> 0)")
    s.add_argument("--storage", help="SQLAlchemy URL overriding study.storage (e.g. postgresql://host/db)")
    s.add_argument("--workers", type=_workers,
                   help="local worker processes sharing the study: N >= 1, or auto (trials packed on every visible "
                        "GPU, one per core without CUDA); default 1; not with --backend ray, which sizes itself from "
                        "study.ray")
    s.add_argument("--backend", choices=("optuna", "ray"), default="optuna",
                   help="run trials in this process (optuna, the default) or under Ray Tune (ray)")
    s.add_argument("--address", help="Ray cluster to join (auto | host:port of a running one); default: a local Ray")
    s.add_argument("--seed-offset", type=int, default=0, help=argparse.SUPPRESS)  # set per local worker
    s.add_argument("--worker-tag", default="", help=argparse.SUPPRESS)
    s.add_argument("--no-requeue", action="store_true", help=argparse.SUPPRESS)  # the parent re-queues once
    s.add_argument("--no-confirm", action="store_true",
                   help="skip the confirmation of the candidates over seeds (run it later with `confirm`)")
    c = sub.add_parser("confirm", help=COMMANDS["confirm"], description=COMMANDS["confirm"])
    c.add_argument("--space", required=True, help="search-space YAML file of the study")
    c.add_argument("--storage", help="SQLAlchemy URL overriding study.storage")
    e = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"])
    e.add_argument("--space", required=True, help="the space file the study was created from")
    e.add_argument("--storage", help="SQLAlchemy URL overriding study.storage")
    e.add_argument("--trial", type=int, help="trial number (default: the best; required for a Pareto front)")
    e.add_argument("--epochs", type=POSITIVE_INT,
                   help="full budget, >= 1 (default: study.final_epochs, else the trial's budget)")
    e.add_argument("--out", help="output YAML file (default: studies/<study>-best.yaml)")
    e.add_argument("--force", action="store_true", help="overwrite an earlier export at --out")
    t = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    t.add_argument("--config", required=True, help="run config YAML (as written by export)")
    t.add_argument("--output-dir", help="checkpoints and results (default: output_dir, else studies/final/<config "
                                        "name>)")
    t.add_argument("--force", action="store_true",
                   help="train again from scratch when --output-dir already holds a finished run")
    t.add_argument("--epochs", type=POSITIVE_INT,
                   help="the budget, >= 1, instead of the config's optim.epochs (the lr schedule scales with it)")
    r = sub.add_parser("report", help=COMMANDS["report"], description=COMMANDS["report"])
    r.add_argument("--space", required=True, help="the space file the study was created from")
    r.add_argument("--storage", help="SQLAlchemy URL overriding study.storage")
    r.add_argument("--out", help="folder for the plots, tables and trials CSV (default: studies/<study>-report/)")
    d = sub.add_parser("dashboard", help=COMMANDS["dashboard"], description=COMMANDS["dashboard"])
    d.add_argument("--space", required=True, help="the space file the study was created from")
    d.add_argument("--storage", help="SQLAlchemy URL overriding study.storage")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=POSITIVE_INT, default=8080, help="port to serve on (default 8080)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(COMMANDS)}"
        if argv[0].endswith((".yaml", ".yml")):
            hint = f"did you mean --space {argv[0]}?"
        parser.exit(2, f"error: unknown command {argv[0]!r}; {hint}\n")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv = ["search", *argv]  # `search.py --space x` means `search.py search --space x`
    args = parser.parse_args(argv)
    if args.command == "search":
        if args.workers is not None and args.backend == "ray":
            parser.exit(2, "error: --workers is for --backend optuna; Ray runs study.ray.max_concurrent trials at "
                           "once (set it in the space file)\n")
        args.workers = args.workers or 1
    return args


# What an interruption leaves, per command, when no trial was running (data read, teacher trained, between trials).
INTERRUPTED = {
    "confirm": "no confirmation run was running; `confirm` again resumes the confirmation",
    "search": "no trial was running; run the same command again to go on",
    "train": "run the same command again to resume from the last epoch checkpoint",
}


def interruption(args: argparse.Namespace) -> str:
    """What this interruption left behind, naming the trials it stopped (read back from the study)."""
    if args.command not in ("search", "confirm"):
        return INTERRUPTED.get(args.command, "stopped before finishing")
    try:
        stopped = interrupted_here(load_space(args.space), args.storage)
    except Exception:  # the study is not reachable: say what the command leaves in general
        stopped = None
    if not stopped:
        return INTERRUPTED[args.command] if stopped is not None else "stopped; run the same command again to go on"
    again = "`confirm`" if args.command == "confirm" else "the same command"
    return (f"{', '.join(stopped)} recorded as FAIL (interrupted); {again} again re-runs "
            f"{'it' if len(stopped) == 1 else 'them'} from the last epoch checkpoint")


def _stop_on_signal(signum, frame):
    """SIGINT and SIGTERM stop the search the same way: the running trial is recorded as interrupted. Further
    signals are ignored while that record is written, so a second Ctrl-C cannot leave the trial RUNNING."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_search(args) -> int:
    space = load_space(args.space)
    if args.backend == "ray":
        from ackd_search.backends.ray_run import run_ray_search  # Ray is loaded only when asked for

        study = run_ray_search(space, n_trials=args.n_trials, storage_url=args.storage, address=args.address,
                               timeout_s=args.timeout, seed_offset=args.seed_offset, confirm=not args.no_confirm)
    elif args.workers == "auto" or args.workers > 1:
        return run_workers(args, space)
    else:
        study = run_search(space, args.n_trials, args.timeout, args.storage, seed_offset=args.seed_offset,
                           tag=args.worker_tag, requeue=not args.no_requeue, confirm=not args.no_confirm)
    if not args.worker_tag:  # a local worker: its parent prints the one summary
        print(summary(study, space))
    return 0


def cmd_export(args) -> int:
    space = load_space(args.space)
    study = open_existing_study(space, args.storage)
    chosen = select_trial(study, args.trial, StudyPaths.for_space(space), min_seeds(space))
    out = Path(args.out or f"studies/{space.study.name}-best.yaml")
    cfg = write_export(space, study, chosen.trial, out, args.epochs, force=args.force)
    print(f"exporting {chosen.why}")
    print(f"wrote {out}: {describe(chosen.trial)}, {cfg.optim.epochs} epochs, distill.method {cfg.distill.method}")
    return 0


def cmd_train(args) -> int:
    cfg = load_run_config(args.config)
    if args.epochs is not None:
        cfg.optim.epochs = args.epochs  # the schedule scales with it (milestones are in recipe epochs)
    cfg.output_dir = args.output_dir or cfg.output_dir or f"studies/final/{Path(args.config).stem}"
    cfg.eval_test = True
    _refuse_or_clear_finished_run(Path(cfg.output_dir), args.force)

    def show(epoch: int, metrics: dict) -> None:
        note = " (restored from checkpoint)" if metrics.get("resumed") else ""
        print(f"epoch {epoch:>4}/{cfg.optim.epochs}  val_acc {metrics['val_acc']:6.2f}  "
              f"loss {metrics['terms']['loss']:.4f}  lr {metrics['lr']:.4g}{note}", flush=True)

    result = run_training(cfg, reporter=show, teacher_progress=EpochBar)
    print(f"final: student {cfg.student} val_acc {result.final_val_acc:.2f}  test_acc {result.test_acc:.2f}  "
          f"({result.student_params:,} params, {result.student_flops / 1e6:.2f} MFLOPs; {result.device}); "
          f"results in {cfg.output_dir}")
    return 0


def _refuse_or_clear_finished_run(run_dir: Path, force: bool) -> None:
    """A finished run is not trained again by accident (that would read the test set again and overwrite its
    result); with `force` its checkpoint and results are removed, so it trains from scratch."""

    result = run_dir / "result.json"
    if not result.exists():
        return  # new, or interrupted: `train` resumes from its last epoch checkpoint
    if force:
        for name in ("checkpoint.pt", "result.json", "student.pt"):
            (run_dir / name).unlink(missing_ok=True)
        return
    try:
        test_acc = f"{json.loads(result.read_text())['test_acc']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        test_acc = "unreadable"
    raise UsageError(f"{run_dir} already trained (test_acc {test_acc}); use --output-dir for a new run or --force "
                     "to retrain")


def cmd_report(args) -> int:
    space = load_space(args.space)
    study = open_existing_study(space, args.storage)
    print(summary(study, space))
    written = write_report(study, Path(args.out or f"studies/{space.study.name}-report"), space=space)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_confirm(args) -> int:
    space = load_space(args.space)
    print(summary(confirm_study(space, args.storage), space))
    return 0


def _check_port(host: str, port: int) -> None:
    """A port another program listens on is one line, with a free one to use instead."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return
        except OSError as err:
            reason = err.strerror or str(err)
    with socket.socket() as free:
        free.bind((host, 0))
        other = free.getsockname()[1]
    raise UsageError(f"dashboard: cannot serve on {host}:{port} ({reason}); allowed: a free --port, "
                     f"e.g. --port {other}")


def cmd_dashboard(args) -> int:
    space = load_space(args.space)
    url = args.storage or space.storage_url
    study = open_existing_study(space, url)  # a study that is not there is reported, not created empty
    artifacts = StudyPaths.for_space(space).artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    _check_port(args.host, args.port)
    print(f"serving {space.study.name!r} (and {confirm_study_name(space.study.name)!r}, its confirmation) on "
          f"http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    # In this process, not as a command: the storage URL, password included, stays off every command line.
    try:
        run_server(study._storage, host=args.host, port=args.port,
                   artifact_store=FileSystemArtifactStore(str(artifacts)))
    except KeyboardInterrupt:  # Ctrl-C is how a dashboard stops
        print("dashboard stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    previous = {signum: signal.signal(signum, _stop_on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    finally:  # in-process callers (tests, notebooks) get their own handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    quiet_optuna()

    commands = {"search": cmd_search, "confirm": cmd_confirm, "export": cmd_export, "train": cmd_train,
                "report": cmd_report, "dashboard": cmd_dashboard}
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not end_live_lines() and sys.stderr.isatty():
            print(file=sys.stderr)  # end the live progress line this message would otherwise be glued to
        print(f"interrupted: {interruption(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
