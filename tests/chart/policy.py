"""Security and operations policies that every render of the chart must meet.

Each `check_*` function takes the rendered objects and returns its problems as sentences naming
the object, so a test can list every violation at once and a mutated render can prove that a
check fails. `allowed_flows` evaluates the NetworkPolicies the way Kubernetes does, to compare the
connections they allow with the platform's process table.
"""

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
BATCH_KINDS = frozenset({"Job", "CronJob"})
COMPONENT_LABEL = "app.kubernetes.io/component"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# Names of variables that hold secrets. Such variables must come from a Secret.
SECRET_ENV_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|PRIVATE_KEY|API_KEY|_AUTH)$|^[A-Z_]*TOKEN$")
# A URL with a password in its user information: scheme://user:password@host.
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s]*:(?P<password>[^/@\s]+)@", re.IGNORECASE)
DEPENDENT_VARIABLE = re.compile(r"^\$\((?P<name>[A-Za-z_][A-Za-z0-9_]*)\)$")
# Secret values shorter than this are too common to search for in other objects.
MIN_SECRET_LENGTH = 8


def describe(manifest: Manifest) -> str:
    return f"{manifest['kind']} {manifest['metadata']['name']}"


@dataclass(frozen=True)
class PodTemplate:
    """The pod spec of a workload, batch job or bare pod, with what owns it."""

    owner: Manifest
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    namespace: str
    long_running: bool

    @property
    def name(self) -> str:
        return describe(self.owner)

    @property
    def component(self) -> str:
        return self.labels.get(COMPONENT_LABEL, self.owner["metadata"]["name"])

    def containers(self) -> Iterator[Mapping[str, Any]]:
        yield from self.spec.get("initContainers") or []
        yield from self.spec.get("containers") or []

    def container_ports(self) -> dict[str, int]:
        """Return the named ports of the pod's containers, by name; unnamed ones by number."""
        ports: dict[str, int] = {}
        for container in self.spec.get("containers") or []:
            for port in container.get("ports") or []:
                ports[port.get("name") or str(port["containerPort"])] = port["containerPort"]
        return ports


def pod_templates(objects: Iterable[Manifest]) -> list[PodTemplate]:
    """Return the pod template of every object that creates pods."""
    templates = []
    for manifest in objects:
        kind = manifest["kind"]
        namespace = manifest["metadata"].get("namespace", "default")
        if kind in WORKLOAD_KINDS or kind == "Job":
            template = manifest["spec"]["template"]
        elif kind == "CronJob":
            template = manifest["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "Pod":
            template = manifest
        else:
            continue
        labels = (template.get("metadata") or {}).get("labels") or {}
        templates.append(
            PodTemplate(manifest, labels, template["spec"], namespace, kind not in BATCH_KINDS)
        )
    return templates


def check_probes(objects: Iterable[Manifest]) -> list[str]:
    """Check that long-running containers have liveness and readiness probes.

    A batch pod has no readiness to report. Its Job needs activeDeadlineSeconds instead, which
    stops a run that hangs.
    """
    problems = []
    for pod in pod_templates(objects):
        if not pod.long_running:
            if not _job_spec(pod.owner).get("activeDeadlineSeconds"):
                problems.append(f"{pod.name} sets no activeDeadlineSeconds for its jobs.")
            continue
        for container in pod.spec.get("containers") or []:
            for probe in ("livenessProbe", "readinessProbe"):
                if not container.get(probe):
                    problems.append(f"{pod.name} container {container['name']} has no {probe}.")
    return problems


def _job_spec(owner: Manifest) -> Mapping[str, Any]:
    if owner["kind"] == "CronJob":
        spec: Mapping[str, Any] = owner["spec"]["jobTemplate"]["spec"]
        return spec
    return owner["spec"] if owner["kind"] == "Job" else {}


def check_resources(objects: Iterable[Manifest]) -> list[str]:
    """Every container requests and limits both CPU and memory."""
    problems = []
    for pod in pod_templates(objects):
        for container in pod.containers():
            resources = container.get("resources") or {}
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(bound) or {}):
                        problems.append(
                            f"{pod.name} container {container['name']} sets no {resource} "
                            f"in resources.{bound}."
                        )
    return problems


def check_security_contexts(objects: Iterable[Manifest]) -> list[str]:
    """Every container runs as non-root with a read-only root file system, without privilege
    escalation or capabilities, under the RuntimeDefault seccomp profile, and no pod shares the
    node's namespaces or file system."""
    problems = []
    for pod in pod_templates(objects):
        pod_context = pod.spec.get("securityContext") or {}
        for shared in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.spec.get(shared):
                problems.append(f"{pod.name} sets {shared}.")
        for volume in pod.spec.get("volumes") or []:
            if "hostPath" in volume:
                problems.append(f"{pod.name} mounts the node's {volume['hostPath']['path']}.")
        for container in pod.containers():
            problems += [
                f"{pod.name} container {container['name']} {problem}"
                for problem in _container_context_problems(pod_context, container)
            ]
    return problems


