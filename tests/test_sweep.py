"""The sweep command refuses a bad grid in one line (a real sweep with a diverging trial: tests/test_sweep_ui.py)."""

from __future__ import annotations

import pytest

from tests.helpers import one_line_error, run_cli_here

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--hidden-units", "128,64;;32"], "hidden_units='128,64;;32'"),
        (["--learning-rate", "0.01,-1"], "each a number > 0"),
        (["--epochs", "2,"], "epochs='2,'"),
        (["--mode", "best"], "mode='best'"),
    ],
)
def test_a_bad_grid_gives_one_line_and_exit_2(tmp_path, args, fragment):
    result = run_cli_here(["sweep", *args], MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    assert one_line_error(result, fragment).startswith("error: parameter ")
    assert not (tmp_path / "mlflow.db").exists()
