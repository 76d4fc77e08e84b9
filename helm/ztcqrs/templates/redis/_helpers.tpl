{{/* Helpers of the in-release Redis. */}}

{{- define "ztcqrs.redis.secretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "ztcqrs.componentName" (dict "root" . "component" "redis")) }}
{{- end }}
