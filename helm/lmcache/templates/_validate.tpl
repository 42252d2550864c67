{{/*
Checks that values.schema.json cannot express because they relate two values. Each failure names
the values involved and the fix. Included once, from deployment.yaml.
*/}}
{{- define "lmcache.validate" -}}
{{- $v := .Values }}
{{- $lm := $v.lmcache }}

{{- /* The HPA is rejected by the API server when min > max; say so at render time instead. */}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d): set minReplicas <= maxReplicas" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}

{{- /* The CPU tier is allocated up front, inside the container's memory limit, beside vLLM itself. */}}
{{- /* Empty means the library's default size, 5.0 GB, which must fit just the same. */}}
{{- $memoryLimit := dig "limits" "memory" "" $v.deployment.resources }}
{{- $cpuTier := default "5.0" $lm.maxLocalCpuSize }}
{{- if and (include "lmcache.isTrue" $lm.localCpu) $memoryLimit }}
{{- $limitGiB := include "lmcache.quantityToGiB" $memoryLimit | float64 }}
{{- if ge (float64 $cpuTier) $limitGiB }}
{{- fail (printf "lmcache.maxLocalCpuSize (%s GB) is not below deployment.resources.limits.memory (%s): the CPU cache tier lives inside the container's memory limit and vLLM needs room beside it; lower maxLocalCpuSize to at most the limit minus about 4 GiB minus deployment.shmSize, or raise the limit" $cpuTier (toString $memoryLimit)) }}
{{- end }}
{{- end }}

{{- /* The disk tier: a size is required (the library refuses a disk tier without one) and must fit the volume. */}}
{{- if $lm.localDisk }}
{{- if not (gt (float64 (default "0" $lm.maxLocalDiskSize)) 0.0) }}
{{- fail (printf "lmcache.localDisk is %q but lmcache.maxLocalDiskSize is not set: give the disk tier a size in GB smaller than its volume, e.g. \"10.0\"" $lm.localDisk) }}
{{- end }}
{{- $volumeSize := "" }}
{{- $volumeName := "" }}
{{- if and $v.persistence.enabled (not $v.persistence.existingClaim) }}
{{- $volumeSize = toString $v.persistence.size }}
{{- $volumeName = "persistence.size" }}
{{- else if and (not $v.persistence.enabled) (not $v.persistence.hostPath.path) $v.persistence.emptyDir.sizeLimit }}
{{- $volumeSize = $v.persistence.emptyDir.sizeLimit }}
{{- $volumeName = "persistence.emptyDir.sizeLimit" }}
{{- end }}
{{- if $volumeSize }}
{{- if ge (float64 $lm.maxLocalDiskSize) (include "lmcache.quantityToGiB" $volumeSize | float64) }}
{{- fail (printf "lmcache.maxLocalDiskSize (%s GB) does not fit the disk-tier volume (%s = %s): the tier must be smaller than its volume (GB here means GiB), so lower maxLocalDiskSize or enlarge the volume" $lm.maxLocalDiskSize $volumeName $volumeSize) }}
{{- end }}
{{- end }}
{{- else if $v.persistence.enabled }}
{{- fail "persistence.enabled is true but lmcache.localDisk is empty, so the volume would not be used: set lmcache.localDisk (e.g. \"file:///data/lmcache\") or disable persistence" }}
{{- end }}

{{- /* P2P finds peers through the lookup registry; the library refuses P2P without one. */}}
{{- if and (include "lmcache.isTrue" $lm.enableP2P) (not $lm.lookupUrl) (not $v.redis.enabled) }}
{{- fail "lmcache.enableP2P is on but there is no lookup registry: set lmcache.lookupUrl (redis://HOST:PORT) or redis.enabled=true" }}
{{- end }}

{{- /* One source for the connector package, so what gets installed is never a surprise. */}}
{{- if and $v.connectorInstall.package $v.connectorInstall.wheelUrl }}
{{- fail "connectorInstall.package and connectorInstall.wheelUrl are both set: keep one (wheelUrl installs that wheel, package is a pip requirement)" }}
{{- end }}

{{- /* A variable set twice takes the later value in Kubernetes, silently: refuse it. */}}
{{- $chartSet := dict "HF_HOME" "deployment.modelCache" "VLLM_CACHE_ROOT" "deployment.modelCache" }}
{{- if $v.connectorInstall.enabled }}{{ $_ := set $chartSet "PYTHONPATH" "connectorInstall.target" }}{{ end }}
{{- if $v.deployment.hfToken.secretName }}{{ $_ := set $chartSet "HF_TOKEN" "deployment.hfToken" }}{{ end }}
{{- if include "lmcache.isTrue" $lm.enableP2P }}{{ $_ := set $chartSet "POD_IP" "lmcache.enableP2P" }}{{ end }}
{{- range include "lmcache.settings" . | fromJsonArray }}
{{- if index . 1 }}
{{- $_ := set $chartSet (index . 0) (index . 2) }}
{{- end }}
{{- end }}
{{- range $name, $_ := $v.deployment.env }}
{{- if hasKey $chartSet $name }}
{{- fail (printf "deployment.env.%s is set by the chart from %s: set it there instead" $name (get $chartSet $name)) }}
{{- end }}
{{- end }}
{{- end }}
