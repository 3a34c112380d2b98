"""Fault injection: bad config, bad data, pre-emption, SIGKILL, non-finite losses, full disks, unsafe
checkpoints. One section per kind of fault; each test fails if that behaviour regresses.

Runs are `efficientnet_tiny` at 16 px on a few dozen generated (or written) images, on one thread so
that a run split across processes can be compared bit for bit with one that was not.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny

from ipu_effnet.cli import main
from ipu_effnet.config import DataConfig, load
from ipu_effnet.data import create_dataset, create_loader
from ipu_effnet.data.datasets import ALPHA_FILL, DataError, DataWarning, ImageFolderDataset
from ipu_effnet.data.transforms import EvalTransform
from ipu_effnet.errors import RunError, UsageError
from ipu_effnet.run import faults, train
from ipu_effnet.training import checkpoint as ckpt_mod
from ipu_effnet.training.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from ipu_effnet.training.model import TrainingModel

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = str(ROOT / "configs" / "tiny-cpu.yaml")
TINY = tiny("model.resolution=16", "data.num_val=8", "train.epochs=2", "data.workers=0")
QUIET = {"log": lambda _m: None}


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def env1():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(autouse=True)
def one_thread():
    # as the subprocesses (OMP_NUM_THREADS=1): bit-identical arithmetic, and no two-thread spinning on a
    # shared two-core machine
    torch.set_num_threads(1)
    yield


def tiny_cfg(*extra):
    return load(TINY_CPU, TINY + list(extra))


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run with a checkpoint per epoch (copied by the tests that damage it)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("finished") / "run"
    summary = train(tiny_cfg(), run, **QUIET)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt-e0001-s000000008.pt",
                                                                        "ckpt-e0002-s000000016.pt"]
    return run, summary


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------
# 1. Config: one line naming file, key, value and what is valid; exit status 2; no run directory


CONFIG_CASES = {
    "unknown key": (["train.epohcs=3"], ["--set", "train.epohcs", "did you mean 'train.epochs'"]),
    "wrong type": (["train.micro_batch=four"], ["--set", "train.micro_batch = 'four'", "not an integer"]),
    "negative lr": (["train.lr=-0.1"], ["--set", "train.lr = -0.1", "out of range; expected >= 0"]),
    "group size not dividing": (["model.name=efficientnet_b3", "model.group_size=16"],
                                ["tiny-cpu.yaml", "model.group_size = 16", "does not divide the 40 channels",
                                 "divisors of 40"]),
    "micro-batch too small for mixup + cutmix": (
        ["train.micro_batch=3", "train.mixup_alpha=0.2", "train.cutmix=true"],
        ["--set", "train.micro_batch = 3", "mixup + cutmix", "train.micro_batch >= 4"]),  # 4 samples take part
    "split naming no module": (["ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0.conv_px]"],
                               ["--set", "ipu.pipeline_splits = 'blocks.3.0.conv_px'", "names no module",
                                "blocks.3.0.conv_pw"]),
    "more stages than IPUs": (["ipu.pipeline_splits=[blocks.1.0, blocks.3.0]"],
                              ["--set", "ipu.pipeline_splits", "makes 3 stages", "ipu.ipus_per_replica = 1",
                               "ipus_per_replica - 1 splits"]),
    "fine-tune layer that does not exist": (["finetune.first_trainable=blocks.9.0"],
                                            ["--set", "finetune.first_trainable = 'blocks.9.0'",
                                             "names no module"]),
    "halfres resolution not divisible as required": (
        ["recipe=halfres", "model.resolution=48", "finetune.resolution=64"],
        ["--set", "model.resolution = 48", "remainder modulo 32", "32 or 64"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_line_with_status_2_and_no_run_directory(case, tmp_path, capsys):
    overrides, expected = CONFIG_CASES[case]
    run = tmp_path / "run"
    status = main(["train", "--config", TINY_CPU, *sets(TINY + overrides), "--out", str(run)])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not run.exists()


@pytest.mark.slow
def test_bad_value_in_a_file_names_the_file_and_the_process_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {TINY_CPU}\ntrain:\n  lr: -1\n")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "ipu_effnet", "train", "--config", str(bad), "--out", str(run)],
                         capture_output=True, text=True, cwd=ROOT, env=env1())
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "train.lr = -1 " in lines[0] and ">= 0" in lines[0]
    assert not run.exists() and out.stdout == ""


# ----------------------------------------------------------------------------------------------------
# 2. Data: readable oddities converted; unreadable files skipped, counted, named; a threshold


def jpeg_bytes(img, **kwargs):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def truncated(data):
    """A JPEG cut short in its pixel data: the header still opens, decoding fails."""
    return data[: len(data) - 100]


def noise(width=24, height=20, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_folder(root, n_good=40, classes=("a", "b"), splits=("train", "validation")):
    for split in splits:
        for i in range(n_good):
            path = root / split / classes[i % len(classes)] / f"good{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(noise(seed=i)))
    return root


def test_readable_oddities_are_converted_to_rgb(tmp_path):
    d = tmp_path / "train" / "x"
    d.mkdir(parents=True)
    Image.new("L", (20, 20), 77).save(d / "gray.jpg")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(d / "cmyk.jpg")  # no ink: white
    Image.fromarray(np.full((20, 20), 0x8000, dtype=np.uint16)).save(d / "deep.png")  # 16-bit grey, half way
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(d / "clear.png")  # fully transparent red
    Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(d / "opaque.png")
    Image.new("LA", (20, 20), (200, 255)).save(d / "la.png")
    pal = Image.new("P", (20, 20), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 250, 0, 0] + [0] * 744)
    pal.save(d / "palette.png", transparency=3)  # the only colour used is the transparent one
    ds = ImageFolderDataset(tmp_path, "train", EvalTransform(16))
    got = {Path(p).stem: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    assert sorted(got) == ["clear", "cmyk", "deep", "gray", "la", "opaque", "palette"]
    for name, image in got.items():
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8, name

    def colour(name):
        return tuple(int(v) for v in got[name][:, 8, 8])

    assert colour("gray") == (77, 77, 77)
    assert min(colour("cmyk")) >= 250
    assert colour("deep") == (128, 128, 128)  # scaled to 8 bits, not clipped to 255
    assert colour("clear") == ALPHA_FILL and colour("palette") == ALPHA_FILL
    assert colour("opaque") == (255, 0, 0) and colour("la") == (200, 200, 200)
    assert not ds.unreadable.found


def test_unreadable_files_are_skipped_counted_and_named(tmp_path):
    root = write_folder(tmp_path, n_good=96, splits=("train",))
    bad = root / "train" / "a"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is not an image")
    good = jpeg_bytes(noise(seed=99))
    (bad / "truncated.jpg").write_bytes(truncated(good))  # the header opens; decoding fails
    (bad / "README.txt").write_text("ignored: not an image extension")
    (root / "train" / "empty_class").mkdir()
    with pytest.warns(DataWarning) as caught:
        ds = ImageFolderDataset(root, "train", EvalTransform(16), max_corrupt_fraction=0.05)
    text = " ".join(str(w.message) for w in caught)
    assert "zero.jpg (empty file" in text and "notes.jpg" in text and "truncated.jpg" not in text
    assert "empty_class" in text and "README.txt" in text
    assert len(ds) == 97 and ds.unreadable.total == 99 and len(ds.unreadable.found) == 2

    # a whole epoch through two worker processes: the truncated file is replaced, the workers live on
    loader = create_loader(ds, 8, train=False, workers=2, seed=0)
    batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == 97 and all(b[0].shape[1:] == (3, 16, 16) for b in batches)
    said = []
    assert faults.check_data(ds, said.append) == 3  # the workers' record reached the main process
    assert len(said) == 1 and "truncated.jpg" in said[0] and "image file is truncated" in said[0]
    assert "3 of 99" in said[0]
    list(loader)  # the next epoch's workers know it already: nothing new to report
    assert faults.check_data(ds, said.append) == 3 and len(said) == 1


def test_corrupt_fraction_above_the_threshold_stops_with_a_clear_error(tmp_path):
    root = write_folder(tmp_path, n_good=40, splits=("train",))
    (root / "train" / "a" / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:  # 1 of 41 = 2.4 % > the default 1 %: before any training
        ImageFolderDataset(root, "train", EvalTransform(16))
    message = str(err.value)
    assert "1 of 41 images are unreadable" in message and "zero.jpg" in message
    assert "data.max_corrupt_fraction = 0.01" in message and "\n" not in message

    # found only while loading (truncated files pass the header check): stopped between epochs
    root = write_folder(tmp_path / "other", n_good=20, splits=("train",))  # (scans are cached per folder)
    good = jpeg_bytes(noise(seed=5))
    for i in range(3):
        (root / "train" / "b" / f"cut{i}.jpg").write_bytes(truncated(good))
    ds = ImageFolderDataset(root, "train", EvalTransform(16), max_corrupt_fraction=0.1)
    for i in range(len(ds)):
        assert ds[i][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"3 of 23 images are unreadable \(13.04%\).*cut0.jpg"):
        faults.check_data(ds, lambda _m: None)


def test_training_survives_unreadable_images_and_reports_them(tmp_path):
    root = write_folder(tmp_path / "data", n_good=40)
    good = jpeg_bytes(noise(seed=7))
    (root / "train" / "b" / "cut.jpg").write_bytes(truncated(good))
    cfg = tiny_cfg("data.dataset=imagenet", f"data.path={root}", "model.num_classes=2", "data.num_train=null",
                   "data.num_val=null", "data.max_corrupt_fraction=0.05", "train.epochs=1")
    said = []
    summary = train(cfg, tmp_path / "run", log=said.append)
    assert summary["steps"] == 41 // 4 and summary["unreadable_images"] == 1
    assert any("cut.jpg" in line and "skipped" in line for line in said)


def test_missing_validation_folder_is_one_line_status_2_and_no_run_directory(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n_good=8, splits=("train",))
    run = tmp_path / "run"
    status = main(["train", "--config", TINY_CPU, *sets(TINY + ["data.dataset=imagenet", f"data.path={root}",
                                                                 "model.num_classes=2"]), "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert str(root / "validation") in err and "val/<class>/<image>" in err
    assert not run.exists()


def test_create_dataset_passes_the_threshold_from_the_config(tmp_path):
    root = write_folder(tmp_path, n_good=40, splits=("train",))
    (root / "train" / "a" / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="max_corrupt_fraction"):
        create_dataset(DataConfig(dataset="imagenet", path=str(root)), "train", 16, train=True, num_classes=2)
    with pytest.warns(DataWarning, match="zero.jpg"):
        ds = create_dataset(DataConfig(dataset="imagenet", path=str(root), max_corrupt_fraction=0.05), "train", 16,
                            train=True, num_classes=2)
    assert len(ds) == 40
    ds = create_dataset(DataConfig(dataset="imagenet", path=str(root), verify_images=False,
                                   max_corrupt_fraction=0.05), "train", 16, train=True, num_classes=2)
    assert len(ds) == 41 and ds[[Path(p).name for p, _ in ds.samples].index("zero.jpg")][0].shape == (3, 16, 16)
    assert len(ds.unreadable.found) == 1  # found while loading instead, and replaced


# ----------------------------------------------------------------------------------------------------
# 3. Pre-emption: SIGTERM/SIGINT checkpoint at the next step boundary, exit 0, a resume hint


# The child holds still inside its second training step until the signal has arrived, so the signal
# lands at a known step however loaded the machine is (a tiny run can otherwise finish first).
HOLD_IN_SECOND_STEP = """
import sys, time
from pathlib import Path
from ipu_effnet.backends.torch_backend import TorchRunner
from ipu_effnet.run import faults
real_step, calls = TorchRunner.step, []
def step(self, images, labels):
    calls.append(1)
    if len(calls) == 2:
        Path(sys.argv[1]).touch()
        deadline = time.time() + 120
        while faults.stop_requested() is None and time.time() < deadline:
            time.sleep(0.01)
    return real_step(self, images, labels)
