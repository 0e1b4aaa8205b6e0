#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, downloaded HERE (pip reaches the registry) into .wheels/ for
# benchmarks/gpu_check.sh to install there without a network (the device tool carries ignored paths up to 64 MiB).
#
#   benchmarks/gpu_wheels.sh [DEST]        # default .wheels; run from anywhere, works in the repository root
#
# What that machine has (../shared/facts.md, "On a GPU machine"): Python 3.12, torch 2.11 + torchvision 0.26 (and
# so numpy, pillow, filelock, fsspec, jinja2, markupsafe, typing-extensions, sympy, networkx), scikit-learn (and so
# scipy, joblib, threadpoolctl), PyYAML; no Optuna, SQLAlchemy or Ray. `import ackd_search` imports the whole package
# (its face re-exports the API), so the set is what that import, the tests and the benchmarks need on top:
#   optuna + alembic, SQLAlchemy, Mako, MarkupSafe, colorlog, tqdm, packaging, typing-extensions, greenlet
#     (SQLAlchemy 2.1 needs greenlet only for asyncio; carried because the last GPU run had it, 0.6 MB)
#   optuna-dashboard + bottle                          (view/notes.py saves notes through it)
#   matplotlib + contourpy, cycler, fonttools, kiwisolver, pyparsing, python-dateutil, tzdata   (view/plots.py)
#   timm + huggingface_hub (+ hf-xet, httpx2, httpcore2, anyio, h11, idna, truststore, click), safetensors,
#     filelock, fsspec                                  (models/timm_models.py, models/weights.py)
#   pytest + pluggy, iniconfig, Pygments               (the CUDA tests; pyproject's filterwarnings names optuna)
# Never torch or torchvision: the machine's own builds are used. Ray is not imported by any of it.
# Versions are this project's pins and this machine's environment. Every wheel is for CPython 3.12 on x86-64 Linux.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.wheels}
PY=${PYTHON:-$ROOT/.venv/bin/python}
LIMIT_MB=60

PACKAGES=(
  optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 MarkupSafe==3.0.4 colorlog==6.12.0 tqdm==4.70.1
  packaging==26.4 typing-extensions==4.16.0 greenlet==3.2.4
  optuna-dashboard==0.21.0 bottle==0.13.4
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3
  python-dateutil==4.0.0 tzdata==2026.6
  timm==1.0.31 huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0
  idna==3.20 truststore==0.10.5 click==8.5.1 safetensors==0.8.0 filelock==4.3.1 fsspec==2026.9.0
  pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1 Pygments==2.21.0
)
TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for glibc in 2014 _2_17 _2_24 _2_27 _2_28 _2_31 _2_34; do
  TAGS+=(--platform "manylinux${glibc}_x86_64")
done
TAGS+=(--platform any)

mkdir -p "$DEST"
# --no-deps: the list above is the whole set, so nothing the machine has (numpy, torch) is fetched.
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps "${TAGS[@]}" -d "$DEST" "${PACKAGES[@]}"

# The set is closed: every requirement of every wheel (markers read for CPython 3.12 on Linux x86-64) is another
# wheel of the set at a fitting version, or something the GPU machine has.
"$PY" - "$DEST" <<'EOF'
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ON_THE_MACHINE = {"torch", "torchvision", "numpy", "pillow", "scipy", "scikit-learn", "joblib", "threadpoolctl",
                  "pyyaml", "jinja2", "networkx", "sympy", "mpmath", "setuptools", "triton"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels = {}
for path in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(path.name)
    wheels[canonicalize_name(name)] = (version, path)
missing = []
for name, (version, path) in wheels.items():
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        dep = canonicalize_name(req.name)
        if dep in ON_THE_MACHINE:
            continue
        have = wheels.get(dep)
        if have is None or (req.specifier and not req.specifier.contains(have[0], prereleases=True)):
            missing.append(f"{name} {version} needs {line} (have {have[0] if have else 'nothing'})")
if missing:
    sys.exit("the wheel set is not closed:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels, closed over their requirements (given what the GPU machine has)")
EOF

total_kb=$(du -sk "$DEST" | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((total_kb / 1024)) MiB in $DEST"
if [ "$total_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "over ${LIMIT_MB} MiB: the device tool carries at most 64 MiB of ignored paths" >&2
  exit 1
fi
