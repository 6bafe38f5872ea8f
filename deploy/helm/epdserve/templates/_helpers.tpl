{{/*
Names, labels and the command lines of the epdserve chart.
*/}}

{{- define "epdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-epdserve, or the release name when it says epdserve. */}}
{{- define "epdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "epdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select one component's pods: call with (dict "ctx" $ "component" "router"). */}}
{{- define "epdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epdserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .modelGroup }}
epdserve.io/model-group: {{ . }}
{{- end }}
{{- end }}

{{/* Every label of one component's objects: call with (dict "ctx" $ "component" "router"). */}}
{{- define "epdserve.labels" -}}
helm.sh/chart: {{ include "epdserve.chart" .ctx }}
{{ include "epdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: epdserve
{{- end }}

{{/* Labels of the objects that belong to the whole release. */}}
{{- define "epdserve.commonLabels" -}}
helm.sh/chart: {{ include "epdserve.chart" . }}
app.kubernetes.io/name: {{ include "epdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: epdserve
{{- end }}

{{/*
The ingress rule of a pod's metrics port: any pod in the cluster (Prometheus wherever it
runs), or only networkPolicy.metricsFrom when given.
*/}}
{{- define "epdserve.metricsIngress" -}}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Image variant of the accelerator: cpu, cuda or npu. */}}
{{- define "epdserve.variant" -}}
{{- $variants := dict "cpu" "cpu" "nvidia" "cuda" "ascend" "npu" }}
{{- get $variants .Values.workers.accelerator }}
{{- end }}

{{/* The image of workers on one accelerator: call with (dict "ctx" $ "accelerator" "nvidia"). */}}
{{- define "epdserve.workerImage" -}}
{{- $variant := include "epdserve.device" . }}
{{- $tag := .ctx.Values.image.tag | default (printf "%s-%s" .ctx.Chart.AppVersion $variant) }}
{{- printf "%s:%s" .ctx.Values.image.repository $tag }}
{{- end }}

{{- define "epdserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (include "epdserve.variant" .)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The engine device of the accelerator (EngineConfig.device). */}}
{{- define "epdserve.device" -}}
{{- get (dict "cpu" "cpu" "nvidia" "cuda" "ascend" "npu") .accelerator }}
{{- end }}

{{/* The Kubernetes extended resource of the accelerator; empty for cpu. */}}
{{- define "epdserve.acceleratorResource" -}}
{{- get (dict "cpu" "" "nvidia" "nvidia.com/gpu" "ascend" "huawei.com/Ascend910") .accelerator }}
{{- end }}

{{/* `--etcd`: the bundled etcd's client Service, or the external endpoints. */}}
{{- define "epdserve.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled }}
{{- printf "%s-etcd:%d" (include "epdserve.fullname" .) (int .Values.etcd.bundled.clientPort) }}
{{- else }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Model flags: the embedded model is EngineConfig/RouterConfig's default (no --model). */}}
{{- define "epdserve.modelPath" -}}
{{- if ne .Values.model.path "embedded" }}{{ .Values.model.path }}{{ end }}
{{- end }}

{{/*
The base models and their workers, as JSON: [{"name", "model", "workers"}]. Without
modelGroups, one group named "" of model and workers; with them, one per entry: its model
over model, its workers over its profile's workers over workers (maps merged, the group's
values win).
*/}}
{{- define "epdserve.modelGroups" -}}
{{- $groups := list }}
{{- if not .Values.modelGroups }}
{{- $groups = append $groups (dict "name" "" "model" .Values.model "workers" .Values.workers) }}
{{- end }}
{{- range $g := .Values.modelGroups }}
{{- $workers := deepCopy $.Values.workers }}
{{- with $g.profile }}
{{- $file := printf "profiles/%s.yaml" . }}
{{- $profile := $.Files.Get $file | fromYaml }}
{{- if not $profile }}{{ fail (printf "modelGroups[%s].profile: no profile %s in the chart" $g.name $file) }}{{ end }}
{{- $workers = mergeOverwrite $workers (deepCopy (default (dict) $profile.workers)) }}
{{- end }}
{{- $workers = mergeOverwrite $workers (deepCopy (default (dict) $g.workers)) }}
{{- $model := mergeOverwrite (deepCopy $.Values.model) (deepCopy (default (dict) $g.model)) }}
{{- $groups = append $groups (dict "name" $g.name "model" $model "workers" $workers) }}
{{- end }}
{{- toJson $groups }}
{{- end }}

{{/*
One value as Python's str() writes it for a field of this type, so that the chart's argv is
to_argv()'s: call with (dict "v" value "type" "int|float|str"). Values reach templates as
float64; ints print without exponent and floats keep Python's ".0".
*/}}
{{- define "epdserve.pystr" -}}
{{- if eq .type "int" }}
{{- printf "%d" (int64 .v) }}
{{- else if eq .type "float" }}
{{- $s := toString (float64 .v) }}
{{- if or (contains "." $s) (contains "e" $s) (contains "Inf" $s) (contains "NaN" $s) }}
{{- $s }}
{{- else }}
{{- printf "%s.0" $s }}
{{- end }}
{{- else }}
{{- toString .v }}
{{- end }}
{{- end }}

{{/*
The flags of one config dataclass, as a YAML list, the way services/common/dataclass_cli.py
to_argv writes them: fields in order (files/flags.json, generated from the dataclasses),
only values that differ from the default, null means unset (the code's default), "none" sets
None where the default is not None (--offline-tpot-quantile none), bools as --x / --no-x.
Call with (dict "spec" (list of flags.json entries) "values" (dict key -> value)).
*/}}
{{- define "epdserve.argv" -}}
{{- $values := .values }}
{{- range $f := .spec }}
{{- if hasKey $values $f.key }}
{{- $v := index $values $f.key }}
{{- if not (kindIs "invalid" $v) }}
{{- if eq $f.type "bool" }}
{{- if ne $v $f.default }}
{{- if $v }}
- {{ $f.flag | quote }}
{{- else }}
- {{ printf "--no-%s" (trimPrefix "--" $f.flag) | quote }}
{{- end }}
{{- end }}
{{- else if eq $f.type "list" }}
{{- if ne (toJson $v) (toJson $f.default) }}
- {{ $f.flag | quote }}
{{- range $item := $v }}
- {{ toString $item | quote }}
{{- end }}
{{- end }}
{{- else if and (kindIs "string" $v) (eq $v "none") (ne $f.type "str") }}
{{- /* "none": the off switch of a setting whose default is not None (Helm drops a null,
       so null can only mean the default); to_argv writes None the same way. */}}
{{- if not (kindIs "invalid" $f.default) }}
- {{ $f.flag | quote }}
- "none"
{{- end }}
{{- else }}
{{- $s := include "epdserve.pystr" (dict "v" $v "type" $f.type) }}
{{- $d := "" }}
{{- if not (kindIs "invalid" $f.default) }}
{{- $d = include "epdserve.pystr" (dict "v" $f.default "type" $f.type) }}
{{- end }}
{{- if or (kindIs "invalid" $f.default) (ne $s $d) }}
- {{ $f.flag | quote }}
- {{ $s | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "epdserve.flags" -}}
{{- .Files.Get "files/flags.json" | fromJson | toJson }}
{{- end }}

{{/*
router.config.workerRestartWaitS when unset: how long a request waits for a worker that died
or hung to come back. The kubelet kills a hung worker after livenessFailureThreshold probes
(each up to periodSeconds + livenessTimeoutSeconds; the longest of any model group's
workers), restarts it after its first back-off (10 s), and the worker starts (60 s, the
router's own default, as `epdserve up` counts it). A flat 60 s gave up before the probes had
even killed the worker (6 x 10 s by default): 503 no_workers while it came back.
*/}}
{{- define "epdserve.restartWaitS" -}}
{{- $detect := 0 }}
{{- range $group := include "epdserve.modelGroups" . | fromJsonArray }}
{{- $p := $group.workers.probes }}
{{- $detect = max $detect (mul (int $p.livenessFailureThreshold) (add (int $p.periodSeconds) (int $p.livenessTimeoutSeconds))) }}
{{- end }}
{{- min 86400 (add 70 $detect) }}
{{- end }}

{{/* argv of the router: services.cli.commands.router_command(RouterConfig(...)). */}}
{{- define "epdserve.routerCommand" -}}
{{- $flags := include "epdserve.flags" . | fromJson }}
{{- $values := deepCopy .Values.router.config }}
{{- $_ := set $values "host" "0.0.0.0" }}
{{- if kindIs "invalid" (index $values "workerRestartWaitS") }}
{{- $_ = set $values "workerRestartWaitS" (include "epdserve.restartWaitS" . | float64) }}
{{- end }}
{{- $_ = set $values "port" .Values.router.port }}
{{- $_ = set $values "cluster" .Values.clusterName }}
{{- $_ = set $values "etcd" (include "epdserve.etcdEndpoints" .) }}
{{- with include "epdserve.modelPath" . }}{{ $_ = set $values "model" . }}{{ end }}
{{- if .Values.router.batchVolume.enabled }}{{ $_ = set $values "batchDir" .Values.router.batchVolume.mountPath }}{{ end }}
- {{ .Values.python | quote }}
- "-m"
- "services.router"
{{- include "epdserve.argv" (dict "spec" $flags.router "values" $values) }}
{{- end }}

{{/*
argv of a worker of one role: services.cli.commands.worker_command(WorkerConfig(...),
EngineConfig(...)). Call with (dict "ctx" $ "role" "prefill").
*/}}
{{- define "epdserve.workerCommand" -}}
{{- $ctx := .ctx }}
{{- $w := default $ctx.Values.workers .workers }}
{{- $model := default $ctx.Values.model .model }}
{{- $roleValues := get $w .role }}
{{- $flags := include "epdserve.flags" $ctx | fromJson }}
{{- $worker := mergeOverwrite (deepCopy $w.config) (deepCopy (default (dict) $roleValues.config)) }}
{{- $_ := set $worker "role" .role }}
{{- /* The pod IP only, not 0.0.0.0: gRPC and metrics (Mooncake binds all interfaces anyway,
see networkpolicy-worker.yaml). The kubelet's probes and Prometheus dial the pod IP. */}}
{{- $_ = set $worker "host" "$(POD_IP)" }}
{{- $_ = set $worker "port" $w.port }}
{{- $_ = set $worker "metricsPort" $w.metricsPort }}
{{- $_ = set $worker "advertiseHost" "$(POD_IP)" }}
{{- $_ = set $worker "instanceId" "$(POD_NAME)" }}
{{- $_ = set $worker "cluster" $ctx.Values.clusterName }}
{{- $_ = set $worker "etcd" (include "epdserve.etcdEndpoints" $ctx) }}
{{- $engine := mergeOverwrite (deepCopy $w.engine) (deepCopy (default (dict) $roleValues.engine)) }}
{{- if ne $model.path "embedded" }}{{ $_ = set $engine "model" $model.path }}{{ end }}
{{- with $model.servedName }}{{ $_ = set $engine "servedModelName" . }}{{ end }}
{{- $_ = set $engine "device" (include "epdserve.device" $w) }}
{{- $_ = set $engine "tensorParallelSize" (int (default 1 $w.tensorParallelSize)) }}
- {{ $ctx.Values.python | quote }}
- "-m"
- "services.worker"
{{- include "epdserve.argv" (dict "spec" $flags.worker "values" $worker) }}
{{- include "epdserve.argv" (dict "spec" $flags.engine "values" $engine) }}
{{- end }}

{{/*
argv of the kvstore: services.cli.commands.kvstore_command(KVStoreConfig(...)). Its master
binds and advertises the pod IP, on fixed ports, so workers reach it again after a restart.
*/}}
{{- define "epdserve.kvstoreCommand" -}}
{{- $k := .Values.kvstore }}
{{- $flags := include "epdserve.flags" . | fromJson }}
{{- $values := deepCopy $k.config }}
{{- $_ := set $values "host" "0.0.0.0" }}
{{- $_ = set $values "port" $k.port }}
{{- $_ = set $values "metricsPort" $k.metricsPort }}
{{- $_ = set $values "advertiseHost" "$(POD_IP)" }}
{{- $_ = set $values "instanceId" "$(POD_NAME)" }}
{{- $_ = set $values "cluster" .Values.clusterName }}
{{- $_ = set $values "etcd" (include "epdserve.etcdEndpoints" .) }}
{{- $_ = set $values "masterHost" "$(POD_IP)" }}
{{- $_ = set $values "masterRpcPort" $k.master.rpcPort }}
{{- $_ = set $values "masterMetadataPort" $k.master.metadataPort }}
{{- $_ = set $values "masterMetricsPort" $k.master.metricsPort }}
- {{ .Values.python | quote }}
- "-m"
- "services.kvstore"
{{- include "epdserve.argv" (dict "spec" $flags.kvstore "values" $values) }}
{{- end }}

{{/* Seconds a worker pod may take to stop: the drain timeout plus the extra margin. */}}
{{- define "epdserve.workerGracePeriod" -}}
{{- $w := default .ctx.Values.workers .workers }}
{{- $roleValues := get $w .role }}
{{- $cfg := mergeOverwrite (deepCopy $w.config) (deepCopy (default (dict) $roleValues.config)) }}
{{- $drain := $cfg.drainTimeoutS }}
{{- if kindIs "invalid" $drain }}
{{- range (include "epdserve.flags" .ctx | fromJson).worker }}
{{- if eq .key "drainTimeoutS" }}{{ $drain = .default }}{{ end }}
{{- end }}
{{- end }}
{{- add (int (ceil $drain)) (int $w.terminationGraceExtraSeconds) }}
{{- end }}

{{/*
The router pods' terminationGracePeriodSeconds: router.config.shutdownGraceS (else the
RouterConfig default from the flag table) plus router.terminationGraceExtraSeconds.
*/}}
{{- define "epdserve.routerGracePeriod" -}}
{{- $grace := .Values.router.config.shutdownGraceS }}
{{- if kindIs "invalid" $grace }}
{{- range (include "epdserve.flags" . | fromJson).router }}
{{- if eq .key "shutdownGraceS" }}{{ $grace = .default }}{{ end }}
{{- end }}
{{- end }}
{{- add (int (ceil $grace)) (int .Values.router.terminationGraceExtraSeconds) }}
{{- end }}

{{/*
The Secret with the etcd client's TLS files (ca.crt, tls.crt, tls.key) that every etcd client
(router, workers, kvstore) mounts at /etc/epdserve/etcd-tls: the bundled etcd's client
certificate with etcd.bundled.tls, the external etcd's with etcd.external.tls; empty: plain
etcd. Every TLS-dependent line of a client (env, volume, mount) follows from this one name.
*/}}
{{- define "epdserve.etcdClientTLSSecret" -}}
{{- $b := .Values.etcd.bundled }}
{{- if $b.enabled }}
{{- if $b.tls.enabled }}{{ $b.tls.clientSecretName | default $b.tls.secretName }}{{ end }}
{{- else if .Values.etcd.external.tls.enabled }}
{{- .Values.etcd.external.tls.secretName }}
{{- end }}
{{- end }}

{{/* The etcd client TLS volume (a list item); empty without etcd TLS. */}}
{{- define "epdserve.etcdTLSVolume" -}}
{{- with include "epdserve.etcdClientTLSSecret" . }}
- name: etcd-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{/* Its mount (a list item); empty without etcd TLS. */}}
{{- define "epdserve.etcdTLSVolumeMount" -}}
{{- if include "epdserve.etcdClientTLSSecret" . }}
- name: etcd-tls
  mountPath: /etc/epdserve/etcd-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* etcd client environment of the router, workers and kvstore: TLS (bundled or external), external auth. */}}
{{- define "epdserve.etcdEnv" -}}
{{- $ext := .Values.etcd.external }}
{{- if include "epdserve.etcdClientTLSSecret" . }}
- name: EPDSERVE_ETCD_CACERT
  value: /etc/epdserve/etcd-tls/ca.crt
- name: EPDSERVE_ETCD_CERT
  value: /etc/epdserve/etcd-tls/tls.crt
- name: EPDSERVE_ETCD_KEY
  value: /etc/epdserve/etcd-tls/tls.key
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) $ext.auth.enabled }}
- name: EPDSERVE_ETCD_USER
  valueFrom:
    secretKeyRef:
      name: {{ $ext.auth.secretName }}
      key: {{ $ext.auth.usernameKey }}
- name: EPDSERVE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ext.auth.secretName }}
      key: {{ $ext.auth.passwordKey }}
{{- end }}
{{- end }}

{{/* Volumes shared by the router and workers: model, conversion cache, etcd TLS. */}}
{{- define "epdserve.commonVolumes" -}}
- name: cache
  emptyDir:
    {{- with .Values.model.cacheSizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- with .Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "epdserve.etcdTLSVolume" . }}
{{- end }}

{{- define "epdserve.commonVolumeMounts" -}}
- name: cache
  mountPath: /cache
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- include "epdserve.etcdTLSVolumeMount" . }}
{{- end }}

{{/* Access modes of the routers' batch volume: as set, else RWO for one replica, RWX for more. */}}
{{- define "epdserve.batchAccessModes" -}}
{{- $modes := .Values.router.batchVolume.accessModes }}
{{- if not $modes }}
{{- $modes = list (ternary "ReadWriteMany" "ReadWriteOnce" (gt (int .Values.router.replicas) 1)) }}
{{- end }}
{{- toYaml $modes }}
{{- end }}

{{/* Render-time checks the schema cannot state. */}}
{{- define "epdserve.validate" -}}
{{- $flags := include "epdserve.flags" . | fromJson }}
{{- /* NOTE: Services and the etcd pods' hostnames are DNS labels (63 characters at most), and
       the etcd StatefulSet's revision label adds 11 to its name; fullname alone is cut to 63. */}}
{{- $full := include "epdserve.fullname" . }}
{{- $longest := printf "%s-mooncake-master" $full }}
{{- range $g := .Values.modelGroups }}
{{- $n := printf "%s-worker-%s-prefill" $full $g.name }}
{{- if gt (len $n) (len $longest) }}{{ $longest = $n }}{{ end }}
{{- end }}
{{- if gt (len $longest) 63 }}
{{- fail (printf "the name %s has %d characters, past Kubernetes' 63: shorten the release name, nameOverride or fullnameOverride (the prefix %s has %d)" $longest (len $longest) $full (len $full)) }}
{{- end }}
{{- $names := list }}
{{- range $g := .Values.modelGroups }}
{{- if has $g.name $names }}{{ fail (printf "modelGroups: two groups are named %s" $g.name) }}{{ end }}
{{- $names = append $names $g.name }}
{{- end }}
{{- /* NOTE: the top-level workers values reach every group: adapters there would be loaded into models they were not trained for. */}}
{{- if and (gt (len .Values.modelGroups) 1) .Values.workers.engine.loraModules }}
{{- fail "workers.engine.loraModules: with several modelGroups, give each group its own adapters (modelGroups[].workers.engine.loraModules): an adapter fits the model it was trained for only" }}
{{- end }}
{{- range $group := include "epdserve.modelGroups" . | fromJsonArray }}
{{- $w := $group.workers }}
{{- $where := ternary (printf "modelGroups[%s].workers" $group.name) "workers" (ne $group.name "") }}
{{- $enabled := list }}
{{- range $role := list "mixed" "prefill" "decode" "encode" }}
{{- if (get $w $role).enabled }}
{{- $enabled = append $enabled $role }}

{{- if not (has $role $flags.roles) }}
{{- fail (printf "%s.%s.enabled: this epdserve version's workers take the roles %s only" $where $role (join ", " $flags.roles)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $enabled }}
{{- fail (printf "%s: enable at least one role (%s.mixed, or %s.prefill with %s.decode)" $where $where $where $where) }}
{{- end }}
{{- if ne (has "prefill" $enabled) (has "decode" $enabled) }}
{{- fail (printf "%s: PD mode needs both %s.prefill.enabled and %s.decode.enabled" $where $where $where) }}
{{- end }}
{{- /* An enabled role may have 0 replicas beside another path (roles flip at run time), but
     some path must have workers: 0 everywhere rendered a cluster that answers only 503. */}}
{{- $n := dict }}
{{- range $role := list "mixed" "prefill" "decode" }}
{{- $_ := set $n $role (ternary (int (get $w $role).replicas) 0 (has $role $enabled)) }}
{{- end }}
{{- if and (lt $n.mixed 1) (or (lt $n.prefill 1) (lt $n.decode 1)) }}
{{- fail (printf "%s: no worker would serve: give %s.mixed.replicas >= 1, or %s.prefill.replicas and %s.decode.replicas >= 1 each (mixed %d, prefill %d, decode %d)" $where $where $where $where $n.mixed $n.prefill $n.decode) }}
{{- end }}
{{- end }}
{{- if and .Values.kvstore.enabled .Values.kvstore.config.master .Values.mooncake.master.enabled }}
{{- fail "kvstore.enabled: the kvstore runs its own Mooncake master; disable mooncake.master (or set kvstore.config.master: false)" }}
{{- end }}
{{- if and .Values.etcd.bundled.image.repository (not .Values.etcd.bundled.image.tag) }}
{{- fail "etcd.bundled.image.tag: give the tag of etcd.bundled.image.repository" }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) (not .Values.etcd.external.endpoints) }}
{{- fail "etcd: enable etcd.bundled or list etcd.external.endpoints" }}
{{- end }}
{{- if and .Values.etcd.bundled.enabled .Values.etcd.bundled.tls.enabled (not .Values.etcd.bundled.tls.secretName) }}
{{- fail "etcd.bundled.tls.secretName: name the Secret with the members' ca.crt, tls.crt and tls.key" }}
{{- end }}
{{- $b := .Values.etcd.bundled }}
{{- if and $b.enabled $b.tls.enabled (has (int $b.tls.healthPort) (list (int $b.clientPort) (int $b.peerPort))) }}
{{- fail "etcd.bundled.tls.healthPort: give the plain health listener a port of its own (not clientPort or peerPort)" }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) .Values.etcd.external.tls.enabled (not .Values.etcd.external.tls.secretName) }}
{{- fail "etcd.external.tls.secretName: name the Secret with ca.crt, tls.crt and tls.key" }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) .Values.etcd.external.auth.enabled (not .Values.etcd.external.auth.secretName) }}
{{- fail "etcd.external.auth.secretName: name the Secret with the etcd user and password" }}
{{- end }}
{{- end }}