def _container_context_problems(
    pod_context: Mapping[str, Any], container: Mapping[str, Any]
) -> list[str]:
    context = container.get("securityContext") or {}

    def effective(key: str) -> Any:
        return context.get(key, pod_context.get(key))

    problems = []
    if effective("runAsNonRoot") is not True:
        problems.append("may run as root: set runAsNonRoot true.")
    if effective("runAsUser") == 0:
        problems.append("runs as user 0.")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("has a writable root file system: set readOnlyRootFilesystem true.")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allows privilege escalation: set allowPrivilegeEscalation false.")
    if context.get("privileged"):
        problems.append("is privileged.")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append("keeps Linux capabilities: drop ALL.")
    if capabilities.get("add"):
        problems.append(f"adds capabilities {capabilities['add']}.")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("runs without the RuntimeDefault seccomp profile.")
    return problems


def check_service_accounts(objects: Iterable[Manifest], *, token_holders: set[str]) -> list[str]:
    """No pod gets an API token, and no ServiceAccount mounts one, except those named in
    `token_holders`."""
    objects = list(objects)
    problems = [
        f"{describe(account)} mounts an API token: set automountServiceAccountToken false."
        for account in objects
        if account["kind"] == "ServiceAccount"
        and account["metadata"]["name"] not in token_holders
        and account.get("automountServiceAccountToken") is not False
    ]
    for pod in pod_templates(objects):
        if pod.spec.get("serviceAccountName") in token_holders:
            continue
        if pod.spec.get("automountServiceAccountToken") is not False:
            problems.append(
                f"{pod.name} mounts an API token: set automountServiceAccountToken false."
            )
    return problems


def check_disruption_budgets(objects: Iterable[Manifest]) -> list[str]:
    """Every workload with more than one replica is covered by a PodDisruptionBudget."""
    objects = list(objects)
    budgets = [item for item in objects if item["kind"] == "PodDisruptionBudget"]
    problems = []
    for pod in pod_templates(objects):
        if (pod.owner["spec"].get("replicas") or 1) <= 1 or not pod.long_running:
            continue
        if not any(
            budget["metadata"].get("namespace") == pod.namespace
            and selects(budget["spec"]["selector"], pod.labels)
            for budget in budgets
        ):
            problems.append(
                f"{pod.name} runs several replicas but no PodDisruptionBudget covers it."
            )
    return problems


# ConfigMap volumes ---------------------------------------------------------------------------


def check_config_map_mounts(objects: Iterable[Manifest]) -> list[str]:
    """ConfigMaps are mounted as directories: a subPath mount never receives updates, so the
    router would not see new rules."""
    problems = []
    for pod in pod_templates(objects):
        config_volumes = {
            volume["name"] for volume in pod.spec.get("volumes") or [] if "configMap" in volume
        }
        for container in pod.containers():
            for mount in container.get("volumeMounts") or []:
                if mount["name"] in config_volumes and (
                    mount.get("subPath") or mount.get("subPathExpr")
                ):
                    problems.append(
                        f"{pod.name} container {container['name']} mounts ConfigMap volume "
                        f"{mount['name']} with subPath, so it never sees updates."
                    )
    return problems


def check_rules_file(
    objects: Iterable[Manifest], *, component: str, rules_config_map: str
) -> list[str]:
    """The router's ROUTER_RULES_FILE is a `rules.yaml` inside the directory where the rules
    ConfigMap is mounted, and the ConfigMap has that entry when the render contains it."""
    objects = list(objects)
    pods = [pod for pod in pod_templates(objects) if pod.component == component]
    if not pods:
        return [f"No pod of component {component} is rendered."]
    config_maps = {
        item["metadata"]["name"]: item for item in objects if item["kind"] == "ConfigMap"
    }
    problems = []
    for pod in pods:
        volumes = {
            volume["name"]: volume["configMap"]["name"]
            for volume in pod.spec.get("volumes") or []
            if "configMap" in volume
        }
        for container in pod.spec.get("containers") or []:
            rules_file = container_environment(container, config_maps).get("ROUTER_RULES_FILE")
            if rules_file is None:
                problems.append(
                    f"{pod.name} container {container['name']} sets no ROUTER_RULES_FILE."
                )
                continue
            mount = next(
                (
                    mount
                    for mount in container.get("volumeMounts") or []
                    if volumes.get(mount["name"]) == rules_config_map
                ),
                None,
            )
            if mount is None:
                problems.append(
                    f"{pod.name} container {container['name']} does not mount ConfigMap "
                    f"{rules_config_map}."
                )
                continue
            directory, _, entry = rules_file.rpartition("/")
            if directory != mount["mountPath"].rstrip("/"):
                problems.append(
                    f"{pod.name}: ROUTER_RULES_FILE {rules_file} is not in {mount['mountPath']}, "
                    f"where ConfigMap {rules_config_map} is mounted."
                )
            config_map = config_maps.get(rules_config_map)
            if config_map is not None and entry not in (config_map.get("data") or {}):
                problems.append(f"ConfigMap {rules_config_map} has no entry {entry}.")
    return problems


