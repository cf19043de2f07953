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
"""Linear evaluation: a linear classifier trained on the frozen backbone's features.

One process or torchrun, on NPU, GPU or CPU. The classifier's checkpoint is
output_dir/checkpoint.pth.tar; running the same command again resumes from it.
"""
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets
from torchvision import transforms as pth_transforms

import eval_knn
import utils
from main_dino import OneLineErrorParser, add_process_args, open_image
from utils import UserError

CHECKPOINT_NAME = "checkpoint.pth.tar"


def get_args_parser():
    parser = OneLineErrorParser('Evaluation with linear classification on ImageNet', allow_abbrev=False)
    parser.add_argument('--n_last_blocks', default=4, type=int, help="""Concatenate [CLS] tokens
        for the `n` last blocks. We use `n=4` when evaluating ViT-Small and `n=1` with ViT-Base.""")
    parser.add_argument('--avgpool_patchtokens', default=False, type=utils.bool_flag,
        help="""Whether ot not to concatenate the global average pooled features to the [CLS] token.
        We typically set this to False for ViT-Small and to True with ViT-Base.""")
    parser.add_argument('--arch', default='vit_small', type=str, help='Architecture')
    parser.add_argument('--patch_size', default=16, type=int, help='Patch resolution of the model.')
    parser.add_argument('--pretrained_weights', default='', type=str, help="Path to pretrained weights to evaluate.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
        help='Key to use in the checkpoint (example: "teacher")')
    parser.add_argument('--random_weights', action='store_true',
        help='Evaluate a randomly initialised backbone instead of --pretrained_weights (a baseline).')
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument("--lr", default=0.001, type=float, help="""Learning rate at the beginning of
        training (highest LR used during training). The learning rate is linearly scaled
        with the batch size, and specified here for a reference batch size of 256.
        We recommend tweaking the LR depending on the checkpoint evaluated.""")
    parser.add_argument('--batch_size_per_gpu', default=128, type=int, help='Per-device batch-size')
    parser.add_argument('--image_size', default=224, type=int, help="""Side of the training crops and of the
        centre crop for validation (validation images are first resized to image_size * 256 / 224).""")
    parser.add_argument('--train_augmentation', default=True, type=utils.bool_flag, help="""Random resized
        crops and horizontal flips of the training images (the reference). false: training images get the
        validation transform, e.g. for digits or text, where a flip changes the class.""")
    add_process_args(parser)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str,
        help='Folder holding train/ and val/ class folders.')
    parser.add_argument('--num_workers', default=10, type=int, help='Number of data loading workers per device.')
    parser.add_argument('--val_freq', default=1, type=int, help="Epoch frequency for validation.")
    parser.add_argument('--output_dir', default=".", help='Path to save logs and checkpoints')
    parser.add_argument('--num_labels', default=None, type=int, help="""Number of labels for linear
        classifier (default: the number of class folders in train/, or the saved head's with --evaluate).""")
    parser.add_argument('--evaluate', dest='evaluate', action='store_true',
        help='evaluate a saved linear classifier on the validation set')
    parser.add_argument('--linear_weights', default='', type=str, help="""Linear classifier to --evaluate
        (default: output_dir/checkpoint.pth.tar; released linear weights, downloaded beforehand, work too).""")
    parser.add_argument('--seed', default=0, type=int, help='Random seed.')
    return parser


