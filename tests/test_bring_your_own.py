"""Issue #16 end to end, on the command line and the Python API: an ImageFolder written here (grey, RGB and RGBA PNGs)
and an .npz searched with a timm student carrying ACKD learners and a torchvision teacher given as a state-dict file
in torchvision's own key names; export -> train reproducing a trial epoch for epoch; in-memory data and builders;
a teacher fine-tuned once from a checkpoint of other classes and read from the cache after; every bad input of the
issue as one line with exit code 2, the existing study untouched; the shipped imagefolder / imagenet spaces. CPU.

The nets are tiny at 16 px: timm's mobilenetv3_small_050 (4 stages, 0.57 M parameters) and torchvision's
mobilenet_v3_small (1.5 M); the teacher is untrained (it need not be good to be used)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torchvision
import yaml
from optuna.trial import TrialState
from PIL import Image
from tiny_space import run_cli, tiny_space, write
from torch import nn

import ackd_search.training.teachers as teachers_module
from ackd_search import export, load_space, search, train
from ackd_search.config import DataConfig, load_run_config
from ackd_search.data import get_splits, load_splits
from ackd_search.models import staging_problem
from ackd_search.searching.preflight import preflight
from ackd_search.searching.study import quiet_optuna

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("ant", "bee", "cat")
SIZE = 16
STUDENT = "timm:mobilenetv3_small_050"
TEACHER = "torchvision:mobilenet_v3_small"
EPOCHS = 2

quiet_optuna()


# --- inputs the tests write -----------------------------------------------------------------------------------------


def write_folder(root: Path, train: int = 20, val: int = 6, size: int = SIZE, seed: int = 0) -> Path:
    """root/{train,val}/<class>/<i>.png: every fourth image grey ("L"), one RGBA image in train/ant; each class has a
    bright channel of its own, so the data is learnable."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 160, (size, size, 3), dtype=np.uint8)
                pixels[..., c] += 95
                img = Image.fromarray(pixels)
                if i % 4 == 0:
                    img = img.convert("L")
                elif split == "train" and c == 0 and i == 1:
                    img = img.convert("RGBA")
                img.save(folder / f"{i:03d}.png")
    return root


