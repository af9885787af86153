{{- define "sonde.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sonde.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sonde.labels" -}}
app.kubernetes.io/name: {{ include "sonde.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sonde.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sonde.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sonde.config" -}}
{{- $base := dict
  "discovery" .Values.selectors
  "capture" (dict "max_bytes" .Values.capture.maxBytes "ring_buffer_bytes" .Values.capture.ringBufferBytes)
  "metrics" (dict "max_series" .Values.metrics.maxSeries "prometheus" (dict "port" .Values.metrics.port "address" "0.0.0.0"))
  "export" (dict "print" "none") -}}
{{- with .Values.excludes }}
{{- $_ := set $base "exclude" . }}
{{- end }}
{{- with .Values.kubernetes.clusterName }}
{{- $_ := set $base "kubernetes" (dict "cluster_name" .) }}
{{- end }}
{{- if .Values.propagation.injectHttp }}
{{- $_ := set $base "propagation" (dict "inject_http" true) }}
{{- end }}
{{- toYaml (mergeOverwrite $base .Values.extraConfig) -}}
{{- end -}}
