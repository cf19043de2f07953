"""--cuda_graph: the backbones' calls replayed as CUDA graphs. On CPUs the plumbing around
torch.cuda.make_graphed_callables is tested with a stand-in that runs the callables eagerly; the GPU tests at the
end run the real capture (test/benchmark_gpu.sh runs them on a GPU machine)."""
import argparse
import copy
import json
import types

import pytest
import torch

import benchmark
import main_dino
import utils
import vision_transformer as vits
from helpers import TINY_TRAIN_ARGS, run_py

CUDA = torch.cuda.is_available()


def tiny_pair(drop_path_rate=0.2):
    ns = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64, drop_path_rate=drop_path_rate,
                            use_bn_in_head=False, norm_last_layer=True)
    torch.manual_seed(0)
    student, teacher = main_dino.build_student_teacher(ns)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def crops(batch=2, n_local=2, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in [32, 32] + [16] * n_local]


class StandIn(object):
    """Runs like make_graphed_callables on a CPU: warm-up forward and backward passes that draw random numbers
    (drop path), then each callable's forward, counted, in place of a graph replay."""
    def __init__(self):
        self.seen, self.replays = None, []

    def __call__(self, callables, sample_args):
        self.seen = (callables, sample_args)
        for call, args in zip(callables, sample_args):
            for _ in range(3):
                out = call(*args)
                if out.requires_grad:
                    torch.autograd.grad(out.sum(), [p for p in call.parameters() if p.requires_grad])

        def replayed(i, call):
            def run(x):
                self.replays.append(i)
                return call(x)
            return run
        return tuple(replayed(i, c) for i, c in enumerate(callables))


def outputs_and_grads(student, teacher, images, seed):
    torch.manual_seed(seed)
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = teacher(images[:2])
    s = student(images)
    (s * torch.linspace(-1, 1, s.shape[-1])).sum().backward()
    return t, s.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_resolution_groups_are_the_runs_of_equal_crop_sizes():
    sized = lambda *sides: [torch.zeros(1, 3, s, s) for s in sides]
    assert utils.MultiCropWrapper.resolution_groups(sized(32, 32, 16, 16, 16)) == [(0, 2), (2, 5)]
    assert utils.MultiCropWrapper.resolution_groups(sized(32, 32)) == [(0, 2)]
    assert utils.MultiCropWrapper.resolution_groups(sized(32, 16, 32)) == [(0, 1), (1, 2), (2, 3)]
    assert utils.MultiCropWrapper.resolution_groups([]) == []


def test_graphed_backbones_compute_what_eager_ones_do_and_keep_names_and_random_state():
    student, teacher = tiny_pair()
    plain_student, plain_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    names = list(student.state_dict())
    images = crops()
    stand_in = StandIn()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    accel = utils.Accelerator.create("cpu")
    calls = utils.backbone_calls_of_step(student, teacher, images)
    count = utils.graph_backbones(calls, accel, utils.Precision("fp32", accel), make_graphed=stand_in)
    assert count == 3
    assert torch.equal(torch.get_rng_state(), before)  # warm-up and capture draws are given back
    wrappers, samples = stand_in.seen
    assert [s[0].shape[-1] for s in samples] == [32, 32, 16]  # teacher, student global, student local: step order
    assert not any(s[0].requires_grad for s in samples)
    assert [list(w.parameters()) for w in wrappers[1:]] == [list(student.backbone.parameters())] * 2
    assert list(wrappers[0].parameters()) == list(teacher.backbone.parameters())
    assert list(student.state_dict()) == names  # checkpoints keep the reference's keys

    stand_in.replays.clear()
    graphed = outputs_and_grads(student, teacher, images, seed=7)
    assert stand_in.replays == [0, 1, 2]  # every backbone call of the step went through its graph
    plain = outputs_and_grads(plain_student, plain_teacher, images, seed=7)
    for a, b in zip(graphed[:2], plain[:2]):
        assert torch.equal(a, b)
    assert graphed[2].keys() == plain[2].keys()
    for name in plain[2]:
        assert torch.equal(graphed[2][name], plain[2][name]), name


