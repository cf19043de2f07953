"""Pieces of the trainer: schedules, crops, multi-crop grouping, parameter groups, devices, precision."""
import math
import re
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import main_dino
import utils
import vision_transformer as vits


def test_cosine_scheduler_warmup_then_half_cosine():
    sched = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1, start_warmup_value=0.0)
    assert len(sched) == 20
    assert np.allclose(sched[:5], np.linspace(0, 1, 5))
    iters = np.arange(15)
    expected = 0.1 + 0.45 * (1 + np.cos(np.pi * iters / 15))
    assert np.allclose(sched[5:], expected)
    assert sched[5] == pytest.approx(1.0) and sched[-1] > 0.1


def test_teacher_temperature_warms_up_linearly_then_stays():
    loss = main_dino.DINOLoss(8, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                              nepochs=10)
    assert np.allclose(loss.teacher_temp_schedule[:3], [0.04, 0.055, 0.07])
    assert np.allclose(loss.teacher_temp_schedule[3:], 0.07)
    assert len(loss.teacher_temp_schedule) == 10


def test_center_is_an_ema_of_teacher_batch_means():
    loss = main_dino.DINOLoss(4, 2, 0.04, 0.04, 0, 1, center_momentum=0.9)
    teacher = torch.tensor([[1., 2., 3., 4.], [3., 2., 1., 0.]])
    student = torch.randn(2, 4)
    loss(student, teacher, 0)
    assert torch.allclose(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    loss(student, teacher, 0)
    assert torch.allclose(loss.center, 0.19 * teacher.mean(0, keepdim=True))


@pytest.mark.parametrize("n_local", [0, 3])
def test_augmentation_gives_the_asked_crop_sizes(photos_dir, n_local):
    img = Image.open(os.path.join(photos_dir, "chelsea.jpg")).convert("RGB")
    aug = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), n_local, global_crop_size=64, local_crop_size=32)
    crops = aug(img)
    assert len(crops) == 2 + n_local
    assert all(c.shape == (3, 64, 64) for c in crops[:2])
    assert all(c.shape == (3, 32, 32) for c in crops[2:])
    assert all(c.dtype == torch.float32 for c in crops)
    default = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 1)(img)
    assert default[0].shape == (3, 224, 224) and default[2].shape == (3, 96, 96)


def test_per_sample_seeding_is_independent_of_call_order(photos_dir):
    path = os.path.join(photos_dir, "coffee.jpg")
    aug = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 2, global_crop_size=32, local_crop_size=16)
    dataset = main_dino.MultiCropDataset([(path, 0), (path, 1)], aug, seed=5)
    first = dataset[(3, 1)][0]
    dataset[(3, 0)]
    torch.rand(10)  # global RNG activity must not matter
    again = dataset[(3, 1)][0]
    other_epoch = dataset[(4, 1)][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch))


