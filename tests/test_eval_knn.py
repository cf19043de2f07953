"""eval_knn.py: the weighted k-NN vote, feature extraction from checkpoints, and its errors."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval_knn
import utils
from conftest import write_digits
from helpers import ROOT, run_py

RESULT_PREFIX = "-NN classifier result: Top1: "


def brute_force_knn(train_features, train_labels, test_features, test_labels, ks, T, num_classes):
    """{k: (top1, top5)}, one test image at a time in plain Python: the k most similar training images
    vote for their class with weight exp(similarity / T); equal scores rank by class index."""
    hits = {k: [0, 0] for k in ks}
    train_labels = train_labels.tolist()
    for feature, target in zip(test_features, test_labels.tolist()):
        sims = (train_features @ feature).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])
        for k in ks:
            scores = [0.0] * num_classes
            for j in order[:k]:
                scores[train_labels[j]] += math.exp(sims[j] / T)
            ranking = sorted(range(num_classes), key=lambda c: (-scores[c], c))
            hits[k][0] += ranking[0] == target
            hits[k][1] += target in ranking[:min(5, k, num_classes)]
    n = len(test_labels)
    return {k: (h1 * 100.0 / n, h5 * 100.0 / n) for k, (h1, h5) in hits.items()}


def clustered_features(n_train, n_test, num_classes, dim=16, seed=0):
    """Noisy points around one centre per class, L2-normalised: the k-NN task is neither trivial nor hopeless."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)

    def draw(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        feats = centres[labels] + 2.0 * torch.randn(n, dim, generator=g)
        return torch.nn.functional.normalize(feats, dim=1), labels
    return draw(n_train) + draw(n_test)


@pytest.mark.parametrize("n_test", [7, 57, 130])
@pytest.mark.parametrize("num_classes", [3, 12])
def test_knn_classifier_matches_brute_force(n_test, num_classes):
    """Fewer than 100 test images included (the reference's chunking divides by 100); k > train set clamped."""
    train_f, train_l, test_f, test_l = clustered_features(300, n_test, num_classes, seed=n_test + num_classes)
    T = 0.07
    expected = brute_force_knn(train_f, train_l, test_f, test_l, (1, 4, 10, 20, 300), T, num_classes)
    expected[500] = expected[300]
    for k, want in expected.items():
        got = eval_knn.knn_classifier(train_f, train_l, test_f, test_l, k, T, num_classes=num_classes)
        assert got == pytest.approx(want, abs=1e-9), (k, got, want)
    assert any(0 < top1 < 100 for top1, _ in expected.values())  # the data make the task non-trivial


def test_knn_classifier_counts_sum_across_splits():
    """What the distributed vote adds up: hits on a split of the test set equal hits on the whole."""
    train_f, train_l, test_f, test_l = clustered_features(200, 90, 10, seed=3)
    whole = eval_knn.knn_correct_counts(train_f, train_l, test_f, test_l, 20, 0.07, num_classes=10)
    parts = [eval_knn.knn_correct_counts(train_f, train_l, test_f[rows], test_l[rows], 20, 0.07, num_classes=10)
             for rows in torch.arange(90).tensor_split(3)]
    assert tuple(map(sum, zip(*parts))) == whole
    assert whole[2] == 90 and 0 < whole[0] <= whole[1] <= 90


# ---------------------------------------------------------------------------
# End to end on the digits (real images)
# ---------------------------------------------------------------------------

EVAL_ARGS = ["--arch", "vit_tiny", "--patch_size", "8", "--device", "cpu", "--num_workers", "0",
             "--crop_size", "32", "--resize_size", "32"]


def knn_results(stdout):
    """{k: (top1, top5)} in printed order, from the reference's result lines."""
    results = {}
    for line in stdout.splitlines():
        if RESULT_PREFIX in line:
            k = int(line.split("-NN")[0])
            top1, top5 = line.split("Top1: ")[1].split(", Top5: ")
            results[k] = (float(top1), float(top5))
    return results


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """Fewer than 100 val images and fewer training images than the largest default k (200)."""
    return write_digits(str(tmp_path_factory.mktemp("small_digits")), n_train=150, n_val=40)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_run(small_digits, tmp_path_factory):
    """One process, random weights, features dumped: (CompletedProcess, dump folder)."""
    dump = str(tmp_path_factory.mktemp("features_1p"))
    result = run_py("eval_knn.py", "--random_weights", "--data_path", small_digits, "--use_cuda", "false",
                    "--dump_features", dump, *EVAL_ARGS, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result, dump


def test_small_val_set_and_k_larger_than_train_set(small_run):
    result, _ = small_run
    results = knn_results(result.stdout)
    assert list(results) == [10, 20, 100, 200]  # the reference's default ks, in order
    for top1, top5 in results.values():
        assert 0 <= top1 <= top5 <= 100
    assert "RANDOM weights" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: k=")]
    assert len(warnings) == 1 and "k=200" in warnings[0] and "150" in warnings[0]
    # 10 classes, 40 images: each result is a multiple of 1/40
    assert all(abs(top1 * 40 / 100 - round(top1 * 40 / 100)) < 1e-9 for top1, _ in results.values())


def test_load_features_gives_the_same_results(small_run, capsys):
    result, dump = small_run
    eval_knn.main(["--load_features", dump, "--device", "cpu"])  # no model, no dataset needed
    assert knn_results(capsys.readouterr().out) == knn_results(result.stdout)


def test_two_processes_match_one(small_run, small_digits, tmp_path):
    """torchrun, gloo on CPU: train and val extraction and the votes split over 2 processes, same numbers."""
    result, dump = small_run
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "eval_knn.py"), "--random_weights", "--data_path", small_digits,
         "--use_cuda", "false", "--dump_features", str(tmp_path), *EVAL_ARGS],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "(rank 1/2)" in two.stdout + two.stderr
    for name in eval_knn.FEATURE_FILES:
        one_proc = utils.load_checkpoint_file(os.path.join(dump, name))
        two_procs = utils.load_checkpoint_file(str(tmp_path / name))
        assert one_proc.shape == two_procs.shape
        assert torch.allclose(one_proc.float(), two_procs.float(), atol=1e-5), name
    assert knn_results(two.stdout) == knn_results(result.stdout)
    assert two.stdout.count("10-NN classifier result") == 1  # printed by rank 0 only


