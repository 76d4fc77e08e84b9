"""The rules ConfigMap as a rules store, through the official Kubernetes client.

Kept apart from rules_store.py and imported only for --configmap, because importing the
Kubernetes client (about 0.5 s on a 2-vCPU machine, measured with `python -X importtime`) would
slow every other `ztcqrs` command.
"""

import json
import logging
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException
from urllib3.exceptions import HTTPError

from .rules_edit import RolloutError
from .rules_store import EditConflict, Snapshot

log = logging.getLogger(__name__)

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_MERGE_PATCH = "application/merge-patch+json"


class ConfigMapStore:
    """One key of a ConfigMap, read with get and written with a merge patch that carries the
    resourceVersion of the read, so the API server rejects it with 409 when the ConfigMap changed.

    The chart's rollout Role grants get, patch and update on the rules ConfigMap; this store
    needs only get and patch.
    """

    def __init__(self, api: client.CoreV1Api, name: str, namespace: str, key: str) -> None:
        self.api = api
        self.name = name
        self.namespace = namespace
        self.key = key

    @property
    def location(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name} key {self.key}"

    def read(self) -> Snapshot:
        try:
            config_map = self.api.read_namespaced_config_map(self.name, self.namespace)
        except (ApiException, HTTPError) as error:
            raise self._api_error(error, "get") from error
        data = config_map.data or {}
        if self.key not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise RolloutError(
                f"ConfigMap {self.namespace}/{self.name} has no key {self.key!r} (its keys: "
                f"{keys}); pass the key that contains the rules with --key."
            )
        version = config_map.metadata.resource_version if config_map.metadata else None
        if not version:
            raise RolloutError(
                f"ConfigMap {self.namespace}/{self.name} came back without a resourceVersion, so "
                "it cannot be updated safely; check that --kubeconfig points at a Kubernetes API "
                "server."
            )
        return Snapshot(data[self.key], version)

    def write(self, text: str, token: str) -> None:
        body = {"metadata": {"resourceVersion": token}, "data": {self.key: text}}
        try:
            self.api.patch_namespaced_config_map(
                self.name, self.namespace, body, _content_type=_MERGE_PATCH
            )
        except ApiException as error:
            if error.status == 409:
                raise EditConflict(self.location) from error
            raise self._api_error(error, "patch") from error
        except HTTPError as error:
            raise self._api_error(error, "patch") from error

    def _api_error(self, error: ApiException | HTTPError, verb: str) -> RolloutError:
        target = f"ConfigMap {self.namespace}/{self.name}"
        log.error(
            "Kubernetes API request failed",
            extra={"verb": verb, "configmap": self.name, "namespace": self.namespace,
                   "status": getattr(error, "status", None), "error": _api_message(error)},
        )
        if not isinstance(error, ApiException):
            return RolloutError(
                f"Connecting to the Kubernetes API to {verb} {target} failed ({error}); check the "
                "cluster address in the kubeconfig and that the API server is up."
            )
        if error.status == 404:
            return RolloutError(
                f"{target} not found. Check --configmap and --namespace. The chart names it "
                "<fullname>-rules, such as ztcqrs-rules for release ztcqrs, unless "
                "router.existingRulesConfigMap is set."
            )
        if error.status == 403:
            return RolloutError(
                f"Forbidden to {verb} {target}: {_api_message(error)}. Use an identity with get "
                "and patch on that ConfigMap, such as the chart's rollout ServiceAccount."
            )
        if error.status == 401:
            return RolloutError(
                f"The Kubernetes API rejected the credentials while trying to {verb} {target}; "
                "refresh the kubeconfig credentials or pass another --context."
            )
        return RolloutError(
            f"The Kubernetes API failed to {verb} {target} with status {error.status}: "
            f"{_api_message(error)}."
        )


def connect_kubernetes(
    kubeconfig: str | None, context: str | None
) -> tuple[client.CoreV1Api, str | None]:
    """Return a CoreV1Api client and the namespace of its configuration, if it names one.

    Inside a pod, without --kubeconfig or --context, the pod's ServiceAccount is used. Otherwise
    the kubeconfig file (default ~/.kube/config or $KUBECONFIG) and its current or given context.
    """
    configuration = client.Configuration()
    # NOTE: no test runs the in-cluster branch, because it needs the ServiceAccount files that
    # the kubelet mounts under /var/run/secrets.
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except ConfigException:
            pass  # not in a pod: fall through to the kubeconfig
        else:
            namespace = _NAMESPACE_FILE.read_text().strip() if _NAMESPACE_FILE.exists() else None
            return client.CoreV1Api(client.ApiClient(configuration)), namespace or None
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration,
            persist_config=False,
        )
        contexts, current = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig
        )
    except (ConfigException, OSError) as error:
        where = kubeconfig or "the default kubeconfig"
        raise RolloutError(
            f"Loading Kubernetes configuration from {where} failed ({error}); pass --kubeconfig "
            "and --context, or run inside the cluster with a ServiceAccount."
        ) from error
    chosen = next((entry for entry in contexts if entry.get("name") == context), current)
    namespace = (chosen or {}).get("context", {}).get("namespace")
    return client.CoreV1Api(client.ApiClient(configuration)), namespace or None


def _api_message(error: ApiException | HTTPError) -> str:
    """Return the `message` of a Kubernetes Status response, or the error's own text."""
    body = getattr(error, "body", None)
    if isinstance(body, str):
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str) and message:
            return message
    reason = getattr(error, "reason", None)
    return str(reason) if reason else type(error).__name__