def container_environment(
    container: Mapping[str, Any], config_maps: Mapping[str, Manifest]
) -> dict[str, str]:
    """Return the literal environment of a container: its `envFrom` ConfigMaps that the render
    contains, then its `env` values, which override them."""
    environment: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        name = (source.get("configMapRef") or {}).get("name")
        if name in config_maps:
            environment.update(config_maps[name].get("data") or {})
    for variable in container.get("env") or []:
        if "value" in variable:
            environment[variable["name"]] = str(variable["value"])
    return environment


# Secrets -------------------------------------------------------------------------------------


def check_secret_handling(objects: Iterable[Manifest]) -> list[str]:
    """Check that secret values reach pods only through Secrets.

    No ConfigMap entry, literal env value or container argument may contain a value of a rendered
    Secret. Variables named like secrets must come from `secretKeyRef`. A password in a URL must be
    a `$(VARIABLE)` whose variable comes from a Secret.
    """
    objects = list(objects)
    secrets = secret_values(objects)
    problems = []

    for config_map in (item for item in objects if item["kind"] == "ConfigMap"):
        for key, value in (config_map.get("data") or {}).items():
            problems += [
                f"{describe(config_map)} entry {key} {problem}"
                for problem in _literal_problems(key, str(value), secrets, set())
            ]

    for pod in pod_templates(objects):
        for container in pod.containers():
            where = f"{pod.name} container {container['name']}"
            from_secrets = {
                variable["name"]
                for variable in container.get("env") or []
                if "secretKeyRef" in (variable.get("valueFrom") or {})
            }
            for variable in container.get("env") or []:
                if "value" in variable:
                    problems += [
                        f"{where} variable {variable['name']} {problem}"
                        for problem in _literal_problems(
                            variable["name"], str(variable["value"]), secrets, from_secrets
                        )
                    ]
            for argument in [*(container.get("command") or []), *(container.get("args") or [])]:
                if any(secret in str(argument) for secret in secrets):
                    problems.append(f"{where} has a secret value in its command line.")
    return problems


def _literal_problems(
    name: str, value: str, secret_values: set[str], from_secrets: set[str]
) -> list[str]:
    problems = []
    if any(secret in value for secret in secret_values):
        problems.append("contains the value of a Secret.")
    if SECRET_ENV_NAME.search(name.upper()) and value:
        problems.append("is named like a secret but is a literal value: use a secretKeyRef.")
    for match in URL_PASSWORD.finditer(value):
        reference = DEPENDENT_VARIABLE.match(match["password"])
        if reference is None or reference["name"] not in from_secrets:
            problems.append(
                "holds a URL with a literal password: put the password in a Secret and write "
                "$(VARIABLE) for a variable taken from it."
            )
    return problems


def secret_values(objects: Iterable[Manifest]) -> set[str]:
    """Return the decoded values of the rendered Secrets that are long enough to search for."""
    values = set()
    for secret in (item for item in objects if item["kind"] == "Secret"):
        for encoded in (secret.get("data") or {}).values():
            try:
                values.add(base64.b64decode(encoded, validate=True).decode("utf-8", "replace"))
            except binascii.Error:
                values.add(str(encoded))
        values.update(str(value) for value in (secret.get("stringData") or {}).values())
    return {value for value in values if len(value) >= MIN_SECRET_LENGTH}


