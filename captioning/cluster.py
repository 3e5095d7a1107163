"""Multi-worker start-up: find the peers TF_CONFIG names before TensorFlow looks for them.

MultiWorkerMirroredStrategy connects to its peers inside TensorFlow's C++
runtime, which prints nothing while it waits, never gives up, and does not
return to Python, so Ctrl-C and SIGTERM go unanswered. `wait_for_peers`
does that waiting in Python first: it says which peers it waits for, tries
each one's port until all answer or the deadline passes, and names the
missing ones. Host names that do not resolve fail at once, since no amount
of waiting makes them resolve.

Each worker also listens on its own port while it waits (without ever
accepting, so the kernel's handshake is all a peer sees), because its peers
are waiting for it in the same way: TensorFlow's own server only opens that
port once the strategy is made, which is after the wait. The listener closes
just before the strategy binds the port; a peer that checks in that instant
retries until TensorFlow's server answers instead.
"""

import json
import os
import signal
import socket
import sys
import time

DEFAULT_TIMEOUT = 120  # seconds: `train --peer-timeout` waits longer


class ClusterError(ValueError):
    """The cluster cannot start: a peer is unreachable, a name does not resolve, the port is taken."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM while waiting for the peers."""


def _split(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _resolves(host):
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def _answers(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _listen(port):
    """Our own port, open for the peers' checks; ClusterError if something else holds it."""
    # On IPv6 too where the machine has it: a peer may resolve our name to an IPv6 address.
    dual = socket.has_dualstack_ipv6()
    try:
        listener = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                        backlog=64, dualstack_ipv6=dual)
    except OSError as error:
        raise ClusterError(f"cannot listen on this worker's port {port} ({error.strerror or error}): another "
                           "program uses it; free it or choose another port in TF_CONFIG") from None
    return listener


def wait_for_peers(tf_config, timeout=DEFAULT_TIMEOUT, log=None, poll=0.5):
    """Return once every other task of TF_CONFIG's cluster accepts a TCP connection.

    tf_config: the variable's text, already checked (captioning.tf_config_problem).
    Raises ClusterError naming the peers that did not answer within `timeout`
    seconds, or whose names do not resolve; Stopped on Ctrl-C or SIGTERM.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    config = json.loads(tf_config)
    task = config["task"]
    if task["type"] == "evaluator":
        return  # an evaluator is not part of the training cluster: it neither waits nor is waited for
    addresses = [(role, index, address) for role, hosts in config["cluster"].items() if role != "evaluator"
                 for index, address in enumerate(hosts)]
    own = next(address for role, index, address in addresses if (role, index) == (task["type"], task["index"]))
    peers = [address for role, index, address in addresses if (role, index) != (task["type"], task["index"])]
    unknown = [address for address in [own, *peers] if not _resolves(_split(address)[0])]
    if unknown:
        raise ClusterError(f"TF_CONFIG names hosts that do not resolve: {', '.join(unknown)}; put each machine's "
                           "real host name or IP address in TF_CONFIG (README: More than one machine)")
    if not peers:
        return

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)  # Ctrl-C is already KeyboardInterrupt
    listener = _listen(_split(own)[1])
    missing = list(peers)
    try:
        log(f"waiting for workers: {', '.join(missing)} (up to {timeout:g} s; --peer-timeout waits longer)")
        deadline = time.monotonic() + timeout
        while True:
            missing = [address for address in missing if not _answers(*_split(address))]
            if not missing:
                log("all workers answered")
                return
            if time.monotonic() >= deadline:
                raise ClusterError(f"no answer after {timeout:g} s from {', '.join(missing)}: start the same "
                                   "command there with its TF_CONFIG, check the host names, ports and firewall, "
                                   "or wait longer with --peer-timeout SECONDS")
            time.sleep(poll)
    except KeyboardInterrupt:
        raise Stopped("SIGINT") from None
    finally:
        listener.close()
        signal.signal(signal.SIGTERM, previous)


def wait_from_command_line(timeout=DEFAULT_TIMEOUT):
    """`train --distribute multi-worker`: wait for the other workers before TensorFlow does it
    silently. None once they answer (or TF_CONFIG is unset: one worker alone), else the exit
    status after a one-line message. cli.main reads --peer-timeout before calling this."""
    if not os.environ.get("TF_CONFIG"):
        return None
    try:
        wait_for_peers(os.environ["TF_CONFIG"], timeout=timeout)
    except Stopped as stop:
        print(f"stopped ({stop}) while waiting for the other workers: nothing was started; run the same "
              "command again on every machine", file=sys.stderr)
        return 130 if str(stop) == "SIGINT" else 143
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return None
