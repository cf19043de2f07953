"""Running the package's scripts as a user would: in a subprocess, from the package root."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small, fast settings for CPU runs of main_dino.py.
TINY_TRAIN_ARGS = [
    "--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "256", "--device", "cpu",
    "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2",
    "--batch_size_per_gpu", "16", "--num_workers", "0", "--use_fp16", "false",
]


def run_py(script, *args, env=None, timeout=300, cwd=ROOT):
    """Runs `python script args...`; returns the CompletedProcess (text output, never raises on failure)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    cmd = [sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