TorchRunner.step = step
from ipu_effnet.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_step_boundary_and_resume_continues_exactly(tmp_path, capsys):
    overrides = TINY + ["train.epochs=4", "train.ema_decay=0.9"]
    straight = train(tiny_cfg(*overrides[len(TINY):]), tmp_path / "straight", **QUIET)

    run, waiting = tmp_path / "stopped", tmp_path / "waiting"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_SECOND_STEP, str(waiting), "train", "--config", TINY_CPU,
                             *sets(overrides), "--out", str(run)], cwd=ROOT, env=env1(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not waiting.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "received SIGTERM" in stderr
    hint = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(hint) == 1 and f"python -m ipu_effnet train --resume {run}" in hint[0], stdout
    saved = latest_checkpoint(run)
    ckpt = load_checkpoint(saved)
    assert saved.name in hint[0]
    assert ckpt["step"] == 2 < straight["steps"]  # the step under way when the signal came, then stopped
    steps_logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["kind"] == "step"]
    assert steps_logged[-1] == ckpt["step"]  # stopped at the step boundary after the last step done

    assert main(["train", "--resume", str(run)]) == 0
    assert "resuming from" in capsys.readouterr().out
    final = load_checkpoint(latest_checkpoint(run))
    assert final["step"] == straight["steps"] and final["epoch"] == 4
    assert_same_weights(final["model"], weights(latest_checkpoint(tmp_path / "straight")))
    a = json.loads((run / "summary.json").read_text())
    assert (a["val_top1"], a["val_loss"], a["val_top1_ema"]) == (straight["val_top1"], straight["val_loss"],
                                                                 straight["val_top1_ema"])