def validate_args(args):
    for name in ("n_last_blocks", "epochs", "batch_size_per_gpu", "image_size", "val_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must not be negative (got {args.num_workers})")
    eval_knn.check_arch(args.arch)
    if args.num_labels is not None and args.num_labels < 1:
        raise UserError(f"--num_labels must be at least 1 (got {args.num_labels})")
    if args.random_weights and args.pretrained_weights:
        raise UserError("--random_weights and --pretrained_weights exclude each other")
    if not args.random_weights and not args.pretrained_weights:
        raise UserError("no --pretrained_weights given: pass a checkpoint file, or --random_weights for an "
                        "untrained baseline")
    if args.linear_weights and not args.evaluate:
        raise UserError(f"--linear_weights {args.linear_weights} is read with --evaluate only (training starts a "
                        f"new head, or resumes from {os.path.join(args.output_dir, CHECKPOINT_NAME)})")
    if args.pretrained_weights:
        utils.check_file_flag(args.pretrained_weights, "--pretrained_weights")
    if args.evaluate:
        utils.check_file_flag(args.linear_weights or os.path.join(args.output_dir, CHECKPOINT_NAME),
                              "--linear_weights" if args.linear_weights else "--evaluate (no --linear_weights)")
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path is not a folder: {args.data_path}")
    for split in ("val",) if args.evaluate else ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_path, split)):
            raise UserError(f"--data_path {args.data_path} has no {split}/ folder (the linear evaluation needs "
                            f"train/ and val/ class folders)")


# ============ model ============

class LinearClassifier(nn.Module):
    """Linear layer to train on top of frozen features"""
    def __init__(self, dim, num_labels=1000):
        super(LinearClassifier, self).__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        x = x.view(x.size(0), -1)
        return self.linear(x)


def build_frozen_backbone(args, accel):
    """The frozen backbone (eval_knn's, same weights on every rank) and the size of the classifier's input."""
    model = eval_knn.build_model(args, accel)
    if hasattr(model, "get_intermediate_layers"):
        return model, model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    with torch.no_grad():  # a convnet's pooled width, whatever the torchvision model
        return model, model(accel.to(torch.zeros(1, 3, args.image_size, args.image_size))).shape[-1]


@torch.no_grad()
def extract_features(model, inp, n, avgpool):
    """[CLS] tokens of the n last blocks (ViT), optionally with the mean patch token; a convnet's pooled output."""
    if not hasattr(model, "get_intermediate_layers"):
        return model(inp)
    intermediate_output = model.get_intermediate_layers(inp, n)
    output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
    if avgpool:
        pooled = torch.mean(intermediate_output[-1][:, 1:], dim=1)
        if n == 1:  # the reference interleaves [CLS] and mean features; released linear heads expect that order
            output = torch.stack((output, pooled), dim=-1).reshape(output.shape[0], -1)
        else:
            output = torch.cat((output, pooled), dim=-1)
    return output


# ============ data ============

def image_folder(root, transform):
    try:
        return datasets.ImageFolder(root, transform=transform, loader=open_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"no images found in {root}: expected class sub-folders holding image files "
                        f"({str(err).splitlines()[0]})") from err


