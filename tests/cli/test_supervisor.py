"""The process handling of `ssb up` (cli/supervisor.py) on small real processes and real signals: every line comes
out prefixed, a process that ignores SIGTERM and the child it started are SIGKILLed after the grace period, a
process that exits is noticed, a real Redis started first is waited for, and the processes get SIGTERM should the
supervisor itself be killed."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cli.supervisor import StartError, Supervisor, free_port, port_in_use
from cli.topology import ProcessSpec, redis_server_argv

STUBBORN = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("child", child.pid, flush=True)
time.sleep(600)
"""


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def family(supervisor: Supervisor) -> list[psutil.Process]:
    processes = [psutil.Process(p.pid) for p in supervisor.processes.values()]
    return processes + [child for p in processes for child in p.children(recursive=True)]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_lines_are_prefixed_with_the_process_name():
    out = io.StringIO()
    specs = [
        ProcessSpec("alpha", python("print('one'); print('two')")),
        ProcessSpec("b", python("import sys; sys.stderr.write('to stderr\\n')"), env={"SSB_X": "1"}),
    ]
    with Supervisor(specs, out=out, stop_timeout=5) as supervisor:
        supervisor.start()
        wait_for(lambda: all(p.poll() is not None for p in supervisor.processes.values()))
    lines = out.getvalue().splitlines()
    assert lines.index("alpha | one") < lines.index("alpha | two")
    assert "b     | to stderr" in lines


def test_the_environment_is_added_to_the_inherited_one(monkeypatch):
    monkeypatch.setenv("INHERITED", "yes")
    out = io.StringIO()
    code = "import os; print(os.environ['INHERITED'], os.environ['ADDED'])"
    with Supervisor([ProcessSpec("env", python(code), env={"ADDED": "too"})], out=out) as supervisor:
        supervisor.start()
        wait_for(lambda: supervisor.exited() is not None)
    assert supervisor.exited() == ("env", 0)
    assert "env | yes too" in out.getvalue()


