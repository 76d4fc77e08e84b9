{{/* Helpers of the reverse-sync worker. */}}

{{/* The client secret the worker trades for a `sync:write` service token at the auth server. */}}
{{- define "ztcqrs.reverseSync.secretEnv" -}}
- name: CQRS_SYNC_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "ztcqrs.auth.clientSecretsName" . }}
      key: reverse-sync-client-secret
{{- end }}