def val_transform(image_size):
    resize = int(round(image_size * 256 / 224))
    return pth_transforms.Compose([
        pth_transforms.Resize(resize, interpolation=pth_transforms.InterpolationMode.BICUBIC),
        pth_transforms.CenterCrop(image_size),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def train_transform(image_size, augment=True):
    if not augment:
        return val_transform(image_size)
    return pth_transforms.Compose([
        pth_transforms.RandomResizedCrop(image_size),
        pth_transforms.RandomHorizontalFlip(),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def build_val_loader(args, accel, class_to_idx=None):
    root = os.path.join(args.data_path, "val")
    dataset_val = image_folder(root, val_transform(args.image_size))
    if class_to_idx is not None:
        eval_knn.use_class_indices(dataset_val, class_to_idx, root)
    # each process validates its own share (no padding: the averages stay exact)
    shard = torch.utils.data.Subset(dataset_val, range(args.rank, len(dataset_val), args.world_size))
    val_loader = torch.utils.data.DataLoader(
        shard,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=accel.pin_memory,
    )
    return dataset_val, val_loader


def build_train_loader(args, accel):
    dataset_train = image_folder(os.path.join(args.data_path, "train"),
                                 train_transform(args.image_size, args.train_augmentation))
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset_train, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(
        dataset_train,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=accel.pin_memory,
    )
    return dataset_train, train_loader


# ============ checkpoints of the linear classifier ============

def linear_state(checkpoint, path):
    """The classifier's state dict without DDP's 'module.' prefix, from our checkpoints or released heads."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a linear classifier's state dict")
    state = utils.strip_prefixes(state, prefixes=("module.",))
    if set(state) != {"linear.weight", "linear.bias"}:
        raise UserError(f"{path} is not a linear classifier checkpoint (keys: {', '.join(sorted(state)[:5])})")
    return state


def load_linear_state(classifier, state, path, embed_dim):
    weight = state["linear.weight"]
    if tuple(weight.shape) != (classifier.num_labels, embed_dim):
        raise UserError(f"{path} holds a classifier for {weight.shape[1]} features and {weight.shape[0]} labels, "
                        f"but this run has {embed_dim} features (--arch, --n_last_blocks, --avgpool_patchtokens) "
                        f"and {classifier.num_labels} labels; use the settings it was trained with, or another "
                        f"--output_dir")
    classifier.load_state_dict(state, strict=True)


def resume(path, classifier, optimizer, scheduler, embed_dim, epochs):
    """(start epoch, best accuracy) from output_dir/checkpoint.pth.tar, or (0, 0.) without one."""
    if not os.path.isfile(path):
        return 0, 0.
    print("Found checkpoint at {}".format(path))
    checkpoint = utils.load_checkpoint_file(path)
    load_linear_state(classifier, linear_state(checkpoint, path), path, embed_dim)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best_acc = int(checkpoint["epoch"]), float(checkpoint["best_acc"])
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{path} lacks the optimizer or schedule state needed to resume ({err}); "
                        f"use another --output_dir") from err
    if scheduler.T_max != epochs:
        print(f"--epochs changed from {scheduler.T_max} to {epochs}: the cosine schedule is stretched to it.")
        scheduler.T_max = epochs
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base_lr - scheduler.eta_min) * (
                1 + math.cos(math.pi * min(start_epoch, epochs) / epochs)) / 2
    print(f"Resuming the linear classifier from epoch {start_epoch}.")
    return start_epoch, best_acc


# ============ training and validation ============

def train(model, linear_classifier, optimizer, loader, epoch, n, avgpool, accel=None):
    accel = accel or utils.Accelerator("cpu")
    linear_classifier.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = 'Epoch: [{}]'.format(epoch)
    for (inp, target) in metric_logger.log_every(loader, 20, header):
        inp, target = accel.to(inp), accel.to(target)
        output = linear_classifier(extract_features(model, inp, n, avgpool))
        loss = nn.CrossEntropyLoss()(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss.detach())
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def validate_network(val_loader, model, linear_classifier, n, avgpool, accel=None):
    accel = accel or utils.Accelerator("cpu")
    linear_classifier.eval()
    num_labels = getattr(linear_classifier, "module", linear_classifier).num_labels
    metric_logger = utils.MetricLogger(delimiter="  ")
    # a process with no share of val/ still joins the reductions
    for name in ("loss", "acc1", "acc5") if num_labels >= 5 else ("loss", "acc1"):
        metric_logger.add_meter(name, utils.SmoothedValue())
    header = 'Test:'
    for inp, target in metric_logger.log_every(val_loader, 20, header):
        inp, target = accel.to(inp), accel.to(target)
        output = linear_classifier(extract_features(model, inp, n, avgpool))
        loss = nn.CrossEntropyLoss()(output, target)
        topk = (1, 5) if num_labels >= 5 else (1,)
        accs = utils.accuracy(output, target, topk=topk)
        batch_size = inp.shape[0]
        metric_logger.meters['loss'].update(loss.item(), n=batch_size)
        metric_logger.meters['acc1'].update(accs[0].item(), n=batch_size)
        if num_labels >= 5:
            metric_logger.meters['acc5'].update(accs[1].item(), n=batch_size)
    metric_logger.synchronize_between_processes()
    if num_labels >= 5:
        print('* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f}'
              .format(top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))
    else:
        print('* Acc@1 {top1.global_avg:.3f} loss {losses.global_avg:.3f}'
              .format(top1=metric_logger.acc1, losses=metric_logger.loss))
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def wrap_ddp(classifier, accel):
    if utils.is_dist_avail_and_initialized():
        return nn.parallel.DistributedDataParallel(classifier, device_ids=accel.ddp_device_ids)
    return classifier


def evaluate_saved_head(args, accel, model, embed_dim):
    path = args.linear_weights or os.path.join(args.output_dir, CHECKPOINT_NAME)
    state = linear_state(utils.load_checkpoint_file(path), path)
    train_root = os.path.join(args.data_path, "train")
    class_to_idx = datasets.folder.find_classes(train_root)[1] if os.path.isdir(train_root) else None
    dataset_val, val_loader = build_val_loader(args, accel, class_to_idx)
    num_labels = args.num_labels or state["linear.weight"].shape[0]
    if len(dataset_val.classes) > num_labels:
        raise UserError(f"{path} scores {num_labels} labels but the data has {len(dataset_val.classes)} classes")
    classifier = accel.to(LinearClassifier(embed_dim, num_labels=num_labels))
    load_linear_state(classifier, state, path, embed_dim)
    test_stats = validate_network(val_loader, model, wrap_ddp(classifier, accel), args.n_last_blocks,
                                  args.avgpool_patchtokens, accel)
    print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
    return test_stats


def eval_linear(args):
    validate_args(args)
    if not args.evaluate:  # --evaluate writes nothing
        utils.make_output_dir(args.output_dir)
    accel = utils.init_distributed_mode(args)
    accel.set_binary_mode(args.bin)
    print("git:\n  {}\n".format(utils.get_sha()))
    print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))

    model, embed_dim = build_frozen_backbone(args, accel)
    utils.fix_random_seeds(args.seed)  # the same classifier initialisation on every rank
    if args.evaluate:
        return evaluate_saved_head(args, accel, model, embed_dim)

    dataset_train, train_loader = build_train_loader(args, accel)
    dataset_val, val_loader = build_val_loader(args, accel, dataset_train.class_to_idx)
    num_labels = args.num_labels or len(dataset_train.classes)
    if num_labels < len(dataset_train.classes):
        raise UserError(f"--num_labels {num_labels} is smaller than the {len(dataset_train.classes)} classes "
                        f"of {os.path.join(args.data_path, 'train')}")
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs ({num_labels} labels).")

    classifier = accel.to(LinearClassifier(embed_dim, num_labels=num_labels))
    linear_classifier = wrap_ddp(classifier, accel)
    optimizer = torch.optim.SGD(
        linear_classifier.parameters(),
        args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.,  # linear scaling rule
        momentum=0.9,
        weight_decay=0,  # we do not apply weight decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)

    ckpt_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best_acc = resume(ckpt_path, classifier, optimizer, scheduler, embed_dim, args.epochs)

    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train(model, linear_classifier, optimizer, train_loader, epoch, args.n_last_blocks,
                            args.avgpool_patchtokens, accel)
        scheduler.step()

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            test_stats = validate_network(val_loader, model, linear_classifier, args.n_last_blocks,
                                          args.avgpool_patchtokens, accel)
            print(f"Accuracy at epoch {epoch} of the network on the {len(dataset_val)} test images: "
                  f"{test_stats['acc1']:.1f}%")
            best_acc = max(best_acc, test_stats["acc1"])
            print(f'Max accuracy so far: {best_acc:.2f}%')
            log_stats = {**log_stats, **{f'test_{k}': v for k, v in test_stats.items()}}
        if utils.is_main_process():
            with (Path(args.output_dir) / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_dict = {
                "epoch": epoch + 1,
                # 'module.' keys whether or not DDP ran, as the reference's (and released) heads
                "state_dict": {"module." + k: v for k, v in classifier.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_acc": best_acc,
            }
            utils.save_atomic(save_dict, ckpt_path)
    print("Training of the supervised linear classifier on frozen features completed.\n"
          "Top-1 test accuracy: {acc:.1f}".format(acc=best_acc))
    return best_acc


def run(args):
    try:
        return eval_linear(args)
    finally:
        utils.cleanup_distributed()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    utils.run_cli(run, args)


if __name__ == '__main__':
    main()
