{{/*
How lmcache.* values become the connector's settings: the LMCACHE_* variables, the
--kv-transfer-config line, and the disk-tier folder. The library reads the same variables
(lmcache_connector/config.py), and a test feeds this environment to its loader.
*/}}

{{/* "true" when an LMCache boolean string is on (as the library parses it), else "". */}}
{{- define "lmcache.isTrue" -}}
{{- if has (lower (toString .)) (list "true" "1" "yes" "on") }}true{{ end }}
{{- end }}

{{/*
The Secrets the connector reads as files, as a JSON list of {name, secretName, mountPath, items}:
each is mounted read-only at mountPath, its keys at the item paths. The remote store's password
comes from remoteSecrets.password, or from the chart's Redis when that is the remote tier.
*/}}
{{- define "lmcache.secretMounts" -}}
{{- $lm := .Values.lmcache }}
{{- $s := .Values.remoteSecrets }}
{{- $mounts := list }}
{{- $password := dict }}
{{- if $s.password.secretName }}
{{- $password = dict "secretName" $s.password.secretName "key" $s.password.secretKey }}
{{- else if and .Values.redis.enabled .Values.redis.auth.enabled (not $lm.remoteUrl) }}
{{- $password = include "lmcache.redis.passwordSecret" . | fromJson }}
{{- end }}
{{- if $password }}
{{- $mounts = append $mounts (dict "name" "remote-password" "secretName" $password.secretName "mountPath" "/etc/lmcache/remote-password" "items" (list (dict "key" $password.key "path" "password"))) }}
{{- end }}
{{- if $s.sentinelPassword.secretName }}
{{- $mounts = append $mounts (dict "name" "remote-sentinel-password" "secretName" $s.sentinelPassword.secretName "mountPath" "/etc/lmcache/remote-sentinel-password" "items" (list (dict "key" $s.sentinelPassword.secretKey "path" "password"))) }}
{{- end }}
{{- if $s.tls.secretName }}
{{- $items := list }}
{{- range list (list $s.tls.caKey "ca.crt") (list $s.tls.certKey "tls.crt") (list $s.tls.keyKey "tls.key") }}
{{- if index . 0 }}{{ $items = append $items (dict "key" (index . 0) "path" (index . 1)) }}{{ end }}
{{- end }}
{{- $mounts = append $mounts (dict "name" "remote-tls" "secretName" $s.tls.secretName "mountPath" "/etc/lmcache/remote-tls" "items" $items) }}
{{- end }}
{{- $mounts | toJson }}
{{- end }}

{{/* The in-pod path of one mounted secret file: (list . "remote-tls" "ca.crt"), or "" when not mounted. */}}
{{- define "lmcache.secretFile" -}}
{{- $root := index . 0 }}
{{- range include "lmcache.secretMounts" $root | fromJsonArray }}
{{- if eq .name (index $ 1) }}
{{- $mount := . }}
{{- range .items }}
{{- if eq .path (index $ 2) }}{{ printf "%s/%s" $mount.mountPath .path }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The LMCACHE_* settings as a JSON list of [name, value, values key] triples, in a fixed order; an empty value
means "not set". Defaults that come from elsewhere in the chart are filled in here:
the remote and lookup URLs from the chart's Redis, the P2P address from the pod IP, the files of
mounted Secrets.
*/}}
{{- define "lmcache.settings" -}}
{{- $lm := .Values.lmcache }}
{{- $redisUrl := "" }}
{{- if .Values.redis.enabled }}
{{- $redisUrl = include "lmcache.redis.url" . }}
{{- end }}
{{- $distributedUrl := $lm.distributedUrl }}
{{- if and (include "lmcache.isTrue" $lm.enableP2P) (not $distributedUrl) }}
{{- /* POD_IP is defined before this variable, so Kubernetes expands it. */}}
{{- $distributedUrl = printf "$(POD_IP):%d" (int $lm.p2pPort) }}
{{- end }}
{{- $passwordFrom := ternary "remoteSecrets.password" "redis.auth" (not (empty .Values.remoteSecrets.password.secretName)) }}
{{- list
    (list "LMCACHE_CHUNK_SIZE" $lm.chunkSize "lmcache.chunkSize")
    (list "LMCACHE_LOCAL_CPU" $lm.localCpu "lmcache.localCpu")
    (list "LMCACHE_MAX_LOCAL_CPU_SIZE" $lm.maxLocalCpuSize "lmcache.maxLocalCpuSize")
    (list "LMCACHE_LOCAL_DISK" $lm.localDisk "lmcache.localDisk")
    (list "LMCACHE_MAX_LOCAL_DISK_SIZE" $lm.maxLocalDiskSize "lmcache.maxLocalDiskSize")
    (list "LMCACHE_REMOTE_URL" (default $redisUrl $lm.remoteUrl) "lmcache.remoteUrl")
    (list "LMCACHE_REMOTE_PASSWORD_FILE" (include "lmcache.secretFile" (list . "remote-password" "password")) $passwordFrom)
    (list "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE" (include "lmcache.secretFile" (list . "remote-sentinel-password" "password")) "remoteSecrets.sentinelPassword")
    (list "LMCACHE_REMOTE_SERVICE_NAME" $lm.remoteServiceName "lmcache.remoteServiceName")
    (list "LMCACHE_REMOTE_TLS" $lm.remoteTls "lmcache.remoteTls")
    (list "LMCACHE_REMOTE_TLS_CA_FILE" (include "lmcache.secretFile" (list . "remote-tls" "ca.crt")) "remoteSecrets.tls")
    (list "LMCACHE_REMOTE_TLS_CERT_FILE" (include "lmcache.secretFile" (list . "remote-tls" "tls.crt")) "remoteSecrets.tls")
    (list "LMCACHE_REMOTE_TLS_KEY_FILE" (include "lmcache.secretFile" (list . "remote-tls" "tls.key")) "remoteSecrets.tls")
    (list "LMCACHE_REMOTE_TTL_SECS" $lm.remoteTtlSecs "lmcache.remoteTtlSecs")
    (list "LMCACHE_REMOTE_KEY_PREFIX" $lm.remoteKeyPrefix "lmcache.remoteKeyPrefix")
    (list "LMCACHE_ENABLE_P2P" $lm.enableP2P "lmcache.enableP2P")
    (list "LMCACHE_LOOKUP_URL" (default $redisUrl $lm.lookupUrl) "lmcache.lookupUrl")
    (list "LMCACHE_DISTRIBUTED_URL" $distributedUrl "lmcache.distributedUrl")
    (list "LMCACHE_MODEL_NAME" $lm.modelName "lmcache.modelName")
  | toJson }}
{{- end }}

