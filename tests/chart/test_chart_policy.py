"""Every render of the chart meets the platform's policies, and each check reports a render that
breaks it."""

import copy
from typing import Any

import pytest

from services.auth.settings import Settings as AuthSettings
from services.cli.processes import SERVICES, WORKERS
from services.cqrs.reconcile import ReconcileSettings
from services.monolith.settings import Settings as MonolithSettings
from services.router.settings import Settings as RouterSettings
from services.shared.settings import ServiceSettings
from tests.chart import policy
from tests.chart.conftest import rendering_of
from tests.chart.render import render

ROLLOUT_ACCOUNT = "ztcqrs-rollout"
RULES_CONFIG_MAP = "ztcqrs-rules"
# Variables the chart adds for its own wiring, read by no Settings class: the Redis password that
# REDIS_URL expands, and the variable redis-cli reads it from.
CHART_VARIABLES = frozenset({"REDIS_PASSWORD", "REDISCLI_AUTH"})
SETTINGS_BY_PREFIX: dict[str, type[ServiceSettings]] = {
    "AUTH_": AuthSettings,
    "ROUTER_": RouterSettings,
    "MONOLITH_": MonolithSettings,
    # The reconcile job reads the CQRS settings plus a few of its own under the same prefix.
    "CQRS_": ReconcileSettings,
}

Manifest = dict[str, Any]


def _default_objects() -> list[Manifest]:
    return copy.deepcopy(list(rendering_of("default").objects))


def _find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    return next(
        item for item in objects if item["kind"] == kind and item["metadata"]["name"] == name
    )


