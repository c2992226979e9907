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

{{- /* The gateway's shared secret is used only where the chart also configures that gateway (Istio). */ -}}
{{- define "nexus.envoyTokenOn" -}}
{{- if and .Values.envoyToken.enabled .Values.istio.envoyFilter.enabled -}}true{{- end -}}
{{- end -}}

{{- define "nexus.envoyTokenSecret" -}}{{ include "nexus.fullname" . }}-envoy{{- end -}}

{{- /* The token, resolved once per render (the Secret and the EnvoyFilter must agree): the given value, the one a
previous install generated, or a new random one. */ -}}
{{- define "nexus.envoyToken" -}}
{{- if not (hasKey .Values.envoyToken "resolved") -}}
{{- $token := .Values.envoyToken.value -}}
{{- if not $token -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "nexus.envoyTokenSecret" .) -}}
{{- $token = ternary (index ($old.data | default dict) "token" | default "" | b64dec) (randAlphaNum 32) (and (not (empty $old)) (hasKey ($old.data | default dict) "token")) -}}
{{- end -}}
{{- $_ := set .Values.envoyToken "resolved" $token -}}
{{- end -}}
{{- .Values.envoyToken.resolved -}}
{{- end -}}