def test_calls_the_graphs_were_not_captured_for_run_eagerly():
    student, teacher = tiny_pair()
    images = crops()
    stand_in = StandIn()
    accel = utils.Accelerator.create("cpu")
    utils.graph_backbones(utils.backbone_calls_of_step(student, teacher, images), accel,
                          utils.Precision("fp32", accel), make_graphed=stand_in)
    stand_in.replays.clear()
    outputs_and_grads(student, teacher, crops(batch=3), seed=0)  # another batch size
    with torch.no_grad():
        student(images)  # the student without gradients (graphs hold a backward)
    student.eval()
    outputs_and_grads(student, teacher, images, seed=0)  # eval mode: no drop path, another graph
    assert stand_in.replays == [0]  # only the last teacher call matched what was captured
    student.train()
    outputs_and_grads(student, teacher, images, seed=0)
    assert stand_in.replays == [0, 0, 1, 2]


def test_a_failed_capture_is_one_line_and_leaves_the_backbones_eager():
    student, teacher = tiny_pair()
    images = crops()
    accel = utils.Accelerator.create("cpu")
    forwards = (student.backbone.forward, teacher.backbone.forward)

    def failing(callables, sample_args):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    with pytest.raises(utils.UserError, match=r"capturing the backbones failed \(operation not permitted when stream "
                                              r"is capturing\); run without --cuda_graph$"):
        utils.graph_backbones(utils.backbone_calls_of_step(student, teacher, images), accel,
                              utils.Precision("fp32", accel), make_graphed=failing)
    assert (student.backbone.forward, teacher.backbone.forward) == forwards


def test_unsupported_settings_are_refused_in_one_line(tmp_path):
    assert "NVIDIA GPU" in utils.cuda_graph_unsupported_reason("cpu", False, "fp32")
    assert "NVIDIA GPU" in utils.cuda_graph_unsupported_reason("npu", False, "apex_o1")
    assert "--compile" in utils.cuda_graph_unsupported_reason("cuda", True, "bf16")
    assert "apex" in utils.cuda_graph_unsupported_reason("cuda", False, "apex_o1")
    assert "SyncBatchNorm" in utils.cuda_graph_unsupported_reason("cuda", False, "fp16", sync_batchnorm=True)
    for mode in ("fp32", "fp16", "bf16"):
        assert utils.cuda_graph_unsupported_reason("cuda", False, mode) is None
    result = run_py("main_dino.py", *TINY_TRAIN_ARGS, "--synthetic", "--num_steps", "1", "--cuda_graph",
                    "--output_dir", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("--cuda_graph needs an NVIDIA GPU (CUDA graphs); "
                                                            "this run is on cpu")
    assert not (tmp_path / "checkpoint.pth").exists()
    result = run_py("benchmark.py", "--what", "step", "--device", "cpu", "--cuda_graph", "--arch", "vit_tiny")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--cuda_graph needs" in result.stderr


# ---- on a GPU: the real capture ----

def step_side(student, teacher, mode, graphed, device="cuda"):
    args = types.SimpleNamespace(out_dim=64, local_crops_number=2)
    accel = utils.Accelerator.create(device)
    return benchmark.PackageStep(accel.to(copy.deepcopy(student)), accel.to(copy.deepcopy(teacher)), args, accel,
                                 mode, graphed=graphed)


def relative_gap(trained, reference, start):
    """|trained - reference| over how far the reference moved from start, all tensors together: a scale that
    does not depend on the learning rate or the precision, and that a step without gradients fails."""
    gap = sum(float((trained[k] - reference[k]).pow(2).sum()) for k in reference)
    moved = sum(float((reference[k] - start[k]).pow(2).sum()) for k in reference)
    return (gap / moved) ** 0.5


def check_graphed_steps_train_as_eager_steps(mode, device):
    """Three whole training steps (loss, clipping, AdamW, EMA) from the same weights and seed, drop path on:
    student and teacher move as in the eager run, up to the reduced precision's rounding."""
    student, teacher = tiny_pair(drop_path_rate=0.2)
    start = {"student": {k: v.float() for k, v in student.state_dict().items()},
             "teacher": {k: v.float() for k, v in teacher.state_dict().items()}}
    images = crops(batch=4, device=device)
    runs = []
    for graphed in (False, True):
        side = step_side(student, teacher, mode, graphed, device)
        torch.manual_seed(3)
        if device == "cuda":
            torch.cuda.manual_seed(3)
        losses = [side(images) for _ in range(3)]
        runs.append((torch.stack(losses).float().cpu(),
                     {name: {k: v.float().cpu() for k, v in getattr(side, name).state_dict().items()}
                      for name in ("student", "teacher")}))
    (loss_eager, eager), (loss_graphed, graphed) = runs
    tol = dict(rtol=1e-4, atol=1e-5) if mode == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss_graphed, loss_eager, **tol)
    bound = 1e-3 if mode == "fp32" else 5e-2
    for name in ("student", "teacher"):
        assert relative_gap(graphed[name], eager[name], start[name]) < bound, name