@pytest.fixture
def default_sigint():
    # A process started in the background by a non-interactive shell (CI launchers, `cmd &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler. Pin Python's usual one.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_first_signal_sets_the_flag_and_a_second_acts_at_once(default_sigint):
    with faults.StopOnSignals():
        assert faults.stop_requested() is None
        os.kill(os.getpid(), signal.SIGINT)
        assert faults.stop_requested() == "SIGINT"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM terminates at once
        with pytest.raises(KeyboardInterrupt):  # a second SIGINT interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert faults.stop_requested() is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with faults.StopOnSignals():  # a forked child (a loader worker) ignores the signal; the parent decides
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if faults.stop_requested() is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert faults.stop_requested() is None


def test_a_signal_ignored_at_start_checkpoints_once_and_is_ignored_again():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `cmd &` from a non-interactive shell
    try:
        with faults.StopOnSignals():
            os.kill(os.getpid(), signal.SIGINT)
            assert faults.stop_requested() == "SIGINT"
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the launcher's choice is restored
            os.kill(os.getpid(), signal.SIGINT)  # and a second one does nothing
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# ----------------------------------------------------------------------------------------------------
# 4. Crash safety: SIGKILL at any moment, a truncated checkpoint


KILL_IN_SECOND_SAVE = """
import os, signal, sys, torch
real_save = torch.save
calls = []
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, f, *args, **kwargs)
    import io
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half of the second checkpoint on disk
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from ipu_effnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    overrides = TINY + ["train.epochs=3"]
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE, "train", "--config", TINY_CPU,
                           *sets(overrides), "--out", str(run)], cwd=ROOT, env=env1(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())  # the half-written one under its temporary name
    assert len(names) == 2 and names[0].startswith(".tmp-ckpt-e0002") and names[1] == "ckpt-e0001-s000000008.pt"
    assert latest_checkpoint(run).name == "ckpt-e0001-s000000008.pt"
    assert load_checkpoint(latest_checkpoint(run))["epoch"] == 1

    assert main(["train", "--resume", str(run)]) == 0
    final = load_checkpoint(latest_checkpoint(run))  # (bit-identical to a straight run: tests/test_train.py)
    assert (final["epoch"], final["step"]) == (3, 24)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # pruned with the rest


def _flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max((zf.getinfo(n) for n in zf.namelist() if "/data/" in n), key=lambda i: i.file_size)
    h = info.header_offset
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[start + info.file_size // 2] ^= 0xFF  # torch.load alone would not notice
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, finished_run):
    src, summary = finished_run
    for damage in ("truncate", "flip"):
        run = copy_run(src, tmp_path / damage)
        newest = run / "checkpoints" / "ckpt-e0002-s000000016.pt"
        if damage == "truncate":
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        else:
            _flip_a_tensor_byte(newest)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(newest)
        said = []
        path, ckpt = faults.load_resume(run, said.append)
        assert path.name == "ckpt-e0001-s000000008.pt" and ckpt["epoch"] == 1
        assert len(said) == 1 and str(newest) in said[0] and "truncated or corrupt" in said[0]
        assert "trying the previous checkpoint" in said[0]
    said = []
    resumed = train(load(run / "config.yaml"), run, resume=True, log=said.append)  # the flipped copy
    assert any("ckpt-e0002" in s and "truncated or corrupt" in s for s in said)
    assert any("resuming from" in s and "ckpt-e0001" in s for s in said)
    assert resumed["steps"] == summary["steps"]
    assert_same_weights(weights(latest_checkpoint(run)), weights(latest_checkpoint(src)))


# ----------------------------------------------------------------------------------------------------
# 5. Numerical faults: fp16 loss scaling skips and lowers the scale; fp32 stops; N bad steps stop


class InfLoss(torch.nn.Module):
    """A TrainingModel stand-in whose loss is multiplied by `factor` (inf or NaN to inject a fault)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 4 * 4, 2)
        self.factor = 1.0

    def forward(self, images, labels):
        logits = self.linear(images.float().flatten(1) / 255.0)
        loss = torch.nn.functional.cross_entropy(logits, labels) * self.factor
        return loss, logits


