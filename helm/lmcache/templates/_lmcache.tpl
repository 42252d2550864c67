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
Where LMCACHE_REMOTE_PASSWORD_FILE comes from, as JSON {"secret": {secretName, key} or {}, "error": ""}.
The library has one password setting for the remote tier and the P2P lookup registry (the registry
uses the LMCACHE_REMOTE_* settings, tiers/peer/registry.py), so when both are Redis servers with a
password they must share it; "error" says why a combination cannot work (_validate.tpl fails with it).
The registry is the chart's Redis when lmcache.lookupUrl is empty; an external one takes
p2p.registryPassword, or else whatever the remote tier takes.
*/}}
{{- define "lmcache.passwordPlan" -}}
{{- $v := .Values }}
{{- $lm := $v.lmcache }}
{{- $chart := dict }}
{{- $chartJson := "" }}
{{- if $v.redis.enabled }}{{ $chartJson = include "lmcache.redis.passwordSecret" . }}{{ end }}
{{- if $chartJson }}{{ $chart = fromJson $chartJson }}{{ end }}
{{- $remoteScheme := "" }}
{{- if $lm.remoteUrl }}{{ $remoteScheme = regexReplaceAll "://.*$" $lm.remoteUrl "" }}
{{- else if $v.redis.enabled }}{{ $remoteScheme = "chart" }}{{ end }}
{{- $remote := dict }}
{{- $remoteFrom := "" }}
{{- if eq $remoteScheme "chart" }}
{{- $remote = $chart }}
{{- $remoteFrom = "the remote tier (the chart's Redis, redis.auth)" }}
{{- else if $v.remoteSecrets.password.secretName }}
{{- $remote = dict "secretName" $v.remoteSecrets.password.secretName "key" $v.remoteSecrets.password.secretKey }}
{{- $remoteFrom = "the remote tier (lmcache.remoteUrl, remoteSecrets.password)" }}
{{- end }}
{{- $secret := $remote }}
{{- $error := "" }}
{{- if include "lmcache.isTrue" $lm.enableP2P }}
{{- $registry := dict }}
{{- $registryFrom := "" }}
{{- $rp := $v.p2p.registryPassword }}
{{- if and (not $lm.lookupUrl) $v.redis.enabled }}
{{- $registry = $chart }}
{{- $registryFrom = "the P2P lookup registry (the chart's Redis, redis.auth)" }}
{{- else if and $lm.lookupUrl $rp.secretName }}
{{- $registry = dict "secretName" $rp.secretName "key" $rp.secretKey }}
{{- $registryFrom = "the P2P lookup registry (lmcache.lookupUrl, p2p.registryPassword)" }}
{{- end }}
{{- $one := "the library reads one password, LMCACHE_REMOTE_PASSWORD_FILE, for the remote tier and the P2P lookup registry" }}
{{- if not $registryFrom }}
{{- /* An external registry without p2p.registryPassword takes the remote tier's password, or none. */}}
{{- else if and $registry $remote }}
{{- if ne (toJson $registry) (toJson $remote) }}
{{- $error = printf "%s takes the password in Secret %s (key %s) and %s the one in Secret %s (key %s), but %s: point both at one Redis (leave lmcache.lookupUrl empty, or set it to the remote store), or give both the same Secret" $registryFrom $registry.secretName $registry.key $remoteFrom $remote.secretName $remote.key $one }}
{{- end }}
{{- else if $registry }}
{{- if eq $remoteScheme "s3" }}
{{- $error = printf "%s takes a password, but %s and an s3:// remote tier refuses that setting: use a registry without a password (redis.auth.enabled=false; the NetworkPolicy does not cover Redis), or a Redis remote tier" $registryFrom $one }}
{{- else if has $remoteScheme (list "chart" "redis" "rediss" "unix" "redis-sentinel" "redis-cluster") }}
{{- $error = printf "%s takes a password and the remote tier's Redis none, but %s, so the remote Redis would be sent a password it refuses: name its password in remoteSecrets.password if it is the same Secret, point lmcache.lookupUrl at the remote store, or set redis.auth.enabled=false" $registryFrom $one }}
{{- else }}
{{- $secret = $registry }}
{{- end }}
{{- else if $remote }}
{{- $error = printf "%s has no password (redis.auth.enabled=false) but %s has one, and %s, so the registry would be sent a password it refuses: turn redis.auth on with the same Secret (redis.auth.existingSecret), or point lmcache.lookupUrl at the remote store" $registryFrom $remoteFrom $one }}
{{- end }}
{{- if and (not $lm.lookupUrl) $v.redis.enabled (include "lmcache.isTrue" $lm.remoteTls) }}
{{- $error = "lmcache.remoteTls is on, and the library uses the remote TLS settings for the P2P lookup registry too, but the registry is the chart's Redis, which has no TLS: set lmcache.lookupUrl to a TLS registry (e.g. the remote store), or turn remoteTls off" }}
{{- end }}
{{- end }}
{{- dict "secret" $secret "error" $error | toJson }}
{{- end }}

