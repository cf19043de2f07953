"""DINO on a small real image set (UCI digits), as a user runs it: main_dino.py, then eval_knn.py."""
import json
import math
import re

from conftest import write_digits
from helpers import run_py
from test_eval_knn import EVAL_ARGS, knn_results

# 30 fp32 steps of ViT-T/8 on 160 digits at 32 px. A sharp teacher (temperature 0.01) over 64 outputs makes
# the loss fall within the first epoch; the teacher's 20-NN top-1 rises from about 41% (the same network
# before training) to about 49% (measured on x86-64, 2 cores).
BRIEF_TRAINING = ["--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "64", "--device", "cpu",
                  "--num_workers", "0", "--use_fp16", "false", "--global_crop_size", "32", "--local_crop_size",
                  "16", "--local_crops_number", "0", "--global_crops_scale", "0.5", "1", "--batch_size", "16",
                  "--lr", "0.005", "--momentum_teacher", "0.95", "--warmup_teacher_temp", "0.01",
                  "--teacher_temp", "0.01", "--epochs", "4", "--warmup_epochs", "1", "--num_steps", "30",
                  "--saveckp_freq", "0", "--seed", "0"]


def test_training_on_digits_lowers_the_loss_and_improves_knn(tmp_path):
    train_root = write_digits(str(tmp_path / "train_digits"), n_train=160, n_val=1)
    eval_root = write_digits(str(tmp_path / "eval_digits"), n_train=500, n_val=150)
    out = tmp_path / "run"
    trained = run_py("main_dino.py", "--data_path", train_root, "--output_dir", out, *BRIEF_TRAINING)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "/train only" in trained.stdout  # the ImageNet layout: val/ is never trained on
    first_loss = float(re.search(r"\[\s*0/\d+\].*?loss: ([0-9.]+)", trained.stdout).group(1))
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    for epoch in range(3):  # every epoch's last progress line and total time, the last epoch's too
        assert re.search(rf"Epoch: \[{epoch}/4\]\s+\[\s*9/10\]", trained.stdout), trained.stdout[-3000:]
        assert f"Epoch: [{epoch}/4] Total time" in trained.stdout
    assert epochs[0]["train_loss"] < first_loss
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    # so sharp a teacher on 160 images ends in one-hot collapse after the first epoch: the monitor says so, once
    assert trained.stdout.count("collapse suspected") == 1
    assert "collapse suspected at epoch 1 (one-hot)" in trained.stdout and "--momentum_teacher" in trained.stdout

    common = ["--data_path", eval_root, "--nb_knn", "20", *EVAL_ARGS]
    after = run_py("eval_knn.py", "--pretrained_weights", out / "checkpoint.pth", *common)
    before = run_py("eval_knn.py", "--random_weights", *common)  # seed 0: the network training started from
    assert after.returncode == 0 and before.returncode == 0, after.stderr[-2000:] + before.stderr[-2000:]
    trained_top1, initial_top1 = knn_results(after.stdout)[20][0], knn_results(before.stdout)[20][0]
    assert trained_top1 > initial_top1 + 2.0, (trained_top1, initial_top1)


def test_no_collapse_warning_on_a_healthy_run(tmp_path):
    """The first epoch of the same run: the loss is far from ln(out_dim) and the teacher entropy from 0."""
    train_root = write_digits(str(tmp_path / "train_digits"), n_train=160, n_val=1)
    out = tmp_path / "run"
    healthy = run_py("main_dino.py", "--data_path", train_root, "--output_dir", out, *BRIEF_TRAINING,
                     "--num_steps", "10")  # the last value of a flag wins
    assert healthy.returncode == 0, healthy.stderr[-2000:]
    epoch = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert epoch["train_teacher_entropy"] > 0.1 and epoch["train_loss"] < 0.9 * math.log(64)
    assert "collapse suspected" not in healthy.stdout
