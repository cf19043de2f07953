"""DINO on a small real image set (UCI digits): the loss falls and the teacher's features get better."""
import json
import re

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

import main_dino
import utils
from helpers import run_py

DIGITS_ARGS = [
    "--arch", "vit_tiny", "--patch_size", "16", "--device", "cpu", "--use_fp16", "false",
    "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2",
    "--batch_size_per_gpu", "64", "--num_workers", "2", "--epochs", "2", "--warmup_epochs", "1",
    "--freeze_last_layer", "0", "--lr", "0.004", "--momentum_teacher", "0.99", "--out_dim", "64",
    "--warmup_teacher_temp", "0.01", "--teacher_temp", "0.01", "--saveckp_freq", "0",
]


def features(backbone, folder):
    tf = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.Grayscale(3), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, tf), batch_size=256)
    feats, labels = [], []
    backbone.eval()
    with torch.no_grad():
        for x, y in loader:
            feats.append(F.normalize(backbone(x), dim=1))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train, test, k=20, T=0.07):
    """Weighted k-NN vote, brute force."""
    (train_f, train_y), (test_f, test_y) = train, test
    sims, idx = (test_f @ train_f.t()).topk(k, dim=1)
    votes = torch.zeros(len(test_f), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (sims / T).exp())
    return (votes.argmax(1) == test_y).float().mean().item() * 100


def test_training_on_digits_lowers_the_loss_and_improves_knn(digits_root, tmp_path):
    out = tmp_path / "digits_run"
    result = run_py("main_dino.py", *DIGITS_ARGS, "--data_path", digits_root, "--output_dir", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training on " in result.stdout and "/train only" in result.stdout
    first_loss = float(re.search(r"\[\s*0/\d+\].*?loss: ([0-9.]+)", result.stdout).group(1))
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[-1]["train_loss"] < 0.8 * first_loss
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    args = main_dino.get_args_parser().parse_args(DIGITS_ARGS)
    utils.fix_random_seeds(args.seed)  # the trainer's seed: the same initial weights
    initial, _ = main_dino.build_student_teacher(args)
    trained, _ = main_dino.build_student_teacher(args)
    ckpt = utils.load_checkpoint_file(str(out / "checkpoint.pth"))
    trained.load_state_dict(ckpt["teacher"])
    before = knn_top1(features(initial.backbone, f"{digits_root}/train"), features(initial.backbone,
                                                                                    f"{digits_root}/val"))
    after = knn_top1(features(trained.backbone, f"{digits_root}/train"), features(trained.backbone,
                                                                                   f"{digits_root}/val"))
    assert after > before, (before, after)