def save_backbone_formats(folder, arch="vit_tiny", patch_size=8, seed=1):
    """A backbone's weights as our trainer, the reference's trainer and the released files store them."""
    import main_dino
    torch.manual_seed(seed)
    backbone, dim = main_dino.build_backbone(arch, patch_size)
    weights = backbone.state_dict()
    head = {"mlp.0.weight": torch.zeros(4, dim), "last_layer.weight_g": torch.ones(8, 1)}
    files = {
        "ours.pth": {"teacher": {**{"backbone." + k: v for k, v in weights.items()},
                                 **{"head." + k: v for k, v in head.items()}},
                     "student": {"module.backbone." + k: v + 1 for k, v in weights.items()},
                     "epoch": 3, "args": {"arch": arch}},
        "reference.pth": {"student": {**{"module.backbone." + k: v for k, v in weights.items()},
                                      **{"module.head." + k: v for k, v in head.items()}},
                          "teacher": {"backbone." + k: v - 1 for k, v in weights.items()}},
        "released.pth": dict(weights),
    }
    for name, obj in files.items():
        torch.save(obj, os.path.join(folder, name))
    return weights


@pytest.mark.parametrize("name,key", [("ours.pth", "teacher"), ("reference.pth", "student"),
                                      ("released.pth", "teacher")])
def test_loads_checkpoint_formats(tmp_path, small_digits, name, key):
    weights = save_backbone_formats(str(tmp_path))
    args = eval_knn.get_args_parser().parse_args(
        ["--pretrained_weights", str(tmp_path / name), "--checkpoint_key", key, "--data_path", small_digits]
        + EVAL_ARGS)
    model = eval_knn.build_model(args, utils.Accelerator.create("cpu"))
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k


