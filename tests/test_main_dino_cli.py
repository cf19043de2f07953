"""main_dino.py as users run it: bad input, checkpoints, resume, several processes, a real small dataset."""
import builtins
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import main_dino
import utils
from helpers import ROOT, TINY_TRAIN_ARGS, run_py


@pytest.fixture
def run_main(capsys):
    """Runs main_dino.main in this process; returns (exit code, stderr)."""
    original_print = builtins.print

    def _run(*argv):
        try:
            main_dino.main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            builtins.print = original_print
        return code, capsys.readouterr().err
    return _run


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("extra,words", [
    (["--local_crops_number", "-1"], ["--local_crops_number"]),
    (["--patch_size", "32"], ["--patch_size 32", "16 pixels"]),
    (["--global_crop_size", "64", "--local_crop_size", "96"], ["--global_crop_size 64", "--local_crop_size 96"]),
    (["--global_crops_scale", "0.9", "0.2"], ["--global_crops_scale"]),
    (["--arch", "vit_giant"], ["vit_giant"]),
    (["--arch", "xcit_small_12_p16"], ["XCiT"]),
    (["--warmup_teacher_temp_epochs", "5", "--epochs", "2"], ["--warmup_teacher_temp_epochs"]),
    (["--compile", "--arch", "resnet18"], ["--compile", "resnet18"]),
])
def test_impossible_flags_end_in_one_line_errors(run_main, tmp_path, extra, words):
    code, err = run_main("--synthetic", "--device", "cpu", "--local_crop_size", "16", "--output_dir", tmp_path,
                         *extra)
    assert_one_line_error(code, err, *words)


def test_missing_and_empty_data_paths(run_main, tmp_path):
    missing = tmp_path / "nope"
    code, err = run_main("--data_path", missing, "--output_dir", tmp_path / "o1", "--device", "cpu")
    assert_one_line_error(code, err, "does not exist", str(missing))
    assert not (tmp_path / "o1").exists()  # checked before the output folder is made
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = run_main("--data_path", a_file, "--output_dir", tmp_path / "o0", "--device", "cpu")
    assert_one_line_error(code, err, "not a folder", str(a_file))
    assert not (tmp_path / "o0").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main("--data_path", empty, "--output_dir", tmp_path / "o2", "--device", "cpu")
    assert_one_line_error(code, err, "no images", str(empty))
    assert not (tmp_path / "o2").exists()
    no_images = tmp_path / "noimg" / "cls"
    no_images.mkdir(parents=True)
    (no_images / "readme.txt").write_text("not an image")
    code, err = run_main("--data_path", no_images.parent, "--output_dir", tmp_path / "o3", "--device", "cpu")
    assert_one_line_error(code, err, "no images", str(no_images.parent))


def test_dataset_smaller_than_one_batch(run_main, tmp_path):
    folder = tmp_path / "few" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    code, err = run_main("--data_path", tmp_path / "few", "--output_dir", tmp_path / "o", "--device", "cpu",
                         "--batch_size_per_gpu", "4")
    assert_one_line_error(code, err, "3 images", "fewer than one batch")


