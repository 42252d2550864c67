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
The LMCACHE_* settings as a JSON list of [name, value, values key] triples, in a fixed order; an empty value
means "not set". Defaults that come from elsewhere in the chart are filled in here:
the remote and lookup URLs from the chart's Redis, the P2P address from the pod IP, the model name
from deployment.model.
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
{{- list
    (list "LMCACHE_CHUNK_SIZE" $lm.chunkSize "lmcache.chunkSize")
    (list "LMCACHE_LOCAL_CPU" $lm.localCpu "lmcache.localCpu")
    (list "LMCACHE_MAX_LOCAL_CPU_SIZE" $lm.maxLocalCpuSize "lmcache.maxLocalCpuSize")
    (list "LMCACHE_LOCAL_DISK" $lm.localDisk "lmcache.localDisk")
    (list "LMCACHE_MAX_LOCAL_DISK_SIZE" $lm.maxLocalDiskSize "lmcache.maxLocalDiskSize")
    (list "LMCACHE_REMOTE_URL" (default $redisUrl $lm.remoteUrl) "lmcache.remoteUrl")
    (list "LMCACHE_ENABLE_P2P" $lm.enableP2P "lmcache.enableP2P")
    (list "LMCACHE_LOOKUP_URL" (default $redisUrl $lm.lookupUrl) "lmcache.lookupUrl")
    (list "LMCACHE_DISTRIBUTED_URL" $distributedUrl "lmcache.distributedUrl")
    (list "LMCACHE_MODEL_NAME" $lm.modelName "lmcache.modelName")
  | toJson }}
{{- end }}

{{/* The container env entries for the settings that are set. */}}
{{- define "lmcache.env" -}}
{{- if include "lmcache.isTrue" .Values.lmcache.enableP2P }}
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
