"""A moto S3 server in a child process of its own, for the S3 and archive benchmarks.

In the benchmark's own process, moto would share the GIL with the engine and its CPU
would count as the engine's; in a child it is measured apart (``cpu_seconds(pid)``).
The child is the benchmark script itself started with a flag: it calls ``serve`` with
a function that seeds moto's backend, prints one JSON line once it serves, and serves
until its stdin closes (so it also ends when the parent dies).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def serve(seed: Callable[[object], dict], latency_ms: float = 0.0) -> None:
    """Child process: seed moto's S3 backend, then serve it over HTTP until stdin closes.

    ``seed(backend)`` returns figures to report; they go out with the port in one JSON
    line. With ``latency_ms``, every request sleeps that long first (outside the GIL), a
    crude stand-in for the network and S3's own latency.
    """
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    figures = seed(s3_backends[DEFAULT_ACCOUNT_ID]["aws"])

    # What moto.server.ThreadedMotoServer does, with an optional delay in front.
    app = DomainDispatcherApplication(create_backend_app)
    if latency_ms > 0:
        moto_app = app

        def app(environ, start_response):
            time.sleep(latency_ms / 1000)
            return moto_app(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(json.dumps({**figures, "port": server.server_port}), flush=True)
    try:
        sys.stdin.read()  # EOF: the parent closed the pipe or died
    finally:
        server.shutdown()
        thread.join()


@contextmanager
def moto_server(argv: list[str], start_timeout_s: float) -> Iterator[dict]:
    """Start ``python argv...`` (a child that calls ``serve``); yield its figures, endpoint and pid."""
    process = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], start_timeout_s)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"moto server did not start (exit code {process.poll()})")
        info = json.loads(line)
        info["endpoint"] = f"http://127.0.0.1:{info['port']}"
        info["pid"] = process.pid
        yield info
    finally:
        try:
            process.stdin.close()
        except OSError:
            pass
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_client(endpoint: str):
    """boto3 with its defaults, as a hand-written script would make it."""
    import boto3

    return boto3.client("s3", region_name=REGION, endpoint_url=endpoint, **CREDENTIALS)