def test_random_weights_only_when_asked(small_digits, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(["--data_path", small_digits] + EVAL_ARGS)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "--pretrained_weights" in err and "--random_weights" in err and "\n" not in err


def error_cases(tmp_path, digits):
    save_backbone_formats(str(tmp_path))
    not_ckpt = tmp_path / "notes.pth"
    not_ckpt.write_text("not a checkpoint\n")
    torch.save([1, 2, 3], str(tmp_path / "list.pth"))
    no_val = tmp_path / "no_val"
    (no_val / "train" / "a").mkdir(parents=True)
    no_train = tmp_path / "no_train"
    (no_train / "val" / "a").mkdir(parents=True)
    ours = str(tmp_path / "ours.pth")
    broken = tmp_path / "broken"
    for split, classes in (("train", ("0", "1")), ("val", ("0",))):
        for cls in classes:
            shutil.copytree(os.path.join(digits, split, cls), broken / split / cls)
    (broken / "train" / "1" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    bad_labels = tmp_path / "bad_labels"
    bad_labels.mkdir()
    for name, tensor in zip(eval_knn.FEATURE_FILES, (torch.randn(4, 8), torch.randn(2, 8), torch.tensor([0, 1, -1, 0]),
                                                     torch.tensor([0, 1]))):
        torch.save(tensor, str(bad_labels / name))
    extra_class = tmp_path / "extra_class"
    shutil.copytree(os.path.join(digits, "val", "3"), extra_class / "val" / "3")
    shutil.copytree(os.path.join(digits, "train", "4"), extra_class / "train" / "4")
    return {
        "missing file": (["--pretrained_weights", str(tmp_path / "nope.pth"), "--data_path", digits],
                         ["nope.pth"]),
        "typo in --arch": (["--random_weights", "--data_path", digits, "--arch", "vit_smal"], ["'vit_smal'"]),
        "a folder": (["--pretrained_weights", str(tmp_path), "--data_path", digits],
                     ["is a folder, not a checkpoint file", str(tmp_path)]),
        "no val/": (["--pretrained_weights", ours, "--data_path", str(no_val)], ["val/", str(no_val)]),
        "no train/": (["--pretrained_weights", ours, "--data_path", str(no_train)], ["train/"]),
        "no dataset": (["--pretrained_weights", ours, "--data_path", str(tmp_path / "nowhere")], ["nowhere"]),
        "not a checkpoint": (["--pretrained_weights", str(not_ckpt), "--data_path", digits], ["notes.pth"]),
        "not a state dict": (["--pretrained_weights", str(tmp_path / "list.pth"), "--data_path", digits],
                             ["list.pth"]),
        "wrong arch": (["--pretrained_weights", ours, "--data_path", digits, "--arch", "vit_small"],
                       ["ours.pth", "vit_small"]),
        "wrong patch size": (["--pretrained_weights", ours, "--data_path", digits, "--patch_size", "16"],
                             ["ours.pth", "pos_embed"]),
        "missing key": (["--pretrained_weights", ours, "--data_path", digits, "--checkpoint_key", "ema"],
                        ["ema"]),
        "unreadable image": (["--random_weights", "--data_path", str(broken), "--crop_size", "16"],
                             ["cannot read image", "truncated.png"]),
        "val class not in train": (["--random_weights", "--data_path", str(extra_class)], ["lacks: 3"]),
        "negative label": (["--load_features", str(bad_labels)], ["class indices", "bad_labels"]),
    }


def test_bad_input_is_one_line_error(tmp_path, small_digits, capsys):
    for case, (args, needles) in error_cases(tmp_path, small_digits).items():
        with pytest.raises(SystemExit) as exit_info:
            eval_knn.main(EVAL_ARGS + args)  # the last value of a flag wins
        assert exit_info.value.code != 0, case
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err, (case, err)
        for needle in needles:
            assert needle in err, (case, err)


def test_bad_checkpoint_from_the_command_line(tmp_path, small_digits):
    """The same, as a user sees it: exit code, one line, no traceback (here: another architecture)."""
    save_backbone_formats(str(tmp_path), arch="vit_small", patch_size=16)
    result = run_py("eval_knn.py", "--pretrained_weights", tmp_path / "ours.pth", "--data_path", small_digits,
                    *EVAL_ARGS)
    assert_one_line_error(result, "ours.pth", "vit_tiny", "shape mismatch")




def test_unwritable_dump_folder_fails_before_extraction(tmp_path, small_digits, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(EVAL_ARGS + ["--random_weights", "--data_path", small_digits,
                                   "--dump_features", str(blocker / "features")])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "cannot create --dump_features" in err and "a_file" in err
    assert "Extracting features" not in out


class IndexedImages(torch.utils.data.Dataset):
    """A dataset of the reference's kind: (image, index) items."""
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.images[idx], idx


def test_extract_features_keeps_the_reference_contract(small_digits):
    """The reference's scripts call extract_features(model, loader, use_cuda, multiscale) on (image, index)
    datasets; ReturnIndexDataset takes ImageFolder's keywords and works without a transform."""
    import vision_transformer as vits
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=8).eval()
    images = torch.randn(5, 3, 32, 32)
    loader = torch.utils.data.DataLoader(IndexedImages(images), batch_size=2, shuffle=False)
    accel = utils.Accelerator("cpu")
    with torch.no_grad():
        plain = eval_knn.extract_features(model, loader, False, False, accel=accel)
        assert torch.allclose(plain, model(images), atol=1e-5)
        multiscale = eval_knn.extract_features(model, loader, False, multiscale=True, accel=accel)
        for start in (0, 2, 4):  # multi_scale normalises each batch as a whole, as the reference
            assert torch.allclose(multiscale[start:start + 2], utils.multi_scale(images[start:start + 2], model),
                                  atol=1e-6)

    val = os.path.join(small_digits, "val")
    left_out = eval_knn.ReturnIndexDataset(val).samples[0][0]
    dataset = eval_knn.ReturnIndexDataset(val, target_transform=lambda t: t + 100,
                                          is_valid_file=lambda path: path != left_out)
    assert dataset.samples[0][0] != left_out and len(dataset) == len(eval_knn.ReturnIndexDataset(val)) - 1
    assert dataset.target_transform(1) == 101
    image, index, error = dataset[3]
    assert index == 3 and error == "" and image.mode == "RGB"  # no transform: the PIL image
    # ImageFolder's positional order, as the reference's subclass takes it: target_transform, then loader
    positional = eval_knn.ReturnIndexDataset(val, None, lambda t: t + 7, lambda path: Image.new("L", (5, 3)))
    assert positional.target_transform(1) == 8 and positional[0][0].size == (5, 3)
    assert eval_knn.ReturnIndexDataset(val, None, None)[0][0].mode == "RGB"  # the default loader stays


def test_multi_scale_averages_three_scales():
    sizes = []
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # mean colour per image

    def model(x):
        sizes.append(tuple(x.shape[-2:]))
        return pool(x)
    samples = torch.rand(2, 3, 16, 16)
    scaled = [samples] + [torch.nn.functional.interpolate(samples, scale_factor=s, mode="bilinear")
                          for s in (2 ** -0.5, 0.5)]
    want = sum(pool(x) for x in scaled) / 3
    assert torch.allclose(utils.multi_scale(samples, model), want / want.norm(), atol=1e-6)
    assert sizes == [(16, 16), (11, 11), (8, 8)]


def trapezoid_ap(ranked_relevance, nres):
    """AP of a ranking given as 0/1 relevance per position: trapezoids between successive recall steps."""
    ap, hits = 0.0, 0
    for position, relevant in enumerate(ranked_relevance):
        if relevant:
            before = hits / position if position else 1.0
            hits += 1
            ap += (before + hits / (position + 1)) / 2 / nres
    return ap


def test_retrieval_average_precision():
    assert utils.compute_ap([0, 2], 2) == pytest.approx((1 + 1) / 4 + (1 / 2 + 2 / 3) / 4)
    assert utils.compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    assert utils.compute_ap([1], 4) == pytest.approx((0 + 1 / 2) / 2 / 4)

    rng = torch.Generator().manual_seed(0)
    database, queries = 30, 4
    ranks = torch.stack([torch.randperm(database, generator=rng) for _ in range(queries)], dim=1).numpy()
    gnd = [{"ok": [1, 5, 7], "junk": [2, 9]}, {"ok": [0, 3]}, {"ok": [], "junk": [4]},
           {"ok": list(range(10, 20)), "junk": [0, 1, 2]}]
    mean_ap, aps, pr, prs = utils.compute_map(ranks, gnd, kappas=[1, 5, 10])
    for i, query in enumerate(gnd):
        if not query["ok"]:
            assert math.isnan(aps[i]) and all(math.isnan(x) for x in prs[i])
            continue
        kept = [d for d in ranks[:, i].tolist() if d not in query.get("junk", [])]  # junk leaves the ranking
        relevance = [d in query["ok"] for d in kept]
        assert aps[i] == pytest.approx(trapezoid_ap(relevance, len(query["ok"])))
        last_hit = max(p for p, r in enumerate(relevance) if r) + 1
        for j, kappa in enumerate([1, 5, 10]):
            kq = min(last_hit, kappa)
            assert prs[i, j] == pytest.approx(sum(relevance[:kq]) / kq)
    answered = [i for i, q in enumerate(gnd) if q["ok"]]
    assert mean_ap == pytest.approx(sum(aps[i] for i in answered) / 3)
    assert pr == pytest.approx(prs[answered].mean(axis=0))


def test_pca_whitening_decorrelates():
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    pca = utils.PCA(dim=4, whit=0.5)
    pca.mean = x.mean(axis=0)
    pca.train_pca(np.cov((x - pca.mean).T, bias=True))
    projected = pca.apply(x.copy())
    assert projected.shape == (500, 4)
    assert np.allclose(np.cov(projected.T, bias=True), np.eye(4), atol=1e-8)  # whitened: unit covariance
    as_tensor = torch.from_numpy(x).float()
    assert torch.allclose(pca.apply(as_tensor), torch.from_numpy(projected).float(), atol=1e-3)
    assert torch.equal(as_tensor, torch.from_numpy(x).float())  # the input is left unchanged


def test_reduce_dict_sums_or_averages_over_processes(monkeypatch):
    values = {"loss": torch.tensor(3.0), "acc": torch.tensor(0.5)}
    assert utils.reduce_dict(values) is values  # one process: nothing to reduce
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(utils, "all_reduce_sum", lambda t: t * 2)  # two processes holding the same values
    averaged = utils.reduce_dict(values)
    assert list(averaged) == ["acc", "loss"] and averaged["loss"].item() == 3.0
    assert utils.reduce_dict(values, average=False)["acc"].item() == 1.0


def test_a_released_convnet_file_with_its_classifier_loads_into_the_backbone(tmp_path):
    """The backbone's fc is an Identity (as the reference makes it): the file's fc weights are left out, as the
    reference's non-strict load leaves them; every other key is still checked."""
    import torchvision
    torch.manual_seed(0)
    full = torchvision.models.resnet18(num_classes=10)
    torch.save(full.state_dict(), tmp_path / "released.pth")
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    utils.load_pretrained_weights(backbone, str(tmp_path / "released.pth"), "teacher", "resnet18")
    assert torch.equal(backbone.conv1.weight, full.conv1.weight)
    broken = {k: v for k, v in full.state_dict().items() if k != "layer1.0.conv1.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(utils.UserError, match="missing keys: layer1.0.conv1.weight"):
        utils.load_pretrained_weights(backbone, str(tmp_path / "broken.pth"), "teacher", "resnet18")
