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
"""Training curves from a log.txt (one JSON line per epoch) as one PNG.

    python plot_log.py --log output/log.txt --out curves.png

Plots, per epoch and where the log has them: loss, learning rate, weight decay,
teacher entropy, KL(teacher || student), k-NN accuracy (main_dino.py) and the
test accuracy of eval_linear.py. Needs matplotlib (pip install matplotlib).
"""
import json
import math
import os

import utils
from main_dino import OneLineErrorParser
from utils import UserError

# (panel title, y-axis label, which keys of a log line belong to it)
PANELS = [
    ("loss", "loss", lambda k: k in ("train_loss", "test_loss")),
    ("learning rate", "lr", lambda k: k == "train_lr"),
    ("weight decay", "wd", lambda k: k == "train_wd"),
    ("teacher entropy", "nats", lambda k: k == "train_teacher_entropy"),
    ("KL(teacher || student)", "nats", lambda k: k == "train_kl"),
    ("k-NN accuracy", "%", lambda k: "knn" in k.lower()),
    ("linear accuracy", "%", lambda k: k in ("test_acc1", "test_acc5")),
]


def get_args_parser():
    parser = OneLineErrorParser('Plot training curves', allow_abbrev=False)
    parser.add_argument('--log', default='log.txt', type=str,
        help='log.txt written by main_dino.py or eval_linear.py (one JSON object per line).')
    parser.add_argument('--out', default=None, type=str,
        help='PNG file to write (default: curves.png next to the log).')
    return parser


def read_log(path):
    """One dict per epoch, in epoch order; a resumed run's repeated epoch keeps its last line."""
    if not os.path.isfile(path):
        raise UserError(f"log not found: {path}")
    by_epoch = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a text file (a checkpoint?); is this a log.txt?") from err
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {number} is not JSON ({err.msg}); is this a log.txt?") from err
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number} is not a JSON object; is this a log.txt?")
        epoch = record.get("epoch", len(by_epoch))
        if (isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch)
                or epoch != int(epoch)):
            raise UserError(f"{path}, line {number}: \"epoch\" is {epoch!r}, not a whole number")
        record["epoch"] = int(epoch)
        by_epoch[int(epoch)] = record
    if not by_epoch:
        raise UserError(f"{path} holds no logged epoch yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def series(records):
    """{key: ([epochs], [values])} for every numeric key; missing or non-finite values are left out."""
    out = {}
    for index, record in enumerate(records):
        epoch = record.get("epoch", index)
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(epoch)
            ys.append(value)
    return out


def panels(curves):
    """[(title, ylabel, [key, ...])] for the panels the log has data for."""
    chosen = []
    for title, ylabel, belongs in PANELS:
        keys = sorted(k for k in curves if belongs(k))
        if keys:
            chosen.append((title, ylabel, keys))
    return chosen


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError(f"plotting needs matplotlib, which is not installed ({err}); "
                        f"install it with: pip install matplotlib") from err
    return plt


def plot(records, out_path, title=None):
    curves = series(records)
    chosen = panels(curves)
    if not chosen:
        raise UserError(f"no curve to plot: the log has none of loss, lr, wd, teacher entropy, kl, k-NN or "
                        f"accuracy (keys: {', '.join(sorted(curves)) or 'none'})")
    plt = import_pyplot()
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (panel_title, ylabel, keys) in zip(axes.flat, chosen):
        for key in keys:
            xs, ys = curves[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(out_path, dpi=100)
    except OSError as err:
        raise UserError(f"could not write {out_path}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    return [title for title, _, _ in chosen]


def plot_log(args):
    records = read_log(args.log)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.log)), "curves.png")
    drawn = plot(records, out, title=args.log)
    print(f"{out} saved ({len(records)} epochs: {', '.join(drawn)}).")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    utils.run_cli(plot_log, args)


if __name__ == '__main__':
    main()
