"""eval_linear.py: a linear probe on frozen features of the UCI digits, resume, --evaluate, torchrun."""
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import eval_linear
import utils
from conftest import write_digits
from helpers import ROOT

# Fast CPU settings: 32x32 digits in 2x2 patches of 16 (5 tokens), large batches, no flips (they change digits).
FAST = ["--arch", "vit_tiny", "--patch_size", "16", "--image_size", "32", "--random_weights",
        "--train_augmentation", "false", "--lr", "0.03", "--batch_size_per_gpu", "256", "--num_workers", "0",
        "--device", "cpu"]


def accuracies(text):
    return [float(a) for a in re.findall(r"Accuracy at epoch \d+ of the network on the \d+ test images: "
                                         r"([\d.]+)%", text)]


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("tiny")), n_train=40, n_val=20)


def run_main(capsys, *args):
    eval_linear.main([str(a) for a in args])
    return capsys.readouterr().out


def test_probe_beats_chance_and_evaluates(digits_root, tmp_path, capsys):
    out_dir = tmp_path / "linear"
    trained = run_main(capsys, *FAST, "--data_path", digits_root, "--epochs", 2, "--output_dir", out_dir)
    assert "Data loaded with 1437 train and 360 val imgs (10 labels)." in trained
    assert "* Acc@1" in trained and "Acc@5" in trained
    first, accuracy = accuracies(trained)
    assert accuracy > 50.0, trained[-1500:]  # chance is 10%
    assert f"Top-1 test accuracy: {max(first, accuracy):.1f}" in trained
    ckpt = utils.load_checkpoint_file(str(out_dir / "checkpoint.pth.tar"))
    assert ckpt["epoch"] == 2 and ckpt["best_acc"] == pytest.approx(max(first, accuracy), abs=0.05)
    assert ckpt["state_dict"]["module.linear.weight"].shape == (10, 4 * 192)  # 4 last [CLS] tokens of vit_tiny

    evaluated = run_main(capsys, *FAST, "--data_path", digits_root, "--evaluate", "--output_dir", out_dir)
    match = re.search(r"Accuracy of the network on the 360 test images: ([\d.]+)%", evaluated)
    assert match and float(match.group(1)) == pytest.approx(accuracy, abs=0.05)
    assert "Epoch: [" not in evaluated