{{/* "true" when the pod needs its own IP in POD_IP: the P2P address or the KV-events topic. */}}
{{- define "lmcache.needsPodIp" -}}
{{- if or (include "lmcache.isTrue" .Values.lmcache.enableP2P) .Values.kvEvents.enabled }}true{{ end }}
{{- end }}

{{/* The container env entries for the settings that are set. */}}
{{- define "lmcache.env" -}}
{{- if include "lmcache.needsPodIp" . }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- range include "lmcache.settings" . | fromJsonArray }}
{{- if index . 1 }}
- name: {{ index . 0 }}
  value: {{ index . 1 | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* vLLM's --kv-transfer-config value, naming this package's connector class and module. */}}
{{- define "lmcache.kvTransferConfig" -}}
{{- dict "kv_connector" "LMCacheConnector" "kv_connector_module_path" "lmcache_connector" "kv_role" .Values.lmcache.kvRole | toJson }}
{{- end }}

{{/*
vLLM's --kv-events-config value: llm-d's topic convention kv@<pod IP>@<model>. $(POD_IP) is expanded
by the kubelet (POD_IP is in the container's env), so each pod publishes under its own address.
*/}}
{{- define "lmcache.kvEventsConfig" -}}
{{- $events := .Values.kvEvents }}
{{- $topic := printf "kv@$(POD_IP)@%s" (default .Values.deployment.model $events.topicModel) }}
{{- dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" $events.endpoint "topic" $topic | toJson }}
{{- end }}

{{/* The port the KV-events endpoint binds in the pod ("tcp://*:5557" -> 5557), or "" when it connects out. */}}
{{- define "lmcache.kvEventsPort" -}}
{{- $port := regexReplaceAll "^tcp://(\\*|0\\.0\\.0\\.0):([0-9]+)$" .Values.kvEvents.endpoint "${2}" }}
{{- if ne $port .Values.kvEvents.endpoint }}{{ $port }}{{ end }}
{{- end }}

{{/* The disk-tier folder: lmcache.localDisk without its file:// prefix (empty: no disk tier). */}}
{{- define "lmcache.diskPath" -}}
{{- $path := trimPrefix "file://" .Values.lmcache.localDisk }}
{{- if $path }}{{ clean $path }}{{ end }}
{{- end }}

{{/* The pip requirement the init container installs: a wheel URL, a package spec, or this chart's appVersion. */}}
{{- define "lmcache.connectorRequirement" -}}
{{- $install := .Values.connectorInstall }}
{{- coalesce $install.wheelUrl $install.package (printf "lmcache-connector==%s" .Chart.AppVersion) }}
{{- end }}