{{/*
The Secrets the connector reads as files, as a JSON list of {name, secretName, mountPath, items}:
each is mounted read-only at mountPath, its keys at the item paths. The password of the remote
store and the lookup registry comes from lmcache.passwordPlan; the P2P token from p2p.authToken.
*/}}
{{- define "lmcache.secretMounts" -}}
{{- $s := .Values.remoteSecrets }}
{{- $mounts := list }}
{{- $password := (include "lmcache.passwordPlan" . | fromJson).secret }}
{{- if $password }}
{{- $mounts = append $mounts (dict "name" "remote-password" "secretName" $password.secretName "mountPath" "/etc/lmcache/remote-password" "items" (list (dict "key" $password.key "path" "password"))) }}
{{- end }}
{{- $token := .Values.p2p.authToken }}
{{- if and (include "lmcache.isTrue" .Values.lmcache.enableP2P) $token.secretName }}
{{- $mounts = append $mounts (dict "name" "p2p-auth-token" "secretName" $token.secretName "mountPath" "/etc/lmcache/p2p-auth-token" "items" (list (dict "key" $token.secretKey "path" "token"))) }}
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
the remote and lookup URLs from the chart's Redis, the P2P bind address and the pod IP peers dial,
the files of mounted Secrets.
*/}}
{{- define "lmcache.settings" -}}
{{- $lm := .Values.lmcache }}
{{- $redisUrl := "" }}
{{- if .Values.redis.enabled }}
{{- $redisUrl = include "lmcache.redis.url" . }}
{{- end }}
{{- $p2p := include "lmcache.isTrue" $lm.enableP2P }}
{{- $lookupUrl := $lm.lookupUrl }}
{{- $distributedUrl := "" }}
{{- $advertiseHost := "" }}
{{- if $p2p }}
{{- $lookupUrl = default $redisUrl $lm.lookupUrl }}
{{- /* Each worker binds every interface at p2pPort + its rank; peers dial the pod IP. POD_IP is */}}
{{- /* defined before these variables, so Kubernetes expands it. */}}
{{- $distributedUrl = printf "0.0.0.0:%d" (int $lm.p2pPort) }}
{{- $advertiseHost = "$(POD_IP)" }}
{{- end }}
{{- $passwordFrom := "remoteSecrets.password, redis.auth or p2p.registryPassword" }}
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
    (list "LMCACHE_LOOKUP_URL" $lookupUrl "lmcache.lookupUrl")
    (list "LMCACHE_DISTRIBUTED_URL" $distributedUrl "lmcache.p2pPort")
    (list "LMCACHE_P2P_ADVERTISE_HOST" $advertiseHost "lmcache.enableP2P")
    (list "LMCACHE_P2P_AUTH_TOKEN_FILE" (include "lmcache.secretFile" (list . "p2p-auth-token" "token")) "p2p.authToken")
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

{{/*
The peer ports, as a JSON list of {name, port}: the worker of rank r (tp_rank + tp_size x pp_rank)
serves on lmcache.p2pPort + r, so one port per worker (tensorParallelSize x pipelineParallelSize).
*/}}
{{- define "lmcache.p2pPorts" -}}
{{- $ports := list }}
{{- $workers := mul (int .Values.deployment.tensorParallelSize) (int .Values.deployment.pipelineParallelSize) }}
{{- range $rank := until (int $workers) }}
{{- $ports = append $ports (dict "name" (printf "lmcache-p2p-%d" $rank) "port" (add (int $.Values.lmcache.p2pPort) $rank)) }}
{{- end }}
{{- $ports | toJson }}
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
