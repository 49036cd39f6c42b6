"""Screenshots of what users see of a sweep: the MLflow UI in Chromium, and optuna-dashboard on the sweep's study.

    .venv/bin/python bench/ui_screens.py --out /work/screens
    .venv/bin/python bench/ui_screens.py --out /work/screens --dataset ../shared/data/mnist-10k.npz --epochs 4

Needs Chromium (Debian: `apt-get install chromium`, used at /usr/bin/chromium) and, in the venv,
`pip install playwright optuna-dashboard` (not project dependencies: no test needs them).

Starts an `mlflow server` on a temporary SQLite store, trains one run (`mlflow run . -P ...`) and runs a
small sweep (`mlflow run . -e sweep`, a grid of four learning rates with the median pruner, whose last,
far too small rate is pruned), its study in the default journal file (HOME is a temporary directory);
then saves PNGs of: the experiment's runs table, the sweep's parent run, a pruned trial, the parent's
logged-model output (the logged model's page and the experiment's Models tab), and optuna-dashboard's study
page and trials list. Prints each file with the ids it shows.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
SMALL_DATA = PROJECT_DIR / "tests" / "data" / "mnist-small.npz"
GRID = {"sampler": "grid", "pruner": "median", "learning_rate": "0.01,0.003,0.005,0.00001",
        "lr_patience": "1", "es_patience": "5"}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def mlflow_run(entry_point: str, params: dict[str, str], env: dict[str, str], cwd: Path) -> None:
    command = [str(BIN / "mlflow"), "run", str(PROJECT_DIR), "-e", entry_point, "--env-manager", "local",
               "--experiment-name", "ui-screens"]
    for name, value in params.items():
        command += ["-P", f"{name}={value}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"mlflow run -e {entry_point} failed:\n{result.stderr[-3000:]}")
    print(f"mlflow run -e {entry_point}: {time.perf_counter() - started:.0f} s")
    if entry_point == "sweep":
        print("\n".join(line for line in result.stdout.splitlines() if line.startswith(("Trial", "Best", "Sweep"))))


def shoot(page, url: str, path: Path, wait_text: str | None = None, full_page: bool = False) -> None:
    page.goto(url, wait_until="load")  # not "networkidle": the MLflow UI keeps polling
    try:
        if wait_text:
            page.get_by_text(wait_text).first.wait_for(timeout=30_000)
    except Exception as error:  # noqa: BLE001 - a screenshot of what did show is still worth having
        print(f"{path}: {wait_text!r} not shown within 30 s ({type(error).__name__})")
    time.sleep(5)  # charts and tables settle after the last request
    page.screenshot(path=str(path), full_page=full_page)
    print(f"{path}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/screens"))
    parser.add_argument("--dataset", default=str(SMALL_DATA))
    parser.add_argument("--epochs", default="4")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="ui-screens-") as temporary:
        work = Path(temporary)
        (work / "home").mkdir()
        port, dashboard_port = free_port(), free_port()
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
             "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        dashboard = None
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/health", 120, server)
            env = {**os.environ, "MLFLOW_TRACKING_URI": base, "HOME": str(work / "home"),
                   "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
            mlflow_run("main", {"epochs": args.epochs, "dataset": args.dataset}, env, work)
            mlflow_run("sweep", GRID | {"epochs": args.epochs, "dataset": args.dataset}, env, work)

            client = MlflowClient(base)
            experiment = client.get_experiment_by_name("ui-screens")
            eid = experiment.experiment_id
            [parent] = client.search_runs([eid], "tags.run_type = 'sweep'")
            children = client.search_runs([eid], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
            pruned = [run for run in children if run.data.tags.get("trial_state") == "pruned"]
            [output] = parent.outputs.model_outputs
            journal = work / "home" / ".cache" / "mnist-pipeline" / "optuna-studies.journal"
            dashboard = subprocess.Popen(
                [str(BIN / "optuna-dashboard"), str(journal), "--host", "127.0.0.1", "--port", str(dashboard_port)],
                cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            dashboard_base = f"http://127.0.0.1:{dashboard_port}"
            wait_for(f"{dashboard_base}/api/studies", 60, dashboard)

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                shoot(page, f"{base}/#/experiments/{eid}/runs", args.out / "1-runs-table.png", "sweep")
                expand = page.locator("[data-testid='runs-table'] button[aria-label*='xpand'], "
                                      "button[aria-label*='xpand']").first
                if expand.count():
                    expand.click()
                    time.sleep(2)
                    page.screenshot(path=str(args.out / "1b-runs-table-expanded.png"))
                    print(f"{args.out / '1b-runs-table-expanded.png'}: the sweep's row expanded")
                shoot(page, f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}",
                      args.out / "2-sweep-parent.png", "sweep", full_page=True)
                if pruned:
                    shoot(page, f"{base}/#/experiments/{eid}/runs/{pruned[0].info.run_id}",
                          args.out / "3-pruned-trial.png", pruned[0].info.run_name, full_page=True)
                shoot(page, f"{base}/#/experiments/{eid}/models/{output.model_id}",
                      args.out / "4-best-model.png", full_page=True)
                shoot(page, f"{base}/#/experiments/{eid}/models", args.out / "4b-models-tab.png")
                study_id = 0  # the journal holds this one study
                shoot(page, f"{dashboard_base}/dashboard/studies/{study_id}", args.out / "5-optuna-dashboard.png",
                      full_page=True)
                shoot(page, f"{dashboard_base}/dashboard/studies/{study_id}/trials",
                      args.out / "5b-optuna-dashboard-trials.png")
                browser.close()
            print(f"parent {parent.info.run_id}, pruned {[run.info.run_name for run in pruned]}, "
                  f"best model {output.model_id}, study {parent.data.tags.get('study_name')}")
        finally:
            for process in (dashboard, server):
                if process is not None:
                    os.killpg(process.pid, 15)
                    process.wait(timeout=30)


if __name__ == "__main__":
    main()