@pytest.mark.parametrize("fast", [False, True])
def test_uint8_crops_normalized_on_the_device_equal_the_workers_crops(photos_dir, fast):
    """normalize=False (an accelerator's loader): uint8 crops, a quarter of the bytes, which
    utils.normalize_uint8_crops turns into the float crops the workers would have made, to the bit."""
    samples = [(os.path.join(photos_dir, name), 0) for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    datasets = [main_dino.MultiCropDataset(samples, main_dino.DataAugmentationDINO(
        (0.4, 1.), (0.05, 0.4), 3, fast, global_crop_size=64, local_crop_size=32, normalize=normalize), seed=7)
        for normalize in (True, False)]
    for key in [(0, 0), (0, 1), (1, 2), (2, 0)]:
        floats, uint8 = (main_dino.collate_crops([ds[key]])[0] for ds in datasets)
        assert all(c.dtype == torch.uint8 for c in uint8)
        assert [c.shape for c in uint8] == [c.shape for c in floats]
        normalized = utils.normalize_uint8_crops(uint8)
        assert all(torch.equal(a, b) for a, b in zip(normalized, floats)), key
    assert utils.normalize_uint8_crops(floats) == floats  # float crops pass through


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_uint8_crops_normalized_on_a_gpu_equal_the_cpus():
    """The device's division and subtraction round as the CPU's (test/benchmark_gpu.sh runs this on a GPU)."""
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (4, 3, s, s), generator=g, dtype=torch.uint8) for s in (64, 64, 32)]
    on_cpu = utils.normalize_uint8_crops(crops)
    on_gpu = utils.normalize_uint8_crops([c.to("cuda") for c in crops])
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_gpu))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_trainer_on_images_on_a_gpu_takes_pinned_uint8_crops(digits_root, tmp_path):
    """Real images through the workers to a GPU: pinned uint8 batches, normalized there, and training moves the
    teacher (test/benchmark_gpu.sh runs this on a GPU)."""
    from helpers import TINY_TRAIN_ARGS
    args = [a for a in TINY_TRAIN_ARGS if a not in ("--device", "cpu", "--num_workers", "0")]
    args = main_dino.get_args_parser().parse_args(args + [
        "--device", "cuda", "--num_workers", "2", "--data_path", digits_root, "--num_steps", "3",
        "--output_dir", str(tmp_path)])
    trainer = main_dino.Trainer(args)
    crops = next(iter(trainer.loader))[0]
    assert all(c.dtype == torch.uint8 and c.is_pinned() for c in crops)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train()
    after = trainer.teacher.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_only_accelerators_take_uint8_crops():
    kinds = {}
    for kind in ("cpu", "cuda", "npu"):
        accel = utils.Accelerator.__new__(utils.Accelerator)  # no device needed to ask the policy
        accel.kind = kind
        kinds[kind] = accel.normalizes_crops
    assert kinds == {"cpu": False, "cuda": True, "npu": True}


@pytest.mark.parametrize("fast", [False, True])
def test_trainer_with_uint8_crops_trains_as_with_float_crops(digits_root, tmp_path, monkeypatch, fast):
    """The trainer's loader hands over uint8 crops where the accelerator normalizes them (forced here on a CPU):
    the same teacher after two steps as with the workers normalizing."""
    from helpers import TINY_TRAIN_ARGS

    def train(out, uint8):
        monkeypatch.setattr(utils.Accelerator, "normalizes_crops", property(lambda self: uint8))
        out.mkdir()
        args = main_dino.get_args_parser().parse_args(
            TINY_TRAIN_ARGS + ["--data_path", digits_root, "--num_steps", "2", "--output_dir", str(out)]
            + (["--use_color_jitter_opti"] if fast else []))
        trainer = main_dino.Trainer(args)
        crops = next(iter(trainer.loader))[0]
        assert {c.dtype for c in crops} == {torch.uint8 if uint8 else torch.float32}
        trainer.train()
        return trainer.teacher.state_dict()
    floats, uint8 = train(tmp_path / "float", False), train(tmp_path / "uint8", True)
    assert all(torch.equal(floats[k], uint8[k]) for k in floats)


def test_epoch_sampler_matches_distributed_sampler_and_resumes_mid_epoch():
    dataset = list(range(23))
    for rank in range(3):
        ref = torch.utils.data.DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=True, seed=0)
        ref.set_epoch(2)
        ours = main_dino.EpochSampler(23, num_replicas=3, rank=rank, shuffle=True, seed=0)
        ours.set_epoch(2)
        assert [i for _, i in ours] == list(ref)
        ours.set_epoch(2, start=4)
        assert [i for _, i in ours] == list(ref)[4:]
        assert all(e == 2 for e, _ in ours)


class CountingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_multicrop_wrapper_runs_backbone_once_per_resolution_run():
    backbone = CountingBackbone()
    wrapper = utils.MultiCropWrapper(backbone, nn.Identity())
    crops = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
             torch.randn(2, 3, 4, 4)]
    out = wrapper(crops)
    assert backbone.calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert torch.allclose(out, torch.cat([c.mean(dim=(2, 3)) for c in crops]))
    assert isinstance(backbone.fc, nn.Identity)  # the classifier is removed


def test_parameter_groups_exclude_biases_norms_and_frozen_weight_g():
    model = utils.MultiCropWrapper(vits.vit_tiny(), vits.DINOHead(192, 16))
    regularized, not_regularized = utils.get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    reg_names = {names[id(p)] for p in regularized["params"]}
    noreg_names = {names[id(p)] for p in not_regularized["params"]}
    assert not_regularized["weight_decay"] == 0.
    assert all(not n.endswith(".bias") and "norm" not in n for n in reg_names)
    assert "head.last_layer.weight_v" in reg_names
    assert "head.last_layer.weight_g" not in reg_names | noreg_names
    assert "backbone.blocks.0.norm1.weight" in noreg_names and "backbone.cls_token" in reg_names


def test_per_parameter_clipping_matches_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = [p.grad.clone() for p in model.parameters()]
    utils.clip_gradients(model, 1.0, fused=True)
    for g0, p in zip(before, model.parameters()):
        norm = g0.norm()
        expected = g0 * min(1.0, (1.0 / (norm + 1e-6)).item())
        assert torch.allclose(p.grad, expected, atol=1e-6)


def test_frozen_last_layer_gets_no_update_and_fresh_optimizer_state():
    torch.manual_seed(0)
    model = utils.MultiCropWrapper(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)),
                                   vits.DINOHead(8, 16, norm_last_layer=False, nlayers=1))
    opt = torch.optim.AdamW(utils.get_params_groups(model), lr=0.1)
    v_before = model.head.last_layer.weight_v.detach().clone()
    model(torch.randn(4, 3, 2, 2)).sum().backward()
    utils.cancel_gradients_last_layer(0, model, freeze_last_layer=1)
    opt.step()
    assert torch.equal(model.head.last_layer.weight_v, v_before)
    assert model.head.last_layer.weight_v not in opt.state
    opt.zero_grad()
    model(torch.randn(4, 3, 2, 2)).sum().backward()
    utils.cancel_gradients_last_layer(1, model, freeze_last_layer=1)
    opt.step()
    assert not torch.equal(model.head.last_layer.weight_v, v_before)
    assert int(opt.state[model.head.last_layer.weight_v]["step"]) == 1


def test_ema_moves_teacher_towards_student():
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    utils.TeacherEMA(student, teacher).update(0.9)
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.9 * t_old + 0.1 * s, atol=1e-7)


@pytest.mark.parametrize("requested,npu,cuda,expected", [
    ("auto", True, True, "npu"), ("auto", False, True, "cuda"), ("auto", False, False, "cpu"),
    ("cpu", True, True, "cpu"), ("cuda", True, True, "cuda"), ("npu", True, False, "npu"),
])
def test_device_selection(requested, npu, cuda, expected):
    assert utils.resolve_device_kind(requested, npu, cuda) == expected


@pytest.mark.parametrize("requested,npu,cuda", [("npu", False, True), ("cuda", True, False), ("tpu", True, True)])
def test_device_selection_refuses_missing_devices(requested, npu, cuda):
    with pytest.raises(utils.UserError):
        utils.resolve_device_kind(requested, npu, cuda)


def test_more_processes_than_devices_is_a_user_error():
    assert utils.check_device_index("npu", 7, 8) == 7
    assert utils.check_device_index("cpu", 5, 0) == 0  # CPU processes share the host
    with pytest.raises(utils.UserError, match="process 4 on this machine has no cuda device of its own: 4 visible"):
        utils.check_device_index("cuda", 4, 4)
    # SLURM binding one GPU to each task: every task sees its own device as index 0
    assert utils.check_device_index("cuda", 5, 1, wrap=True) == 0
    assert utils.check_device_index("cuda", 5, 4, wrap=True) == 1


