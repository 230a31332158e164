{{- define "llm-streams.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-streams.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llm-streams.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-streams.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-streams.labels" -}}
{{ include "llm-streams.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The worker's config file: the user's config with the metrics listener the probes use. */}}
{{- define "llm-streams.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "metrics" (dict "host" "0.0.0.0" "port" (int .Values.metricsPort)) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* worker.shutdown_grace_seconds as the worker reads it (its default is 20). */}}
{{- define "llm-streams.shutdownGrace" -}}
{{- $worker := .Values.config.worker | default dict -}}
{{- hasKey $worker "shutdown_grace_seconds" | ternary $worker.shutdown_grace_seconds 20 | ceil | int -}}
{{- end -}}

{{- define "llm-streams.terminationGrace" -}}
{{- $grace := include "llm-streams.shutdownGrace" . | int -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $grace 10 -}}
{{- else -}}
{{- $given := .Values.terminationGracePeriodSeconds | int -}}
{{- if le $given $grace -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above config.worker.shutdown_grace_seconds (%d)" $given $grace) -}}
{{- end -}}
{{- $given -}}
{{- end -}}
{{- end -}}