# NetworkPolicies ------------------------------------------------------------------------------


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Evaluate a Kubernetes label selector; an empty selector selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (with a namespace and labels) or an address outside the
    cluster (with an IP address only)."""

    name: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None
    ports: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, pod: PodTemplate) -> "Endpoint":
        return cls(pod.component, pod.namespace, pod.labels, None, pod.container_ports())


def check_network_coverage(objects: Iterable[Manifest]) -> list[str]:
    """Every pod is isolated for ingress and egress by some NetworkPolicy, and a default-deny
    policy (both directions, no rules) selects every pod."""
    objects = list(objects)
    policies = [item for item in objects if item["kind"] == "NetworkPolicy"]
    pods = pod_templates(objects)
    problems = []
    for pod in pods:
        for direction in ("Ingress", "Egress"):
            if not _isolating(policies, Endpoint.of(pod), direction):
                problems.append(
                    f"{pod.name} is selected by no NetworkPolicy for {direction.lower()}, so "
                    f"all its {direction.lower()} traffic is allowed."
                )
    default_deny = [
        policy
        for policy in policies
        if set(policy["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not policy["spec"].get("ingress")
        and not policy["spec"].get("egress")
    ]
    if not default_deny:
        problems.append("No default-deny NetworkPolicy (both directions, no rules) is rendered.")
    for pod in pods:
        if default_deny and not any(_applies(policy, Endpoint.of(pod)) for policy in default_deny):
            problems.append(f"{pod.name} is not selected by the default-deny NetworkPolicy.")
    return problems


def _applies(policy: Manifest, pod: Endpoint) -> bool:
    return policy["metadata"].get("namespace") == pod.namespace and selects(
        policy["spec"].get("podSelector"), pod.labels
    )


def _isolating(policies: Iterable[Manifest], pod: Endpoint, direction: str) -> list[Manifest]:
    return [
        policy
        for policy in policies
        if _applies(policy, pod) and direction in _policy_types(policy)
    ]


def _policy_types(policy: Manifest) -> list[str]:
    # Kubernetes defaults policyTypes to Ingress, plus Egress when egress rules are present.
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"])


def connection_allowed(
    policies: Iterable[Manifest],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether the policies let `source` open a connection to `destination` on `port`: the
    source's egress and, for a pod, the destination's ingress must both allow it."""
    policies = list(policies)
    if source.namespace is not None:
        egress = _isolating(policies, source, "Egress")
        if egress and not any(
            _rule_allows(rule, "to", destination, policy, port, protocol)
            for policy in egress
            for rule in policy["spec"].get("egress") or []
        ):
            return False
    if destination.namespace is not None:
        ingress = _isolating(policies, destination, "Ingress")
        if ingress and not any(
            _rule_allows(rule, "from", source, policy, port, protocol, ports_of=destination)
            for policy in ingress
            for rule in policy["spec"].get("ingress") or []
        ):
            return False
    return True


def _rule_allows(
    rule: Mapping[str, Any],
    peers_key: str,
    peer: Endpoint,
    policy: Manifest,
    port: int,
    protocol: str,
    *,
    ports_of: Endpoint | None = None,
) -> bool:
    # In an egress rule the destination owns named ports; in an ingress rule, the policy's pod.
    named_ports = (ports_of or peer).ports
    ports = rule.get("ports")
    if ports and not any(_port_matches(item, port, protocol, named_ports) for item in ports):
        return False
    peers = rule.get(peers_key)
    if not peers:
        return True
    return any(_peer_matches(item, peer, policy["metadata"].get("namespace")) for item in peers)


def _port_matches(
    item: Mapping[str, Any], port: int, protocol: str, named: Mapping[str, int]
) -> bool:
    if item.get("protocol", "TCP") != protocol:
        return False
    if "port" not in item:
        return True
    declared = item["port"]
    number = named.get(declared) if isinstance(declared, str) else declared
    if number is None:
        return False
    return bool(number <= port <= item.get("endPort", number))


def _peer_matches(
    peer: Mapping[str, Any], endpoint: Endpoint, policy_namespace: str | None
) -> bool:
    if "ipBlock" in peer:
        return endpoint.ip is not None and _in_block(endpoint.ip, peer["ipBlock"])
    if endpoint.namespace is None:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {NAMESPACE_NAME_LABEL: endpoint.namespace}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), endpoint.labels)


def _in_block(ip: str, block: Mapping[str, Any]) -> bool:
    address = ipaddress.ip_address(ip)
    if address not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except") or [])


def allowed_flows(objects: Iterable[Manifest]) -> set[tuple[str, str, int]]:
    """Return every (source component, destination component, port) that the NetworkPolicies
    allow between the render's pods, over each TCP port the destination's containers declare."""
    objects = list(objects)
    policies = [item for item in objects if item["kind"] == "NetworkPolicy"]
    endpoints = [Endpoint.of(pod) for pod in pod_templates(objects)]
    return {
        (source.name, destination.name, port)
        for source in endpoints
        for destination in endpoints
        for port in set(destination.ports.values())
        if connection_allowed(policies, source, destination, port)
    }