def torchvision_teacher(path: Path, num_classes: int, in_chans: int = 3, seed: int = 0) -> Path:
    """torchvision's own mobilenet_v3_small for `num_classes` and `in_chans`, saved as a plain state dict (its key
    names: features.0.0.weight, classifier.3.weight, ...), as a user's training script writes it."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(num_classes=num_classes)
    if in_chans != 3:
        model.features[0][0] = nn.Conv2d(in_chans, 16, 3, stride=2, padding=1, bias=False)
    torch.save(model.state_dict(), path)
    return path


def byo_space(tmp: Path, name: str, data: dict, checkpoint: Path, n_trials: int = 3, **run) -> dict:
    """tiny_space with its data, student and teacher replaced by the user's: ACKD vs KD searched, learners up to three,
    no pruning (a 2-epoch trial is not cut)."""
    space = tiny_space(tmp, name=name, n_trials=n_trials, pruner={"name": "none"})
    space["run"].update(student=STUDENT, data=data, cpu_threads=1,
                        optim={"epochs": EPOCHS, "batch_size": 16, "lr": {"low": 0.01, "high": 0.1, "log": True}},
                        teacher={"arch": TEACHER, "checkpoint": str(checkpoint), "cache_dir": str(tmp / "teachers")})
    space["run"].update(run)
    space["learners"] = {"max_per_stage": 3, "max_total": 3}  # the reference point [3, 3, 3] fits
    return space


def artifact(space, trial, filename: str):
    store = optuna.artifacts.FileSystemArtifactStore(space.study.artifacts_dir)
    metas = optuna.artifacts.get_all_artifact_meta(trial, storage=optuna.storages.get_storage(space.storage_url))
    meta = next(m for m in metas if m.filename == filename)
    with store.open_reader(meta.artifact_id) as f:
        return json.load(f)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`search.py args` in a fresh process: what a user's next command line sees."""
    return subprocess.run([sys.executable, str(ROOT / "search.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


def assert_learners_trained(space, study, reference_placements: list[int]) -> None:
    """Every trial that ran is COMPLETE; the ACKD ones with learners in their configs and in their loss terms; the
    first is the reference point: three learners before the student's last stage."""
    ran = [t for t in study.trials if t.state != TrialState.WAITING]  # a preset the budget left queued is not run
    assert ran and [t.state for t in ran] == [TrialState.COMPLETE] * len(ran)
    reference = study.trials[0]
    assert reference.user_attrs["preset"] == "reference"
    for t in ran:
        config = artifact(space, t, "config.json")
        placements = config["distill"]["ackd"]["aux_placements"]
        if config["distill"]["method"] == "ackd" and t is reference:
            assert placements == reference_placements
        if config["distill"]["method"] == "ackd" and placements:
            assert t.user_attrs["aux_placements"] == placements
            assert any(k.startswith("aux1/") for k in artifact(space, t, "curve.json")[0]["terms"])


def assert_reproduced(space, trial, result: dict) -> None:
    """`train`'s validation curve is the trial's, epoch for epoch (its curve.json and its intermediate values)."""
    trained = [h["val_acc"] for h in result["history"]]
    assert [h["val_acc"] for h in artifact(space, trial, "curve.json")] == trained
    assert [trial.intermediate_values[e] for e in range(1, EPOCHS + 1)] == trained
    assert result["test_acc"] is not None


# --- an ImageFolder, on the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_study(tmp_path_factory):
    """One imagefolder search on the command line (3 trials x 2 epochs), shared by the tests that read it and by the
    bad-input tests, which must leave it untouched."""
    tmp = tmp_path_factory.mktemp("folder")
    root = write_folder(tmp / "images")
    checkpoint = torchvision_teacher(tmp / "teacher.pt", num_classes=3)
    data = {"name": "imagefolder", "data_root": str(root), "cache_dir": str(tmp / "decoded")}
    raw = byo_space(tmp, "folder", data, checkpoint)
    return tmp, raw, write(tmp / "space.yaml", raw)


def test_imagefolder_search_export_train(folder_study, capsys) -> None:
    tmp, raw, path = folder_study
    assert staging_problem(STUDENT) is None and staging_problem(TEACHER) is None
    code, out, err = run_cli(["--space", str(path), "--no-confirm"], capsys)
    assert code == 0, err
    assert "data imagefolder: 3 classes (ant, bee, cat), 48 / 18 / 12 images" in out  # 20% of train is the test
    assert f"teacher {TEACHER}: val_acc " in out and "data: decoded 78 images" in err
    space = load_space(path)
    study = optuna.load_study(study_name="folder", storage=space.storage_url)
    assert len(study.trials) == 3 and study.trials[2].state == TrialState.COMPLETE
    assert_learners_trained(space, study, [3, 3, 3])
    splits = get_splits(DataConfig(**raw["run"]["data"]))
    assert splits.classes == CLASSES and splits.in_channels == 3  # grey and RGBA images become RGB, as torchvision's
    teacher_acc = study.trials[0].user_attrs["teacher_val_acc"]
    assert 0 <= teacher_acc <= 100 and f"val_acc {teacher_acc:.2f}" in out
    assert all(t.user_attrs["teacher_arch"] == TEACHER for t in study.trials)

    out_file = tmp / "trial0.yaml"
    code, out, err = run_cli(["export", "--space", str(path), "--trial", "0", "--epochs", str(EPOCHS),
                              "--out", str(out_file)], capsys)
    assert code == 0, err
    cfg = load_run_config(out_file)
    assert cfg.student == STUDENT and cfg.teacher.checkpoint == raw["run"]["teacher"]["checkpoint"]
    assert cfg.distill.ackd.aux_placements == [3, 3, 3] and cfg.optim.epochs == EPOCHS
    run_dir = tmp / "final"
    done = cli("train", "--config", str(out_file), "--output-dir", str(run_dir))  # a fresh process: the decode cache
    assert done.returncode == 0, done.stderr
    assert "memory-mapped" in done.stderr and "data: decoded" not in done.stderr  # read, not decoded again
    assert_reproduced(space, study.trials[0], json.loads((run_dir / "result.json").read_text()))


# --- an .npz, on the command line -----------------------------------------------------------------------------------


def _grey_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 128, (n, SIZE, SIZE), dtype=np.uint8)
    for c in range(3):
        x[y == c, c * 5 : c * 5 + 5] += 127  # a bright band of rows per class
    return x, y


def test_npz_search_export_train(tmp_path, capsys) -> None:
    # N x H x W grey images: one channel, so the teacher's checkpoint has a one-channel first conv (torchvision's
    # keys, the conv swapped in the user's script) and timm builds the student with in_chans=1.
    (x, y), (xv, yv), (xt, yt) = _grey_arrays(48, 0), _grey_arrays(15, 1), _grey_arrays(15, 2)
    npz = tmp_path / "data.npz"
    np.savez(npz, x_train=x, y_train=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt, classes=np.array(CLASSES))
    checkpoint = torchvision_teacher(tmp_path / "grey-teacher.pt", num_classes=3, in_chans=1)
    path = write(tmp_path / "npz.yaml", byo_space(tmp_path, "npz", {"name": "arrays", "data_root": str(npz)},
                                                 checkpoint, n_trials=2))
    code, out, err = run_cli(["--space", str(path), "--no-confirm"], capsys)
    assert code == 0, err
    assert "data arrays: 3 classes (ant, bee, cat), 48 / 15 / 15 images" in out and "16x16, 1 channel" in out
    space = load_space(path)
    study = optuna.load_study(study_name="npz", storage=space.storage_url)
    assert_learners_trained(space, study, [3, 3, 3])
    assert "teacher_val_acc" in study.trials[0].user_attrs
    out_file = tmp_path / "trial0.yaml"
    code, _, err = run_cli(["export", "--space", str(path), "--trial", "0", "--epochs", str(EPOCHS), "--out",
                            str(out_file)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["train", "--config", str(out_file), "--output-dir", str(tmp_path / "final")], capsys)
    assert code == 0, err
    assert_reproduced(space, study.trials[0], json.loads((tmp_path / "final" / "result.json").read_text()))


# --- the Python API -------------------------------------------------------------------------------------------------


BUILDERS = """
    from torch import nn

    def small(num_classes, in_channels=3):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
        )
"""


def _rgb_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grey_arrays(n, seed)
    return np.repeat(x[..., None], 3, axis=-1), y  # N x H x W x C


def test_python_api_in_memory_data_and_builders(tmp_path, capsys) -> None:
    namespace: dict = {}
    exec(textwrap.dedent(BUILDERS), namespace)  # the same builder, once in memory and once as a py: file
    builder_file = tmp_path / "builders.py"
    builder_file.write_text(textwrap.dedent(BUILDERS))
    data = {"train": _rgb_arrays(48, 0), "val": _rgb_arrays(15, 1), "test": _rgb_arrays(15, 2)}
    checkpoint = torchvision_teacher(tmp_path / "teacher.pt", num_classes=3)
    raw = byo_space(tmp_path, "api", {"name": "digits"}, checkpoint, n_trials=1)  # run.data is replaced by `data`
    study = search(raw, data=data, student=namespace["small"], confirm=False)
    space_file = tmp_path / "api-space.yaml"  # written beside the study, for the command line
    assert_learners_trained(load_space(space_file), study, [2, 2, 2])  # the builder's 3 stages
    stored = yaml.safe_load(space_file.read_text())
    assert stored["run"]["student"] == "python:api-student" and stored["run"]["data"]["name"] == "arrays"
    assert Path(stored["run"]["data"]["data_root"]).parent == tmp_path / "api-data"
    # This process has the builder: export (given the same inputs as search, or the space file) and train work.
    cfg = export(raw, data=data, student=namespace["small"], trial=0, epochs=EPOCHS)
    assert cfg == export(space_file, trial=0, epochs=EPOCHS) and cfg.student == "python:api-student"
    result = train(cfg, output_dir=tmp_path / "final")
    assert_reproduced(load_space(space_file), study.trials[0], result.summary())

    # A fresh command line reads the study, but cannot build the in-memory builder: export says so in one line.
    report = cli("report", "--space", str(space_file), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "best search trial #" in report.stdout and (tmp_path / "report" / "trials.csv").exists()
    refused = cli("export", "--space", str(space_file), "--out", str(tmp_path / "x.yaml"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "python:api-student" in line and "give it as py:<file.py>:<function>" in line
    assert not (tmp_path / "x.yaml").exists()

    # The same builder as py:<file>:<function>: any process rebuilds it from the file, so the command line's export
    # works (in this process: it holds nothing a fresh one lacks for a py: name).
    raw = byo_space(tmp_path, "api-py", {"name": "digits"}, checkpoint, n_trials=1, student=f"py:{builder_file}:small")
    raw["run"]["distill"]["method"] = "kd"
    study = search(raw, data=data, confirm=False)
    assert study.trials[0].state == TrialState.COMPLETE
    out_file = tmp_path / "py.yaml"
    code, _, err = run_cli(["export", "--space", str(tmp_path / "api-py-space.yaml"), "--out", str(out_file)], capsys)
    assert code == 0, err
    assert load_run_config(out_file).student == f"py:{builder_file}:small"


# --- teacher.finetune: once, then the cache -------------------------------------------------------------------------


def test_finetune_from_other_classes_runs_once_then_reads_the_cache(tmp_path, capsys, monkeypatch) -> None:
    root = write_folder(tmp_path / "images", train=10, val=3)
    checkpoint = torchvision_teacher(tmp_path / "five.pt", num_classes=5)  # a head of 5 classes for a 3-class folder
    data = {"name": "imagefolder", "data_root": str(root), "cache_dir": str(tmp_path / "decoded")}
    raw = byo_space(tmp_path, "tune", data, checkpoint, n_trials=1)
    raw["run"]["teacher"]["finetune"] = {"epochs": 1, "lr": 0.01, "batch_size": 8}
    raw["run"]["optim"]["epochs"] = 1
    path = write(tmp_path / "tune.yaml", raw)
    calls = []
    real = teachers_module._train_teacher
    monkeypatch.setattr(teachers_module, "_train_teacher", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = run_cli(["--space", str(path), "--no-confirm"], capsys)
    assert code == 0, err
    assert calls == [1] and f"fine-tuning the teacher {TEACHER}" in out + err
    (entry,) = [p for p in (tmp_path / "teachers").iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["recipe"]["init"] == {"checkpoint_sha256": sha(checkpoint)}
    weights = torch.load(entry / "model.pt", weights_only=True)
    assert weights["head.fc.weight"].shape == (3, 1024)  # the 5-class head replaced by a fresh 3-class one
    stamp = (entry / "model.pt").stat().st_mtime_ns

    code, out, err = run_cli(["--space", str(path), "--no-confirm"], capsys)  # resumes: one more trial
    assert code == 0, err
    assert calls == [1] and "fine-tuning" not in out + err  # read from the cache, not fine-tuned again
    assert json.loads((entry / "manifest.json").read_text())["created"] == manifest["created"]
    assert (entry / "model.pt").stat().st_mtime_ns == stamp
    study = optuna.load_study(study_name="tune", storage=load_space(path).storage_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert {t.user_attrs["teacher_val_acc"] for t in study.trials} == {manifest["val_acc"]}


# --- bad inputs: one line, exit code 2, the existing study untouched ------------------------------------------------


NOT_A_CHAIN = """
    from torch import nn

    class Residual(nn.Module):  # a residual the order of its children cannot express: no stages to find
        def __init__(self, num_classes):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, num_classes)

        def forward(self, x):
            return self.fc((x + self.conv(x)).mean((2, 3)))

    def residual(num_classes):
        return Residual(num_classes)

    def broken(num_classes):
        raise RuntimeError("no weights here")
"""


def _bad_folder(tmp: Path, case: str) -> Path:
    root = tmp / case.replace(" ", "-")
    if case == "empty folder":
        root.mkdir()
        return root
    write_folder(root, train=4, val=2)
    if case == "empty train":
        for path in sorted((root / "train").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    elif case == "class missing from val":
        for path in (root / "val" / "cat").iterdir():
            path.unlink()
        (root / "val" / "cat").rmdir()
    elif case == "unreadable images":
        (root / "train" / "ant" / "002.png").write_bytes(b"not a png")
        (root / "train" / "bee" / "003.png").write_bytes(b"\x89PNG\r\n")
    elif case == "mixed sizes":
        Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(root / "train" / "bee" / "wide.png")
    return root


def _variant(tmp: Path, raw: dict, case: str) -> dict:
    """The folder study's space with one bad input: the same study name and storage as the study already there."""
    bad = json.loads(json.dumps(raw))
    run = bad["run"]
    builders = tmp / "builders.py"
    if not builders.exists():
        builders.write_text(textwrap.dedent(NOT_A_CHAIN))
        torchvision_teacher(tmp / "five.pt", num_classes=5)
        torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=3).state_dict(), tmp / "other-arch.pt")
    if case in ("empty folder", "empty train", "class missing from val", "unreadable images", "mixed sizes"):
        run["data"]["data_root"] = str(_bad_folder(tmp, case))
    elif case == "unknown timm name":
        run["student"] = "timm:mobilenetv3_small_05"
    elif case == "checkpoint that does not fit":
        run["teacher"]["checkpoint"] = str(tmp / "other-arch.pt")
    elif case == "checkpoint that does not fit, fine-tuned":
        run["teacher"].update(checkpoint=str(tmp / "other-arch.pt"), finetune={"epochs": 1})
    elif case == "head mismatch without finetune":
        run["teacher"]["checkpoint"] = str(tmp / "five.pt")
    elif case == "py: file that does not exist":
        run["student"] = f"py:{tmp / 'no-such-file.py'}:build"
    elif case == "py: builder that raises":
        run["student"] = f"py:{builders}:broken"
    elif case == "student without stages, with learners":
        run["student"] = f"py:{builders}:residual"
    elif case.startswith("teacher.pretrained"):
        run["teacher"].pop("checkpoint")
        run["teacher"]["pretrained"] = True
        if case.endswith("fine-tuned"):
            run["teacher"]["finetune"] = {"epochs": 1}
    return bad


# (case, what the one line must hold). Rules pinned: an unreadable image is skipped while there are at most 1% of
# the images unreadable (or one); more refuses the folder, naming the files (the single-file skip is pinned below).
BAD_INPUTS = [
    ("empty folder", ["imagefolder: no train folder in", "empty-folder", "ROOT/train/<class>/<image>"]),
    ("empty train", ["imagefolder:", "empty-train/train is empty", "ROOT/train/<class>/<image>"]),
    ("class missing from val", ["class 'cat' of", "class-missing-from-val/train is missing from",
                                "class-missing-from-val/val", "the same class folders"]),
    ("unreadable images", ["2 unreadable image(s) of 18", "train/ant/002.png", "train/bee/003.png",
                           "at most 1% of the images (or one)"]),
    ("mixed sizes", ["different sizes", "train/bee/wide.png 20x12", "set data.image_size: N"]),
    ("unknown timm name", ["run.student: unknown timm model 'timm:mobilenetv3_small_05'",
                           "close matches: ", "timm:mobilenetv3_small_050"]),
    ("checkpoint that does not fit", ["teacher.checkpoint", "other-arch.pt does not fit the model",
                                      "missing keys: features.0.0.weight", "unexpected keys: conv1.0.weight"]),
    ("checkpoint that does not fit, fine-tuned", ["teacher.checkpoint", "other-arch.pt does not fit the model",
                                                  "missing keys: features.0.0.weight"]),
    ("head mismatch without finetune", ["teacher.checkpoint", "five.pt", "head has 5 outputs, the data set has 3",
                                        "teacher.finetune: {epochs: N, lr: X}"]),
    ("py: file that does not exist", ["run.student: py:", "no-such-file.py", "file not found"]),
    ("py: builder that raises", ["run.student: py:", "builders.py:broken: the builder raised RuntimeError: "
                                 "no weights here"]),
    ("student without stages, with learners", ["learners: py:", "cannot carry auxiliary learners",
                                               "allowed: no learners section"]),
    ("teacher.pretrained without network", ["teacher.pretrained: torchvision:mobilenet_v3_small: cannot fetch its "
                                            "pretrained weights", "give a checkpoint file"]),
    ("teacher.pretrained without network, fine-tuned", ["teacher.pretrained: torchvision:mobilenet_v3_small: cannot "
                                                        "fetch its pretrained weights"]),
]


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network, at once: a proxy that refuses every connection (torchvision's download fails in milliseconds
    instead of waiting on DNS), no cached weights (TORCH_HOME), and huggingface_hub's offline mode (timm's hub
    would otherwise retry for ~46 s)."""
    import huggingface_hub.constants

    for key in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("case, expected", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_the_study_is_untouched(folder_study, case, expected, capsys,
                                                                  tmp_path, offline) -> None:
    tmp, raw, _ = folder_study
    db = Path(raw["study"]["storage"].removeprefix("sqlite:///"))
    if not db.exists():  # this test alone: make the study it must leave untouched
        assert run_cli(["--space", str(write(tmp / "space.yaml", raw)), "--no-confirm", "--n-trials", "1"],
                       capsys)[0] == 0
    before = (sha(db), db.stat().st_mtime_ns)
    path = write(tmp_path / "bad.yaml", _variant(tmp_path, raw, case))
    code, out, err = run_cli(["--space", str(path), "--no-confirm"], capsys)
    assert code == 2 and "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, the last thing said
    assert all(part in errors[0] for part in expected), errors[0]
    assert (sha(db), db.stat().st_mtime_ns) == before


def test_one_unreadable_image_is_skipped_and_named(tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "images", train=10, val=3)
    (root / "train" / "cat" / "005.png").write_bytes(b"truncated")
    splits = load_splits("imagefolder", root, cache_dir=str(tmp_path / "decoded"))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 38  # 39 files, one skipped
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s) of 39" in err and "train/cat/005.png" in err


# --- the shipped spaces ---------------------------------------------------------------------------------------------


def test_shipped_imagefolder_and_imagenet_spaces_load(tmp_path) -> None:
    imagenet = load_space(ROOT / "spaces" / "imagenet.yaml")
    cfg = imagenet.run_config(imagenet.default_values())
    assert (cfg.student, cfg.teacher.arch, cfg.teacher.pretrained) == ("torchvision:resnet18",
                                                                       "torchvision:resnet34", True)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.augment) == ("imagefolder", 224, "resized_crop_flip")
    o = cfg.optim
    assert (o.batch_size, o.lr, o.momentum, o.weight_decay, o.recipe_epochs, o.milestones, o.lr_decay) == (
        256, 0.1, 0.9, 1e-4, 100, [30, 60, 90], 0.1)
    assert imagenet.study.final_epochs == 100 and o.epochs < 100 and cfg.data.limit
    assert (cfg.distill.temperature, cfg.distill.ce_weight, cfg.distill.kd_weight) == (1.0, 0.5, 0.5)
    assert "distill.ackd.aux_width" not in {p.path for p in imagenet.params} and imagenet.num_stages == 4

    template = load_space(ROOT / "spaces" / "imagefolder.yaml")  # loads though data/my-images is not there
    assert "distill.ackd.aux_width" not in {p.path for p in template.params}
    raw = json.loads(json.dumps(template.raw))
    raw["run"]["data"].update(data_root=str(write_folder(tmp_path / "my-images", train=6, val=2, size=20)),
                              cache_dir=str(tmp_path / "decoded"))
    checkpoint = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(raw["run"]["teacher"]["arch"].split(":")[1], num_classes=3).state_dict(),
               checkpoint)
    raw["run"]["teacher"].update(checkpoint=str(checkpoint), cache_dir=str(tmp_path / "teachers"))
    lines: list[str] = []
    preflight(load_space(write(tmp_path / "mine.yaml", raw)), lines.append)
    assert any(line.startswith("data imagefolder: 3 classes (ant, bee, cat)") and "64x64" in line for line in lines)
    assert any(line.startswith(f"teacher {raw['run']['teacher']['arch']}: val_acc") for line in lines)