def frozen_head_case():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("last_layer", nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(utils.get_params_groups(model), lr=0.1, weight_decay=0.5)
    model(torch.randn(5, 4)).square().sum().backward()
    return model, optimizer


def test_last_layer_freeze_with_combined_gradients_keeps_it_unchanged():
    """Ascend apex keeps gradients in one buffer (never None): the freeze zeroes them in place and puts the
    weights back after the step, which weight decay would otherwise move."""
    model, optimizer = frozen_head_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.last_layer.parameters()]
    frozen = utils.cancel_gradients_last_layer(0, model, 1, in_place=True)
    assert [p.grad for p in model.last_layer.parameters()] == grads  # the same tensors, zeroed
    assert all(torch.all(g == 0) for g in grads)
    optimizer.step()
    assert not torch.equal(model.last_layer.weight, before["last_layer.weight"])  # weight decay moved it
    utils.restore_last_layer(frozen, optimizer)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("last_layer"))
    assert not torch.equal(after["body.weight"], before["body.weight"])
    assert utils.cancel_gradients_last_layer(1, model, 1, in_place=True) is None  # past the frozen epochs

    model, optimizer = frozen_head_case()  # the reference's way: no gradient, no step for the last layer
    assert utils.cancel_gradients_last_layer(0, model, 1) is None
    assert all(p.grad is None for p in model.last_layer.parameters())


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd", "lars"])
def test_combined_gradient_freeze_trains_as_the_reference_after_the_frozen_steps(optimizer_name):
    """Frozen steps with zeroed gradients, then normal steps, give the weights of the reference's freeze (no
    gradient at all): the optimizer state of the frozen layer is reset along with its weights."""
    def run(in_place):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("body", nn.Linear(4, 4))
        model.add_module("last_layer", nn.Linear(4, 3))
        optimizer = utils.build_optimizer(optimizer_name, utils.get_params_groups(model), utils.Accelerator("cpu"))
        for group in optimizer.param_groups:
            group["lr"] = 0.05
        optimizer.param_groups[0]["weight_decay"] = 0.3
        data = torch.randn(8, 5, 4, generator=torch.Generator().manual_seed(1))
        for step, x in enumerate(data):
            optimizer.zero_grad(set_to_none=not in_place)
            model(x).square().sum().backward()
            epoch = 0 if step < 5 else 1  # the last layer is frozen in epoch 0
            frozen = utils.cancel_gradients_last_layer(epoch, model, 1, in_place=in_place)
            optimizer.step()
            utils.restore_last_layer(frozen, optimizer)
        return model.state_dict()
    reference, combined = run(False), run(True)
    for key in reference:
        assert torch.allclose(reference[key], combined[key], rtol=1e-5, atol=1e-7), key


def test_gradient_buffers_and_fused_adamw_follow_the_precision_mode():
    assert not utils.Precision("fp32", utils.Accelerator("cpu")).combined_grads
    apex_o1 = object.__new__(utils.Precision)  # apex itself is not importable here
    apex_o1.mode = "apex_o1"
    model, optimizer = frozen_head_case()
    apex_o1.zero_grad(optimizer)  # combined gradients: zeroed, never None
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in model.parameters())
    utils.Precision("bf16", utils.Accelerator("cpu")).zero_grad(optimizer)
    assert all(p.grad is None for p in model.parameters())
    # NpuFusedAdamW steps apex O1's combined buffers only: without --amp it would fail on its first step
    assert utils.npu_fused_adamw_usable("npu", True, "apex_o1")
    assert not utils.npu_fused_adamw_usable("npu", True, "fp16")
    assert not utils.npu_fused_adamw_usable("npu", True, "fp32")
    assert not utils.npu_fused_adamw_usable("npu", False, "fp16")
    assert not utils.npu_fused_adamw_usable("cuda", True, "apex_o1")


