"""TF_CONFIG, read and checked, and the wait for the peers: in one line, within a deadline."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from pipeline.errors import ClusterConfigError, ClusterUnavailable
from pipeline.training.cluster import Cluster, platform_tf_config, read_cluster, wait_for_peers
from pipeline.training.distribution import _lost_peer, plan_distribution
from tests.helpers import free_ports, tf_config


def _cluster(config: object) -> Cluster:
    return read_cluster({"TF_CONFIG": config if isinstance(config, str) else json.dumps(config)})


def test_workers_only_cluster_makes_worker_0_the_chief():
    cluster = _cluster({"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 1}})
    assert cluster.addresses == ("a:1", "b:2", "c:3")
    assert (cluster.worker_id, cluster.num_workers, cluster.is_chief) == (1, 3, False)
    assert cluster.own_address == "b:2"
    assert cluster.peers == {0: "a:1", 2: "c:3"}
    assert _cluster({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}).is_chief


def test_a_chief_task_comes_first_and_is_the_chief():
    jobs = {"chief": ["[::1]:2222"], "worker": ["w0:2222", "w1:2222"]}
    chief = _cluster({"cluster": jobs, "task": {"type": "chief", "index": 0}})
    worker = _cluster({"cluster": jobs, "task": {"type": "worker", "index": 0}})
    assert chief.addresses == worker.addresses == ("[::1]:2222", "w0:2222", "w1:2222")
    assert (chief.worker_id, chief.is_chief) == (0, True)
    assert (worker.worker_id, worker.is_chief) == (1, False)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("", "it is not set"),
        ("{not json", "it is not JSON"),
        ("[]", "no 'cluster' object"),
        ({"cluster": {"worker": ["a:1"]}}, "no 'task' object"),
        ({"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}, "'ps'"),
        ({"cluster": {"chief": ["a:1"]}, "task": {"type": "chief", "index": 0}}, "cluster.worker is missing"),
        ({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}, "non-empty list"),
        ({"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}, "non-empty list"),
        ({"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}, "cluster.worker[1]='b'"),
        ({"cluster": {"worker": ["a:0"]}, "task": {"type": "worker", "index": 0}}, "port 1..65535"),
        ({"cluster": {"worker": ["a:99999"]}, "task": {"type": "worker", "index": 0}}, "port 1..65535"),
        ({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}, "appears twice"),
        ({"cluster": {"chief": ["a:1", "b:1"], "worker": ["c:1"]}, "task": {"type": "chief", "index": 0}},
         "one address only"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, "task.type 'chief'"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": ["worker"], "index": 0}}, "task.type ['worker']"),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}, "task.index 2"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": -1}}, "task.index -1"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}, "task.index '0'"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": True}}, "task.index True"),
    ],
)
def test_invalid_tf_config_is_one_line_naming_what_is_wrong(config, fragment):
    with pytest.raises(ClusterConfigError) as raised:
        _cluster(config)
    message = str(raised.value)
    assert message.startswith("TF_CONFIG is invalid: ") and fragment in message
    assert '"task": {"type": "worker", "index": 0}' in message  # an example of what is expected
    assert "\n" not in message
    assert raised.value.exit_code == 2


PLATFORM = {"WORKER_INDEX": "2", "NUM_WORKERS": "3", "WORKER_HOSTS": "cluster-worker-{index}", "WORKER_PORT": "2222"}


def test_a_platforms_worker_gets_the_tf_config_of_its_index_among_the_named_hosts():
    cluster = _cluster(platform_tf_config(PLATFORM))
    assert cluster.addresses == ("cluster-worker-0:2222", "cluster-worker-1:2222", "cluster-worker-2:2222")
    assert (cluster.worker_id, cluster.is_chief) == (2, False)
    # Kubernetes' own index variable, and the default port
    kubernetes = {"JOB_COMPLETION_INDEX": "0", "NUM_WORKERS": "2", "WORKER_HOSTS": "train-{index}.train"}
    assert _cluster(platform_tf_config(kubernetes)).addresses == ("train-0.train:2222", "train-1.train:2222")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"WORKER_INDEX": "3"}, "WORKER_INDEX='3' is not an index of the 3 workers (0..2)"),
        ({"WORKER_INDEX": ""}, "WORKER_INDEX='' is not an index of the 3 workers"),
        ({"NUM_WORKERS": "0"}, "NUM_WORKERS='0' is not a number of workers"),
        ({"WORKER_HOSTS": "cluster-worker"}, "WORKER_HOSTS='cluster-worker' does not hold {index}"),
        ({"WORKER_PORT": "99999"}, "port 1..65535"),
    ],
)
def test_a_platforms_bad_worker_environment_is_one_line(change, fragment):
    with pytest.raises(ClusterConfigError) as raised:
        platform_tf_config(PLATFORM | change)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_the_lost_peer_is_the_other_task_the_error_names_not_this_workers_own():
    """TensorFlow's text names this worker's own task too (the device of the aborted collective): seen over a
    compose network, where the chief first named itself as the lost worker."""
    message = ("Collective ops is aborted by: recvmsg:Connection reset by peer [/job:worker/replica:0/task:{own}/"
               "device:CPU:0] Additional GRPC error information from remote target /job:worker/replica:0/task:{other} "
               "while calling /tensorflow.WorkerService/RecvBuf")
    for own, other in ((0, 1), (1, 0)):
        cluster = _cluster({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": own}})
        lost = _lost_peer(message.format(own=own, other=other), cluster)
        assert lost.startswith(f"worker {other} ({['a:1', 'b:2'][other]}) (recvmsg:Connection reset by peer"), lost
    # only the own task named: nobody is blamed by name
    cluster = _cluster({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})
    assert _lost_peer("aborted by: reset /job:worker/replica:0/task:0", cluster).startswith("contact with another")


def test_multi_worker_strategy_needs_tf_config_and_the_others_ignore_it(caplog):
    with pytest.raises(ClusterConfigError, match="it is not set"):
        plan_distribution("multi_worker", {})
    stray = {"TF_CONFIG": tf_config([1, 2], 1)}
    assert plan_distribution("default", stray).is_chief  # trains alone, with a warning
    assert "TF_CONFIG is set but strategy=default" in caplog.text


def test_workers_started_in_turn_find_each_other_and_free_their_port_for_tensorflow():
    ports = free_ports(3)
    servers: list[socket.socket] = []  # what TensorFlow's server does next: listen on the same port
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            wait_for_peers(_cluster(tf_config(ports, index)), timeout=20)
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's server does
            server.bind(("", ports[index]))
            server.listen()
            servers.append(server)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(3)]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.7)  # in turn, as processes start
        for thread in threads:
            thread.join(timeout=30)
        assert not errors and not any(thread.is_alive() for thread in threads)
        assert len(servers) == 3
    finally:
        for server in servers:
            server.close()


def test_a_peer_that_never_answers_is_named_within_the_deadline():
    ports = free_ports(2)
    started = time.monotonic()
    with pytest.raises(ClusterUnavailable) as raised:
        wait_for_peers(_cluster(tf_config(ports, 0)), timeout=1.5)
    # It gives up at the deadline (a refused connection answers at once); the slack is for a loaded
    # machine, and still fails a wait that ignores the deadline (the CLI's default is 120 s).
    assert 1.5 <= time.monotonic() - started < 1.5 + 10
    message = str(raised.value)
    assert f"worker 1 (127.0.0.1:{ports[1]}) did not answer within 1.5 s" in message and "\n" not in message


def test_an_own_port_in_use_is_reported_before_waiting():
    ports = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("", ports[0]))
        taken.listen()
        with pytest.raises(ClusterConfigError, match=f"port {ports[0]}, which is already in use"):
            wait_for_peers(_cluster(tf_config(ports, 0)), timeout=30)