def test_resume_continues_the_run(tiny_digits, tmp_path, capsys):
    out_dir = tmp_path / "linear"
    first = run_main(capsys, *FAST, "--data_path", tiny_digits, "--epochs", 1, "--output_dir", out_dir)
    second = run_main(capsys, *FAST, "--data_path", tiny_digits, "--epochs", 3, "--val_freq", 2,
                      "--output_dir", out_dir)
    assert "Resuming the linear classifier from epoch 1." in second
    assert "Epoch: [0]" not in second and "Epoch: [1]" in second and "Epoch: [2]" in second
    assert "stretched" in second  # the cosine schedule follows the new --epochs
    log = [json.loads(line) for line in (out_dir / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1, 2]
    assert ["test_acc1" in entry for entry in log] == [True, False, True]  # every 2nd epoch and the last
    assert log[0]["train_lr"] > log[1]["train_lr"] > log[2]["train_lr"] > 0
    best = max(accuracies(first) + accuracies(second))
    assert f"Top-1 test accuracy: {best:.1f}" in second
    assert utils.load_checkpoint_file(str(out_dir / "checkpoint.pth.tar"))["epoch"] == 3
    third = run_main(capsys, *FAST, "--data_path", tiny_digits, "--epochs", 3, "--output_dir", out_dir)
    assert "Epoch: [" not in third and f"Top-1 test accuracy: {best:.1f}" in third  # nothing left to do

    with pytest.raises(SystemExit):  # the saved head reads 4 blocks; resuming with 1 must not load it
        eval_linear.main([*FAST, "--data_path", tiny_digits, "--epochs", "4", "--n_last_blocks", "1",
                          "--output_dir", str(out_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "768 features" in err[0] and "192 features" in err[0], err


def test_two_processes_train_the_same_classifier(tmp_path, capsys):
    """torchrun, gloo on CPU: 2 x 32 images per step give the same classifier as 1 x 64 (DDP averages)."""
    data = write_digits(str(tmp_path / "digits"), n_train=128, n_val=40)
    common = [*FAST, "--data_path", data, "--epochs", "1", "--batch_size_per_gpu"]
    one = run_main(capsys, *common, 64, "--output_dir", tmp_path / "one")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "eval_linear.py"), *common, "32", "--output_dir", str(tmp_path / "two")],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "(rank 1/2)" in two.stdout + two.stderr
    heads = [utils.load_checkpoint_file(str(tmp_path / name / "checkpoint.pth.tar"))["state_dict"]
             for name in ("one", "two")]
    for key in heads[0]:
        assert torch.allclose(heads[0][key], heads[1][key], atol=1e-5), key
    assert accuracies(two.stdout) == accuracies(one)  # val/ is split over the processes, counted exactly


def test_features_and_accuracy():
    torch.manual_seed(0)
    args = SimpleNamespace(arch="vit_tiny", patch_size=16, random_weights=True, pretrained_weights="",
                           checkpoint_key="teacher", n_last_blocks=1, avgpool_patchtokens=True, image_size=32)
    model, dim = eval_linear.build_frozen_backbone(args, utils.Accelerator("cpu"))
    assert dim == 2 * 192
    images = torch.randn(3, 3, 32, 32)
    tokens = model.get_intermediate_layers(images, 1)[-1]
    feats = eval_linear.extract_features(model, images, 1, True)
    # the reference's order for n=1: [CLS] and mean patch features interleaved (released heads expect it)
    assert torch.allclose(feats[:, 0::2], tokens[:, 0]) and torch.allclose(feats[:, 1::2], tokens[:, 1:].mean(1))
    feats4 = eval_linear.extract_features(model, images, 4, True)
    assert feats4.shape == (3, 5 * 192)
    assert torch.allclose(feats4[:, -192:], tokens[:, 1:].mean(1))

    args.arch = "resnet18"
    _, dim = eval_linear.build_frozen_backbone(args, utils.Accelerator("cpu"))
    assert dim == 512

    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    top1, top2 = utils.accuracy(scores, torch.tensor([1, 1, 2, 1]), topk=(1, 2))
    assert top1.item() == pytest.approx(50.0) and top2.item() == pytest.approx(100.0)


@pytest.mark.parametrize("args, message", [
    (["--data_path", "{missing}"], "--data_path is not a folder"),
    (["--data_path", "{no_val}"], "has no val/ folder"),
    (["--data_path", "{tiny}", "--pretrained_weights", "{tiny}/train/0/0000.png", "--random_weights"],
     "exclude each other"),
    (["--data_path", "{tiny}", "--no_weights"], "--random_weights"),
    (["--data_path", "{tiny}", "--no_weights", "--pretrained_weights", "{tiny}/train/0/0000.png"], "0000.png"),
    (["--data_path", "{tiny}", "--evaluate"], "--evaluate (no --linear_weights): no such file"),
    (["--data_path", "{tiny}", "--evaluate", "--linear_weights", "{tiny}"], "is a folder, not a checkpoint"),
    (["--data_path", "{tiny}", "--no_weights", "--pretrained_weights", "{missing}"], "--pretrained_weights: no such"),
    (["--data_path", "{tiny}", "--output_dir", "{a_file}"], "is a file, not a folder"),
    (["--data_path", "{tiny}", "--num_labels", "3"], "smaller than the 10 classes"),
    (["--data_path", "{tiny}", "--epochs", "0"], "--epochs"),
    (["--data_path", "{tiny}", "--arch", "vit_smal"], "unknown --arch 'vit_smal'"),
    (["--data_path", "{tiny}", "--output_dir", "{a_file}/out"], "cannot create --output_dir"),
    (["--data_path", "{tiny}", "--linear_weights", "{a_file}"], "with --evaluate only"),
])
def test_bad_input_is_one_line(tiny_digits, tmp_path, capsys, args, message):
    no_val = tmp_path / "no_val"
    (no_val / "train" / "a").mkdir(parents=True)
    (tmp_path / "a_file").write_text("")
    fast = [a for a in FAST if a != "--random_weights"] if "--no_weights" in args else FAST
    args = [a.format(missing=tmp_path / "missing", no_val=no_val, tiny=tiny_digits, a_file=tmp_path / "a_file")
            for a in args if a != "--no_weights"]
    with pytest.raises(SystemExit) as exit_info:
        eval_linear.main([*fast, "--output_dir", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    if "classes" not in message:  # all but the class count (known once the data is read) come before any work
        assert not (tmp_path / "out").exists()


def test_unreadable_image_is_named(tiny_digits, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    (data / "train" / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):  # read in a DataLoader worker: its traceback must not reach the user
        eval_linear.main([*FAST, "--num_workers", "1", "--data_path", str(data), "--epochs", "1",
                          "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "broken.png" in err[0], err
    assert "Traceback" not in err[0]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_linear.main(["--help"])
    assert exit_info.value.code == 0
    assert "--val_freq" in capsys.readouterr().out
