"""ackd-search command line: search / export / train / report / dashboard. Parses arguments, calls the package.

`search.py` at the repository root and `python -m ackd_search.cli` (how local workers are started) both run `main`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

COMMANDS = ("search", "export", "train", "report", "dashboard")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="search.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="run or resume a study (the default command)")
    s.add_argument("--space", required=True, help="search-space YAML file")
    s.add_argument("--n-trials", type=int, help="trials to add in this run (default: study.n_trials)")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--storage", help="SQLAlchemy URL overriding study.storage (e.g. postgresql://host/db)")
    s.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    s.add_argument("--backend", choices=("optuna", "ray"), default="optuna")
    s.add_argument("--address", help="Ray cluster to join (auto | host:port of a running one); default: a local Ray")
    s.add_argument("--seed-offset", type=int, default=0, help=argparse.SUPPRESS)  # set per local worker
    s.add_argument("--worker-tag", default="", help=argparse.SUPPRESS)
    s.add_argument("--no-requeue", action="store_true", help=argparse.SUPPRESS)  # the parent re-queues once
    e = sub.add_parser("export", help="write a trial as a complete run config")
    e.add_argument("--space", required=True)
    e.add_argument("--storage")
    e.add_argument("--trial", type=int, help="trial number (default: the best; required for a Pareto front)")
    e.add_argument("--epochs", type=int, help="full budget (default: study.final_epochs, else the trial budget)")
    e.add_argument("--out", help="output YAML (default: studies/<study>-best.yaml)")
    t = sub.add_parser("train", help="train a run config to the end and report test accuracy once")
    t.add_argument("--config", required=True)
    t.add_argument("--output-dir", help="checkpoints and results (default: studies/final/<config name>)")
    r = sub.add_parser("report", help="print a study's summary")
    r.add_argument("--space", required=True)
    r.add_argument("--storage")
    d = sub.add_parser("dashboard", help="serve optuna-dashboard for the study on 127.0.0.1")
    d.add_argument("--space", required=True)
    d.add_argument("--storage")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["search", *argv]
    return parser.parse_args(argv)


def _stop_on_signal(signum, frame):
    """SIGINT and SIGTERM stop the search the same way: the running trial is recorded as interrupted. Further
    signals are ignored while that record is written, so a second Ctrl-C cannot leave the trial RUNNING."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_search(args) -> int:
    from ackd_search.space import load_space
    from ackd_search.study import run_search, summary

    space = load_space(args.space)
    if args.backend == "ray":
        from ackd_search.ray_backend import run_ray_search

        study = run_ray_search(space, n_trials=args.n_trials, storage_url=args.storage, address=args.address,
                               timeout_s=args.timeout, seed_offset=args.seed_offset)
    elif args.workers > 1:
        from ackd_search.workers import run_workers

        return run_workers(args, space)
    else:
        study = run_search(space, args.n_trials, args.timeout, args.storage, seed_offset=args.seed_offset,
                           tag=args.worker_tag, requeue=not args.no_requeue)
    print(summary(study))
    return 0


def cmd_export(args) -> int:
    from ackd_search.export import load_existing_study, select_trial, write_export
    from ackd_search.space import load_space

    space = load_space(args.space)
    study = load_existing_study(space, args.storage)
    trial = select_trial(study, args.trial)
    out = Path(args.out or f"studies/{space.study.name}-best.yaml")
    cfg = write_export(space, study, trial, out, args.epochs)
    print(f"wrote {out}: trial #{trial.number}, {cfg.optim.epochs} epochs, distill.method {cfg.distill.method}")
    return 0


def cmd_train(args) -> int:
    from ackd_search.config import load_run_config
    from ackd_search.trainer import train

    cfg = load_run_config(args.config)
    cfg.output_dir = args.output_dir or cfg.output_dir or f"studies/final/{Path(args.config).stem}"
    cfg.eval_test = True

    def show(epoch: int, metrics: dict) -> None:
        note = " (restored from checkpoint)" if metrics.get("resumed") else ""
        print(f"epoch {epoch:>4}/{cfg.optim.epochs}  val_acc {metrics['val_acc']:6.2f}  "
              f"loss {metrics['terms']['loss']:.4f}  lr {metrics['lr']:.4g}{note}", flush=True)

    result = train(cfg, reporter=show)
    print(f"final: student {cfg.student} val_acc {result.final_val_acc:.2f}  test_acc {result.test_acc:.2f}  "
          f"({result.student_params:,} params, {result.student_flops / 1e6:.2f} MFLOPs; {result.device}); "
          f"results in {cfg.output_dir}")
    return 0


def cmd_report(args) -> int:
    from ackd_search.export import load_existing_study
    from ackd_search.space import load_space
    from ackd_search.study import summary

    print(summary(load_existing_study(load_space(args.space), args.storage)))
    return 0


def cmd_dashboard(args) -> int:
    from ackd_search.space import load_space
    from ackd_search.study import StudyPaths

    space = load_space(args.space)
    url = args.storage or space.storage_url
    artifacts = StudyPaths.for_space(space).artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    # The dashboard installed beside this Python, so it works without activating the virtual environment.
    exe = Path(sys.executable).parent / "optuna-dashboard"
    cmd = [str(exe) if exe.exists() else "optuna-dashboard", "--host", args.host, "--port", str(args.port),
           "--artifact-dir", str(artifacts), url]
    print(f"serving {space.study.name!r} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    from ackd_search.errors import USER_ERRORS
    from ackd_search.study import quiet_optuna

    quiet_optuna()

    commands = {"search": cmd_search, "export": cmd_export, "train": cmd_train, "report": cmd_report,
                "dashboard": cmd_dashboard}
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial is recorded as FAIL (interrupted) and resumes from its last epoch "
              "checkpoint when you run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
