{{- define "nexus.name" -}}nexus-extproc{{- end -}}

{{- define "nexus.fullname" -}}
{{- if contains "nexus-extproc" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-nexus-extproc" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "nexus.selectorLabels" -}}
app.kubernetes.io/name: nexus-extproc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: extproc
{{- end -}}

{{- define "nexus.labels" -}}
{{ include "nexus.selectorLabels" . }}
app.kubernetes.io/part-of: nexus
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nexus.adminSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "nexus.fullname" .)) -}}
{{- end -}}

{{- define "nexus.configMap" -}}
{{- .Values.existingConfigMap | default (printf "%s-config" (include "nexus.fullname" .)) -}}
{{- end -}}

{{- /* The ext_proc Service Envoy connects to: headless, so Envoy sees every pod. */ -}}
{{- define "nexus.grpcService" -}}{{ include "nexus.fullname" . }}-grpc{{- end -}}

{{- /* The server's configuration: the user's budgets and backends, and what the chart owns. */ -}}
{{- define "nexus.config" -}}
{{- $store := dict "outbox_path" "/var/lib/nexus/outbox.jsonl" -}}
{{- if eq .Values.store.kind "sqlite" -}}
{{- $_ := set $store "kind" "sqlite" -}}{{- $_ := set $store "path" "/var/lib/nexus/ledger.db" -}}
{{- else -}}
{{- $_ := set $store "kind" "redis" -}}{{- $_ := set $store "cluster" .Values.store.redis.cluster -}}
{{- $_ := set $store "key_prefix" .Values.store.redis.keyPrefix -}}
{{- end -}}
{{- $owned := dict "store" $store "store_failure" .Values.store.failure
      "server" (dict "grpc_host" "0.0.0.0" "admin_host" "0.0.0.0" "workers" (int .Values.workers) "log_json" true
                     "settlement" .Values.settlement)
      "admin_api" (dict "host" "0.0.0.0" "port" (int .Values.service.adminApiPort) "token_file" "/etc/nexus/admin/token") -}}
{{- toYaml (merge $owned (deepCopy .Values.config)) -}}
{{- end -}}
