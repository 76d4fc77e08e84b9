{{/* Helpers of the auth server. */}}

{{- define "ztcqrs.auth.signingKeySecret" -}}
{{- .Values.auth.signingKey.existingSecret | default (include "ztcqrs.componentName" (dict "root" . "component" "auth-signing-key")) }}
{{- end }}

{{/* Secret with the client secrets of the reverse-sync worker and the admin client. */}}
{{- define "ztcqrs.auth.clientSecretsName" -}}
{{- .Values.auth.clientSecrets.existingSecret | default (include "ztcqrs.componentName" (dict "root" . "component" "client-secrets")) }}
{{- end }}

{{/* Client secrets the auth server registers for the reverse-sync worker and the admin client. */}}
{{- define "ztcqrs.auth.secretEnv" -}}
- name: AUTH_REVERSE_SYNC_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "ztcqrs.auth.clientSecretsName" . }}
      key: reverse-sync-client-secret
- name: AUTH_ADMIN_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "ztcqrs.auth.clientSecretsName" . }}
      key: admin-client-secret
{{- end }}
