{{/* Helpers of the gray router. */}}

{{/* ConfigMap with the routing rules: the chart's, or one managed outside the chart. */}}
{{- define "ztcqrs.router.rulesConfigMap" -}}
{{- .Values.router.existingRulesConfigMap | default (include "ztcqrs.componentName" (dict "root" . "component" "rules")) }}
{{- end }}
