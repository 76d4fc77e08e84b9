{{/*
Chart-wide helpers: names, labels, images, security contexts, secrets and NetworkPolicy peers.
Each component's folder holds the helpers only that component uses.
*/}}

{{- define "ztcqrs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name; a release named like the chart is not repeated. */}}
{{- define "ztcqrs.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's resources. Call with (dict "root" $ "component" "auth"). */}}
{{- define "ztcqrs.componentName" -}}
{{- printf "%s-%s" (include "ztcqrs.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ztcqrs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select one component's pods. Call with (dict "root" $ "component" "auth"). */}}
{{- define "ztcqrs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ztcqrs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object. Call with (dict "root" $ "component" "auth"). */}}
{{- define "ztcqrs.labels" -}}
helm.sh/chart: {{ include "ztcqrs.chart" .root }}
{{ include "ztcqrs.selectorLabels" . }}
app.kubernetes.io/part-of: ztcqrs
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* Metadata of a namespaced object. Call with (dict "root" $ "component" "auth" "name" "..."). */}}
{{- define "ztcqrs.metadata" -}}
name: {{ .name | default (include "ztcqrs.componentName" .) }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "ztcqrs.labels" . | nindent 2 }}
{{- end }}

{{/* One of the four platform images. Call with (dict "root" $ "repository" "ztcqrs-auth"). */}}
{{- define "ztcqrs.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- if .root.Values.image.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .repository $tag }}
{{- else }}
{{- printf "%s:%s" .repository $tag }}
{{- end }}
{{- end }}

{{/* In-cluster base URL of an HTTP service. Call with (dict "root" $ "component" "auth" "port" 8000). */}}
{{- define "ztcqrs.serviceUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "ztcqrs.componentName" .) .root.Release.Namespace .port }}
{{- end }}

{{- define "ztcqrs.tokenIssuer" -}}
{{- .Values.global.tokenIssuer | default (include "ztcqrs.serviceUrl" (dict "root" . "component" "auth" "port" 8000)) }}
{{- end }}

{{/*
Pod-level fields every platform pod shares: the ServiceAccount without an API token, no service
links (they would inject variables such as ZTCQRS_REDIS_PORT=tcp://... that collide with the
platform's own settings), pull secrets and scheduling. Call with (dict "root" $ "component" "auth").
*/}}
{{- define "ztcqrs.podSpecCommon" -}}
serviceAccountName: {{ include "ztcqrs.componentName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.global.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.global.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template metadata. Call with (dict "root" $ "component" "auth" "checksum" "<sha256>"). */}}
{{- define "ztcqrs.podMetadata" -}}
labels:
  {{- include "ztcqrs.selectorLabels" . | nindent 2 }}
  {{- with .root.Values.global.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or .checksum .root.Values.global.podAnnotations }}
annotations:
  {{- with .checksum }}
  checksum/config: {{ . }}
  {{- end }}
  {{- with .root.Values.global.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Checksum of a component's environment ConfigMap, so that a settings change restarts its pods. The
rules ConfigMap gets none: the router reloads rules live. Call with (dict "root" $ "component" "auth").
*/}}
{{- define "ztcqrs.envChecksum" -}}
{{- include (print .root.Template.BasePath "/" .component "/configmap-env.yaml") .root | sha256sum }}
{{- end }}

{{/*
A platform container, as one item of a `containers` list: image, `ztcqrs` arguments, the
component's environment, `/tmp` and `/data`, the restricted security context, resources, and
probes. Call with (dict "root" $ "name" "cdc-relay" "repository" "ztcqrs-monolith"
"args" (list "worker" "cdc-relay") "envFrom" "monolith" "resources" {...} and optionally
"port" 8001 (an API: `http` port and HTTP probes), "probes" ("worker", "sidecar" or "none", for
containers without a port), "env" and "extraEnv" (lists of env entries), "volumeMounts" (list),
"noRedis" true (no REDIS_URL, for a container that uses no Redis)).
*/}}
{{- define "ztcqrs.container" -}}
- {{ include "ztcqrs.containerFields" . | indent 2 | trim }}
{{- end }}

{{- define "ztcqrs.containerFields" -}}
name: {{ .name }}
image: {{ include "ztcqrs.image" . | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
command: ["ztcqrs"]
args:
  {{- toYaml .args | nindent 2 }}
envFrom:
  - configMapRef:
      name: {{ include "ztcqrs.componentName" (dict "root" .root "component" (printf "%s-env" .envFrom)) }}
{{- $redisEnv := ternary (list) (include "ztcqrs.redisEnv" .root | fromYamlArray) (.noRedis | default false) }}
{{- $metricsEnv := list }}
{{- with .metricsPort }}
{{- $metricsEnv = list (dict "name" "METRICS_PORT" "value" (toString .)) }}
{{- end }}
{{- $env := concat $redisEnv $metricsEnv (.env | default list) (.extraEnv | default list) }}
env:
  {{- toYaml $env | nindent 2 }}
{{- if or .port .metricsPort }}
ports:
{{- with .port }}
  - name: http
    containerPort: {{ . }}
    protocol: TCP
{{- end }}
{{- with .metricsPort }}
  - name: {{ $.metricsPortName | default "metrics" }}
    containerPort: {{ . }}
    protocol: TCP
{{- end }}
{{- end }}
{{- if .port }}
{{- include "ztcqrs.httpProbes" $ | trim | nindent 0 }}
{{- else }}
{{- if eq .probes "worker" }}
{{- include "ztcqrs.workerProbes" (dict "root" .root "sidecar" false) | trim | nindent 0 }}
{{- else if eq .probes "sidecar" }}
{{- include "ztcqrs.workerProbes" (dict "root" .root "sidecar" true) | trim | nindent 0 }}
{{- else if ne .probes "none" }}
{{- fail (printf "ztcqrs.container %s: probes must be worker, sidecar or none, not %v" .name .probes) }}
{{- end }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.global.containerSecurityContext | nindent 2 }}
resources:
  {{- toYaml .resources | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  - name: data
    mountPath: /data
  {{- with .volumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The memory-backed `/tmp` volume every platform pod mounts. */}}
{{- define "ztcqrs.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.global.tmpSizeLimit }}
{{- end }}

{{/*
HTTP probes of an API container on its `http` port. The startup probe gives a slow start up to 60
seconds before the liveness probe may restart the container; readiness checks the service's
dependencies, so a pod whose database or JWKS fails leaves the Service's endpoints.
*/}}
{{- define "ztcqrs.httpProbes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 2
  failureThreshold: 30
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/*
Probes of a worker container. Workers serve no HTTP, so the liveness probe can only show that the
worker process (PID 1 of the container) exists. The readiness probe of a worker in its own pod
pings Redis, its one dependency; a worker sharing a pod with an API (call with "sidecar" true)
uses the process check for readiness too, so that a Redis outage does not take the API out of its
Service. Call with (dict "root" $ "sidecar" true).
NOTE: a worker whose event loop hangs passes these probes; catching that needs a heartbeat that
the workers do not write yet.
*/}}
{{- define "ztcqrs.workerProbes" -}}
{{- $alive := list "python" "-c" "import os; os.kill(1, 0)" }}
{{- $redis := list "python" "-c" "import os, redis; redis.Redis.from_url(os.environ['REDIS_URL'], socket_timeout=3).ping()" }}
livenessProbe:
  exec:
    command:
      {{- toYaml $alive | nindent 6 }}
  periodSeconds: 20
  timeoutSeconds: 5
readinessProbe:
  exec:
    command:
      {{- toYaml (ternary $alive $redis (.sidecar | default false)) | nindent 6 }}
  periodSeconds: 20
  timeoutSeconds: 5
{{- end }}

{{/*
REDIS_URL of every platform container. With the in-release Redis the password comes from its
Secret through `$(REDIS_PASSWORD)`, which Kubernetes expands when it starts the container, so the
URL in the pod spec holds no secret. An external Redis URL comes whole from the named Secret.
*/}}
{{- define "ztcqrs.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ztcqrs.redis.secretName" . }}
      key: password
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc:6379/0" (include "ztcqrs.componentName" (dict "root" . "component" "redis")) .Release.Namespace | quote }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.existingSecretKey }}
{{- end }}
{{- end }}

{{/*
Data entries of a generated Secret: each entry keeps the value of the Secret already in the
cluster, so upgrades do not replace keys and passwords, and is generated only when missing. `lookup`
returns nothing under `helm template` and dry runs, which therefore show fresh values. Call with
(dict "root" $ "name" "<secret name>" "entries" (dict "<key>" "<kind>")), kind `rsa` for a PEM
private key or `token` for a random 40-character alphanumeric string.
*/}}
{{- define "ztcqrs.keptSecretData" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- $data := dig "data" dict ($existing | default dict) }}
{{- range $key, $kind := .entries }}
{{- if hasKey $data $key }}
{{ $key }}: {{ index $data $key }}
{{- else if eq $kind "rsa" }}
{{ $key }}: {{ genPrivateKey "rsa" | b64enc }}
{{- else }}
{{ $key }}: {{ randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}
{{- end }}

{{/* NetworkPolicy peer of one component's pods. Call with (dict "root" $ "component" "auth"). */}}
{{- define "ztcqrs.peer" -}}
- podSelector:
    matchLabels:
      {{- include "ztcqrs.selectorLabels" . | nindent 6 }}
{{- end }}

{{/* NetworkPolicy egress rule that allows DNS lookups. */}}
{{- define "ztcqrs.dnsEgress" -}}
- to:
    {{- toYaml .Values.networkPolicy.dnsTo | nindent 4 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end }}

{{/*
NetworkPolicy egress rule to one component's HTTP port. Call with (dict "root" $ "component"
"auth" "port" 8000).
*/}}
{{- define "ztcqrs.egressTo" -}}
- to:
    {{- include "ztcqrs.peer" . | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ .port }}
{{- end }}

{{/* NetworkPolicy egress rule to Redis, in the release or external. */}}
{{- define "ztcqrs.redisEgress" -}}
{{- if .Values.redis.enabled }}
{{- include "ztcqrs.egressTo" (dict "root" . "component" "redis" "port" 6379) }}
{{- else }}
- to:
    {{- toYaml .Values.externalRedis.to | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ .Values.externalRedis.port }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy ingress rule that lets Prometheus scrape `/metrics` on a component's HTTP port, when
`networkPolicy.metricsFrom` names the scrapers. It renders as a list item indented for the
`ingress` list of the chart's policies, and as nothing otherwise, so callers add no indentation.
Call with (dict "root" $ "port" 8000).
*/}}
{{- define "ztcqrs.metricsIngress" -}}
{{- with .root.Values.networkPolicy.metricsFrom }}
{{- $rule := dict "from" . "ports" (list (dict "protocol" "TCP" "port" $.port)) }}
{{- toYaml (list $rule) | nindent 4 }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy ingress rule for a public entry point: from `networkPolicy.publicFrom`, or from any
source when that list is empty. Call with (dict "root" $ "port" 8080).
*/}}
{{- define "ztcqrs.publicIngress" -}}
- ports:
    - protocol: TCP
      port: {{ .port }}
  {{- with .root.Values.networkPolicy.publicFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express. Every problem is collected and the
render fails once, listing them all.
*/}}
{{- define "ztcqrs.validateValues" -}}
{{- $problems := list }}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.existingSecret) }}
{{- $problems = append $problems "redis.enabled is false but externalRedis.existingSecret is empty: name the Secret that holds the external Redis URL, or set redis.enabled=true." }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.to) }}
{{- $problems = append $problems "redis.enabled is false but externalRedis.to is empty, so the NetworkPolicies would block every connection to Redis: list the egress peers of the external Redis (for example an ipBlock)." }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.networkPolicy.metricsFrom) }}
{{- $problems = append $problems "metrics.serviceMonitor.enabled is true but networkPolicy.metricsFrom is empty, so the NetworkPolicies would block Prometheus: list the peers that scrape, for example Prometheus's namespace." }}
{{- end }}
{{- if $problems }}
{{- fail (printf "\nInvalid values for the ztcqrs chart:\n- %s" (join "\n- " $problems)) }}
{{- end }}
{{- end }}

{{/*
Environment entries every platform process reads (services/shared/settings.py). `/data` is the
pod's data volume: a persistent volume where the pod owns an SQLite file, an empty one elsewhere.
*/}}
{{- define "ztcqrs.sharedEnv" -}}
ZTCQRS_ENV: {{ .Values.global.environment | quote }}
ZTCQRS_PHASE: {{ .Values.global.phase | quote }}
ZTCQRS_LOG_LEVEL: {{ .Values.global.logLevel | quote }}
ZTCQRS_DATA_DIR: "/data"
ZTCQRS_TOKEN_ISSUER: {{ include "ztcqrs.tokenIssuer" . | quote }}
ZTCQRS_TOKEN_AUDIENCE: {{ .Values.global.tokenAudience | quote }}
ZTCQRS_JWKS_URL: {{ printf "%s/.well-known/jwks.json" (include "ztcqrs.serviceUrl" (dict "root" . "component" "auth" "port" 8000)) | quote }}
{{- end }}

{{/* A ServiceAccount without an API token. Call with (dict "root" $ "component" "auth"). */}}
{{- define "ztcqrs.serviceAccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  {{- include "ztcqrs.metadata" . | nindent 2 }}
automountServiceAccountToken: false
{{- end }}

{{/*
A PersistentVolumeClaim for a pod's SQLite file. ReadWriteOnce: only the pod that owns the file
mounts it, so that pod's Deployment runs one replica with the Recreate strategy. Call with
(dict "root" $ "component" "auth" "persistence" .Values.auth.persistence).
*/}}
{{- define "ztcqrs.dataClaim" -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  {{- include "ztcqrs.metadata" . | nindent 2 }}
spec:
  accessModes:
    - ReadWriteOnce
  {{- with .persistence.storageClass }}
  storageClassName: {{ . | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ .persistence.size }}
{{- end }}

{{/* A ClusterIP Service on the `http` port. Call with (dict "root" $ "component" "auth" "port" 8000). */}}
{{- define "ztcqrs.httpService" -}}
apiVersion: v1
kind: Service
metadata:
  {{- include "ztcqrs.metadata" . | nindent 2 }}
spec:
  type: {{ .type | default "ClusterIP" }}
  selector:
    {{- include "ztcqrs.selectorLabels" . | nindent 4 }}
  ports:
    - name: http
      port: {{ .port }}
      targetPort: http
      protocol: TCP
{{- end }}

{{/*
A PodDisruptionBudget that lets a node drain evict one pod of a scalable component at a time.
Call with (dict "root" $ "component" "router").
*/}}
{{- define "ztcqrs.disruptionBudget" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  {{- include "ztcqrs.metadata" . | nindent 2 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "ztcqrs.selectorLabels" . | nindent 6 }}
{{- end }}