def runner_and_batch(precision="32.32"):
    from ipu_effnet.backends.torch_backend import TorchRunner

    torch.manual_seed(0)
    net = InfLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    runner = TorchRunner(net, opt, 1, precision, torch.device("cpu"))
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    return net, runner, images, torch.tensor([0, 1, 0, 1])


def test_fp16_loss_scaling_skips_a_non_finite_step_and_lowers_the_scale():
    grad_scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if grad_scaler is None:
        pytest.skip("this torch has no device-generic GradScaler (fp16 loss scaling runs on CUDA only)")
    net, runner, images, labels = runner_and_batch()
    runner.scaler = grad_scaler("cpu", init_scale=1024.0)  # what TorchRunner builds for fp16 on CUDA
    before = [p.detach().clone() for p in net.parameters()]
    net.factor = float("inf")
    out = runner.step(images, labels)
    assert out["skipped"] and out["scale"] == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the step was not applied
    net.factor = 1.0
    out = runner.step(images, labels)
    assert not out["skipped"] and out["scale"] == 512.0
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    policy = faults.BadSteps(limit=3, tolerant=True, precision="16.16")
    for step in (1, 2):
        policy.observe({"loss": float("inf"), "skipped": True, "scale": 256.0}, step, Path("ck.pt"))
    policy.observe({"loss": 1.0, "skipped": False}, 3, Path("ck.pt"))  # a good step resets the count
    for step in (4, 5):
        policy.observe({"loss": float("nan"), "skipped": True, "scale": 64.0}, step, Path("ck.pt"))
    with pytest.raises(faults.NumericalError, match=r"step 6: 3 consecutive steps.*max_bad_steps = 3.*ck.pt"):
        policy.observe({"loss": float("nan"), "skipped": True, "scale": 32.0}, 6, Path("ck.pt"))
    assert policy.skipped == 5