def test_output_dir_that_cannot_be_created(run_main, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_main("--synthetic", "--device", "cpu", "--output_dir", blocker / "sub")
    assert_one_line_error(code, err, "--output_dir", str(blocker / "sub"))
    code, err = run_main("--synthetic", "--device", "cpu", "--output_dir", blocker)
    assert_one_line_error(code, err, "--output_dir", str(blocker), "is a file, not a folder")
    assert blocker.read_text() == "x"


def test_help_needs_no_network():
    result = run_py("main_dino.py", "--help", env={"no_proxy": "", "https_proxy": "http://127.0.0.1:9",
                                                   "http_proxy": "http://127.0.0.1:9"}, timeout=120)
    assert result.returncode == 0
    for flag in ("--data_path", "--device", "--synthetic", "--global_crop_size", "--amp", "--num_steps"):
        assert flag in result.stdout


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    result = run_py("main_dino.py", "--data_path", tmp_path / "missing", "--output_dir", tmp_path, "--device", "cpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


SYNTHETIC = TINY_TRAIN_ARGS + ["--synthetic", "--batch_size_per_gpu", "4"]


def throughput(stdout):
    match = re.search(r"^Training throughput: ([0-9.]+) images/s$", stdout, re.M)
    assert match, stdout[-2000:]
    return float(match.group(1))


def test_synthetic_run_writes_a_reference_format_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = run_py("main_dino.py", *SYNTHETIC, "--num_steps", "4", "--output_dir", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert throughput(first.stdout) > 0
    assert re.search(r"Epoch: \[0/100\]\s+\[\s*0/\d+\]\s+eta: .*loss: .*lr: .*wd: .*time: .*data: ", first.stdout)

    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    for key in ("student", "teacher", "optimizer", "epoch", "args", "dino_loss"):
        assert key in ckpt
    assert all(k.startswith("module.") for k in ckpt["student"])
    assert "module.head.last_layer.weight_g" in ckpt["student"] and "module.backbone.cls_token" in ckpt["student"]
    assert "backbone.blocks.0.attn.qkv.weight" in ckpt["teacher"]
    assert ckpt["dino_loss"]["center"].shape == (1, 256)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 4)
    assert ckpt["args"]["arch"] == "vit_tiny" and ckpt["args"]["num_steps"] == 4

    second = run_py("main_dino.py", *SYNTHETIC, "--num_steps", "6", "--output_dir", out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from epoch 0, step 4." in second.stdout
    resumed = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert resumed["step_in_epoch"] == 6
    steps = {int(state["step"]) for state in resumed["optimizer"]["state"].values()}
    assert steps == {6}  # the optimizer went on from its saved state (4 steps), not from scratch
    assert throughput(second.stdout) > 0
    # an epoch cut short by --num_steps still logs its last step (5) and its total time
    assert re.search(r"Epoch: \[0/100\]\s+\[\s*5/\d+\]", second.stdout) and "Epoch: [0/100] Total time" in second.stdout

    before = (out / "checkpoint.pth").stat().st_mtime_ns
    third = run_py("main_dino.py", *SYNTHETIC, "--num_steps", "6", "--output_dir", out)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Nothing to train" in third.stdout and "--num_steps 6" in third.stdout
    assert "Epoch: [" not in third.stdout and (out / "checkpoint.pth").stat().st_mtime_ns == before


def test_checkpoints_that_cannot_resume_this_run(run_main, tmp_path):
    """Another optimizer's state, a file that is no training checkpoint, missing keys: one line each, before any
    step, and the checkpoint is left as it was."""
    out = tmp_path / "run"
    code, err = run_main(*SYNTHETIC, "--num_steps", "1", "--output_dir", out)
    assert code == 0, err
    ckpt_path = out / "checkpoint.pth"
    saved = ckpt_path.read_bytes()
    code, err = run_main(*SYNTHETIC, "--num_steps", "2", "--output_dir", out, "--optimizer", "sgd")
    assert_one_line_error(code, err, "--optimizer adamw", "sgd", str(ckpt_path))
    assert ckpt_path.read_bytes() == saved
    code, err = run_main(*SYNTHETIC, "--num_steps", "2", "--output_dir", out, "--optimizer", "npufusedadamw")
    assert code == 0, err  # AdamW's state either way (NpuFusedAdamW falls back to AdamW off Ascend)

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    del ckpt["student"]["module.backbone.cls_token"]
    torch.save(ckpt, ckpt_path)
    code, err = run_main(*SYNTHETIC, "--num_steps", "3", "--output_dir", out)
    assert_one_line_error(code, err, "does not fit this run", "backbone.cls_token")

    torch.save(torch.zeros(3), ckpt_path)
    code, err = run_main(*SYNTHETIC, "--num_steps", "3", "--output_dir", out)
    assert_one_line_error(code, err, "not a training checkpoint", "Tensor")


def test_a_class_named_train_is_not_the_imagenet_layout(tmp_path):
    for name in ("bus", "train"):
        (tmp_path / "classes" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "classes" / name / "0.png")
    assert main_dino.resolve_train_folder(str(tmp_path / "classes")) == str(tmp_path / "classes")
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    assert main_dino.resolve_train_folder(str(tmp_path / "imagenet")) == str(tmp_path / "imagenet" / "train")
    assert isinstance(main_dino.torchvision_archs, list) and "resnet50" in main_dino.torchvision_archs


@pytest.mark.parametrize("compiled", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not utils.has_cxx_compiler(), reason="--compile needs a C++ compiler")),
])
def test_two_processes_with_torchrun_on_cpu(tmp_path, compiled):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "main_dino.py"), *SYNTHETIC, "--num_steps", "3", "--output_dir", str(out)]
    if compiled:  # the compiled blocks inside DistributedDataParallel (drop path on)
        cmd += ["--compile", "--drop_path_rate", "0.1"]
    else:  # BatchNorm in the head: SyncBatchNorm is for accelerators, CPU processes keep their own statistics
        cmd += ["--use_bn_in_head", "true"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("transformer blocks (compiled" in result.stdout) == compiled
    assert ("BatchNorm layers keep per-process statistics" in result.stdout) != compiled
    assert "distributed init (rank 0/2)" in result.stdout + result.stderr
    assert "distributed init (rank 1/2)" in result.stdout + result.stderr
    assert throughput(result.stdout) > 0
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step_in_epoch"] == 3
