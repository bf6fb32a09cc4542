"""The suite's Redis: a `redis-server` of the test session's own on a free loopback port (no snapshots, its files in a
temporary directory, killed by the kernel should pytest die), started when tests/conftest.py is imported, before any
other conftest or test module reads its URL, and stopped after the last test: the tests need no Redis running on the
machine and leave one that is alone. Without `redis-server` (or should it fail to start), the machine's Redis on
127.0.0.1:6379 is used. `SSB_TEST_REDIS_URL` (`redis://host:port`, no database) names another one.

Each test module takes a database number of its own (`redis_url(13)`) and a key prefix per test, and cleans up with
`delete_keys`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
import warnings

from redis import Redis

from shared.processes import die_with_parent

MACHINE_REDIS = "redis://127.0.0.1:6379"


def redis_url(database: int) -> str:
    """The URL of one database of the suite's Redis (after `start_session_redis`)."""
    return f"{os.environ.get('SSB_TEST_REDIS_URL', MACHINE_REDIS)}/{database}"


def start_session_redis() -> subprocess.Popen | None:
    """Start the session's `redis-server` and point `SSB_TEST_REDIS_URL` at it; None when another Redis is named, or
    none can be started (then the machine's is used)."""
    if os.environ.get("SSB_TEST_REDIS_URL") or shutil.which("redis-server") is None:
        return None
    for _ in range(3):  # a free port taken by another process before the server binds it: another port
        server = start_redis_server()
        if server is not None:
            return server
    warnings.warn(f"redis-server did not start; the tests use {MACHINE_REDIS}")
    return None


def start_redis_server() -> subprocess.Popen | None:
    """One try of `start_session_redis`, on a free port."""
    from cli.supervisor import free_port

    server = run_redis_server(free_port(), tempfile.mkdtemp(prefix="ssb-test-redis-"))
    if server is not None:
        os.environ["SSB_TEST_REDIS_URL"] = server.url
    return server


def run_redis_server(port: int, directory: str, *, appendonly: bool = False) -> subprocess.Popen | None:
    """A `redis-server` on loopback `port` keeping its files in `directory` (an append-only file there with
    `appendonly`, so that a restart finds the data again), answering pings; None if it did not start in 30 s. It has
    `.url` and `.directory`."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
            "--appendonly", "yes" if appendonly else "no"]  # fmt: skip
    server = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=functools.partial(die_with_parent, os.getpid()),
    )
    server.directory = directory
    server.url = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            Redis.from_url(server.url, socket_connect_timeout=1).ping()
            return server
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_session_redis(server)
                return None
            time.sleep(0.05)


def stop_session_redis(server: subprocess.Popen | None, *, keep_files: bool = False) -> None:
    """Stop a server of `run_redis_server` (it writes its append-only file as it goes), and remove its directory unless
    `keep_files`."""
    if server is None:
        return
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    if not keep_files:
        shutil.rmtree(server.directory, ignore_errors=True)


def delete_keys(connection: Redis, key_prefix: str) -> None:
    """Every key of this test's deployment: its records, its RQ queues, jobs, registries and workers."""
    for key in connection.scan_iter(match=f"*{key_prefix}*", count=1000):
        connection.delete(key)
    for set_key in (b"rq:queues", b"rq:workers"):
        for member in connection.smembers(set_key):
            if key_prefix.encode() in member:
                connection.srem(set_key, member)