def _pod_spec(objects: list[Manifest], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _find(objects, kind, name)["spec"]["template"]["spec"]
    return spec


def _rules_config_map(scenario: str) -> str:
    return "ztcqrs-rules-gitops" if scenario == "existing-secrets-values.yaml" else RULES_CONFIG_MAP


# Policies over every render ---------------------------------------------------------------------


def test_probes_present(scenario: str) -> None:
    assert policy.check_probes(rendering_of(scenario).objects) == []


def test_resources_bounded(scenario: str) -> None:
    assert policy.check_resources(rendering_of(scenario).objects) == []


def test_security_contexts_restricted(scenario: str) -> None:
    assert policy.check_security_contexts(rendering_of(scenario).objects) == []


def test_service_accounts_without_token(scenario: str) -> None:
    objects = rendering_of(scenario).objects
    assert policy.check_service_accounts(objects, token_holders={ROLLOUT_ACCOUNT}) == []


def test_disruption_budgets_cover_replicas(scenario: str) -> None:
    assert policy.check_disruption_budgets(rendering_of(scenario).objects) == []


def test_network_policies_cover_pods(scenario: str) -> None:
    assert policy.check_network_coverage(rendering_of(scenario).objects) == []


def test_config_maps_mounted_whole(scenario: str) -> None:
    assert policy.check_config_map_mounts(rendering_of(scenario).objects) == []


def test_rules_file_in_mount(scenario: str) -> None:
    problems = policy.check_rules_file(
        rendering_of(scenario).objects,
        component="router",
        rules_config_map=_rules_config_map(scenario),
    )
    assert problems == []


def test_secrets_only_from_secrets(scenario: str) -> None:
    assert policy.check_secret_handling(rendering_of(scenario).objects) == []


# The chart's shape -------------------------------------------------------------------------------


def test_processes_match_cli() -> None:
    commands: dict[str, list[list[str]]] = {}
    for pod in policy.pod_templates(rendering_of("monitoring-values.yaml").objects):
        for container in pod.containers():
            if container.get("command") == ["ztcqrs"]:
                commands.setdefault(pod.component, []).append(container["args"])

    assert commands == {
        "auth": [["serve", "auth"]],
        "router": [["serve", "router"]],
        "monolith": [["serve", "monolith"], ["worker", "cdc-relay"]],
        "cqrs": [["serve", "cqrs"], ["worker", "outbox-relay"], ["worker", "cdc-ingest"]],
        "projector": [["worker", "projector"]],
        "reverse-sync": [["worker", "reverse-sync"]],
        "reconcile": [["reconcile"]],
    }
    started = [args for runs in commands.values() for args in runs]
    assert {args[1] for args in started if args[0] == "serve"} == set(SERVICES)
    assert {args[1] for args in started if args[0] == "worker"} == set(WORKERS)


def test_sqlite_owners_single_pod() -> None:
    objects = list(rendering_of("monitoring-values.yaml").objects)
    for name in ("ztcqrs-auth", "ztcqrs-monolith", "ztcqrs-cqrs"):
        deployment = _find(objects, "Deployment", name)
        claims = [
            volume["persistentVolumeClaim"]["claimName"]
            for volume in deployment["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in volume
        ]
        assert deployment["spec"]["replicas"] == 1, name
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name
        assert claims == [name], name
        claim = _find(objects, "PersistentVolumeClaim", name)
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], name


def test_settings_names_known(scenario: str) -> None:
    objects = rendering_of(scenario).objects
    config_maps = {
        item["metadata"]["name"]: item for item in objects if item["kind"] == "ConfigMap"
    }
    names: set[str] = set()
    for pod in policy.pod_templates(objects):
        for container in pod.containers():
            if container.get("command") != ["ztcqrs"]:
                continue
            names.update(policy.container_environment(container, config_maps))
            names.update(variable["name"] for variable in container.get("env") or [])

    unknown = sorted(name for name in names - CHART_VARIABLES if not _read_by_settings(name))
    assert unknown == []


def _read_by_settings(name: str) -> bool:
    aliases = {
        alias
        for info in ServiceSettings.model_fields.values()
        for alias in getattr(info.validation_alias, "choices", [])
    }
    if name in aliases:
        return True
    for prefix, settings in SETTINGS_BY_PREFIX.items():
        if name.startswith(prefix) and name.removeprefix(prefix).lower() in settings.model_fields:
            return True
    return False


def test_config_checksum_follows_settings() -> None:
    changed = render({"global": {"logLevel": "DEBUG"}})

    before = _checksums(list(rendering_of("default").objects))
    after = _checksums(list(changed.objects))

    assert set(before) == {"auth", "router", "monolith", "cqrs", "projector", "reverse-sync"}
    assert all(before[name] != after[name] for name in before), (before, after)


def test_rules_change_restarts_nothing() -> None:
    rules = copy.deepcopy(rendering_of("default").objects)
    values = {
        "router": {
            "rules": {
                "version": 1,
                "salt": "other",
                "default_target": "cqrs",
                "rules": [{"name": "all", "target": "cqrs"}],
            }
        }
    }
    changed = render(values)

    assert _checksums(list(changed.objects)) == _checksums(list(rules))
    assert _find(list(changed.objects), "ConfigMap", RULES_CONFIG_MAP) != _find(
        list(rules), "ConfigMap", RULES_CONFIG_MAP
    )


def _checksums(objects: list[Manifest]) -> dict[str, str]:
    return {
        pod.component: pod.owner["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for pod in policy.pod_templates(objects)
        if pod.long_running and pod.component != "redis"
    }


def test_rollout_role_limited_to_rules() -> None:
    objects = list(rendering_of("default").objects)
    role = _find(objects, "Role", ROLLOUT_ACCOUNT)
    binding = _find(objects, "RoleBinding", ROLLOUT_ACCOUNT)
    holders = [
        item["metadata"]["name"]
        for item in objects
        if item["kind"] == "ServiceAccount"
        and item.get("automountServiceAccountToken") is not False
    ]

    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [RULES_CONFIG_MAP],
            "verbs": ["get", "patch", "update"],
        }
    ]
    assert binding["roleRef"]["name"] == ROLLOUT_ACCOUNT
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ROLLOUT_ACCOUNT, "namespace": "ztcqrs"}
    ]
    assert holders == [ROLLOUT_ACCOUNT]
    assert not [item for item in objects if item["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


# Each check fails on a render that breaks it ------------------------------------------------------


def test_probe_check_reports_missing_probe() -> None:
    objects = _default_objects()
    container = _pod_spec(objects, "Deployment", "ztcqrs-router")["containers"][0]
    del container["livenessProbe"]
    del container["readinessProbe"]

    assert policy.check_probes(objects) == [
        "Deployment ztcqrs-router container router has no livenessProbe.",
        "Deployment ztcqrs-router container router has no readinessProbe.",
    ]


def test_probe_check_reports_job_without_deadline() -> None:
    objects = copy.deepcopy(list(rendering_of("monitoring-values.yaml").objects))
    del _find(objects, "CronJob", "ztcqrs-reconcile")["spec"]["jobTemplate"]["spec"][
        "activeDeadlineSeconds"
    ]

    assert policy.check_probes(objects) == [
        "CronJob ztcqrs-reconcile sets no activeDeadlineSeconds for its jobs."
    ]


def test_coverage_check_reports_unselected_pod() -> None:
    objects = _default_objects()
    stray = copy.deepcopy(_find(objects, "Deployment", "ztcqrs-projector"))
    stray["metadata"]["name"] = "stray"
    stray["spec"]["template"]["metadata"]["labels"] = {"app": "stray"}
    objects.append(stray)

    assert policy.check_network_coverage(objects) == [
        "Deployment stray is selected by no NetworkPolicy for ingress, so all its ingress "
        "traffic is allowed.",
        "Deployment stray is selected by no NetworkPolicy for egress, so all its egress "
        "traffic is allowed.",
        "Deployment stray is not selected by the default-deny NetworkPolicy.",
    ]


def test_coverage_check_reports_missing_default_deny() -> None:
    objects = [
        item
        for item in _default_objects()
        if not (
            item["kind"] == "NetworkPolicy" and item["metadata"]["name"].endswith("default-deny")
        )
    ]

    assert policy.check_network_coverage(objects) == [
        "No default-deny NetworkPolicy (both directions, no rules) is rendered."
    ]


def test_mount_check_reports_sub_path() -> None:
    objects = _default_objects()
    container = _pod_spec(objects, "Deployment", "ztcqrs-router")["containers"][0]
    rules_mount = next(mount for mount in container["volumeMounts"] if mount["name"] == "rules")
    rules_mount["mountPath"] = "/etc/ztcqrs/rules/rules.yaml"
    rules_mount["subPath"] = "rules.yaml"

    assert policy.check_config_map_mounts(objects) == [
        "Deployment ztcqrs-router container router mounts ConfigMap volume rules with subPath, "
        "so it never sees updates."
    ]
    assert policy.check_rules_file(
        objects, component="router", rules_config_map=RULES_CONFIG_MAP
    ) == [
        "Deployment ztcqrs-router: ROUTER_RULES_FILE /etc/ztcqrs/rules/rules.yaml is not in "
        "/etc/ztcqrs/rules/rules.yaml, where ConfigMap ztcqrs-rules is mounted."
    ]


def test_secret_check_reports_secret_in_config_map() -> None:
    objects = _default_objects()
    password = policy.secret_values([_find(objects, "Secret", "ztcqrs-redis")]).pop()
    _find(objects, "ConfigMap", "ztcqrs-cqrs-env")["data"]["CQRS_EXTRA"] = password

    assert policy.check_secret_handling(objects) == [
        "ConfigMap ztcqrs-cqrs-env entry CQRS_EXTRA contains the value of a Secret."
    ]


def test_secret_check_reports_literal_env() -> None:
    objects = _default_objects()
    container = _pod_spec(objects, "Deployment", "ztcqrs-reverse-sync")["containers"][0]
    for variable in container["env"]:
        if variable["name"] == "CQRS_SYNC_CLIENT_SECRET":
            variable.pop("valueFrom")
            variable["value"] = "s3cret-typed-in-values"
        if variable["name"] == "REDIS_URL":
            variable["value"] = "redis://:hunter2hunter2@ztcqrs-redis:6379/0"

    assert policy.check_secret_handling(objects) == [
        "Deployment ztcqrs-reverse-sync container reverse-sync variable REDIS_URL holds a URL "
        "with a literal password: put the password in a Secret and write $(VARIABLE) for a "
        "variable taken from it.",
        "Deployment ztcqrs-reverse-sync container reverse-sync variable CQRS_SYNC_CLIENT_SECRET "
        "is named like a secret but is a literal value: use a secretKeyRef.",
    ]


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("readOnlyRootFilesystem", False, "has a writable root file system"),
        ("allowPrivilegeEscalation", True, "allows privilege escalation"),
        ("capabilities", {"drop": ["NET_RAW"]}, "keeps Linux capabilities"),
        ("runAsNonRoot", False, "may run as root"),
        ("seccompProfile", {"type": "Unconfined"}, "runs without the RuntimeDefault seccomp"),
    ],
)
def test_security_check_reports_weakened_container(field: str, value: Any, problem: str) -> None:
    objects = _default_objects()
    spec = _pod_spec(objects, "Deployment", "ztcqrs-monolith")
    spec["containers"][1]["securityContext"][field] = value

    problems = policy.check_security_contexts(objects)

    assert len(problems) == 1, problems
    assert problems[0].startswith("Deployment ztcqrs-monolith container cdc-relay " + problem)