@pytest.mark.parametrize(
    "stop_timeout, hurry_after, says",
    [(1.0, None, "still running 1 s after SIGTERM: SIGKILL"), (60.0, 1.0, "still running at a second signal: SIGKILL")],
    ids=["grace-period", "second-signal"],
)
def test_a_process_that_ignores_sigterm_and_its_child_are_killed_after_the_grace_period(stop_timeout, hurry_after,
                                                                                       says):
    """A process that ignores SIGTERM, and the child it started, are SIGKILLed once the grace period is over, or at
    once after `hurry` (what a second Ctrl-C to `ssb up` calls), not after `stop_timeout`."""
    import threading

    out = io.StringIO()
    supervisor = Supervisor([ProcessSpec("stubborn", python(STUBBORN))], out=out, stop_timeout=stop_timeout)
    supervisor.start()
    wait_for(lambda: "child" in out.getvalue())
    processes = family(supervisor)
    assert len(processes) == 2
    if hurry_after is not None:
        threading.Timer(hurry_after, supervisor.hurry).start()
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 15
    gone, alive = psutil.wait_procs(processes, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert f"stubborn | {says}" in out.getvalue()


def test_a_lock_passed_to_the_processes_stays_taken_while_any_of_them_lives(tmp_path):
    """`ssb up` passes its data directory's lock to every process it starts: should `ssb up` itself be killed, the
    processes it leaves still hold it, and a second `ssb up` on the directory is refused until they are gone."""
    import fcntl

    from cli.up_command import claim_data_directory

    claim = claim_data_directory(tmp_path)
    supervisor = Supervisor([ProcessSpec("sleeper", python("import time; time.sleep(600)"))], out=io.StringIO(),
                            pass_fds=(claim.fileno(),))
    supervisor.start()
    claim.close()  # as when `ssb up` is killed
    with open(tmp_path / ".ssb-up.lock", "a") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    supervisor.stop()
    claim_data_directory(tmp_path).close()  # free again


HORSE_KEEPER = r"""
import os, subprocess, sys
horse = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], process_group=0)  # before it runs
print("horse", horse.pid, flush=True)
horse.wait()  # a warm shutdown: SIGTERM leaves this process waiting for its horse
"""


class LostTerminal(io.StringIO):
    """The output of `ssb up` after its terminal closed: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


def test_processes_are_stopped_when_the_output_is_gone():
    """The terminal closes (SSH dropped): stopping must not depend on printing."""
    with Supervisor([ProcessSpec("stubborn", python(STUBBORN))], out=LostTerminal(), stop_timeout=1.0) as supervisor:
        supervisor.start()
        wait_for(lambda: len(family(supervisor)) == 2)
        processes = family(supervisor)
        supervisor.stop()
    gone, alive = psutil.wait_procs(processes, timeout=5)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def test_a_child_in_a_group_of_its_own_is_killed_with_its_session():
    """RQ forks each job's work horse into a new process group, and a worker's warm shutdown waits for it: SIGTERM to
    the worker's group misses the horse, so what is left of the whole session is SIGKILLed."""
    out = io.StringIO()
    supervisor = Supervisor([ProcessSpec("worker", python(HORSE_KEEPER))], out=out, stop_timeout=1.0)
    supervisor.start()
    wait_for(lambda: "horse" in out.getvalue())
    processes = family(supervisor)
    assert len({p.pid for p in processes}) == 2 and len({os.getpgid(p.pid) for p in processes}) == 2
    supervisor.stop()
    gone, alive = psutil.wait_procs(processes, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert "worker | still running 1 s after SIGTERM: SIGKILL" in out.getvalue()


def test_a_process_that_obeys_sigterm_is_not_killed():
    out = io.StringIO()
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('bye', flush=True), sys.exit(0)));"
        "print('up', flush=True); time.sleep(600)"
    )
    with Supervisor([ProcessSpec("polite", python(code))], out=out, stop_timeout=30) as supervisor:
        supervisor.start()
        wait_for(lambda: "up" in out.getvalue())
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert supervisor.processes["polite"].returncode == 0
    assert "polite | bye" in out.getvalue() and "SIGKILL" not in out.getvalue()


# A supervisor in a process of its own (`ssb up`), whose one process writes a file when SIGTERM reaches it.
ORPHANED = r"""
import signal, sys, time
from pathlib import Path
from cli.supervisor import Supervisor
from cli.topology import ProcessSpec
marker = sys.argv[1]
child = (
    "import signal, sys, time; from pathlib import Path\n"
    f"signal.signal(signal.SIGTERM, lambda *a: (Path({marker!r}).write_text('SIGTERM'), sys.exit(0)))\n"
    "print('up', flush=True); time.sleep(600)"
)
supervisor = Supervisor([ProcessSpec("service", (sys.executable, "-c", child))])
supervisor.start()
time.sleep(600)
"""


def test_the_processes_get_sigterm_when_the_supervisor_dies_without_a_stop(tmp_path):
    """`ssb up` SIGKILLed (or taken by the OOM killer) runs no stop: the kernel sends each process SIGTERM, which it
    handles as it would at a stop, instead of running on with no one to stop it."""
    marker = tmp_path / "terminated"
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", ORPHANED, str(marker)]
    supervisor = psutil.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
    started = [supervisor]
    try:
        assert supervisor.stdout.readline().strip() == "service | up"
        started += supervisor.children()
        supervisor.kill()
        supervisor.wait(timeout=10)
        # The service is no child of this process: its end is seen by what it wrote.
        wait_for(lambda: marker.exists() and marker.read_text() == "SIGTERM")
    finally:
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert marker.read_text() == "SIGTERM"


