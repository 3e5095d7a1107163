"""More than one machine, with TensorFlow's own engine: `train --distribute multi-worker`.

Two worker processes on 127.0.0.1, each told its place by TF_CONFIG, train one model
(tf.distribute.MultiWorkerMirroredStrategy: every step's gradients are summed over the
workers). Worker 0 is the chief and writes the bundle; the other works in a scratch folder
of its own that it removes. A worker killed mid-run is brought back as TensorFlow expects,
with its peers: all of them start again, and they resume from their last finished epoch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, small_flickr8k
from test_faults import tiny_flickr8k

pytestmark = pytest.mark.slow


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def start_workers(arguments, ports):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(len(ports)):
        environment = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                           TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen([sys.executable, "-m", "captioning", *map(str, arguments)], cwd=REPO,
                                        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return workers


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    data_dir, work = tiny_flickr8k(root / "flickr8k"), root / "work"
    # Both workers of a machine would share this cache: fill it once first.
    run_cli("features", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2",
            "--weights", "none", "--out", work / "features" / "flickr8k-mobilenet_v2-avg")
    return data_dir, work


def train_arguments(data_dir, work, out, epochs):
    return ["train", "--dataset", "flickr8k", "--data-dir", data_dir, "--encoder", "mobilenet_v2", "--weights",
            "none", "--cache-dir", work, "--out", out, "--epochs", epochs, "--self-critical-epochs", 0, "--seed", 1]


def final_val_loss(bundle):
    return json.loads((bundle / "bundle.json").read_text())["metrics"]["val_loss"]


def test_two_workers_train_one_bundle_like_one_worker(cluster_data, tmp_path):
    data_dir, work = cluster_data
    out = tmp_path / "bundle"
    workers = start_workers([*train_arguments(data_dir, work, out, 3), "--distribute", "multi-worker"], free_ports(2))
    logs = [worker.communicate(timeout=900)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "worker worker-1 done" in logs[1] and f"bundle written to {out}" in logs[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]  # the worker's scratch folder is gone

    alone = run_cli(*train_arguments(data_dir, work, tmp_path / "alone", 3))
    assert alone.returncode == 0
    together, single = final_val_loss(out), final_val_loss(tmp_path / "alone")
    assert abs(together - single) < 0.15 * single, (together, single)


def test_a_killed_worker_and_its_peer_restart_and_resume(cluster_data, tmp_path):
    data_dir, work = cluster_data
    out = tmp_path / "bundle"
    arguments = [*train_arguments(data_dir, work, out, 4), "--distribute", "multi-worker"]
    ports = free_ports(2)
    workers = start_workers(arguments, ports)
    for line in workers[1].stdout:
        if line.startswith("Epoch 3/4"):  # two epochs are finished and backed up
            workers[1].send_signal(signal.SIGKILL)
            break
    workers[1].wait(timeout=60)
    # Its peer cannot go on alone: it fails, or waits for the dead worker; either way it is stopped.
    deadline = time.time() + 60
    while workers[0].poll() is None and time.time() < deadline:
        time.sleep(1)
    if workers[0].poll() is None:
        workers[0].send_signal(signal.SIGKILL)
    workers[0].communicate(timeout=60)
    assert not (out / "bundle.json").exists()

    again = start_workers(arguments, free_ports(2))
    logs = [worker.communicate(timeout=900)[0] for worker in again]
    assert [worker.returncode for worker in again] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "Epoch 1/4" not in logs[0] and "Epoch 4/4" in logs[0]  # resumed from the backup
    assert json.loads((out / "bundle.json").read_text())["metrics"]["epochs_run"] == 4


def test_features_cached_by_two_processes_merge_into_one_process_s_store(flickr8k_dir, mobilenet_weights, tmp_path):
    photos = small_flickr8k(flickr8k_dir, tmp_path / "flickr8k", train=30, dev=10)
    common = ["features", "--dataset", "flickr8k", "--data-dir", photos, "--encoder", "mobilenet_v2",
              "--weights", mobilenet_weights, "--batch-size", 4]  # chunks of 16 photos: 3 for 40
    run_cli(*common, "--out", tmp_path / "one")
    shards = [subprocess.Popen([sys.executable, "-m", "captioning", *map(str, common), "--shard", f"{i}/2",
                                "--out", str(tmp_path / f"shard{i}")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [shard.communicate(timeout=900)[0] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    merged = run_cli("merge-shards", tmp_path / "shard1", tmp_path / "shard0", "--out", tmp_path / "merged")
    assert "cached 40 images" in merged.stdout
    one, two = tmp_path / "one", tmp_path / "merged"
    names = sorted(path.name for path in one.iterdir() if path.is_file())
    assert names == sorted(path.name for path in two.iterdir() if path.is_file()) and "features.npy" in names
    for name in names:  # the very same bytes
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("config, message", [
    ("{cluster: x}", "is not JSON"),
    ('["worker"]', "must be a JSON object"),
    ('{"cluster": {"worker": ["host1"]}, "task": {"type": "worker", "index": 0}}', '"host:port" addresses'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'needs "task"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}', 'needs "task"'),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}',
     '"index" must be 0 to 1'),
])
def test_a_malformed_tf_config_is_one_line_naming_the_variable(tmp_path, config, message):
    result = subprocess.run([sys.executable, "-m", "captioning", "train", "--dataset", "flickr8k", "--data-dir",
                             tmp_path, "--encoder", "mobilenet_v2", "--weights", "none", "--out", tmp_path / "out",
                             "--distribute", "multi-worker"], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), TF_CONFIG=config))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: the TF_CONFIG environment variable") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# --- start-up: peers that do not answer (captioning/cluster.py) -------------------------------

def lone_worker(tmp_path, cluster, *more):
    """Worker 0 of `cluster`, started alone: its peers never come."""
    config = json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": 0}})
    return subprocess.Popen([sys.executable, "-m", "captioning", "train", "--dataset", "flickr8k", "--data-dir",
                             str(tmp_path), "--encoder", "mobilenet_v2", "--weights", "none", "--out",
                             str(tmp_path / "out"), "--distribute", "multi-worker", *map(str, more)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), TF_CONFIG=config),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # As in a terminal: a shell's background job (`make test &`) ignores Ctrl-C, and
                            # its children inherit that; the Ctrl-C test below would then wait 2 minutes.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_peer_that_never_starts_is_named_and_given_up_on_after_the_timeout(tmp_path):
    own, peer = free_ports(2)
    worker = lone_worker(tmp_path, [f"127.0.0.1:{own}", f"127.0.0.1:{peer}"], "--peer-timeout", 3)
    _, stderr = worker.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert worker.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert lines[0].startswith("waiting for workers: ") and f"127.0.0.1:{peer}" in lines[0]
    assert f"127.0.0.1:{own}" not in lines[0]  # itself it does not wait for
    assert len(lines) == 2 and lines[1].startswith("error: no answer after 3 s from") and f"127.0.0.1:{peer}" in lines[1]
    assert "--peer-timeout" in lines[1] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("signal_number, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_while_waiting_stops_at_once_with_a_message(tmp_path, signal_number, status):
    worker = lone_worker(tmp_path, [f"127.0.0.1:{port}" for port in free_ports(2)])  # the default 2 minutes
    assert worker.stderr.readline().startswith("waiting for workers: ")
    started = time.monotonic()
    worker.send_signal(signal_number)
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == status and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.startswith("stopped (") and "while waiting for the other workers" in stderr
    assert time.monotonic() - started < 30  # long before the 2 minutes are up


def test_the_readme_s_host_names_as_they_are_fail_at_once_naming_them(tmp_path):
    worker = lone_worker(tmp_path, ["host1:12345", "host2:12345"])  # README: More than one machine
    _, stderr = worker.communicate(timeout=60)
    lines = stderr.strip().splitlines()
    assert worker.returncode == 1 and len(lines) == 1, stderr[-2000:]
    assert "do not resolve: host1:12345, host2:12345" in lines[0] and "README" in lines[0]


def test_the_port_of_this_worker_taken_by_another_program_is_named(tmp_path):
    own, peer = free_ports(2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", own))
        squatter.listen()
        worker = lone_worker(tmp_path, [f"127.0.0.1:{own}", f"127.0.0.1:{peer}"], "--peer-timeout", 3)
        _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 1 and f"port {own}" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_an_evaluator_task_neither_waits_nor_is_waited_for(capsys):
    from captioning.cluster import wait_for_peers
    own, evaluator = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{own}"], "evaluator": [f"127.0.0.1:{evaluator}"]}  # nobody listens there
    started = time.monotonic()
    wait_for_peers(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}), timeout=30)
    wait_for_peers(json.dumps({"cluster": cluster, "task": {"type": "evaluator", "index": 0}}), timeout=30)
    assert time.monotonic() - started < 10 and "waiting for workers" not in capsys.readouterr().err