def test_smoothed_median_is_the_lower_middle_value_as_in_the_reference():
    meter = utils.SmoothedValue()
    for value in (1.0, 4.0, 2.0, 3.0):
        meter.update(value)
    assert meter.median == 2.0


def test_old_torch_stops_before_any_work(monkeypatch, capsys):
    assert utils.torch_version_problem("2.14.1+cu130") is None and utils.torch_version_problem("1.13.0") is None
    assert "needs torch >= 1.13" in utils.torch_version_problem("1.11.0a0+git1d9b5e2")
    ran = []
    monkeypatch.setattr(utils.torch, "__version__", "1.8.1")
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(ran.append, "work")
    assert exit_info.value.code == 2 and ran == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this is torch 1.8.1" in err


@pytest.mark.parametrize("kind,amp,fp16,apex,bf16,expected", [
    ("npu", True, True, True, True, "apex_o1"), ("npu", True, False, False, True, "fp16"),
    ("npu", False, True, True, True, "fp16"), ("npu", False, False, True, True, "fp32"),
    ("cuda", False, True, False, True, "fp16"), ("cuda", True, True, False, True, "bf16"),
    ("cuda", True, False, False, False, "fp16"), ("cuda", False, False, False, True, "fp32"),
    ("cpu", False, True, False, True, "fp32"), ("cpu", True, False, False, True, "bf16"),
])
def test_precision_table(kind, amp, fp16, apex, bf16, expected):
    assert utils.resolve_precision_mode(kind, amp=amp, use_fp16=fp16, apex_available=apex,
                                        bf16_supported=bf16) == expected


def test_cpu_accelerator_and_bf16_autocast():
    accel = utils.Accelerator.create("cpu")
    assert accel.kind == "cpu" and accel.dist_backend == "gloo" and not accel.pin_memory
    precision = utils.Precision("bf16", accel)
    layer = nn.Linear(4, 4)
    with precision.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with utils.Precision("fp32", accel).autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_distributed_env_parsing():
    assert utils.distributed_env({}) == (0, 1, 0)
    assert utils.distributed_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8, 3)
    assert utils.distributed_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == (5, 16, 1)
    assert utils.distributed_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)


def test_collapse_monitor_diagnoses_both_collapses(capsys):
    monitor = main_dino.CollapseMonitor(out_dim=256)
    assert monitor.diagnose(math.log(256) * 0.995, 5.0) == "uniform"
    assert monitor.diagnose(3.0, 0.01) == "one-hot"
    assert monitor.diagnose(4.0, 2.0) is None
    flat = {"loss": math.log(256), "teacher_entropy": 5.0}
    monitor.check(0, flat)
    assert "collapse suspected at epoch 0 (uniform)" in capsys.readouterr().out
    silent = main_dino.CollapseMonitor(out_dim=256, enabled=False)  # --synthetic: random crops
    silent.check(0, flat)
    assert "collapse" not in capsys.readouterr().out


def test_parser_keeps_reference_flags_and_aliases():
    parser = main_dino.get_args_parser()
    args = parser.parse_args([])
    assert (args.arch, args.patch_size, args.out_dim, args.momentum_teacher) == ("vit_small", 16, 65536, 0.996)
    assert (args.lr, args.min_lr, args.weight_decay, args.weight_decay_end) == (0.0005, 1e-6, 0.04, 0.4)
    assert (args.batch_size_per_gpu, args.epochs, args.warmup_epochs, args.freeze_last_layer) == (64, 100, 10, 1)
    assert (args.local_crops_number, tuple(args.global_crops_scale)) == (8, (0.4, 1.))
    assert args.use_fp16 is True and args.clip_grad == 3.0 and args.saveckp_freq == 20
    assert (args.global_crop_size, args.local_crop_size, args.device) == (224, 96, "auto")
    aliased = parser.parse_args(["--batch_size", "8", "--local-rank", "2"])
    assert aliased.batch_size_per_gpu == 8 and aliased.local_rank == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch", "8"])  # no prefix abbreviations