def test_fp32_non_finite_loss_is_not_applied_and_the_policy_stops_at_once():
    net, runner, images, labels = runner_and_batch()
    assert runner.scaler is None
    before = [p.detach().clone() for p in net.parameters()]
    net.factor = float("nan")
    out = runner.step(images, labels)
    assert out["skipped"] and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(faults.NumericalError, match="step 7: the loss is nan in precision 32.32.*not applied"):
        faults.BadSteps(limit=20, tolerant=False).observe(out, 7, None)
    # a backend that reports no `skipped` (the IPU's): a non-finite loss counts as bad
    with pytest.raises(faults.NumericalError, match="no checkpoint was written yet"):
        faults.BadSteps().observe({"loss": float("inf")}, 1, None)


def test_a_nan_loss_in_fp32_stops_the_run_with_exit_1_and_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_forward = TrainingModel.forward
    calls = []

    def forward(self, images, labels=None, *args, **kwargs):
        loss, logits = real_forward(self, images, labels, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 11:  # the third step of the second epoch
                loss = loss * float("nan")
        return loss, logits

    monkeypatch.setattr(TrainingModel, "forward", forward)
    run = tmp_path / "run"
    status = main(["train", "--config", TINY_CPU, *sets(TINY), "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1
    assert "step 11: the loss is nan" in err and "ckpt-e0001-s000000008.pt" in err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt-e0001-s000000008.pt"]
    good = load_checkpoint(latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------
# 6. Disk full or unwritable: a clear error before training; during training the previous checkpoint


def test_unwritable_run_directory_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status = main(["train", "--config", TINY_CPU, *sets(TINY), "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert f"run directory {blocker / 'run'} is not writable" in err


def test_full_disk_before_training_is_a_clear_error(tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faults.os, "fsync", fsync_full)
    run = tmp_path / "run"
    assert main(["train", "--config", TINY_CPU, *sets(TINY), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is not writable (ENOSPC: No space left on device)" in err and not run.exists()
    monkeypatch.setattr(faults.os, "fsync", real_fsync)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda _p: usage._replace(free=4096))
    assert main(["train", "--config", TINY_CPU, *sets(TINY), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "MiB free, a checkpoint needs about" in err and not run.exists()


def test_full_disk_during_training_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 a partial checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(RunError) as err:
        train(tiny_cfg(), run, **QUIET)
    message = str(err.value)
    assert "cannot write checkpoint" in message and "ckpt-e0002" in message and "ENOSPC" in message
    assert "ckpt-e0001-s000000008.pt is intact" in message and f"train --resume {run}" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-e0001-s000000008.pt"]
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(latest_checkpoint(run))["step"] == 8
    assert train(load(run / "config.yaml"), run, resume=True, **QUIET)["steps"] == 16


# ----------------------------------------------------------------------------------------------------
# 7. Untrusted checkpoints: weights_only, pickled code refused and never run


class Payload:
    """Unpickling this would create a directory: the marker that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_and_never_run(tmp_path, finished_run, monkeypatch, capsys):
    src, _ = finished_run
    run = copy_run(src, tmp_path / "run")
    marker = tmp_path / "code-ran"
    evil = run / "checkpoints" / "ckpt-e0003-s000000024.pt"
    state = load_checkpoint(run / "checkpoints" / "ckpt-e0002-s000000016.pt")
    state["extra"] = {"payload": Payload(marker)}
    torch.save(state, evil)

    assert main(["train", "--resume", str(run)]) == 2  # no silent fall back past it to ckpt-e0002
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(evil) in err and "refused by weights_only loading" in err
    assert "nothing in it was run" in err
    assert main(["evaluate", "--checkpoint", str(evil)]) == 2
    assert "refused by weights_only" in capsys.readouterr().err
    with pytest.raises(UnsafeCheckpointError):
        faults.load_resume(run, lambda _m: None)
    monkeypatch.setattr(ckpt_mod, "_HAS_WEIGHTS_ONLY", False)  # a torch without weights_only: refused too
    with pytest.raises(UnsafeCheckpointError, match="no weights_only loading"):
        load_checkpoint(run / "checkpoints" / "ckpt-e0002-s000000016.pt")
    assert not marker.exists()
    assert isinstance(UnsafeCheckpointError("x"), UsageError)

