"""Entry point of one worker pod of the Indexed Job in job.yaml: writes its TF_CONFIG, then trains.

Kubernetes gives each pod of an Indexed Job its index (JOB_COMPLETION_INDEX) and the hostname
`<job name>-<index>`; with the pod's `subdomain` set to the headless Service, every pod resolves as
`<job name>-<index>.<service>`. From that, this script writes the TF_CONFIG of worker <index> in a
cluster of NUM_WORKERS workers and replaces itself with
`python -m mlflow_project train --strategy multi_worker <its own arguments>`.

It is mounted into the pods from a ConfigMap (see kustomization.yaml), so any image of the project
runs it; it needs the standard library only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence


def tf_config(environ: Mapping[str, str]) -> str:
    """The TF_CONFIG of this pod, from the Job's environment (JOB_COMPLETION_INDEX, NUM_WORKERS,
    JOB_NAME, SERVICE_NAME, WORKER_PORT)."""
    num_workers = int(environ["NUM_WORKERS"])
    workers = [
        f"{environ['JOB_NAME']}-{index}.{environ['SERVICE_NAME']}:{environ['WORKER_PORT']}"
        for index in range(num_workers)
    ]
    task = {"type": "worker", "index": int(environ["JOB_COMPLETION_INDEX"])}
    return json.dumps({"cluster": {"worker": workers}, "task": task})


def main(arguments: Sequence[str]) -> None:
    os.environ["TF_CONFIG"] = tf_config(os.environ)
    print(f"TF_CONFIG={os.environ['TF_CONFIG']}", flush=True)
    command = [sys.executable, "-m", "mlflow_project", "train", "--strategy", "multi_worker", *arguments]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main(sys.argv[1:])