@pytest.mark.parametrize("kind,module_compile,cxx,triton,words", [
    ("npu", True, True, True, "Ascend"),
    ("cpu", True, False, True, "C++ compiler"),
    ("cuda", True, True, False, "triton"),
    ("cuda", False, True, True, "torch >= 2.2"),
])
def test_compile_refuses_devices_it_cannot_run_on(kind, module_compile, cxx, triton, words):
    assert words in utils.compile_unsupported_reason(kind, module_compile, cxx, triton)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_compile_is_allowed_where_its_toolchain_exists(kind):
    assert utils.compile_unsupported_reason(kind, True, True, True) is None


def test_host_copy_is_a_snapshot_read_later():
    accel = utils.Accelerator.create("cpu")
    flag = torch.tensor([0.0])
    copy = accel.host_copy(flag)
    flag.add_(1.0)  # what the device does after the copy does not change the value read
    assert copy.get().item() == 0.0 and copy.get().device.type == "cpu"
    assert accel.host_copy(flag).get().item() == 1.0


def test_reference_train_one_epoch_signature_trains_as_the_reference_loop():
    """main_dino.train_one_epoch with the reference's arguments: schedules applied, the last layer frozen in
    epoch 0, the teacher an EMA of the student, the averaged stats returned."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    args = SimpleNamespace(arch="vit_tiny", patch_size=8, out_dim=32, use_bn_in_head=False, norm_last_layer=True,
                           drop_path_rate=0.0, epochs=2, clip_grad=3.0, freeze_last_layer=1)
    student, teacher = main_dino.build_student_teacher(args)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = main_dino.DINOLoss(32, 4, 0.04, 0.04, 0, 2)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    loader = [([torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8) for _ in range(2)],
               torch.zeros(2)) for _ in range(2)]
    lr, wd, momentum = np.array([1e-3, 2e-3, 3e-3, 4e-3]), np.array([0.04, 0.05, 0.06, 0.07]), np.full(4, 0.9)
    last_before = {k: v.clone() for k, v in student.state_dict().items() if "last_layer" in k}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stats = main_dino.train_one_epoch(student, teacher, teacher, dino_loss, loader, optimizer, lr, wd, momentum,
                                      0, None, args)
    assert set(stats) == {"loss", "lr", "wd"} and math.isfinite(stats["loss"])
    assert stats["lr"] == pytest.approx(1.5e-3) and optimizer.param_groups[0]["lr"] == 2e-3
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in last_before.items())  # frozen in epoch 0
    assert not torch.equal(after["backbone.cls_token"], student_before["backbone.cls_token"])
    # two EMA steps of momentum 0.9 from the same start: the teacher moved towards the student, not onto it
    key = "backbone.blocks.0.attn.qkv.weight"
    moved = (teacher.state_dict()[key] - teacher_before[key]).norm()
    assert 0 < moved < (after[key] - teacher_before[key]).norm()


def test_log_every_prints_the_last_step_of_an_iterable_that_ends_early(capsys):
    logger = utils.MetricLogger(delimiter="  ")
    for _ in logger.log_every(iter(range(3)), 10, "Epoch: [0/1]", total=100, start_index=4):
        pass
    lines = capsys.readouterr().out.strip().splitlines()
    assert [re.search(r"\[\s*(\d+)/100\]", line).group(1) for line in lines[:-1]] == ["6"]
    assert lines[-1].startswith("Epoch: [0/1] Total time")
    for _ in logger.log_every(list(range(12)), 10, "h"):  # a whole pass: steps 0, 10 and the last, 11
        pass
    lines = capsys.readouterr().out.strip().splitlines()
    assert [re.search(r"\[\s*(\d+)/12\]", line).group(1) for line in lines[:-1]] == ["0", "10", "11"]
