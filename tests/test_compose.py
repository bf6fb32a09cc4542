"""docker-compose.yml, the Dockerfiles and .env.example checked against the code, without Docker.

Nothing here can start a container (no Docker engine on the machines that run the suite), so these tests check what
the files promise against what the code does: every service runs an `ssb` command that exists; every `SSB_*`
variable compose sets is read by that service's settings class; every variable in `.env.example` is read by a
settings class or by compose, and every setting is listed there; the shared data volume is mounted where
SSB_DATA_DIR points; ports agree with the settings; the GPU is reserved exactly where a model runs; Redis is private,
persistent and password-protected; the curator image holds everything the curator imports and no torch.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# The settings module each `ssb` command reads (one settings class per service, STYLE.md).
COMMAND_SETTINGS = {
    ("serve", "teacher"): "services.teacher.settings",
    ("serve", "curator"): "services.curator.settings",
    ("worker", "curate"): "services.curator.settings",
    ("serve", "trainer"): "services.trainer.settings",
    ("worker", "train"): "services.trainer.settings",
}
# The HTTP services: compose service, its settings' port field, the variable other services reach it by.
APIS = {"teacher": "teacher_port", "curator": "curator_port", "trainer": "trainer_port"}
# Variables compose sets that no SSB settings class reads, and who reads them.
LIBRARY_VARIABLES = {
    "HF_HOME": "huggingface_hub: where Hugging Face models are cached (the models volume)",
    "HF_TOKEN": "huggingface_hub: the token for gated models",
    "REDISCLI_AUTH": "redis-cli in Redis's health check",
    "RQ_DASHBOARD_REDIS_URL": "rq-dashboard",
    "VLLM_CACHE_ROOT": "vLLM: its compiled graphs, kept in the models volume (not compiled again when recreated)",
}
GPU_SERVICES = {"teacher", "trainer-worker"}
SSB_SERVICES = ["teacher", "curator", "curator-worker", "trainer", "trainer-worker"]
DATA_VOLUME = "ssb-data"
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """The value as compose would see it with no .env: `${VAR:-default}` is the default, any other `${VAR}` a marker."""

    def replace(match: re.Match) -> str:
        name, kind, default = match.groups()
        return default if kind in (":-", "-") else f"<{name}>"

    return INTERPOLATION.sub(replace, value)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def argv(service: dict) -> list[str]:
    """What compose runs: `entrypoint` (which also drops the image's CMD) plus `command`."""
    entrypoint, command = service.get("entrypoint") or [], service.get("command") or []
    return [*entrypoint, *command]


def ssb_command_words(words: list[str]) -> tuple[str, ...]:
    """The command words of an `ssb` argv (up to the first option)."""
    assert words and words[0] == "ssb", words
    return tuple(word for word in words[1:] if not word.startswith("-"))


def resolve_cli_command(words: tuple[str, ...]):
    """The click command `ssb WORDS...` runs, or None."""
    import typer.main

    from cli.main import app

    command = typer.main.get_command(app)
    for word in words:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return None
    return None if hasattr(command, "commands") else command


def settings_classes(module_name: str) -> list[type]:
    from pydantic_settings import BaseSettings

    module = importlib.import_module(module_name)
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, BaseSettings) and value.__module__ == module_name
    ]


def variables_read(cls) -> set[str]:
    """The environment variables a pydantic-settings class reads (its prefix plus each field name, or its alias)."""
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def all_settings_modules() -> list[str]:
    services_settings = sorted(f"services.{path.parent.name}.settings" for path in ROOT.glob("services/*/settings.py"))
    return ["shared.settings", *services_settings]


def every_variable_read() -> set[str]:
    classes = [cls for module in all_settings_modules() for cls in settings_classes(module)]
    return {name for cls in classes for name in variables_read(cls)}


def env_example_variables() -> set[str]:
    """Every variable `.env.example` names, set or commented out (`# NAME=`)."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))


def interpolated_variables() -> set[str]:
    return {match.group(1) for match in INTERPOLATION.finditer(COMPOSE_FILE.read_text())}


def mounts(service: dict) -> dict[str, str]:
    """Target path -> named volume, for the named volumes a service mounts."""
    result = {}
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
        result[target] = source
    return result


def ssb_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if argv(s)[:1] == ["ssb"]}


def test_the_file_parses_and_holds_the_topology():
    assert set(services()) == {"redis", *SSB_SERVICES, "dashboard"}
    commands = {name: ssb_command_words(argv(s)) for name, s in ssb_services().items()}
    assert commands == {
        "teacher": ("serve", "teacher"),
        "curator": ("serve", "curator"),
        "curator-worker": ("worker", "curate"),
        "trainer": ("serve", "trainer"),
        "trainer-worker": ("worker", "train"),
    }


@pytest.mark.parametrize("service_name", SSB_SERVICES)
def test_every_service_runs_a_command_the_cli_has(service_name):
    words = ssb_command_words(argv(services()[service_name]))
    assert resolve_cli_command(words) is not None, f"{service_name}: `ssb {' '.join(words)}` is not a command"


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Each stage's name, base and the ENTRYPOINT/CMD it ends with (inherited from a stage of the same file)."""
    stages: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        if match := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, flags=re.IGNORECASE):
            base, name = match.groups()
            inherited = stages.get(base, {})
            current = {"entrypoint": inherited.get("entrypoint"), "cmd": inherited.get("cmd"), "own_cmd": False}
            stages[name or f"stage{len(stages)}"] = current
        elif match := re.match(r"(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", line):
            if match.group(1) == "CMD":
                current.update(cmd=json.loads(match.group(2)), own_cmd=True)
            else:
                # Docker: an ENTRYPOINT resets the CMD a stage inherited.
                cmd = current["cmd"] if current["own_cmd"] else None
                current.update(entrypoint=json.loads(match.group(2)), cmd=cmd)
        elif match := re.match(r"COPY\s+(.+)\s+\S+$", line):
            for source in match.group(1).split():
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"{path}: COPY {source}: no such path in the repository"
    return stages


