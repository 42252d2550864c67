{{/*
Names and labels shared by every template (the `helm create` conventions).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "lmcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: "<release>-<chart>", or just the release name when it already
contains the chart name (so `helm install lmcache ./lmcache` gives "lmcache", not "lmcache-lmcache").
Truncated to 57 characters so suffixes such as "-redis" still fit the 63-character DNS limit.
*/}}
{{- define "lmcache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "lmcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The standard labels of the objects of one component: `include "lmcache.labels" (list . "redis")`.
Components: vllm (the Deployment and what serves it), redis, test.
*/}}
{{- define "lmcache.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "lmcache.chart" $root }}
{{ include "lmcache.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end }}

{{/* The labels that select one component's pods; they must never change after install. */}}
{{- define "lmcache.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "lmcache.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The Redis Service name, and the URL the connector uses to reach it. */}}
{{- define "lmcache.redis.fullname" -}}
{{- printf "%s-redis" (include "lmcache.fullname" .) }}
{{- end }}

{{- define "lmcache.redis.url" -}}
{{- printf "redis://%s:6379" (include "lmcache.redis.fullname" .) }}
{{- end }}

{{/*
The Secret and key that hold the chart Redis's password, as JSON {secretName, key}: redis.auth.existingSecret,
or the Secret the chart generates (redis-secret.yaml). Empty when redis.auth is off.
*/}}
{{- define "lmcache.redis.passwordSecret" -}}
{{- $auth := .Values.redis.auth }}
{{- if $auth.enabled }}
{{- if $auth.existingSecret }}
{{- dict "secretName" $auth.existingSecret "key" $auth.existingSecretKey | toJson }}
{{- else }}
{{- dict "secretName" (include "lmcache.redis.fullname" .) "key" "password" | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/* How many vLLM pods run at least: replicaCount, or the HPA's minReplicas. */}}
{{- define "lmcache.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas }}{{ else }}{{ .Values.deployment.replicaCount }}{{ end }}
{{- end }}

{{/* The ServiceAccount the vLLM pods run as. */}}
{{- define "lmcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmcache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" of an image values block. */}}
{{- define "lmcache.image" -}}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}
