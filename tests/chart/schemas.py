"""Validate rendered objects strictly against the Kubernetes JSON schemas, reporting every error.

`kubernetes_validate.validate` stops at an object's first error, so this module loads the same
strict schemas (unknown fields are errors) that the `kubernetes-validate` package ships and runs
every check of jsonschema's validator. Those schemas lack the prometheus-operator kinds
(ServiceMonitor, PrometheusRule), so these are checked against JSON schemas derived from the
`cloudcoil-models-prometheus-operator` models, made strict the same way.
"""

import functools
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import referencing
from kubernetes_validate import utils as schema_files

# The oldest Kubernetes release the chart supports (Chart.yaml's kubeVersion) and the newest one
# with schemas in kubernetes-validate.
OLDEST_KUBERNETES = "1.29"
NEWEST_KUBERNETES = schema_files.major_minor(schema_files.latest_version())
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, NEWEST_KUBERNETES)

PROMETHEUS_OPERATOR_GROUP = "monitoring.coreos.com/"

Manifest = dict[str, Any]


def describe(manifest: Manifest) -> str:
    metadata = manifest.get("metadata") or {}
    return f"{manifest.get('kind')} {metadata.get('name')}"


def validation_errors(manifest: Manifest, version: str) -> list[str]:
    """Return every schema error of `manifest` for Kubernetes `version` (`1.29`), as sentences."""
    validator = _validator(manifest["apiVersion"], manifest["kind"], version)
    standard = (
        "the prometheus-operator schema"
        if manifest["apiVersion"].startswith(PROMETHEUS_OPERATOR_GROUP)
        else f"Kubernetes {version}"
    )
    return [
        f"{describe(manifest)} is invalid for {standard} at {_path(error)}: {error.message}"
        for error in _leaf_errors(validator.iter_errors(manifest))
    ]


def _leaf_errors(
    errors: Iterator[jsonschema.ValidationError],
) -> Iterator[jsonschema.ValidationError]:
    # A failed `anyOf` (the schemas allow null beside most types) wraps the errors of each branch;
    # the branch errors name the real problem.
    for error in errors:
        if error.context:
            yield from _leaf_errors(iter(error.context))
        else:
            yield error


def _path(error: jsonschema.ValidationError) -> str:
    return "/" + "/".join(str(part) for part in error.absolute_path)


def _validator(api_version: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    if api_version.startswith(PROMETHEUS_OPERATOR_GROUP):
        return _prometheus_operator_validator(kind)
    return _kubernetes_validator(api_version, kind, version)


@functools.cache
def _kubernetes_validator(
    api_version: str, kind: str, version: str
) -> jsonschema.Draft202012Validator:
    # Same file layout as kubernetes_validate.validate: rbac.authorization.k8s.io/v1 -> rbac-v1.
    full_version = _schema_version(version)
    folder = f"kubernetes-json-schema/v{full_version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = schema_files.schema_contents(
            f"{folder}/{kind.lower()}-{group_version}.json", full_version
        )
    except FileNotFoundError as error:
        raise LookupError(
            f"kubernetes-validate has no schema for {kind} {api_version} in Kubernetes "
            f"{version}; check the apiVersion."
        ) from error
    definitions = schema_files.schema_contents(f"{folder}/_definitions.json", full_version)
    registry: referencing.Registry[Any] = (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _schema_version(version: str) -> str:
    matches = [
        full for full in schema_files.all_versions() if schema_files.major_minor(full) == version
    ]
    if not matches:
        raise schema_files.VersionNotSupportedError(version=version)
    return matches[0]


@functools.cache
def _prometheus_operator_validator(kind: str) -> jsonschema.Draft202012Validator:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, kind, None)
    if model is None:
        raise LookupError(
            f"cloudcoil-models-prometheus-operator has no model for {kind}; check the kind."
        )
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return jsonschema.Draft202012Validator(_strict(schema))


def _strict(schema: Any) -> Any:
    """Copy a JSON schema with `additionalProperties: false` on every object that lists its
    properties and allows no others explicitly, as the strict Kubernetes schemas do."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    return strict
