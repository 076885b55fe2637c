"""docker-compose.yml: valid against the Compose Specification schema, and wired as operations expect.

tests/ops/compose-spec.json is vendored from compose-spec/compose-spec (see tests/ops/README.md). No Docker
engine runs here, so the file is checked statically; `docker compose config` runs wherever Docker does.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "ops" / "compose-spec.json"
ENV_EXAMPLE = ROOT / ".env.example"
APP_SERVICES = ("migrate", "api", "worker", "beat")
LONG_RUNNING_APP = ("api", "worker", "beat")
# Interpolation references: ${VAR}, ${VAR:-default}, ${VAR?err}...; `$${...}` is an escaped literal dollar.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on must use the long form with conditions"
    return {name: spec["condition"] for name, spec in deps.items()}


def _image_tag(image: str) -> str:
    assert ":" in image.rsplit("/", 1)[-1], f"{image}: no tag"
    return image.rsplit(":", 1)[1]


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_rejects_an_invalid_file() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    bad = {"services": {"api": {"image": "x:1", "depends_on": {"db": {"condition": "service_ready"}}, "restart_policy": 1}}}
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(bad))


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"migrate", "api", "worker", "beat", "redis", "postgres", "hapi", "flower"}


def test_app_services_share_the_image_and_read_env_file(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1, images
    for name in APP_SERVICES:
        service = services[name]
        env_files = service["env_file"]
        env_files = [env_files] if isinstance(env_files, str) else env_files
        paths = [e if isinstance(e, str) else e["path"] for e in env_files]
        assert ".env" in paths, name
        assert service["environment"]["CDS_DATA_DIR"] == "/var/lib/calcinosis"
        assert service.get("read_only") is True, name
        assert service.get("user", "").split(":")[0] == "10001", name
        assert "ALL" in service.get("cap_drop", []), name
        assert "/tmp" in service.get("tmpfs", []), name
    # Every other service runs a third-party image, not ours.
    assert all(services[name]["image"] not in images for name in set(services) - set(APP_SERVICES))


def test_commands_use_the_cli(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["command"][:1] == ["serve"]
    assert services["worker"]["command"][:1] == ["worker"]
    assert "--queues" in services["worker"]["command"]
    assert services["beat"]["command"] == ["beat"]


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert not any("container_name" in s for s in services.values())


def test_migrate_is_one_shot(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["restart"] == "no"
    assert _depends(services["migrate"]) == {"postgres": "service_healthy"}


def test_depends_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING_APP:
        assert _depends(services[name]) == {
            "migrate": "service_completed_successfully",
            "postgres": "service_healthy",
            "redis": "service_healthy",
        }, name
    assert _depends(services["flower"]) == {"redis": "service_healthy"}


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "redis", "postgres"):
        check = services[name]["healthcheck"]
        assert not check.get("disable"), name
        assert check["test"], name
    assert "redis-cli" in services["redis"]["healthcheck"]["test"] and "ping" in services["redis"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_redis_is_durable(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert re.fullmatch(r"7\.\d+\.\d+(-[a-z]+)?", _image_tag(redis["image"]))
    command = redis["command"]
    command = command.split() if isinstance(command, str) else command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_postgres(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert re.fullmatch(r"16\.\d+(-[a-z]+)?", _image_tag(postgres["image"]))
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "POSTGRES_PASSWORD" in postgres["environment"]


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in APP_SERVICES:
            continue
        tag = _image_tag(service["image"])
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {service['image']} is not pinned"


def test_hapi_enables_r4_rest_hook_subscriptions(services: dict[str, dict[str, Any]]) -> None:
    hapi = services["hapi"]
    assert hapi["image"].startswith("hapiproject/hapi:v")
    env = hapi["environment"]
    assert str(env["hapi.fhir.subscription.resthook_enabled"]).lower() == "true"
    assert env["hapi.fhir.fhir_version"] == "R4"
    # The receiver http://api:8080/fhir/notifications is reachable: same network, api listens on 8080.
    assert "network_mode" not in hapi and "networks" not in hapi and "networks" not in services["api"]
    assert services["api"]["command"][services["api"]["command"].index("--port") + 1] == "8080"


def test_flower_watches_the_broker(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower:")
    command = " ".join(flower["command"])
    assert "--broker=" in command and "redis://redis:6379" in command
    assert "FLOWER_BASIC_AUTH" in flower["environment"]


def test_host_ports_bind_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_every_interpolated_variable_is_documented() -> None:
    lines = COMPOSE_FILE.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    used = set(INTERPOLATION.findall(text))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M))
    assert used, "no ${VAR} found: the pattern is wrong"
    missing = used - documented
    assert not missing, f"used in docker-compose.yml but not in .env.example: {sorted(missing)}"
