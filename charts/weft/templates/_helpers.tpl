{{/* The chart's name. */}}
{{- define "weft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the StatefulSet's, so pods are <fullname>-<ordinal>. */}}
{{- define "weft.fullname" -}}
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

{{/* The headless Service that gives every pod a stable DNS name. */}}
{{- define "weft.peersService" -}}
{{- printf "%s-peers" (include "weft.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "weft.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "weft.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
A pod's DNS name, the ordinal left as "{ordinal}" (for peer_address_pattern) or as a
Kubernetes "$(POD_NAME)" reference (for the advertised address): through the headless
Service, or through the pod's own Service when perPodServices is on.
*/}}
{{- define "weft.podHost" -}}
{{- $pod := index . 1 }}
{{- with index . 0 }}
{{- if .Values.perPodServices.enabled }}
{{- printf "%s.%s.svc.%s" $pod .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- printf "%s.%s.%s.svc.%s" $pod (include "weft.peersService" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}
{{- end }}
{{- end }}

{{/* The broker config file: .Values.config as TOML, one key per line (JSON scalars and
arrays are TOML values; numbers print as integers, as the broker's keys are). */}}
{{- define "weft.toml" -}}
{{- $tables := dict }}
{{- range $key, $value := .Values.config }}
{{- if kindIs "map" $value }}
{{- $_ := set $tables $key $value }}
{{- else if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "weft.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $table, $values := $tables }}

[{{ $table }}]
{{- range $key, $value := $values }}
{{- if and (not (kindIs "invalid" $value)) (not (kindIs "map" $value)) (not (and (kindIs "slice" $value) (gt (len $value) 0) (kindIs "map" (first $value)))) }}
{{ $key }} = {{ include "weft.tomlValue" $value }}
{{- end }}
{{- end }}
{{- /* Sub-tables ([tls.client]) and arrays of tables ([[acl.rules]]). */}}
{{- range $key, $value := $values }}
{{- if kindIs "map" $value }}

[{{ $table }}.{{ $key }}]
{{- range $k, $v := $value }}
{{- if not (kindIs "invalid" $v) }}
{{ $k }} = {{ include "weft.tomlValue" $v }}
{{- end }}
{{- end }}
{{- else if and (kindIs "slice" $value) (gt (len $value) 0) (kindIs "map" (first $value)) }}
{{- range $item := $value }}

[[{{ $table }}.{{ $key }}]]
{{- range $k, $v := $item }}
{{ $k }} = {{ include "weft.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "weft.tomlValue" -}}
{{- if kindIs "float64" . }}{{ printf "%.0f" . }}{{- else if kindIs "int64" . }}{{ . }}{{- else if kindIs "int" . }}{{ . }}{{- else }}{{ toJson . }}{{- end }}
{{- end }}

{{/* The gRPC paths that administer the cluster ("/service/*" for a whole service): only
operators may call them when a mesh profile guards the brokers. Producers and consumers need
only Publisher, Subscriber and the read-only Metadata service. */}}
{{- define "weft.operatorPaths" -}}
- /weft.v1.TopicAdmin/*
- /weft.v1.Cluster/*
- /weft.v1.Subscriber/DeleteGroup
{{- end }}

{{/* The broker's own mesh identity (SPIFFE-style, as Istio writes principals). */}}
{{- define "weft.istioPrincipal" -}}
{{- printf "%s/ns/%s/sa/%s" .Values.mesh.istio.trustDomain .Release.Namespace (include "weft.serviceAccountName" .) }}
{{- end }}