@pytest.mark.parametrize("service_name", [*SSB_SERVICES, "dashboard"])
def test_every_image_builds_from_a_dockerfile_here_whose_default_command_exists(service_name):
    build = services()[service_name]["build"]
    assert build["context"] == "."
    dockerfile = ROOT / build["dockerfile"]
    assert dockerfile.is_file(), f"{service_name}: {dockerfile} does not exist"
    stages = dockerfile_stages(dockerfile)
    stage = stages[build["target"]] if "target" in build else list(stages.values())[-1]
    default = [*(stage["entrypoint"] or []), *(stage["cmd"] or [])]
    if default[:1] == ["ssb"]:
        assert resolve_cli_command(ssb_command_words(default)) is not None, f"{dockerfile}: {default}"
    else:
        assert default[:1] == ["rq-dashboard"], f"{dockerfile}: {default}"


def test_dockerignore_keeps_the_virtual_env_and_data_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", ".env", "runs", "ssb-data"} <= ignored


@pytest.mark.parametrize("service_name", SSB_SERVICES)
def test_every_ssb_variable_a_service_gets_is_read_by_its_settings(service_name):
    service = services()[service_name]
    module = COMMAND_SETTINGS[ssb_command_words(argv(service))]
    read = set().union(*(variables_read(cls) for cls in settings_classes(module)))
    assert read, f"{module} defines no settings class"
    for name in environment(service):
        if name.startswith("SSB_"):
            assert name in read, f"{service_name} sets {name}, which {module} does not read"
        else:
            assert name in LIBRARY_VARIABLES, f"{service_name} sets {name}: who reads it?"
    assert service["env_file"] == ".env", f"{service_name} does not read .env"