def test_relative_gap_is_scaled_by_how_far_training_moved():
    start = {"w": torch.zeros(4)}
    moved = {"w": torch.full((4,), 2.0)}
    assert relative_gap(moved, moved, start) == 0
    assert relative_gap({"w": torch.full((4,), 2.2)}, moved, start) == pytest.approx(0.1)
    assert relative_gap(start, moved, start) == pytest.approx(1.0)  # a side that did not train at all


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_graphed_steps_train_as_eager_steps_with_the_stand_in(mode, monkeypatch):
    """The GPU test's comparison on a CPU, the stand-in in place of the capture (the plumbing: graphs keyed,
    random state given back, every call replayed)."""
    stand_in = StandIn()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    check_graphed_steps_train_as_eager_steps(mode, "cpu")
    assert stand_in.replays == [0, 1, 2] * 3


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need an NVIDIA GPU")
@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_graphed_steps_train_as_eager_steps_on_a_gpu(mode):
    """The real capture: the graphs draw what the eager ops draw (a replay's random offsets continue the
    generator's), so drop path is the same on both sides."""
    check_graphed_steps_train_as_eager_steps(mode, "cuda")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need an NVIDIA GPU")
def test_main_dino_with_cuda_graph_runs_and_resumes_on_a_gpu(tmp_path):
    args = [a for a in TINY_TRAIN_ARGS if a not in ("--device", "cpu")] + [
        "--device", "cuda", "--synthetic", "--cuda_graph", "--amp", "--output_dir", tmp_path]
    first = run_py("main_dino.py", *args, "--num_steps", "4", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "CUDA graphs: 3 backbone calls captured" in first.stdout
    again = run_py("main_dino.py", *args, "--num_steps", "6", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from epoch 0, step 4." in again.stdout


def test_trainer_checks_the_crops_against_the_captured_shapes(capsys):
    trainer = main_dino.Trainer.__new__(main_dino.Trainer)
    trainer.args = types.SimpleNamespace(global_crop_size=32, local_crop_size=16, local_crops_number=2,
                                         batch_size_per_gpu=2)
    assert trainer.step_crop_shapes() == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    trainer.check_graphed_crops(crops(batch=2))
    assert capsys.readouterr().err == ""
    trainer.check_graphed_crops(crops(batch=3))
    assert "differ from those captured; the backbones run eagerly" in capsys.readouterr().err


def test_trainer_captures_before_training_and_trains_as_without_graphs(tmp_path, monkeypatch):
    """main_dino.Trainer with graphs (the stand-in in place of the capture): the same teacher after 3 steps as a
    run without, every backbone call of every step through its graph, in the step's order."""
    def run(out, stand_in=None):
        out.mkdir()
        args = main_dino.get_args_parser().parse_args(
            TINY_TRAIN_ARGS + ["--synthetic", "--num_steps", "3", "--output_dir", str(out)])
        trainer = main_dino.Trainer(args)
        if stand_in is not None:
            monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
            trainer.graphs_pending = True  # as --cuda_graph on a GPU; refused on CPUs
        trainer.train()
        return trainer.teacher.state_dict()
    stand_in = StandIn()
    plain = run(tmp_path / "plain")
    graphed = run(tmp_path / "graphed", stand_in)
    assert stand_in.replays == [0, 1, 2] * 3
    assert [s[0].shape for s in stand_in.seen[1]] == [(32, 3, 32, 32), (32, 3, 32, 32), (32, 3, 16, 16)]
    assert plain.keys() == graphed.keys()
    for name in plain:
        assert torch.equal(plain[name], graphed[name]), name


def test_benchmark_leaves_side_g_out_when_its_capture_fails(monkeypatch, capsys):
    """A capture that fails on a GPU machine costs side G, not the A/B measurement of the same run."""
    def failing_capture(calls, accelerator, precision, make_graphed=None):
        raise utils.UserError("--cuda_graph: capturing the backbones failed (operation not permitted when stream "
                              "is capturing); run without --cuda_graph")
    monkeypatch.setattr(utils, "cuda_graph_unsupported_reason", lambda *args, **kwargs: None)  # as on a GPU
    monkeypatch.setattr(utils, "graph_backbones", failing_capture)
    args = benchmark.get_args_parser().parse_args(
        ["--device", "cpu", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--batch_size", "2",
         "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2", "--steps", "1",
         "--rounds", "2", "--warmup", "0", "--threads", "1", "--cuda_graph"])
    summary = benchmark.run(args)[0]
    out = capsys.readouterr().out
    assert "G left out: --cuda_graph: capturing the backbones failed (operation not permitted" in out
    assert "G" not in summary and summary["A"]["img_s_median"] > 0 and summary["B"]["img_s_median"] > 0
    assert "speed-up B/A" in out and "G/A" not in out


def test_benchmark_leaves_side_g_out_when_it_fails_after_its_capture(monkeypatch, capsys, tmp_path):
    """An error in a replay (after a good capture, inside a timed round) also costs side G only; the summary and
    the JSON come before the profiles, so a failing profiler cannot lose them."""
    monkeypatch.setattr(utils, "cuda_graph_unsupported_reason", lambda *args, **kwargs: None)  # as on a GPU
    monkeypatch.setattr(utils, "graph_backbones", lambda *args, **kwargs: None)  # "captured"
    original_step, calls = benchmark.PackageStep.__call__, []

    def replay_fails_after_warmup(self, images):
        if self.name.endswith("CUDA graphs"):
            calls.append(1)
            if len(calls) > 2:  # the two warm-up steps went well
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return original_step(self, images)
    monkeypatch.setattr(benchmark.PackageStep, "__call__", replay_fails_after_warmup)
    original_profile = benchmark.profile_step

    def profiler_fails_for_a(step, images, accel, rows):
        if isinstance(step, benchmark.ReferenceStep):
            raise RuntimeError("profiler broke")
        return original_profile(step, images, accel, rows)
    monkeypatch.setattr(benchmark, "profile_step", profiler_fails_for_a)
    json_path = tmp_path / "step.json"
    args = benchmark.get_args_parser().parse_args(
        ["--device", "cpu", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--batch_size", "2",
         "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2", "--steps", "1",
         "--rounds", "2", "--warmup", "0", "--threads", "1", "--cuda_graph", "--profile", "3",
         "--json", str(json_path)])
    summary = benchmark.run(args)[0]
    out = capsys.readouterr().out
    assert "G left out: CUDA error: an illegal memory access was encountered" in out
    assert "G" not in summary and len(summary["A"]["img_s_rounds"]) == 2 and len(summary["B"]["img_s_rounds"]) == 2
    assert out.index("speed-up B/A") < out.index("profile of A failed: profiler broke") < out.index(
        "profile of one step of B")
    assert set(summary["profile"]) == {"B"}
    assert json.loads(json_path.read_text())[0]["B"]["img_s_median"] == summary["B"]["img_s_median"]
