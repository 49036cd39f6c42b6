"""Which process trains a run: a heartbeat in the run itself, so that a second process never trains
a run that another one is still training, on this machine or another sharing the tracking store.

While it has a run open, the training process keeps the run's tag `training_owner` up to date: a
JSON object naming its machine, process id and start time, and `beat`, the wall-clock time of its last
heartbeat, refreshed every `timeout / 6` seconds by a thread of its own (not the recorder's queue,
so that a long epoch or a backlog of records cannot make a live training look dead). When it closes
the run, however the training ended, it marks the tag `ended`. A process killed with SIGKILL leaves
the tag as it was, and its run RUNNING: MLflow never learns that it died.

A run is taken as trained by a live process (`live_owner`) when its tag is there, not ended, and
- the owner is on this machine (same host name, boot and process-id namespace): while that process
  (same id and start time) still runs, however old its beat; a killed one is known to be gone at once;
- the owner is on another machine: while its last beat is younger than `timeout` seconds
  (`HEARTBEAT_TIMEOUT_SECONDS`, 60 by default). The machines' clocks must agree to well within that
  (NTP); a machine cut off from the store for longer is taken as gone.
The run's MLflow status is not evidence either way: `mlflow run` marks a run FAILED when a command
refused to resume it, while its owner still trains it.

Two processes may be given the same existing run at the same instant, and both find it free. MLflow
has no compare-and-set on a tag, so a process takes an existing run with Fischer's protocol
(`RunHeartbeat.claim`): it reads the tag, refuses a live owner, writes its own tag with a token of its
own, waits `settle` seconds, and reads the tag back; only the process whose token is read back trains.
This holds while every claim's write lands in the store within `settle` seconds of its read:
`settle` is CLAIM_SETTLE_FACTOR times the claimer's own read and write, and at least
CLAIM_SETTLE_SECONDS (a store slower than that for one process only can still let two through).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.errors import first_line
from pipeline.tracking.process_group import wait_at_barrier

logger = logging.getLogger(__name__)

# Seconds after its last heartbeat that a training on another machine is taken as gone.
HEARTBEAT_TIMEOUT_SECONDS = 60.0
# The heartbeat is refreshed this many times within the timeout.
BEATS_PER_TIMEOUT = 6
# A claim waits this many times its own read and write, and at least CLAIM_SETTLE_SECONDS, before it reads
# the tag back (see the module's docstring).
CLAIM_SETTLE_FACTOR, CLAIM_SETTLE_SECONDS = 4.0, 1.0
# For tests that force a race: a directory in which a claim, before it reads the tag, leaves a file
# `waiting-<pid>` and then waits for a file `go` (`pipeline.tracking.process_group.wait_at_barrier`).
CLAIM_BARRIER_VARIABLE = "MNIST_PIPELINE_CLAIM_BARRIER"


def this_machine() -> str:
    """This machine as the heartbeat names it: the host name, and on Linux the boot id and the
    process-id namespace (two containers on one host are two machines: their process ids differ)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that trains a run, as its `training_owner` tag describes it.

    Args:
        machine: `this_machine()` of the owner.
        pid: its process id.
        started: its start time (seconds since the epoch), which tells it from a later process with its id.
        beat: the wall-clock time of its last heartbeat.
        ended: whether it has closed the run.
        claim: a token of this owner's claim on the run, unique to it (empty in tags written before claims).
    """

    machine: str
    pid: int
    started: float
    beat: float
    ended: bool = False
    claim: str = ""

    @classmethod
    def of_this_process(cls) -> Owner:
        return cls(this_machine(), os.getpid(), psutil.Process().create_time(), time.time(), claim=uuid.uuid4().hex)

    @classmethod
    def of_run(cls, run: Run) -> Owner | None:
        """The owner the run's tag names; None when the run has no tag (or one this code cannot read)."""
        text = run.data.tags.get(names.TAG_TRAINING_OWNER)
        if text is None:
            return None
        try:
            value = json.loads(text)
            return cls(str(value["machine"]), int(value["pid"]), float(value["started"]), float(value["beat"]),
                       bool(value.get("ended", False)), str(value.get("claim", "")))
        except (ValueError, KeyError, TypeError):
            logger.warning("Run %s: unreadable %s tag %r, ignored", run.info.run_id, names.TAG_TRAINING_OWNER, text)
            return None

    def tag(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @property
    def on_this_machine(self) -> bool:
        return self.machine == this_machine()

    def process_runs(self) -> bool:
        """On this machine: whether the owner's process still runs (a zombie does not)."""
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def describe(self) -> str:
        host = "this machine" if self.on_this_machine else f"host {self.machine.split('/')[0]}"
        return f"process {self.pid} on {host}"


def live_owner(run: Run, timeout: float = HEARTBEAT_TIMEOUT_SECONDS) -> tuple[Owner, str] | None:
    """The live process that trains `run`, with why it is taken as alive; None when no process does
    (the rule is in the module docstring)."""
    owner = Owner.of_run(run)
    if owner is None or owner.ended:
        return None
    age = time.time() - owner.beat
    if owner.on_this_machine:
        if owner.pid == os.getpid() or not owner.process_runs():
            return None
        return owner, f"{owner.describe()} still runs"
    if age >= timeout:
        return None
    return owner, (
        f"{owner.describe()} sent its last heartbeat {max(age, 0):.0f} s ago; a run whose process is gone "
        f"can be continued {timeout:.0f} s after its last heartbeat"
    )


class RunHeartbeat:
    """While open, keeps the run's `training_owner` tag naming this process with a fresh beat; marks it
    ended on close. A failed heartbeat is retried at the next one, never raised.

    Args:
        client: the tracking store's client.
        run_id: the run this process trains.
        timeout: see `HEARTBEAT_TIMEOUT_SECONDS`; the tag is refreshed every `timeout / 6` seconds.

    Example:
        with mlflow_run(run_id) as run, RunHeartbeat(client, run.info.run_id):
            ...train...

    An existing run is claimed first (`claim`), before it is opened; entering then starts the heartbeat.
    """

    def __init__(self, client: MlflowClient, run_id: str, timeout: float = HEARTBEAT_TIMEOUT_SECONDS) -> None:
        self.client = client
        self.run_id = run_id
        self.timeout = timeout
        self.interval = timeout / BEATS_PER_TIMEOUT
        self._claimed = False
        self.owner = Owner.of_this_process()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one tag write at a time; none after the one that says `ended`
        self._thread = threading.Thread(target=self._beat_until_stopped, name="run-heartbeat", daemon=True)

    def claim(self) -> tuple[Owner, str] | None:
        """Takes the existing run for this process unless another live process has it or takes it at the
        same moment (Fischer's protocol, in the module's docstring); returns that process and why it is
        taken as alive, or None when this process won. Costs two reads, one write and the settle time.

        Raises:
            MlflowException: the store failed.
        """
        wait_at_barrier(CLAIM_BARRIER_VARIABLE)
        started = time.monotonic()
        other = live_owner(self.client.get_run(self.run_id), self.timeout)
        if other is not None:
            return other
        with self._lock:
            self.owner = dataclasses.replace(self.owner, beat=time.time())
            self.client.set_tag(self.run_id, names.TAG_TRAINING_OWNER, self.owner.tag())
        time.sleep(max(CLAIM_SETTLE_SECONDS, CLAIM_SETTLE_FACTOR * (time.monotonic() - started)))
        run = self.client.get_run(self.run_id)
        read = Owner.of_run(run)
        if read is not None and read.claim == self.owner.claim:
            self._claimed = True
            return None
        if read is None:
            return self.owner, "its training_owner tag was removed while this process claimed the run"
        return live_owner(run, self.timeout) or (read, f"{read.describe()} claimed it at the same moment")

    def __enter__(self) -> RunHeartbeat:
        if not self._claimed:
            self._beat()  # a new run's claim: before anything of the training reaches the run
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._beat(ended=True)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self, ended: bool = False) -> None:
        with self._lock:
            if self._stop.is_set() and not ended:
                return
            self.owner = dataclasses.replace(self.owner, beat=time.time(), ended=ended)
            try:
                self.client.set_tag(self.run_id, names.TAG_TRAINING_OWNER, self.owner.tag())
            except Exception as error:  # noqa: BLE001 - an unreachable store: the next beat tries again
                logger.debug("Heartbeat of run %s not sent: %s", self.run_id, first_line(error, 160))