def test_env_example_lists_every_setting_and_only_what_is_read():
    listed = env_example_variables()
    read_by_settings = every_variable_read()
    used_by_compose = interpolated_variables() | {name for name in listed if name.startswith("RQ_DASHBOARD_")}
    unread = sorted(listed - read_by_settings - used_by_compose)
    assert not unread, f".env.example lists {unread}: no settings class reads them and compose does not use them"
    missing = sorted((read_by_settings | interpolated_variables()) - listed)
    assert not missing, f".env.example does not list {missing}"
    secrets = re.findall(r"^([A-Z_]*(?:KEY|PASSWORD|TOKEN))=(.+)$", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert not secrets, f".env.example holds values for secrets: {secrets} (leave them empty or commented out)"


def test_the_dashboard_reads_only_its_own_variables_from_env():
    dashboard = services()["dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    assert set(environment(dashboard)) == {"RQ_DASHBOARD_REDIS_URL", "RQ_DASHBOARD_JSON"}
    assert environment(dashboard)["RQ_DASHBOARD_JSON"] == "true", "the jobs travel with RQ's JSON serializer"
    assert urlsplit(interpolate(environment(dashboard)["RQ_DASHBOARD_REDIS_URL"])).hostname == "redis"


def test_one_data_volume_is_mounted_where_data_dir_points():
    declared = set(compose()["volumes"])
    for name, service in services().items():
        used = set(mounts(service).values())
        assert used <= declared, f"{name} mounts undeclared volumes {used - declared}"
    for name, service in ssb_services().items():
        env, mounted = environment(service), mounts(service)
        data_dir = env.get("SSB_DATA_DIR")
        assert data_dir and mounted.get(data_dir) == DATA_VOLUME, f"{name}: SSB_DATA_DIR is not the {DATA_VOLUME} mount"
        assert env.get("SSB_ADAPTERS_DIR", "").startswith(data_dir + "/"), f"{name}: adapters outside the data volume"
        if "SSB_HOME" in env:
            on_a_volume = any(env["SSB_HOME"].startswith(target + "/") for target in mounted)
            assert on_a_volume, f"{name}: SSB_HOME is not on a volume"
    # The trainer worker writes adapters where the teacher loads them from.
    teacher, trainer = environment(services()["teacher"]), environment(services()["trainer-worker"])
    assert teacher["SSB_ADAPTERS_DIR"] == trainer["SSB_ADAPTERS_DIR"]


def test_ports_agree_with_the_settings():
    from services.curator.settings import CuratorSettings
    from services.teacher.settings import TeacherSettings
    from services.trainer.settings import TrainerSettings

    classes = {"teacher": TeacherSettings, "curator": CuratorSettings, "trainer": TrainerSettings}
    for name, field in APIS.items():
        service, default = services()[name], classes[name].model_fields[field].default
        env = environment(service)
        assert env[f"SSB_{field.upper()}"] == str(default), f"{name} does not listen on its settings' port {default}"
        assert env[f"SSB_{name.upper()}_HOST"] == "0.0.0.0", f"{name} listens only inside its container"
        published = [interpolate(port).rsplit(":", 2) for port in service["ports"]]
        assert [(int(host), int(container)) for _, host, container in published] == [(default, default)]
        assert f"127.0.0.1:{default}/readyz" in " ".join(service["healthcheck"]["test"]), f"{name}: health check"
    for name, service in ssb_services().items():
        env = environment(service)
        for url in env.get("SSB_TEACHER_URLS", "").split(","):
            if url:
                assert (urlsplit(url).hostname, urlsplit(url).port) == ("teacher", TeacherSettings().teacher_port)
        if "SSB_TRAINER_URL" in env:
            url = urlsplit(env["SSB_TRAINER_URL"])
            assert (url.hostname, url.port) == ("trainer", TrainerSettings().trainer_port), name
    workers = ("curator-worker", "trainer-worker")
    assert all("ports" not in services()[name] for name in workers), "a worker publishes a port"


def test_the_gpu_is_reserved_exactly_where_a_model_runs():
    """One GPU each, chosen by index (`count: 1` gives every container GPU 0): the teacher's and the trainer's can
    differ on a machine with two."""
    chosen = {}
    for name, service in services().items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_SERVICES:
            (device,) = devices
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device, name
            (chosen[name],) = device["device_ids"]
            assert service.get("ipc") == "host", f"{name}: torch and vLLM need shared memory (ipc: host)"
        else:
            assert not devices, f"{name} reserves a GPU but runs no model"
    assert chosen == {"teacher": "${TEACHER_GPU:-0}", "trainer-worker": "${TRAINER_GPU:-0}"}


def test_the_teacher_is_healthy_only_when_ready_and_workers_wait_for_it():
    assert "/readyz" in " ".join(services()["teacher"]["healthcheck"]["test"])
    for name in ("curator-worker", "trainer-worker"):
        assert services()[name]["depends_on"]["teacher"]["condition"] == "service_healthy", name
    for name, service in services().items():
        if "SSB_REDIS_URL" in environment(service) or name == "dashboard":
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_curator_workers_scale():
    worker = services()["curator-worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["image"] == services()["curator"]["image"]


def test_redis_is_private_persistent_and_password_protected():
    redis = services()["redis"]
    assert "ports" not in redis, "Redis must not be published"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert interpolate(command[command.index("--requirepass") + 1]) == "<REDIS_PASSWORD>"
    assert interpolate(environment(redis)["REDISCLI_AUTH"]) == "<REDIS_PASSWORD>", "the health check must authenticate"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert mounts(redis) == {"/data": "redis-data"}
    for name, service in services().items():
        for key, value in environment(service).items():
            if key.endswith("REDIS_URL"):
                url = urlsplit(interpolate(value))
                assert (url.hostname, url.port, url.password) == ("redis", 6379, "<REDIS_PASSWORD>"), name


CURATOR_IMPORTS = r"""
import importlib, json, pkgutil, sys

NOT_IN_THE_IMAGE = set(json.loads(sys.argv[1]))

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_IN_THE_IMAGE:
            raise ModuleNotFoundError(f"{name} is not in the curator image", name=name)

sys.meta_path.insert(0, Blocked())
import cli.main, services.curator, shared
for package in (services.curator, shared):
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
for name in ("uvicorn", "fastapi", "multipart", "prometheus_client", "rq", "redis"):
    importlib.import_module(name)
"""


def requirement_closure(requirements: list[str]) -> set[str]:
    """Every distribution that installing `requirements` installs (from this environment's metadata)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = Requirement(todo.pop())
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo.extend(requires(name) or [])
        except PackageNotFoundError:
            pass
    return seen


def test_the_curator_image_holds_what_the_curator_imports_and_no_torch():
    """The curator's modules, `shared/`, the CLI and the servers import in this environment with every installed
    package that requirements/curator.txt (services/curator/Dockerfile) does not install blocked: the image has what
    the curator needs, and no torch, vLLM or transformers."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    lines = (ROOT / "requirements/curator.txt").read_text().splitlines()
    closure = requirement_closure([line for line in lines if line.strip() and not line.startswith("#")])
    assert not {"torch", "vllm", "transformers", "peft"} & closure
    first_party = {"cli", "services", "shared"}
    blocked = sorted(
        module
        for module, dists in packages_distributions().items()
        if module not in first_party and not any(canonicalize_name(dist) in closure for dist in dists)
    )
    assert "torch" in blocked
    result = subprocess.run(
        [sys.executable, "-c", CURATOR_IMPORTS, json.dumps(blocked)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"the curator needs more than requirements/curator.txt:\n{result.stderr[-3000:]}"
