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

{{- /* The CPU tier is allocated up front by every vLLM worker process (one per tensor- and pipeline-parallel */}}
{{- /* rank), inside the container's memory limit, beside /dev/shm (memory-backed) and vLLM itself. */}}
{{- /* Empty means the library's default size, 5.0 GB, which must fit just the same. */}}
{{- $workers := mul (int $v.deployment.tensorParallelSize) (int $v.deployment.pipelineParallelSize) }}
{{- $memoryLimit := dig "limits" "memory" "" $v.deployment.resources }}
{{- $cpuTier := default "5.0" $lm.maxLocalCpuSize }}
{{- if and (include "lmcache.isTrue" $lm.localCpu) $memoryLimit }}
{{- $limitGiB := include "lmcache.quantityToGiB" $memoryLimit | float64 }}
{{- $shmGiB := include "lmcache.quantityToGiB" $v.deployment.shmSize | float64 }}
{{- $usedGiB := addf (mulf (float64 $cpuTier) (float64 $workers)) $shmGiB }}
{{- if ge $usedGiB $limitGiB }}
{{- fail (printf "lmcache.maxLocalCpuSize (%s GB) is not below deployment.resources.limits.memory (%s) with room for the rest: each of the %d vLLM workers (deployment.tensorParallelSize x pipelineParallelSize) allocates its own CPU tier, so %d x %s GB plus deployment.shmSize (%s) is %.1f GiB; lower maxLocalCpuSize to at most (the limit - deployment.shmSize - about 4 GiB for vLLM) / %d, or raise the limit" $cpuTier (toString $memoryLimit) $workers $workers $cpuTier (toString $v.deployment.shmSize) $usedGiB $workers) }}
{{- end }}
{{- end }}

{{- /* vLLM needs one GPU per worker; the device plugin would otherwise leave the pod Pending or vLLM fail late. */}}
{{- $gpus := index (default dict $v.deployment.resources.limits) "nvidia.com/gpu" }}
{{- if and $gpus (lt (int (toString $gpus)) $workers) }}
{{- fail (printf "deployment.resources.limits.nvidia.com/gpu (%s) is fewer than the %d GPUs deployment.tensorParallelSize x pipelineParallelSize needs: raise the GPU request and limit to %d" (toString $gpus) $workers $workers) }}
{{- end }}

{{- /* Flags the chart sets itself: given again in extraArgs, vLLM would take one silently. */}}
{{- $owned := dict "--kv-transfer-config" "lmcache.kvRole (the chart passes this connector)" "--kv_transfer_config" "lmcache.kvRole (the chart passes this connector)" "--tensor-parallel-size" "deployment.tensorParallelSize" "-tp" "deployment.tensorParallelSize" "--pipeline-parallel-size" "deployment.pipelineParallelSize" "-pp" "deployment.pipelineParallelSize" }}
{{- if $v.kvEvents.enabled }}
{{- $_ := set $owned "--kv-events-config" "kvEvents.endpoint and kvEvents.topicModel" }}
{{- $_ := set $owned "--prefix-caching-hash-algo" "kvEvents.hashAlgo" }}
{{- $_ := set $owned "--block-size" "kvEvents.blockSize" }}
{{- end }}
{{- range $v.deployment.extraArgs }}
{{- $flag := regexReplaceAll "=.*$" . "" }}
{{- if hasKey $owned $flag }}
{{- fail (printf "deployment.extraArgs has %s, which the chart sets from %s: set it there instead" $flag (get $owned $flag)) }}
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

