"""How good is the search? A tabular benchmark of ackd-search's samplers and pruners.

Every configuration's whole learning curve is recorded once (`record`, then `compact` into a table), then the
product's own samplers and pruners are replayed against the table many times, cheaply (`replay`): a trial samples
through `space.suggest` as the product does and "trains" by reading the curve of the nearest recorded
configuration (one of its seeds at random), reporting each epoch and stopping when the pruner says so.

  python benchmarks/search_replay.py record --task digits --n-configs 160 --seeds 0 1 --workers 1
  python benchmarks/search_replay.py compact --task digits --wall-s S   # -> benchmarks/results/replay-table-digits.json
  python benchmarks/search_replay.py replay [--tables ...] [--seeds 25] [--gp-seeds 6]   # -> search-replay.json
  python benchmarks/search_replay.py report [--default "tpe + percentile90 w{d}"]   # re-judge a saved replay

The committed tables (digits 91 x 2 seeds, shapes 51 x 2) were recorded both at once, one worker each, for 57.8
minutes on 2 shared CPU cores, and stopped there (`record` is resumable, `compact` keeps the configurations with
every seed). The recording's raw logs live in studies/replay/ (gitignored); the tables and the results are
committed. The settings replayed: report.py `settings`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = "tpe + percentile90 w{d}"  # the shipped spaces' choice, judged against the target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train sampled configurations to the end, several seeds (resumable)")
    rec.add_argument("--task", choices=["digits", "shapes"], required=True)
    rec.add_argument("--n-configs", type=int, required=True)
    rec.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    rec.add_argument("--workers", type=int, default=2)
    rec.add_argument("--limit", type=int, default=None, help="run at most this many (config, seed) jobs now")
    rec.add_argument("--log", default=None, help="JSON lines file (default studies/replay/runs-TASK.jsonl)")
    com = sub.add_parser("compact", help="the recorded runs -> the table JSON")
    com.add_argument("--task", choices=["digits", "shapes"], required=True)
    com.add_argument("--log", default=None)
    com.add_argument("--out", default=None, help="default benchmarks/results/replay-table-TASK.json")
    com.add_argument("--wall-s", type=float, default=None, help="the recording's wall time, for the metadata")
    com.add_argument("--note", default=None, help="how it was recorded (sharing, concurrency), for the metadata")
    rep = sub.add_parser("replay", help="replay samplers x pruners against the tables")
    rep.add_argument("--tables", nargs="+", default=[str(RESULTS / "replay-table-digits.json"),
                                                     str(RESULTS / "replay-table-shapes.json")])
    rep.add_argument("--seeds", type=int, default=50, help="sampler seeds per setting")
    rep.add_argument("--gp-seeds", type=int, default=None, help="seeds for the (slow) GP sampler; default --seeds")
    rep.add_argument("--n-trials", type=int, default=None,
                     help="most trials per TPE study (default: twice the table size; random 4x, GP 30)")
    rep.add_argument("--workers", type=int, default=2)
    rep.add_argument("--only", nargs="*", default=None, help="setting labels to run (default: all)")
    rep.add_argument("--out", default=str(RESULTS / "search-replay.json"))
    rep.add_argument("--default", default=DEFAULT, help="the default judged against the target ({d}: first decay)")
    jud = sub.add_parser("report", help="re-judge and reprint a saved replay for another default (no replaying)")
    jud.add_argument("--file", default=str(RESULTS / "search-replay.json"))
    jud.add_argument("--default", default=DEFAULT)
    args = parser.parse_args()

    if args.command in ("record", "compact"):
        from benchmarks.replay import record

        log = Path(args.log) if args.log else record.WORK / f"runs-{args.task}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        if args.command == "record":
            record.record(args.task, args.n_configs, args.seeds, args.workers, log, limit=args.limit)
        else:
            record.compact(log, Path(args.out) if args.out else RESULTS / f"replay-table-{args.task}.json",
                           args.wall_s, args.note)
        return 0
    from benchmarks.replay import report

    if args.command == "report":
        return report.rejudge(Path(args.file), args.default)
    return report.main(args)


if __name__ == "__main__":
    sys.exit(main())