def test_a_process_that_exits_is_noticed():
    specs = [ProcessSpec("steady", python("import time; time.sleep(600)")), ProcessSpec("quick", python("exit(3)"))]
    with Supervisor(specs, out=io.StringIO(), stop_timeout=5) as supervisor:
        supervisor.start()
        wait_for(lambda: supervisor.exited() is not None)
        assert supervisor.exited() == ("quick", 3)
    assert supervisor.processes["steady"].poll() is not None


def test_a_process_others_wait_for_that_dies_stops_the_start():
    port = free_port()
    specs = [
        ProcessSpec("broken", python("exit(1)"), ready_url=f"redis://127.0.0.1:{port}/0", ready_before_the_rest=True),
        ProcessSpec("never", python("import time; time.sleep(600)")),
    ]
    with Supervisor(specs, out=io.StringIO()) as supervisor:
        with pytest.raises(StartError, match="broken did not become ready"):
            supervisor.start()
        assert "never" not in supervisor.processes


def test_a_stop_asked_for_during_the_start_starts_nothing_more():
    """`ssb up`'s Ctrl-C while it waits for Redis: the start returns at once, and the rest never start."""
    port = free_port()  # nothing answers there: the first process would be waited for a minute
    specs = [
        ProcessSpec("slow", python("import time; time.sleep(600)"), ready_url=f"redis://127.0.0.1:{port}/0",
                    ready_before_the_rest=True),
        ProcessSpec("never", python("import time; time.sleep(600)")),
    ]
    asked = time.monotonic() + 1.0
    with Supervisor(specs, out=io.StringIO(), stop_timeout=5) as supervisor:
        supervisor.start(cancelled=lambda: time.monotonic() > asked)
        assert time.monotonic() - asked < 5.0
        assert list(supervisor.processes) == ["slow"]
    assert supervisor.processes["slow"].poll() is not None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_is_ready_before_the_rest_start_and_stops_last(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    check = f"import redis, time; print('ping', redis.Redis.from_url('{url}').ping(), flush=True); time.sleep(600)"
    specs = [
        ProcessSpec("redis", redis_server_argv(port, tmp_path), ready_url=url, ready_before_the_rest=True),
        ProcessSpec("client", python(check)),
    ]
    out = io.StringIO()
    with Supervisor(specs, out=out, stop_timeout=10) as supervisor:
        supervisor.start()
        wait_for(lambda: "client | ping True" in out.getvalue())
        assert port_in_use("127.0.0.1", port)
    log = out.getvalue()
    assert supervisor.processes["client"].returncode == -15
    assert "Redis is now ready to exit" in log
    assert (tmp_path / "appendonlydir").is_dir()


READYZ = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port, kind = int(sys.argv[1]), sys.argv[2]

class Readyz(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"error": {"message": "the engine failed to start: no model", "type": kind}}).encode()
        self.send_response(503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", port), Readyz).serve_forever()
"""


def test_a_service_that_failed_to_start_for_good_is_told_from_one_still_starting():
    """`ssb up` stops on a service whose `/readyz` says it failed to start (a 503 of type `start_failed`) instead of
    waiting for ever; one that is still starting (`not_ready`) it waits for."""
    failing, starting = free_port(), free_port()
    specs = [
        ProcessSpec("starting", (*python(READYZ), str(starting), "not_ready"),
                    ready_url=f"http://127.0.0.1:{starting}/readyz"),
        ProcessSpec("teacher", (*python(READYZ), str(failing), "start_failed"),
                    ready_url=f"http://127.0.0.1:{failing}/readyz"),
    ]
    with Supervisor(specs, out=io.StringIO(), stop_timeout=5) as supervisor:
        supervisor.start()
        wait_for(lambda: supervisor.readiness()[1] is not None)
        assert supervisor.readiness() == (False, ("teacher", "the engine failed to start: no model"))
    with Supervisor(specs[:1], out=io.StringIO(), stop_timeout=5) as supervisor:
        supervisor.start()
        wait_for(lambda: port_in_use("127.0.0.1", starting))
        assert supervisor.readiness() == (False, None)
