"""Crashes, bad files, unsafe checkpoints, diverging losses and dead processes (real subprocesses)."""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from conftest import write_digits
from helpers import ROOT, TINY_TRAIN_ARGS, run_py

# 64 images, batch 8: 8 steps per epoch; 2 epochs. Drop path is on, so the RNG state matters too.
RESUME_ARGS = TINY_TRAIN_ARGS + ["--batch_size_per_gpu", "8", "--out_dim", "64", "--epochs", "2",
                                 "--warmup_epochs", "1", "--saveckp_steps", "3", "--saveckp_freq", "0"]


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("small_digits")), n_train=64, n_val=10)


def train_cmd(data, out, workers, extra=()):
    return [sys.executable, os.path.join(ROOT, "main_dino.py"), *RESUME_ARGS, "--data_path", str(data),
            "--output_dir", str(out), "--num_workers", str(workers), *extra]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def teacher_of(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)["teacher"]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(small_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(train_cmd(small_digits, out, 0), cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return teacher_of(out)


def kill_after_checkpoints(cmd, out, n_checkpoints, rng):
    """Starts training and SIGKILLs it at a random moment after it has written n checkpoints."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, seen, last = os.path.join(out, "checkpoint.pth"), 0, None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        stamp = os.stat(ckpt).st_mtime_ns if os.path.exists(ckpt) else None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
            if seen >= n_checkpoints:
                time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-step, mid-save, mid-epoch
                break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


@pytest.mark.parametrize("workers,seed", [(0, 1), (2, 2)])
def test_sigkill_then_same_command_gives_the_uninterrupted_teacher(small_digits, uninterrupted, tmp_path, workers,
                                                                   seed):
    rng = random.Random(seed)
    out = tmp_path / "killed"
    cmd = train_cmd(small_digits, out, workers)
    killed = kill_after_checkpoints(cmd, out, n_checkpoints=rng.choice([1, 2, 3]), rng=rng)
    assert killed, "training ended before it could be killed"
    resumed = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from epoch" in resumed.stdout
    assert max_abs_diff(teacher_of(out), uninterrupted) <= 1e-6


@pytest.mark.skipif(not utils.has_cxx_compiler(), reason="--compile on a CPU needs a C++ compiler")
def test_compiled_run_resumes_exactly(small_digits, tmp_path):
    """--compile: a resumed compiled run ends with the uninterrupted run's teacher (the checkpoint's RNG state seeds
    drop path, eager on CPUs, the compiler's random stream in whole compiled blocks)."""
    def run(out, steps):
        result = subprocess.run(train_cmd(small_digits, out, 0, ["--compile", "--num_steps", str(steps)]), cwd=ROOT,
                                env=env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout
    run(tmp_path / "straight", 10)
    run(tmp_path / "resumed", 5)
    assert "Resuming from epoch 0, step 5." in run(tmp_path / "resumed", 10)
    assert max_abs_diff(teacher_of(tmp_path / "resumed"), teacher_of(tmp_path / "straight")) == 0.0


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    writer = (
        "import sys, torch; sys.path.insert(0, %r); import utils\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    utils.save_atomic({'step': i, 'w': torch.full((4_000_000,), float(i))}, %r)\n"
    ) % (ROOT, str(path))
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", writer], env=env(), stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not path.exists():
            # a writer that cannot write (full disk, failed import) ends or stalls: fail, never wait forever
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("the writer wrote no checkpoint: " + proc.communicate()[1][-2000:])
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        ckpt = utils.load_checkpoint_file(str(path))
        assert torch.all(ckpt["w"] == float(ckpt["step"]))
    # the next save clears what killed writers left, never a live process's file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".checkpoint.pth.tmp.{int(dead.stdout)}").write_bytes(b"half a checkpoint")
    live = tmp_path / f".checkpoint.pth.tmp.{os.getppid()}"
    live.write_bytes(b"being written")
    utils.save_atomic({"step": 0}, str(path))
    assert sorted(os.listdir(tmp_path)) == [live.name, "checkpoint.pth"]


def test_save_on_master_takes_torch_saves_arguments(tmp_path):
    """As the reference's torch.save wrapper: a path (atomically written) or a file object, and save options."""
    import io
    utils.save_on_master({"w": torch.arange(3)}, tmp_path / "a.pth", _use_new_zipfile_serialization=False)
    assert (tmp_path / "a.pth").read_bytes()[:1] == b"\x80"  # the legacy format asked for, not a zip archive
    assert torch.equal(utils.load_checkpoint_file(str(tmp_path / "a.pth"))["w"], torch.arange(3))
    import pickle
    import types
    used = []

    class RecordingPickler(pickle.Pickler):
        def __init__(self, file, protocol=None, **kwargs):
            used.append(protocol)
            super().__init__(file, protocol, **kwargs)
    recording = types.SimpleNamespace(**{**vars(pickle), "Pickler": RecordingPickler})
    utils.save_on_master({"w": torch.arange(2)}, tmp_path / "b.pth", recording, 2)  # torch.save's positionals
    assert used == [2]
    assert torch.equal(utils.load_checkpoint_file(str(tmp_path / "b.pth"))["w"], torch.arange(2))
    (tmp_path / "b.pth").unlink()
    buffer = io.BytesIO()
    utils.save_on_master({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["a.pth"]


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    utils.save_atomic({"step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(utils.UserError, match="No space left on device"):
        utils.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint_file(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_corrupt_checkpoint_is_reported_not_overwritten(small_digits, tmp_path):
    out = tmp_path / "corrupt"
    out.mkdir()
    ckpt = out / "checkpoint.pth"
    good = tmp_path / "good.pth"
    torch.save({"teacher": {"x": torch.zeros(3)}}, good)
    ckpt.write_bytes(good.read_bytes()[:200])  # truncated
    before = ckpt.read_bytes()
    result = run_py("main_dino.py", *RESUME_ARGS, "--data_path", small_digits, "--output_dir", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(ckpt) in result.stderr and "start over" in result.stderr
    assert ckpt.read_bytes() == before


class _Evil(object):
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(small_digits, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "evil"
    out.mkdir()
    torch.save({"student": _Evil(marker), "epoch": 1}, out / "checkpoint.pth")
    with pytest.raises(utils.UserError, match="refusing"):
        utils.load_checkpoint_file(str(out / "checkpoint.pth"))
    result = run_py("main_dino.py", *RESUME_ARGS, "--data_path", small_digits, "--output_dir", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "refusing" in result.stderr
    assert not marker.exists()


def test_reference_style_checkpoint_with_namespace_and_numpy_scalars_loads(tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({"args": argparse.Namespace(arch="vit_small", global_crops_scale=(0.4, 1.0)),
                "epoch": np.int64(100), "loss": np.float64(2.5), "teacher": {"w": torch.ones(2)}}, path)
    ckpt = utils.load_checkpoint_file(str(path))
    assert ckpt["args"].arch == "vit_small" and int(ckpt["epoch"]) == 100 and float(ckpt["loss"]) == 2.5


def save_reference_style(path, marker=None):
    torch.save({"args": argparse.Namespace(arch="vit_small", global_crops_scale=(0.4, 1.0)),
                "epoch": np.int64(100), "teacher": {"w": torch.ones(2)}}, path)
    if marker is not None:
        torch.save({"student": _Evil(marker)}, path.with_name("evil.pth"))


def test_torch_2_4_registers_the_allow_list_for_reference_checkpoints(tmp_path, monkeypatch):
    """torch 2.4 has add_safe_globals (process-wide) but not the scoped safe_globals of 2.5."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    registered = []
    real_register = torch.serialization.add_safe_globals
    monkeypatch.setattr(torch.serialization, "add_safe_globals",
                        lambda entries: (registered.extend(entries), real_register(entries)))
    try:
        marker = tmp_path / "pwned"
        save_reference_style(tmp_path / "ref.pth", marker)
        ckpt = utils.load_checkpoint_file(str(tmp_path / "ref.pth"))
        assert ckpt["args"].arch == "vit_small" and int(ckpt["epoch"]) == 100
        assert argparse.Namespace in registered
        with pytest.raises(utils.UserError, match="refusing to load"):
            utils.load_checkpoint_file(str(tmp_path / "evil.pth"))
        assert not marker.exists()
    finally:
        torch.serialization.clear_safe_globals()


def test_torch_before_2_4_refuses_reference_checkpoints_with_the_version_to_use(tmp_path, monkeypatch):
    """torch 1.13-2.3 cannot be told that a Namespace is safe: a clear message, and code is still refused."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    monkeypatch.delattr(torch.serialization, "add_safe_globals")
    marker = tmp_path / "pwned"
    save_reference_style(tmp_path / "ref.pth", marker)
    with pytest.raises(utils.UserError, match=r"ref.pth holds argparse or numpy objects .* torch >= 2.4"):
        utils.load_checkpoint_file(str(tmp_path / "ref.pth"))
    with pytest.raises(utils.UserError, match="refusing to load"):
        utils.load_checkpoint_file(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_a_run_resumes_where_torch_cannot_extend_its_allow_list(tmp_path, monkeypatch):
    """The package's own checkpoints (args as a dict, optimizer and random states) need no allow-list."""
    import main_dino
    monkeypatch.delattr(torch.serialization, "safe_globals")
    monkeypatch.delattr(torch.serialization, "add_safe_globals")
    run = ["--synthetic", *TINY_TRAIN_ARGS, "--batch_size_per_gpu", "2", "--output_dir", str(tmp_path)]
    main_dino.main(run + ["--num_steps", "1"])
    main_dino.main(run + ["--num_steps", "2"])
    ckpt = utils.load_checkpoint_file(str(tmp_path / "checkpoint.pth"))
    assert ckpt["step_in_epoch"] == 2 and {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}


def write_odd_images(folder):
    """Real digits in unusual modes: grayscale, CMYK, 16-bit, palette, RGBA, and tiny."""
    from sklearn.datasets import load_digits
    img = (load_digits().images[7] * 16).astype(np.uint8)
    rgb = Image.fromarray(np.stack([img] * 3, -1)).resize((24, 24))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(img.astype(np.uint16) * 257).save(folder / "sixteen.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("LA").save(folder / "la.png")
    rgb.resize((2, 2)).save(folder / "tiny.png")
    return 6


def test_bad_files_are_skipped_counted_and_odd_modes_train(tmp_path):
    root = tmp_path / "data"
    write_digits(str(root), n_train=72, n_val=0)
    train = root / "train"
    odd = write_odd_images(train / "3")
    sample = next((train / "1").iterdir())
    (train / "1" / "truncated.png").write_bytes(sample.read_bytes()[:40])
    (train / "2" / "not_an_image.jpg").write_text("hello")
    jpeg = train / "4" / "broken.jpg"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:150])
    total = 72 + odd + 3
    assert total == 81
    out = tmp_path / "out"
    # batch 27: the one epoch visits every image, and 3 bad of 81 is more than 1%
    result = run_py("main_dino.py", *TINY_TRAIN_ARGS, "--data_path", root, "--output_dir", out,
                    "--batch_size_per_gpu", "27", "--epochs", "1", "--warmup_epochs", "0", "--out_dim", "64")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "more than 1%" in result.stderr
    assert (out / "checkpoint.pth").exists()
    for name in ("truncated.png", "not_an_image.jpg", "broken.jpg"):
        assert name in result.stdout + result.stderr


def test_a_few_bad_files_are_skipped_and_logged(tmp_path):
    root = tmp_path / "data"
    write_digits(str(root), n_train=193, n_val=0)
    train = root / "train"
    sample = next((train / "1").iterdir())
    (train / "1" / "truncated.png").write_bytes(sample.read_bytes()[:40])
    write_odd_images(train / "3")
    batch = sum(len(files) for _, _, files in os.walk(train))  # one step sees every image once
    assert batch == 200  # so 1 bad file is 0.5%
    out = tmp_path / "out"
    result = run_py("main_dino.py", *TINY_TRAIN_ARGS, "--data_path", root, "--output_dir", out,
                    "--batch_size_per_gpu", batch, "--epochs", "1", "--warmup_epochs", "0", "--out_dim", "64",
                    "--local_crops_number", "0", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped unreadable image" in result.stdout + result.stderr and "truncated.png" in result.stdout + result.stderr
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[-1]["train_bad_images"] == 1


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(small_digits, tmp_path):
    out = tmp_path / "nan"
    result = run_py("main_dino.py", *RESUME_ARGS, "--data_path", small_digits, "--output_dir", out,
                    env={"DINO_TEST_NONFINITE_AT_STEP": "4"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "global step 4" in result.stderr and "lower --lr" in result.stderr
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["step_in_epoch"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())


def torchrun(args, out, extra_env=None, restarts=0, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), os.path.join(ROOT, "main_dino.py"), *args, "--output_dir", str(out)]
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True,
                            timeout=timeout)
    return result, time.time() - start


DDP_ARGS = TINY_TRAIN_ARGS + ["--synthetic", "--batch_size_per_gpu", "4", "--num_steps", "6", "--saveckp_steps", "2"]


def test_dead_rank_ends_the_job_instead_of_hanging(tmp_path):
    result, elapsed = torchrun(DDP_ARGS, tmp_path / "dead", {"DINO_TEST_KILL_AT_STEP": "1:3"})
    assert result.returncode != 0
    assert elapsed < 240


def test_dead_rank_with_restarts_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "restart"
    result, _ = torchrun(DDP_ARGS, out, {"DINO_TEST_KILL_AT_STEP": "1:3"}, restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 may write the step-4 checkpoint before it notices that rank 1 died after step 4
    assert re.search(r"Resuming from epoch 0, step [24]\.", result.stdout), result.stdout[-2000:]
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["step_in_epoch"] == 6
