"""PlotProcess: plots drawn by a child process, failures brought back to the caller."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.tracking import reporting
from pipeline.tracking.plot_process import PLOT_FUNCTIONS, PlotProcess

HISTORY = [
    {"loss": 1.0 / (epoch + 1), "accuracy": 0.5 + epoch / 20, "val_loss": 1.2 / (epoch + 1),
     "val_accuracy": 0.45 + epoch / 20, "learning_rate": 1e-3 if epoch < 3 else 5e-4}
    for epoch in range(5)
]
LR_CHANGES = [{"epoch": 2, "old_lr": 1e-3, "new_lr": 5e-4, "cause": "ReduceLROnPlateau(val_loss)"}]


def test_both_plots_are_drawn_in_another_process(tmp_path, monkeypatch):
    def not_in_this_process(*args):
        raise AssertionError("a plot was drawn in the calling process")

    # In this process the plot functions fail; a child process imports its own, intact, pipeline.tracking.reporting.
    for function in PLOT_FUNCTIONS:
        monkeypatch.setattr(reporting, function, not_in_this_process)
    curves, matrix = tmp_path / "curves.png", tmp_path / "matrix.png"
    with PlotProcess() as plotter:
        child = plotter._process.pid
        assert child != os.getpid()
        plotter.submit("plot_training_curves", HISTORY, LR_CHANGES, 4, curves)
        plotter.submit("plot_confusion_matrix", np.eye(10, dtype=np.int64) * 7, matrix)
    assert plotter._process.returncode == 0  # the child ran to its end...
    images = [imread(path) for path in (curves, matrix)]  # ...and drew both, each its own picture
    for image in images:
        height, width, _ = image.shape
        assert height > 100 and width > 100
        assert image[..., :3].std() > 0.05  # not a blank canvas
    assert images[0].shape != images[1].shape or not np.array_equal(images[0], images[1])


def test_an_os_error_in_the_child_keeps_its_errno(tmp_path):
    with pytest.raises(OSError) as raised, PlotProcess() as plotter:
        plotter.submit("plot_confusion_matrix", np.eye(10, dtype=np.int64), tmp_path / "missing" / "matrix.png")
    assert raised.value.errno == errno.ENOENT


def test_any_other_failure_is_one_line(tmp_path):
    with pytest.raises(RuntimeError, match="drawing the plots failed: .*Error"), PlotProcess() as plotter:
        plotter.submit("plot_confusion_matrix", "not a matrix", tmp_path / "matrix.png")


def test_only_plot_functions_can_be_asked_for():
    with pytest.raises(ValueError, match="not a plot function"), PlotProcess() as plotter:
        plotter.submit("classification_report", np.eye(10))


def test_a_failing_caller_does_not_wait_for_the_plots(tmp_path):
    started = time.monotonic()
    with pytest.raises(KeyError), PlotProcess(timeout=60) as plotter:
        plotter.submit("plot_training_curves", HISTORY, LR_CHANGES, 4, tmp_path / "curves.png")
        raise KeyError("the caller failed")
    assert plotter._process.returncode is not None  # the child is gone
    assert time.monotonic() - started < 30
