"""The README's digits-search figures: `search.py --space spaces/digits.yaml` run as a user runs it, against a fresh
temporary storage, runs, artifacts and teacher cache (so the teacher is trained too, as from an empty `studies/`),
timed end to end; then the study is read back for the trial counts, the best search value and the confirmation
table, printed and written as JSON.

  python benchmarks/digits_search.py [--space spaces/digits.yaml] [--out benchmarks/results/digits-search.json]
                                     [--reuse-teacher]   # read studies/teachers instead of training a fresh one
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from ackd_search.searching.compare import (  # noqa: E402
    baseline,
    confirmed,
    paired_difference,
    strongest_baseline,
    winner_of,
)
from ackd_search.searching.confirm import confirmation_runs  # noqa: E402
from ackd_search.searching.confirming import open_confirmation_if_any  # noqa: E402
from ackd_search.searching.record import StudyPaths, search_trials  # noqa: E402
from ackd_search.searching.space import load_space  # noqa: E402
from ackd_search.view.tables import confirmation_table  # noqa: E402


def temporary_space(space: Path, tmp: Path, reuse_teacher: bool) -> tuple[Path, str, str]:
    """The user's space file, unchanged except where it writes: storage, runs, artifacts (and teacher cache)."""
    data = yaml.safe_load(space.read_text())
    name = data["study"]["name"]
    storage = f"sqlite:///{tmp / (name + '.db')}"
    data["study"].update(storage=storage, runs_dir=str(tmp / f"{name}-runs"),
                         artifacts_dir=str(tmp / f"{name}-artifacts"))
    if not reuse_teacher:
        data["run"].setdefault("teacher", {})["cache_dir"] = str(tmp / "teachers")
    path = tmp / space.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, name, storage


def run_search(space: Path) -> tuple[float, int, list[str]]:
    """`python search.py --space FILE` from the repository root; its output is shown live and kept."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "search.py", "--space", str(space)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    return time.perf_counter() - started, code, lines


def by_state(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def clean(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def difference(a, b) -> dict | None:
    if b is None or a is b:
        return None
    d = paired_difference(a, b)
    if d is None:
        return None
    return {"mean": clean(d.mean), "low": clean(d.low), "high": clean(d.high), "n_seeds": d.n_seeds,
            "n_images": d.n_images, "method": d.method, "separable": bool(d.separable)}


def confirmation_rows(results: list) -> list[dict]:
    kd, ref = baseline(results, "kd"), baseline(results, "reference")
    strongest = strongest_baseline(results, other_than=winner_of(results))
    return [{"label": c.label, "method": c.method, "source": c.source, "n": len(c.by_seed),
             "mean": round(c.mean, 3), "std": None if math.isnan(c.std) else round(c.std, 3),
             "by_seed": {str(s): round(v, 3) for s, v in sorted(c.by_seed.items())},
             "vs_kd": difference(c, kd), "vs_strongest_baseline": difference(c, strongest),
             "strongest_baseline": strongest.label if strongest else None,
             "vs_reference": difference(c, ref)} for c in results]


def summarise(study: optuna.Study, wall_s: float, code: int, lines: list[str], args, space: Path) -> dict:
    paths = StudyPaths.for_space(load_space(space))
    search = study.get_trials(deepcopy=False)
    confirm = confirmation_runs(study, open_confirmation_if_any(study))
    results = confirmed(confirm, paths)
    best = search_trials(study)
    top = winner_of(results)
    return {
        "command": f"python search.py --space {args.space}",
        "space": str(args.space),
        "exit_code": code,
        "wall_time_s": round(wall_s, 1),
        "teacher": "trained in this run" if not args.reuse_teacher else "read from studies/teachers",
        "search_trials_by_state": by_state(search),
        "confirmation_runs_by_state": by_state(confirm),
        "best_search_trial": ({"number": best[0].number, "val_acc": round(best[0].values[0], 3),
                               "preset": best[0].user_attrs.get("preset"), "params": best[0].params}
                              if best else None),
        "confirmation": confirmation_rows(results),
        "confirmation_table": confirmation_table(results),
        "winner": None if top is None else {"label": top.label, "mean": round(top.mean, 3), "n": len(top.by_seed)},
        "terminal_output": lines,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "optuna": optuna.__version__,
                    "load_average_before": [round(x, 2) for x in args.load_before]},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def table(result: dict) -> str:
    s, c = result["search_trials_by_state"], result["confirmation_runs_by_state"]
    best = result["best_search_trial"]
    lines = [f"{result['command']}: {result['wall_time_s']:.0f} s wall ({result['teacher']}; "
             f"exit {result['exit_code']})",
             "search trials: " + ", ".join(f"{k.lower()} {v}" for k, v in s.items()),
             "confirmation runs: " + (", ".join(f"{k.lower()} {v}" for k, v in c.items()) or "none"),
             f"best search trial: #{best['number']} val_acc {best['val_acc']:.2f}" if best else "no complete trial",
             "", *result["confirmation_table"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="spaces/digits.yaml")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digits-search.json"))
    parser.add_argument("--reuse-teacher", action="store_true", help="read the teacher from studies/teachers")
    args = parser.parse_args()
    args.load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="digits-search-") as tmp:
        space, name, storage = temporary_space(ROOT / args.space, Path(tmp), args.reuse_teacher)
        wall_s, code, lines = run_search(space)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.load_study(study_name=name, storage=storage)
        result = summarise(study, wall_s, code, lines, args, space)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table(result) + f"\n\nwrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
