"""test/*.sh: the Ascend port's launcher contract (arguments, logs, final lines, summary file) on CPU."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import write_digits
from helpers import ROOT

NETWORK = "DINO_ID3436_for_Pytorch"
PACKAGE_FILES = ["main_dino.py", "utils.py", "vision_transformer.py", "eval_knn.py"]
LAUNCHERS = ["launch_dino.sh", "env_npu.sh", "train_performance_1p.sh", "train_performance_8p.sh",
             "train_full_1p.sh", "train_full_8p.sh"]
TINY = ["--arch=vit_tiny", "--patch_size=8", "--out_dim=256", "--device=cpu", "--global_crop_size=16",
        "--local_crop_size=8", "--local_crops_number=2", "--batch_size=8", "--num_workers=0", "--amp=false"]


@pytest.fixture
def package(tmp_path):
    """A copy of the package, so that test/output of the runs stays out of the work tree."""
    root = tmp_path / "pkg"
    (root / "test").mkdir(parents=True)
    for name in PACKAGE_FILES:
        shutil.copy(os.path.join(ROOT, name), root / name)
    for name in LAUNCHERS:
        shutil.copy(os.path.join(ROOT, "test", name), root / "test" / name)
    return root


def run_script(script, *args, cwd, timeout=300, env_extra=None, env_drop=()):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2", **(env_extra or {}))
    for name in ("ASCEND_DEVICE_ID",) + tuple(env_drop):
        env.pop(name, None)
    return subprocess.run(["bash", script] + [str(a) for a in args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


def final_value(stdout, key):
    match = re.search(rf"^{re.escape(key)} : (.*)$", stdout, re.M)
    assert match, f"no '{key}' line in:\n{stdout}"
    return match.group(1).strip()


def read_summary(path):
    pairs = [line.split(" = ", 1) for line in path.read_text().splitlines()]
    return {k: v for k, v in pairs}


def dry_run(package, script, *args, cwd=None, **env):
    result = run_script(os.path.join("test", script) if cwd is None else script, "--dry_run", *args,
                        cwd=cwd or package, timeout=60, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    return lines["train"].split(), lines.get("eval", "").split(), int(lines["processes"])


def flag_values(argv, name):
    """Values that follow each occurrence of --name (argparse keeps the last)."""
    found = [i for i, a in enumerate(argv) if a == f"--{name}"]
    if not found:
        return None
    values = []
    for a in argv[found[-1] + 1:]:
        if a.startswith("--"):
            break
        values.append(a)
    return values


def test_arguments_reach_the_right_script(package, tmp_path):
    data = write_digits(str(tmp_path / "data"), n_train=20, n_val=10)
    train, evaluation, nprocs = dry_run(
        package, "train_full_8p.sh", f"--data_path={data}", "--arch=vit_tiny", "--batch_size_per_gpu", "8",
        "--device", "cpu", "--global_crops_scale", "0.3", "1", "--nb_knn", "5", "7", "--amp=false",
        "--global_crop_size=32", "--nproc=2")
    assert nprocs == 2
    assert flag_values(train, "arch") == ["vit_tiny"] and flag_values(evaluation, "arch") == ["vit_tiny"]
    assert flag_values(train, "device") == ["cpu"] and flag_values(evaluation, "device") == ["cpu"]
    assert flag_values(train, "batch_size") == ["8"] and flag_values(train, "batch_size_per_gpu") is None
    assert flag_values(train, "global_crops_scale") == ["0.3", "1"]
    assert "--amp" not in train and "--use_color_jitter_opti" in train
    assert flag_values(train, "epochs") == ["100"] and flag_values(train, "data_path") == [data]
    assert flag_values(train, "nb_knn") is None and flag_values(evaluation, "nb_knn") == ["5", "7"]
    assert flag_values(evaluation, "checkpoint_key") == ["teacher"]
    assert flag_values(evaluation, "data_path") == [data]
    assert flag_values(evaluation, "crop_size") == ["32"]  # evaluated at the training resolution
    ckpt = flag_values(evaluation, "pretrained_weights")[0]
    assert ckpt == os.path.join(flag_values(train, "output_dir")[0], "checkpoint.pth")

    # performance defaults of the Ascend port; synthetic data without --data_path; run from test/
    train, evaluation, nprocs = dry_run(package, "train_performance_1p.sh", "--num_steps=5",
                                        cwd=package / "test")
    assert nprocs == 1 and evaluation == []
    assert flag_values(train, "num_steps") == ["5"] and flag_values(train, "epochs") == ["1"]
    assert flag_values(train, "batch_size") == ["64"] and flag_values(train, "arch") == ["vit_small"]
    assert "--synthetic" in train and "--amp" in train and flag_values(train, "data_path") is None
    assert flag_values(train, "output_dir")[0].startswith(str(package / "test" / "output" / "0"))
    _, _, nprocs = dry_run(package, "train_performance_8p.sh")
    assert nprocs == 8
    assert not (package / "test" / "output").exists()  # a dry run writes nothing


def test_every_switch_of_main_dino_takes_true_or_false(package):
    """`--name=false` drops a switch and `--name=true` sets it, for each store_true flag of main_dino.py."""
    sys.path.insert(0, ROOT)
    import main_dino
    switches = sorted(a.dest for a in main_dino.get_args_parser()._actions
                      if a.nargs == 0 and a.const is True and a.dest != "help")
    assert {"amp", "compile", "synthetic"} <= set(switches)
    train, _, _ = dry_run(package, "train_performance_1p.sh", *[f"--{name}=false" for name in switches])
    assert not [name for name in switches if f"--{name}" in train]
    train, _, _ = dry_run(package, "train_performance_1p.sh", *[f"--{name}=true" for name in switches])
    assert [name for name in switches if train.count(f"--{name}") != 1] == []
    assert "true" not in train


def test_ascend_environment_script_runs_under_the_launchers_strict_mode(package, tmp_path):
    """CANN's set_env.sh expands PYTHONPATH and LD_LIBRARY_PATH without defaults; the launcher runs with
    `set -u`, and must still get through it when they are unset."""
    toolkit = tmp_path / "Ascend" / "ascend-toolkit"
    toolkit.mkdir(parents=True)
    (toolkit / "set_env.sh").write_text("export PYTHONPATH=/opt/cann/python:$PYTHONPATH\n"
                                        "export LD_LIBRARY_PATH=/opt/cann/lib64:$LD_LIBRARY_PATH\n")
    train, _, _ = dry_run(package, "train_performance_1p.sh", env_extra={"ASCEND_HOME": str(tmp_path / "Ascend")},
                          env_drop=("PYTHONPATH", "LD_LIBRARY_PATH", "etp_running_flag"))
    assert "main_dino.py" in train


@pytest.mark.parametrize("args,message", [
    ([], 'para "data_path" must be given'),
    (["--data_path=/no/such/folder"], "/no/such/folder"),
    (["--data_path={train}"], "no train/ folder"),
    (["--data_path={data}", "--nproc=zero"], "nproc"),
])
def test_full_run_input_errors(package, tmp_path, args, message):
    data = write_digits(str(tmp_path / "data"), n_train=20, n_val=10)
    args = [a.format(data=data, train=os.path.join(data, "train")) for a in args]
    result = run_script("test/train_full_1p.sh", *args, cwd=package, timeout=60)
    assert result.returncode == 1
    assert result.stdout.strip().count("\n") == 0 and result.stdout.startswith("[Error]"), result.stdout
    assert message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_performance_1p_on_cpu(package):
    """Run from test/, as the Ascend port allows; synthetic data."""
    result = run_script("train_performance_1p.sh", *TINY, "--num_steps=6", cwd=package / "test")
    out_dir = package / "test" / "output" / "0"
    assert result.returncode == 0, result.stdout + result.stderr + (out_dir / "train_0.log").read_text()[-3000:]
    fps = float(final_value(result.stdout, "Final Performance images/sec"))
    assert fps > 0
    assert int(final_value(result.stdout, "E2E Training Duration sec")) >= 0
    log = (out_dir / "train_0.log").read_text()
    assert re.search(r"Training throughput: ([0-9.]+) images/s", log).group(1) == f"{fps:.2f}"
    summary = read_summary(out_dir / f"{NETWORK}_bs8_1p_perf.log")
    assert list(summary) == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS",
                             "TrainingTime", "ActualLoss", "E2ETrainingTime"]
    assert summary["RankSize"] == "1" and summary["BatchSize"] == "8"
    assert summary["CaseName"] == f"{NETWORK}_bs8_1p_perf"
    assert float(summary["ActualFPS"]) == fps
    assert float(summary["TrainingTime"]) == pytest.approx(8 / fps, rel=1e-3)
    last_loss = re.findall(r"\sloss: ([0-9.]+)", log)[-1]
    assert summary["ActualLoss"] == last_loss and float(last_loss) > 0


def test_full_1p_on_digits(package, tmp_path):
    """Train on train/ only, evaluate the teacher with k-NN on val/, report the 10-NN top-1."""
    data = write_digits(str(tmp_path / "data"), n_train=200, n_val=50)
    result = run_script("test/train_full_1p.sh", f"--data_path={data}", *TINY, "--epochs=1",
                        "--warmup_epochs=0", "--num_steps=4", "--nb_knn", "10", "20", cwd=package)
    out_dir = package / "test" / "output" / "0"
    assert result.returncode == 0, result.stdout + result.stderr
    train_log = (out_dir / "train_0.log").read_text()
    assert f"Training on {os.path.join(data, 'train')} only" in train_log
    eval_log = (out_dir / "test_0.log").read_text()
    ten_nn = re.search(r"^10-NN classifier result: Top1: ([0-9.]+), Top5", eval_log, re.M).group(1)
    accuracy = final_value(result.stdout, "Final Train Accuracy")
    assert accuracy == ten_nn and 0 <= float(accuracy) <= 100
    assert "Data loaded with 200 train and 50 val imgs." in eval_log
    summary = read_summary(out_dir / f"{NETWORK}_bs8_1p_acc.log")
    assert summary["TrainAccuracy"] == accuracy
    assert float(summary["ActualFPS"]) > 0 and float(summary["ActualLoss"]) > 0
    assert int(summary["E2ETrainingTime"]) >= 0
    assert (out_dir / "ckpt_full_1p" / "checkpoint.pth").is_file()


def test_gpu_benchmark_script_refuses_a_machine_without_gpu(tmp_path):
    """test/benchmark_gpu.sh checks for a CUDA device before spending minutes (CI machines have none)."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(["bash", os.path.join(ROOT, "test", "benchmark_gpu.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [f"[Error] no CUDA device is visible to {sys.executable}"]
    assert os.path.isdir(tmp_path / "out") and not os.listdir(tmp_path / "out")
