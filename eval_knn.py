# Copyright (c) Facebook, Inc. and its affiliates.
# Copyright 2026 the DINO for PyTorch authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Weighted k-NN classification of frozen [CLS] features (the reference's eval_knn.py) on NPU, GPU or CPU.

Run alone, or under torchrun: the train and val feature extraction and the
k-NN votes are both split across the processes.
"""
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision import datasets
from torchvision import transforms as pth_transforms

import utils
from main_dino import VIT_ARCHS, OneLineErrorParser, add_process_args, build_backbone, check_arch, load_rgb
from utils import UserError

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def get_args_parser():
    parser = OneLineErrorParser('Evaluation with weighted k-NN on ImageNet', allow_abbrev=False)
    parser.add_argument('--batch_size_per_gpu', default=128, type=int, help='Per-device batch-size')
    parser.add_argument('--nb_knn', default=[10, 20, 100, 200], nargs='+', type=int,
        help='Number of NN to use. 20 is usually working the best.')
    parser.add_argument('--temperature', default=0.07, type=float,
        help='Temperature used in the voting coefficient')
    parser.add_argument('--pretrained_weights', default='', type=str, help="""Path to the weights to evaluate:
        a training checkpoint (this package's or the reference's) or released backbone weights.""")
    parser.add_argument('--random_weights', action='store_true', help="""Evaluate a randomly initialised
        network (a baseline); never implied by a missing --pretrained_weights.""")
    parser.add_argument('--use_cuda', default=True, type=utils.bool_flag,
        help="""Keep the feature bank in accelerator (NPU/GPU) memory. Set it to False if you run out of
        memory: the bank then lives in host memory.""")
    parser.add_argument('--arch', default='vit_small', type=str, help='Architecture')
    parser.add_argument('--patch_size', default=16, type=int, help='Patch resolution of the model.')
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
        help='Key to use in the checkpoint (example: "teacher")')
    parser.add_argument('--dump_features', default=None,
        help='Path where to save computed features, empty for no saving')
    parser.add_argument('--load_features', default=None, help="""If the features have
        already been computed, where to find them.""")
    parser.add_argument('--resize_size', default=256, type=int,
        help='Images are resized (shorter side, bicubic) to this size...')
    parser.add_argument('--crop_size', default=224, type=int, help='...then center-cropped to this size.')
    parser.add_argument('--num_workers', default=10, type=int, help='Number of data loading workers per GPU.')
    add_process_args(parser)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str,
        help='Dataset root holding train/ and val/ class folders (ImageFolder layout).')
    return parser


def validate_args(args):
    """Rejects bad settings before any process group, dataset scan or model build."""
    if any(k < 1 for k in args.nb_knn):
        raise UserError(f"--nb_knn values must be at least 1 (got {' '.join(map(str, args.nb_knn))})")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be positive (got {args.temperature})")
    if args.batch_size_per_gpu < 1:
        raise UserError(f"--batch_size_per_gpu must be at least 1 (got {args.batch_size_per_gpu})")
    if args.num_workers < 0:
        raise UserError("--num_workers must be 0 or more")
    if args.load_features:
        for name in FEATURE_FILES:
            path = os.path.join(args.load_features, name)
            if not os.path.isfile(path):
                raise UserError(f"--load_features: feature file not found: {path}")
        return
    if args.pretrained_weights and args.random_weights:
        raise UserError("give either --pretrained_weights or --random_weights, not both")
    if not args.pretrained_weights and not args.random_weights:
        raise UserError("no --pretrained_weights given: pass a checkpoint file, or --random_weights to "
                        "evaluate an untrained network")
    if args.pretrained_weights:
        utils.check_file_flag(args.pretrained_weights, "--pretrained_weights")
    check_arch(args.arch)
    if args.resize_size < 1 or args.crop_size < 1:
        raise UserError("--resize_size and --crop_size must be positive")
    if args.arch.replace("deit", "vit") in VIT_ARCHS and not 1 <= args.patch_size <= args.crop_size:
        raise UserError(f"--patch_size {args.patch_size} must be between 1 and --crop_size {args.crop_size}")
    dataset_dirs(args.data_path)


def dataset_dirs(data_path):
    """(train, val) folders of a dataset root, or a UserError naming what is missing."""
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path is not a folder: {data_path}")
    folders = tuple(os.path.join(data_path, split) for split in ("train", "val"))
    for folder in folders:
        if not os.path.isdir(folder):
            raise UserError(f"--data_path {data_path} has no {os.path.basename(folder)}/ folder (the k-NN "
                            f"evaluation needs train/ and val/ class folders)")
    return folders


class ReturnIndexDataset(datasets.ImageFolder):
    """ImageFolder yielding (image, index, error): an unreadable file is reported, not a worker crash.

    extract_features also takes the reference's (image, index) items, so its other datasets keep working."""
    def __init__(self, root, transform=None, *image_folder_args, blank_size=224, **image_folder_kwargs):
        # ImageFolder's positional order (target_transform, loader, ...) as the reference's subclass
        if len(image_folder_args) < 2:
            image_folder_kwargs.setdefault("loader", load_rgb)
        try:
            super().__init__(root, transform, *image_folder_args, **image_folder_kwargs)
        except (FileNotFoundError, RuntimeError) as err:
            raise UserError(f"no images found in {root}: expected class sub-folders holding image files "
                            f"({str(err).splitlines()[0]})") from err
        self.blank = torch.zeros(3, blank_size, blank_size)

    def __getitem__(self, idx):
        path = self.samples[idx][0]
        try:
            image = self.loader(path)
            return (self.transform(image) if self.transform is not None else image), idx, ""
        except Exception as err:  # PIL raises many types for bad files
            detail = str(err).splitlines()[0] if str(err) else ""
            return self.blank, idx, f"{path} ({type(err).__name__}: {detail})"


