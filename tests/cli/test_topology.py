"""The plan of `ssb up` (cli/topology.py), without starting anything: which processes, with which commands, in which
order, and that each is told where the others are through variables its settings read."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cli.topology import Ports, plan_topology
from tests.test_compose import COMMAND_SETTINGS, resolve_cli_command, settings_classes, variables_read

DATA = Path("/srv/ssb-data")


def plan(**overrides):
    options = dict(python="/venv/bin/python", data_dir=DATA, workers=3, ports=Ports(9000, 9001, 9002), redis_port=6400)
    return plan_topology(**{**options, **overrides})


def test_the_processes_and_their_order():
    topology = plan()
    assert [spec.name for spec in topology.processes] == [
        "redis", "teacher", "curator", "curator-worker-1", "curator-worker-2", "curator-worker-3", "trainer",
        "trainer-worker",
    ]  # fmt: skip
    assert [spec.name for spec in topology.processes if spec.ready_before_the_rest] == ["redis"]
    assert topology.urls == {
        "teacher": "http://127.0.0.1:9000",
        "curator": "http://127.0.0.1:9001",
        "trainer": "http://127.0.0.1:9002",
        "redis": "redis://127.0.0.1:6400/0",
    }
    assert topology.directories == (DATA, DATA / "redis")


def test_redis_of_its_own_is_loopback_append_only_in_the_data_directory():
    argv = plan().process("redis").argv
    options = dict(zip(argv[1::2], argv[2::2]))
    assert argv[0] == "redis-server"
    assert options == {
        "--port": "6400",
        "--bind": "127.0.0.1",
        "--dir": str(DATA / "redis"),
        "--appendonly": "yes",
        "--save": "",
        "--protected-mode": "yes",
    }
    assert plan().process("redis").ready_url == "redis://127.0.0.1:6400/0"


def test_a_configured_redis_is_used_and_none_started():
    topology = plan(redis_url="redis://:secret@cache:6379/3", redis_port=None)
    assert "redis" not in [spec.name for spec in topology.processes]
    assert topology.directories == (DATA,)
    assert {spec.env["SSB_REDIS_URL"] for spec in topology.processes} == {"redis://:secret@cache:6379/3"}


def test_every_process_is_told_where_the_others_are():
    topology = plan(model="Qwen/Qwen2.5-3B-Instruct")
    for spec in topology.processes[1:]:
        assert spec.argv[:3] == ("/venv/bin/python", "-m", "cli.main")
        assert spec.env["SSB_REDIS_URL"] == "redis://127.0.0.1:6400/0"
        assert spec.env["SSB_DATA_DIR"] == str(DATA)
        assert spec.env["SSB_TEACHER_URLS"] == "http://127.0.0.1:9000"
        assert spec.env["SSB_TRAINER_URL"] == "http://127.0.0.1:9002"
        assert spec.env["SSB_MODEL"] == "Qwen/Qwen2.5-3B-Instruct"
    for name, port in (("teacher", 9000), ("curator", 9001), ("trainer", 9002)):
        spec = topology.process(name)
        assert spec.env[f"SSB_{name.upper()}_PORT"] == str(port)
        assert spec.env[f"SSB_{name.upper()}_HOST"] == "127.0.0.1"
        assert spec.ready_url == f"http://127.0.0.1:{port}/readyz"
    assert topology.process("curator-worker-1").ready_url is None


def test_listening_on_every_interface_is_reached_on_loopback():
    topology = plan(host="0.0.0.0")
    assert topology.process("teacher").env["SSB_TEACHER_HOST"] == "0.0.0.0"
    assert urlsplit(topology.urls["teacher"]).hostname == "127.0.0.1"


@pytest.mark.parametrize("name", ["teacher", "curator", "curator-worker-1", "trainer", "trainer-worker"])
def test_every_command_exists_and_every_variable_is_read_by_its_settings(name):
    spec = plan().process(name)
    words = tuple(word for word in spec.argv[3:] if not word.startswith("-"))[:2]
    command = resolve_cli_command(words)
    assert command is not None, f"`ssb {' '.join(words)}` is not a command"
    assert "--log-level" in {opt for param in command.params for opt in param.opts}
    read = set().union(*(variables_read(cls) for cls in settings_classes(COMMAND_SETTINGS[words])))
    unread = {variable for variable in spec.env if variable.startswith("SSB_")} - read
    assert not unread, f"{name} is given {unread}, which its settings do not read"


def test_no_worker_or_no_redis_port_is_refused():
    with pytest.raises(ValueError, match="--workers"):
        plan(workers=0)
    with pytest.raises(ValueError, match="Redis port"):
        plan(redis_port=None)
