"""plot_log.py: training curves from log.txt; matplotlib is optional."""
import json
import math
import sys

import numpy as np
import pytest

import plot_log

# The lines main_dino.py writes (keys as in a real run), with a k-NN accuracy on some epochs.
EPOCHS = [
    {"train_loss": 5.41, "train_teacher_entropy": 4.95, "train_kl": 0.47, "train_lr": 1.6e-05,
     "train_wd": 0.067, "train_bad_images": 0, "epoch": 0},
    {"train_loss": 5.20, "train_teacher_entropy": 4.70, "train_kl": 0.50, "train_lr": 3.1e-05,
     "train_wd": 0.13, "train_bad_images": 0, "epoch": 1, "knn_top1": 21.5},
    {"train_loss": 4.90, "train_teacher_entropy": 4.10, "train_kl": 0.80, "train_lr": 2.0e-05,
     "train_wd": 0.30, "train_bad_images": 0, "epoch": 2},
]


def write_log(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def test_read_log_keeps_the_last_line_of_a_repeated_epoch(tmp_path):
    resumed = dict(EPOCHS[1], train_loss=5.0)  # a run stopped mid-epoch 1 and resumed writes epoch 1 again
    log = write_log(tmp_path / "log.txt", [EPOCHS[0], EPOCHS[1], resumed, EPOCHS[2]], ["\n"])
    records = plot_log.read_log(str(log))
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[1]["train_loss"] == 5.0
    curves = plot_log.series(records)
    assert curves["knn_top1"] == ([1], [21.5])  # only where it was measured
    assert curves["train_loss"] == ([0, 1, 2], [5.41, 5.0, 4.90])
    titles = [title for title, _, _ in plot_log.panels(curves)]
    assert titles == ["loss", "learning rate", "weight decay", "teacher entropy", "KL(teacher || student)",
                      "k-NN accuracy"]


def test_non_finite_values_are_left_out(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('{"train_loss": NaN, "epoch": 0}\n{"train_loss": 3.0, "epoch": 1}\n')
    curves = plot_log.series(plot_log.read_log(str(log)))
    assert curves["train_loss"] == ([1], [3.0])
    assert not any(math.isnan(v) for v in curves["train_loss"][1])


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    log = write_log(tmp_path / "log.txt", EPOCHS)
    out = tmp_path / "curves.png"
    plot_log.main(["--log", str(log), "--out", str(out)])
    with Image.open(out) as img:
        assert img.format == "PNG"
        # 6 panels in 2 rows of 3
        assert img.width > img.height > 300
        assert len(np.unique(np.asarray(img.convert("L")))) > 10  # not a blank picture


def test_default_output_is_next_to_the_log(tmp_path):
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "log.txt", EPOCHS)
    plot_log.main(["--log", str(log)])
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("content, message", [
    (None, "log not found"),
    ("", "no logged epoch"),
    ('{"train_loss": 1.0, "epoch": 0}\nTraceback (most recent call last):\n', "line 2 is not JSON"),
    ("[1, 2]\n", "line 1 is not a JSON object"),
    ('{"epoch": 0, "note": "x"}\n', "no curve to plot"),
    ('{"epoch": "1", "train_loss": 1.0}\n{"epoch": 2, "train_loss": 0.5}\n', "line 1: \"epoch\" is '1'"),
    ('{"epoch": [1], "train_loss": 1.0}\n', "not a whole number"),
    ('{"epoch": NaN, "train_loss": 1.0}\n', "not a whole number"),
    (b"PK\x03\x04\xff\xfe\x80 binary checkpoint bytes", "not a text file"),
])
def test_bad_logs_are_one_line(tmp_path, capsys, content, message):
    log = tmp_path / "log.txt"
    if isinstance(content, bytes):
        log.write_bytes(content)
    elif content is not None:
        log.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        plot_log.main(["--log", str(log), "--out", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_missing_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    """Whether or not matplotlib is installed: a None entry in sys.modules makes its import fail."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    log = write_log(tmp_path / "log.txt", EPOCHS)
    with pytest.raises(SystemExit) as exit_info:
        plot_log.main(["--log", str(log), "--out", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install matplotlib" in lines[0], lines
    assert not (tmp_path / "c.png").exists()


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_log.main(["--help"])
    assert exit_info.value.code == 0
    assert "--log" in capsys.readouterr().out
