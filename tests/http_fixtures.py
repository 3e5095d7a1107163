"""A real HTTP server on 127.0.0.1 for the download tests and the `make demo` test.

It serves `server.files` ({URL path: bytes, or the Path of a file read on each
request}) and answers anything else with 404. Each path can be given a plan,
one action per request in order: "404", "500", "cut" (Content-Length promises
more than is sent), "slow" (sleeps past the client's read timeout), "ok".
Requests beyond the plan are "ok". `hits` counts requests per path and
`served` the complete 200/206 answers.
"""

import collections
import contextlib
import http.server
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit


class FaultHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        path = urlsplit(self.path).path
        with server.lock:
            server.hits[path] += 1
            server.ranges[path].append(self.headers.get("Range"))
            plan = server.plans.get(path, [])
            number = server.hits[path] - 1
            action = plan[number] if number < len(plan) else "ok"
        body = server.files.get(path)
        if isinstance(body, Path):
            body = body.read_bytes() if body.is_file() else None
        if body is None or action == "404":
            return self.send_error(404)
        if action == "500":
            return self.send_error(500)
        if action == "slow":
            time.sleep(server.slow_seconds)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header[len("bytes="):].split("-")[0])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        self.wfile.write(payload[: len(payload) // 3] if action == "cut" else payload)
        if action != "cut":
            with server.lock:
                server.served[path] += 1

    def log_message(self, *args):
        pass


class FaultServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.files, self.plans = {}, {}
        self.hits, self.ranges = collections.Counter(), collections.defaultdict(list)
        self.served = collections.Counter()
        self.lock = threading.Lock()
        self.slow_seconds = 1.0

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request, client_address):
        pass  # the client hung up on a slow or cut response: expected here


@contextlib.contextmanager
def serving():
    """A FaultServer answering on a thread of its own until the block ends."""
    instance = FaultServer()
    thread = threading.Thread(target=instance.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield instance
    finally:
        instance.shutdown()
        instance.server_close()