{{- /* The remote tier: credentials come from Secrets, and every secret names a tier that uses it. */}}
{{- $s := $v.remoteSecrets }}
{{- if regexMatch "^[a-z-]+://[^/@]*:[^/@]*@" $lm.remoteUrl }}
{{- fail "lmcache.remoteUrl carries a password (USER:PASSWORD@): values are not secret; put the password in a Secret and name it in remoteSecrets.password (the connector reads it as LMCACHE_REMOTE_PASSWORD_FILE)" }}
{{- end }}
{{- if and (not $lm.remoteUrl) (not $v.redis.enabled) (or $s.password.secretName $s.sentinelPassword.secretName $s.tls.secretName) }}
{{- fail "remoteSecrets names a Secret but there is no remote tier: set lmcache.remoteUrl (or redis.enabled=true), or remove the Secret" }}
{{- end }}
{{- if and $s.password.secretName $v.redis.enabled (not $lm.remoteUrl) }}
{{- fail "remoteSecrets.password is set but the remote tier is the chart's Redis, which has its own password (redis.auth.existingSecret): remove remoteSecrets.password, or set lmcache.remoteUrl to your own store" }}
{{- end }}
{{- $sentinel := hasPrefix "redis-sentinel://" $lm.remoteUrl }}
{{- if and $s.sentinelPassword.secretName (not $sentinel) }}
{{- fail "remoteSecrets.sentinelPassword is set but lmcache.remoteUrl is not redis-sentinel://: the Sentinels' password is for Sentinel only" }}
{{- end }}
{{- if and $lm.remoteServiceName (not $sentinel) }}
{{- fail "lmcache.remoteServiceName is set but lmcache.remoteUrl is not redis-sentinel://: a service name is for Sentinel only" }}
{{- end }}
{{- if ne (empty $s.tls.certKey) (empty $s.tls.keyKey) }}
{{- fail "remoteSecrets.tls.certKey and remoteSecrets.tls.keyKey go together: a client certificate needs its key; set both or neither" }}
{{- end }}

{{- /* The chart's Redis: a cache that fits its container, evicts on its own, and fits its claim. */}}
{{- $r := $v.redis }}
{{- if $r.enabled }}
{{- $maxMemoryGiB := include "lmcache.redisSizeToGiB" $r.maxMemory | float64 }}
{{- $redisLimit := dig "limits" "memory" "" $r.resources }}
{{- if and $redisLimit (ge $maxMemoryGiB (include "lmcache.quantityToGiB" $redisLimit | float64)) }}
{{- fail (printf "redis.maxMemory (%s) is not below redis.resources.limits.memory (%s): Redis would be OOM-killed before it evicts; lower maxMemory or raise the limit (about 1.5x maxMemory, 2x with persistence)" $r.maxMemory (toString $redisLimit)) }}
{{- end }}
{{- if and $r.persistence.enabled (not $r.persistence.existingClaim) }}
{{- if lt (include "lmcache.quantityToGiB" $r.persistence.size | float64) (mulf 2.0 $maxMemoryGiB) }}
{{- fail (printf "redis.persistence.size (%s) is less than twice redis.maxMemory (%s): a snapshot is written beside the previous one before it replaces it; enlarge the claim or lower maxMemory" (toString $r.persistence.size) $r.maxMemory) }}
{{- end }}
{{- end }}
{{- if and (hasPrefix "volatile-" $r.maxMemoryPolicy) (not $lm.remoteTtlSecs) (not $lm.remoteUrl) }}
{{- fail (printf "redis.maxMemoryPolicy is %s but lmcache.remoteTtlSecs is empty: volatile policies evict only keys with an expiry, and the connector sets none without it, so Redis would fill up and refuse writes; set remoteTtlSecs or use allkeys-lru" $r.maxMemoryPolicy) }}
{{- end }}
{{- end }}

{{- /* KV events: vLLM stores chunks as whole blocks, so the chunk must be a whole number of them. */}}
{{- if and $v.kvEvents.enabled (ne (mod (int $lm.chunkSize) (int $v.kvEvents.blockSize)) 0) }}
{{- fail (printf "lmcache.chunkSize (%s) is not a multiple of kvEvents.blockSize (%d, vLLM's --block-size): choose a chunk size such as %d" $lm.chunkSize (int $v.kvEvents.blockSize) (mul 4 (int $v.kvEvents.blockSize))) }}
{{- end }}