def test_resource_check_reports_missing_limit() -> None:
    objects = _default_objects()
    del _pod_spec(objects, "Deployment", "ztcqrs-cqrs")["containers"][2]["resources"]["limits"]

    assert policy.check_resources(objects) == [
        "Deployment ztcqrs-cqrs container cdc-ingest sets no cpu in resources.limits.",
        "Deployment ztcqrs-cqrs container cdc-ingest sets no memory in resources.limits.",
    ]


def test_account_check_reports_token() -> None:
    objects = _default_objects()
    _pod_spec(objects, "Deployment", "ztcqrs-auth")["automountServiceAccountToken"] = True
    del _find(objects, "ServiceAccount", "ztcqrs-router")["automountServiceAccountToken"]

    assert policy.check_service_accounts(objects, token_holders={ROLLOUT_ACCOUNT}) == [
        "ServiceAccount ztcqrs-router mounts an API token: set automountServiceAccountToken false.",
        "Deployment ztcqrs-auth mounts an API token: set automountServiceAccountToken false.",
    ]


def test_budget_check_reports_uncovered_replicas() -> None:
    objects = [
        item
        for item in _default_objects()
        if not (
            item["kind"] == "PodDisruptionBudget" and item["metadata"]["name"] == "ztcqrs-router"
        )
    ]

    assert policy.check_disruption_budgets(objects) == [
        "Deployment ztcqrs-router runs several replicas but no PodDisruptionBudget covers it."
    ]
