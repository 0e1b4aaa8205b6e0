#!/usr/bin/env bash
# The GPU check: ONE script, run from the repository root on a lent GPU machine (one H200: about 6-7 minutes, never
# past GPU_CHECK_BUDGET_S, default 465 s), with .wheels/ carried beside the checkout (benchmarks/gpu_wheels.sh):
#
#   benchmarks/gpu_check.sh            # everything below
#   benchmarks/gpu_check.sh install    # only step 1 (what the machine lacks, into $GPU_CHECK_SITE)
#
#   1. install, from .wheels with --no-index --no-deps into $GPU_CHECK_SITE (on PYTHONPATH, ahead of the system's),
#      each package the machine lacks or has older than the set needs; never torch or torchvision
#   2. versions (Python, torch, CUDA, the GPU) and `nvidia-smi -L`; `import ackd_search`
#   3. the CUDA tests: tests/test_cuda_graphs.py tests/test_captured_step.py tests/test_gpu_sharing.py
#   4. bench_train.py: the plain DataLoader loop, then KD, ACKD and ACKD on features, each eager, captured, captured
#      with the teacher cache on the GPU and with its per-epoch gather; batch 64   -> results/train-<gpu>.json
#   5. bench_pack.py: KD and ACKD, 1, 2, 4, 8 captured trials without and with MPS (a daemon of its own, pipe and
#      log folders under /tmp) against one eager trial                               -> results/pack-<gpu>.json
#   6. results/gpu-check-<gpu>.json: every step's exit code, time and last lines, the tests' counts
# A failing step is recorded and the next one runs; every step has its own time limit, cut to what is left. The
# JSON files are also copied to $OUT when it is set (the device tool's output folder), with the logs.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/ackd-gpu-site}
WHEELS=${GPU_CHECK_WHEELS:-.wheels}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
LOGS=$(mktemp -d /tmp/gpu-check-logs.XXXX)
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-465}))
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$SITE" "$RESULTS"
: > "$LOGS/steps.tsv"

# step NAME LIMIT_S COMMAND...: run it under `timeout` (cut to the time left), log it, record its exit code.
step() {
  local name=$1 limit=$2 left
  shift 2
  left=$((DEADLINE - $(date +%s) - 15))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 20 ]; then
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$LOGS/steps.tsv"
    echo "== $name: skipped, the check's time is spent"
    return
  fi
  echo "== $name (limit ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$LOGS/steps.tsv"
  tail -n 25 "$LOGS/$name.log"
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s"
}

left_for() {  # seconds a benchmark may plan for: its share, cut to what is left, minus a margin for its last row
  local want=$1 left
  left=$((DEADLINE - $(date +%s) - $2))
  if [ "$left" -lt "$want" ]; then echo "$left"; else echo "$want"; fi
}

install_missing() {
  "$PY" - "$WHEELS" "$SITE" <<'EOF'
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

wheels_dir, site = Path(sys.argv[1]), sys.argv[2]
NEVER = {"torch", "torchvision"}  # the machine's own builds


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = {canon(p.name.split("-")[0]): p for p in sorted(wheels_dir.glob("*.whl"))}
if not wheels:
    sys.exit(f"no wheels in {wheels_dir}: run benchmarks/gpu_wheels.sh where pip reaches the registry")


def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def pip_install(names):
    """Into `site`, all at once; when that fails, one by one, so one bad wheel costs only itself."""
    def run(group):
        return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-index", "--find-links", str(wheels_dir), "--no-deps", "--upgrade", "--target",
                               site, *[str(wheels[n]) for n in group]], check=False).returncode == 0
    names = sorted(names)
    if not names:
        return
    failed = [] if run(names) else [n for n in names if not run([n])]
    print("installed into", site + ":", ", ".join(n for n in names if n not in failed))
    if failed:
        print("FAILED to install:", ", ".join(failed))
        global install_failed
        install_failed = True


install_failed = False


missing = {n for n in wheels if n not in NEVER and installed(n) is None}
pip_install(missing)
# Now `packaging` is importable: a package the machine has, older than a requirement of the set, is shadowed too.
sys.path.insert(0, site)
from packaging.requirements import Requirement  # noqa: E402

older = set()
for name, path in wheels.items():
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
    for line in requires:
        req = Requirement(line)
        dep = canon(req.name)
        if (req.marker is not None and not req.marker.evaluate({"extra": ""})) or dep in NEVER or dep not in wheels:
            continue
        have = installed(dep)
        if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
            print(f"{dep} {have} is older than {name} needs ({line}): the set's wheel shadows it")
            older.add(dep)
pip_install(older - missing)
print("present already:", ", ".join(sorted(n for n in wheels if n not in missing | older)) or "none")
sys.exit(1 if install_failed else 0)
EOF
}

versions() {
  nvidia-smi -L
  "$PY" -c 'import sys, torch, torchvision; print(sys.version); print("torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  "$PY" -m pip list --path "$SITE" 2>/dev/null
}

export PY WHEELS SITE
export -f install_missing versions
step install 120 bash -c install_missing
if [ "${1:-all}" = "install" ]; then cat "$LOGS/install.log"; exit 0; fi

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
SLUG=$(echo "${GPU:-unknown gpu}" | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
step versions 60 bash -c versions
step import 60 "$PY" -c "import ackd_search, optuna, timm, matplotlib; print('import ackd_search: ok', \
ackd_search.__version__, 'optuna', optuna.__version__, 'timm', timm.__version__)"
step tests 170 "$PY" -m pytest tests/test_cuda_graphs.py tests/test_captured_step.py tests/test_gpu_sharing.py \
  -q -p no:cacheprovider --junitxml="$LOGS/junit.xml"
step bench_train 150 "$PY" benchmarks/bench_train.py --device cuda --batch-size 64 --steps 150 --warmup 20 \
  --repeats 2 --rows reference,project-kd,project-ackd,project-ackd-features \
  --modes eager,captured,captured-cache,captured-cache-epoch --budget-s "$(left_for 115 60)" \
  --out "$RESULTS/train-$SLUG.json"
step bench_pack 150 "$PY" benchmarks/bench_pack.py --methods kd,ackd --procs 1,2,4,8 --steps 150 --warmup 20 \
  --budget-s "$(left_for 100 70)" --out "$RESULTS/pack-$SLUG.json"

# An MPS daemon bench_pack started and could not stop (it was killed): stopped here, by its own pipe folder.
for pipe in /tmp/bench-pack-mps-*/pipe; do
  [ -d "$pipe" ] && echo quit | CUDA_MPS_PIPE_DIRECTORY="$pipe" timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1
done

"$PY" - "$LOGS" "$RESULTS/gpu-check-$SLUG.json" "${GPU:-unknown}" "$(($(date +%s) - START))" <<'EOF'
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

logs, out, gpu, took = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
steps = []
for line in (logs / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    log = logs / f"{name}.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-15:] if log.exists() else []
    steps.append({"step": name, "exit": rc, "seconds": int(seconds), "ok": rc == "0", "tail": tail})
tests = None
if (logs / "junit.xml").exists():
    suite = ET.parse(logs / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
report = {"gpu": gpu, "seconds": took, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": steps,
          "tests": tests}
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out}: " + ", ".join(f"{s['step']} {s['exit']}" for s in steps) + f"; {took} s")
EOF

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu-check-logs"
  cp "$RESULTS"/*"-$SLUG.json" "$OUT"/ 2>/dev/null
  cp "$LOGS"/* "$OUT/gpu-check-logs"/ 2>/dev/null
  echo "copied results and logs to $OUT"
fi