{{- /* P2P finds peers through the lookup registry; the library refuses P2P without one. */}}
{{- $p2p := include "lmcache.isTrue" $lm.enableP2P }}
{{- if and $p2p (not $lm.lookupUrl) (not $v.redis.enabled) }}
{{- fail "lmcache.enableP2P is on but there is no lookup registry: set lmcache.lookupUrl (redis://HOST:PORT, or any Redis form) or redis.enabled=true" }}
{{- end }}
{{- if regexMatch "^[a-z-]+://[^/@]*:[^/@]*@" $lm.lookupUrl }}
{{- fail "lmcache.lookupUrl carries a password (USER:PASSWORD@): values are not secret; put it in a Secret named by remoteSecrets.password (the remote store's) or p2p.registryPassword (the connector reads it as LMCACHE_REMOTE_PASSWORD_FILE)" }}
{{- end }}
{{- if and (or $v.p2p.authToken.secretName $v.p2p.registryPassword.secretName) (not $p2p) }}
{{- fail "p2p.authToken or p2p.registryPassword names a Secret but lmcache.enableP2P is off: turn P2P on, or remove the Secret" }}
{{- end }}
{{- if and $v.p2p.registryPassword.secretName (not $lm.lookupUrl) }}
{{- fail "p2p.registryPassword is set but the lookup registry is the chart's Redis, which has its own password (redis.auth): remove p2p.registryPassword, or set lmcache.lookupUrl to your own registry" }}
{{- end }}
{{- with (include "lmcache.passwordPlan" . | fromJson).error }}
{{- fail . }}
{{- end }}
{{- if $p2p }}
{{- /* The peer ports must exist and must not be vLLM's own ports. */}}
{{- $taken := dict (toString (int $v.deployment.containerPort)) "deployment.containerPort" }}
{{- with include "lmcache.kvEventsPort" . }}{{ if $v.kvEvents.enabled }}{{ $_ := set $taken . "kvEvents.endpoint" }}{{ end }}{{ end }}
{{- $ports := include "lmcache.p2pPorts" . | fromJsonArray }}
{{- $last := int (index $ports (sub (len $ports) 1)).port }}
{{- if gt $last 65535 }}
{{- fail (printf "lmcache.p2pPort (%d) + the %d workers (deployment.tensorParallelSize x pipelineParallelSize) run past port 65535: the worker of rank r serves on p2pPort + r; lower p2pPort" (int $lm.p2pPort) (len $ports)) }}
{{- end }}
{{- range $ports }}
{{- $port := toString (int .port) }}
{{- if hasKey $taken $port }}
{{- fail (printf "the peer ports lmcache.p2pPort .. p2pPort + %d (one per worker) include %s, which is %s: move lmcache.p2pPort" (sub (len $ports) 1) $port (get $taken $port)) }}
{{- end }}
{{- end }}
{{- end }}

{{- /* One source for the connector package, so what gets installed is never a surprise. */}}
{{- if and $v.connectorInstall.package $v.connectorInstall.wheelUrl }}
{{- fail "connectorInstall.package and connectorInstall.wheelUrl are both set: keep one (wheelUrl installs that wheel, package is a pip requirement)" }}
{{- end }}

{{- /* A variable set twice takes the later value in Kubernetes, silently: refuse it. */}}
{{- $chartSet := dict "HF_HOME" "deployment.modelCache" "VLLM_CACHE_ROOT" "deployment.modelCache" }}
{{- if $v.connectorInstall.enabled }}{{ $_ := set $chartSet "PYTHONPATH" "connectorInstall.target" }}{{ end }}
{{- if $v.deployment.hfToken.secretName }}{{ $_ := set $chartSet "HF_TOKEN" "deployment.hfToken" }}{{ end }}
{{- if $p2p }}{{ $_ := set $chartSet "POD_IP" "lmcache.enableP2P" }}{{ end }}
{{- if $v.kvEvents.enabled }}{{ $_ := set $chartSet "POD_IP" "kvEvents.enabled" }}{{ $_ := set $chartSet "PYTHONHASHSEED" "kvEvents.pythonHashSeed" }}{{ end }}
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