def use_class_indices(dataset, class_to_idx, root):
    """Labels val/ images with train/'s class indices, so that a val/ missing a class stays aligned."""
    unknown = sorted(set(dataset.classes) - set(class_to_idx))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserError(f"{root} has class folders that the training set lacks: {shown}")
    dataset.samples = [(path, class_to_idx[dataset.classes[t]]) for path, t in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    dataset.classes = sorted(class_to_idx, key=class_to_idx.get)
    dataset.class_to_idx = dict(class_to_idx)


def build_datasets(args):
    train_dir, val_dir = dataset_dirs(args.data_path)
    transform = pth_transforms.Compose([
        pth_transforms.Resize(args.resize_size, interpolation=pth_transforms.InterpolationMode.BICUBIC),
        pth_transforms.CenterCrop(args.crop_size),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset_train = ReturnIndexDataset(train_dir, transform, blank_size=args.crop_size)
    dataset_val = ReturnIndexDataset(val_dir, transform, blank_size=args.crop_size)
    use_class_indices(dataset_val, dataset_train.class_to_idx, val_dir)
    return dataset_train, dataset_val


def build_model(args, accel):
    utils.fix_random_seeds(0)  # --random_weights gives the same network on every rank and every run
    model, _ = build_backbone(args.arch, args.patch_size)
    model.fc, model.head = nn.Identity(), nn.Identity()  # features, not class scores (torchvision models)
    if args.random_weights:
        print(f"warning: evaluating RANDOM weights of {args.arch} (--random_weights), not a trained network")
    else:
        utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch,
                                      args.patch_size)
    if args.arch.replace("deit", "vit") in VIT_ARCHS:
        print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    model = accel.to(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return model


def feature_bank_device(use_cuda, accel):
    """Where the features live: the accelerator, or host memory (--use_cuda false, or a CPU run)."""
    return accel.device if use_cuda else torch.device("cpu")


def extract_feature_pipeline(args, accel=None):
    if accel is None:  # the reference's call, after init_distributed_mode set args.gpu
        accel = utils.Accelerator.create(getattr(args, "device", "auto"), getattr(args, "gpu", 0))
    # ============ building network ... ============
    model = build_model(args, accel)  # before the (long) dataset scan: a bad checkpoint fails at once

    # ============ preparing data ... ============
    dataset_train, dataset_val = build_datasets(args)
    loaders = [make_loader(ds, args, accel) for ds in (dataset_train, dataset_val)]
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")

    # ============ extract features ... ============
    print("Extracting features for train set...")
    train_features = extract_features(model, loaders[0], args.use_cuda, accel=accel)
    print("Extracting features for val set...")
    test_features = extract_features(model, loaders[1], args.use_cuda, accel=accel)
    train_features = nn.functional.normalize(train_features, dim=1, p=2)
    test_features = nn.functional.normalize(test_features, dim=1, p=2)

    train_labels = torch.tensor([s[-1] for s in dataset_train.samples]).long()
    test_labels = torch.tensor([s[-1] for s in dataset_val.samples]).long()
    if args.dump_features and utils.is_main_process():
        for name, tensor in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
            utils.save_atomic(tensor.cpu(), os.path.join(args.dump_features, name))
        print(f"Features and labels saved in {args.dump_features}")
    return train_features, test_features, train_labels, test_labels


def make_loader(dataset, args, accel):
    """Every process reads its own share, in dataset order (padded to equal shares, as DistributedSampler)."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=utils.get_world_size(),
                                                  rank=utils.get_rank(), shuffle=False)
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=accel.pin_memory,
        drop_last=False,
    )


@torch.no_grad()
def extract_features(model, data_loader, use_cuda=True, multiscale=False, *, accel=None):
    """Features of every image of the loader's dataset, on every process, in dataset order.

    Batches are (images, indices[, read errors]); `multiscale` averages three scales (utils.multi_scale)."""
    accel = utils.Accelerator.of(model) if accel is None else accel
    bank_device = feature_bank_device(use_cuda, accel)
    metric_logger = utils.MetricLogger(delimiter="  ")
    features = None
    for samples, index, *errors in metric_logger.log_every(data_loader, 10):
        bad = [e for e in (errors[0] if errors else ()) if e]
        if bad:
            raise UserError(f"cannot read image {bad[0]}" + (f" (and {len(bad) - 1} more in this batch)"
                                                              if len(bad) > 1 else ""))
        samples = accel.to(samples)
        feats = (utils.multi_scale(samples, model) if multiscale else model(samples)).float()
        if features is None:
            features = torch.zeros(len(data_loader.dataset), feats.shape[-1], device=bank_device)
            print(f"Storing features into tensor of shape {features.shape}")
        feats, index = gather_from_all(feats, index)
        features.index_copy_(0, index.to(bank_device), feats.to(bank_device))
    return features


def gather_from_all(feats, index):
    """Concatenates every process's batch (the shares have equal batch sizes, see make_loader)."""
    world = utils.get_world_size()
    if world == 1:
        return feats, index
    device = utils.collective_device()
    feats, index = feats.to(device).contiguous(), index.to(device).contiguous()
    all_feats = [torch.empty_like(feats) for _ in range(world)]
    all_index = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(all_feats, feats)
    dist.all_gather(all_index, index)
    return torch.cat(all_feats), torch.cat(all_index)


@torch.no_grad()
def knn_correct_counts(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000,
                       imgs_per_chunk=None):
    """(top-1 hits, top-5 hits, number of test images) of the reference's weighted k-NN vote.

    Each of the k nearest training images (cosine similarity s) votes for its
    class with weight exp(s / T). Classes of equal score rank by class index.
    """
    device = train_features.device
    train_features = train_features.t()
    train_labels = train_labels.to(device)
    k = min(k, train_labels.shape[0])
    num_test_images = test_labels.shape[0]
    if imgs_per_chunk is None:  # the reference's 100 chunks, but never chunks of 0 images
        imgs_per_chunk = max(1, math.ceil(num_test_images / 100))
    top_n = min(5, k, num_classes)  # top-5 means top-k when k < 5
    top1, top5 = 0, 0
    retrieval_one_hot = torch.zeros(k, num_classes, device=device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx:idx + imgs_per_chunk].to(device)
        targets = test_labels[idx:idx + imgs_per_chunk].cpu()
        batch_size = targets.shape[0]

        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)

        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        # a stable sort on the host: ties (classes nobody voted for) rank the same on every device
        predictions = probs.cpu().sort(dim=1, descending=True, stable=True)[1][:, :top_n]
        correct = predictions.eq(targets.view(-1, 1))
        top1 += int(correct[:, :1].sum().item())
        top5 += int(correct.sum().item())
    return top1, top5, num_test_images


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000,
                   imgs_per_chunk=None):
    """Top-1 and top-5 accuracy (percent) of the weighted k-NN vote, as the reference's function."""
    top1, top5, total = knn_correct_counts(train_features, train_labels, test_features, test_labels, k, T,
                                           num_classes, imgs_per_chunk)
    return top1 * 100.0 / total, top5 * 100.0 / total


def knn_classifier_distributed(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """knn_classifier with the test images split across processes; the same numbers on every process."""
    world, rank = utils.get_world_size(), utils.get_rank()
    if world == 1:
        return knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes)
    rows = torch.arange(test_labels.shape[0]).tensor_split(world)[rank]
    if len(rows):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        top1, top5, _ = knn_correct_counts(train_features, train_labels, test_features[lo:hi],
                                           test_labels[lo:hi], k, T, num_classes)
    else:
        top1, top5 = 0, 0
    # float32 is exact for counts below 2**24 and reduces on every backend (HCCL has no float64)
    hits = torch.tensor([top1, top5], dtype=torch.float32, device=utils.collective_device())
    top1, top5 = (int(x) for x in utils.all_reduce_sum(hits).tolist())
    total = test_labels.shape[0]
    return top1 * 100.0 / total, top5 * 100.0 / total


def load_features(folder):
    tensors = [utils.load_checkpoint_file(os.path.join(folder, name)) for name in FEATURE_FILES]
    train_features, test_features, train_labels, test_labels = tensors
    if not all(torch.is_tensor(t) for t in tensors):
        raise UserError(f"--load_features {folder}: the files must hold tensors ({', '.join(FEATURE_FILES)})")
    shapes_ok = (train_features.dim() == 2 and test_features.dim() == 2
                 and train_features.shape[1] == test_features.shape[1]
                 and train_labels.shape == (train_features.shape[0],)
                 and test_labels.shape == (test_features.shape[0],))
    labels_ok = all(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
                    and (t.numel() == 0 or int(t.min()) >= 0) for t in (train_labels, test_labels))
    if not labels_ok:
        raise UserError(f"--load_features {folder}: the labels must be class indices (integers >= 0)")
    if not shapes_ok or len(train_labels) == 0 or len(test_labels) == 0:
        raise UserError(f"--load_features {folder}: features and labels do not fit together "
                        f"(train {tuple(train_features.shape)}/{tuple(train_labels.shape)}, "
                        f"test {tuple(test_features.shape)}/{tuple(test_labels.shape)})")
    print(f"Features loaded from {folder}.")
    return train_features.float(), test_features.float(), train_labels.long(), test_labels.long()


def eval_knn(args):
    validate_args(args)
    if args.dump_features and not args.load_features:
        utils.make_output_dir(args.dump_features, "--dump_features")  # before hours of feature extraction
    accel = utils.init_distributed_mode(args)
    try:
        accel.set_binary_mode(args.bin)
        print("git:\n  {}\n".format(utils.get_sha()))
        print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))

        if args.load_features:
            train_features, test_features, train_labels, test_labels = load_features(args.load_features)
            num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        else:
            # need to extract features !
            train_features, test_features, train_labels, test_labels = extract_feature_pipeline(args, accel)
            num_classes = len(datasets.folder.find_classes(dataset_dirs(args.data_path)[0])[0])

        bank_device = feature_bank_device(args.use_cuda, accel)
        train_features, test_features = train_features.to(bank_device), test_features.to(bank_device)
        train_labels, test_labels = train_labels.to(bank_device), test_labels.to(bank_device)

        print("Features are ready!\nStart the k-NN classification.")
        results = {}
        for k in args.nb_knn:
            if k > train_labels.shape[0]:
                print(f"warning: k={k} is larger than the training set; using its {train_labels.shape[0]} images")
            top1, top5 = knn_classifier_distributed(train_features, train_labels, test_features, test_labels,
                                                    k, args.temperature, num_classes)
            print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
            results[k] = (top1, top5)
        return results
    finally:
        utils.cleanup_distributed()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return utils.run_cli(eval_knn, args)


if __name__ == '__main__':
    main()
