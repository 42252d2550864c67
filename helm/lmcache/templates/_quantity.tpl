{{/*
Sizes for the chart's checks. LMCache counts GB as GiB (1024^3 bytes), so every size is turned
into GiB before it is compared: a Kubernetes quantity ("8Gi", "8G", "8192Mi", 8589934592), a Redis
size ("1gb", "512mb"), and a LMCACHE_* size ("2.0") as it is.
*/}}

{{/* GiB in a Kubernetes quantity, as a decimal string; `include ... | float64` to compare. */}}
{{- define "lmcache.quantityToGiB" -}}
{{- $text := toString . | trim }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $suffix := trimPrefix $number $text }}
{{- $bytesPerUnit := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- if or (not $number) (not (hasKey $bytesPerUnit $suffix)) }}
{{- fail (printf "%q is not a Kubernetes quantity: expected a number with an optional unit such as Mi, Gi, M or G (e.g. 8Gi)" $text) }}
{{- end }}
{{- divf (mulf (float64 $number) (get $bytesPerUnit $suffix)) 1073741824.0 }}
{{- end }}

{{/* GiB in a Redis memory size ("1gb", "512mb", "2g", 1073741824): Redis's "gb" is 1024^3, its "g" 10^9. */}}
{{- define "lmcache.redisSizeToGiB" -}}
{{- $text := toString . | trim | lower }}
{{- $number := regexFind "^[0-9]+" $text }}
{{- $suffix := trimPrefix $number $text }}
{{- $bytesPerUnit := dict "" 1.0 "b" 1.0 "k" 1e3 "kb" 1024.0 "m" 1e6 "mb" 1048576.0 "g" 1e9 "gb" 1073741824.0 }}
{{- if or (not $number) (not (hasKey $bytesPerUnit $suffix)) }}
{{- fail (printf "%q is not a Redis memory size: expected a number with an optional unit b, kb, mb, gb, k, m or g (e.g. 1gb)" $text) }}
{{- end }}
{{- divf (mulf (float64 $number) (get $bytesPerUnit $suffix)) 1073741824.0 }}
{{- end }}
