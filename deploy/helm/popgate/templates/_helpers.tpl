{{/*
Names and labels, in the usual Helm shape.
*/}}
{{- define "popgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "popgate.fullname" -}}
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

{{/* Labels of every object, without the component. */}}
{{- define "popgate.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: popgate
app.kubernetes.io/name: {{ include "popgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "popgate.labels" -}}
{{ include "popgate.commonLabels" . }}
app.kubernetes.io/component: pop3-gateway
{{- end }}

{{/* The pods' identity; never change it on a live release (selectors are immutable). */}}
{{- define "popgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "popgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: pop3-gateway
{{- end }}

{{- define "popgate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "popgate.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "popgate.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "popgate.credentialsSecretName" -}}
{{- default (printf "%s-backend-credentials" (include "popgate.fullname" .)) .Values.backendCredentials.secretName }}
{{- end }}

{{/* "true" when some listener needs a certificate. */}}
{{- define "popgate.usesTls" -}}
{{- range .Values.listeners }}{{ if ne (default "none" .tls) "none" }}true{{ end }}{{ end }}
{{- end }}

{{/*
The kubelet may SIGKILL only after popgate's own grace period: the optional
preStop sleep, then drain_delay_secs (still accepting while /readyz says
503), then shutdown_grace_secs for sessions to finish, then 5 s for
the last replies and the exit.
*/}}
{{- define "popgate.terminationGracePeriod" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.drainDelaySeconds) (int .Values.shutdownGraceSeconds) 5 }}
{{- end }}

{{/*
"true" when OAuth accounts are configured: in `accounts`, or in config.raw
(an [account.oauth] table, an inline `oauth = {…}` or a [token_store]).
Without shared state (state.url), two pods would both refresh the same
tokens (docs/ACCOUNTS.md): then the chart runs exactly one (singleReplica).
*/}}
{{- define "popgate.oauth" -}}
{{- if .Values.config.raw -}}
{{- if regexMatch `(?m)^[ \t]*(\[account\.oauth\]|\[token_store\]|oauth[ \t]*=)` .Values.config.raw }}true{{ end -}}
{{- else -}}
{{- range .Values.accounts }}{{ if .oauth }}true{{ end }}{{ end -}}
{{- end -}}
{{- end }}

{{/*
"true" when exactly one pod may run: OAuth accounts without shared state.
With state.url (Redis) the tokens live there, encrypted, and replicas
refresh one at a time under a lock in it (docs/ACCOUNTS.md), so the usual
replicaCount, HPA and PDB apply.
*/}}
{{- define "popgate.singleReplica" -}}
{{- if and (include "popgate.oauth" .) (not .Values.state.url) }}true{{ end -}}
{{- end }}

{{- define "popgate.tokenKeySecretName" -}}
{{- default (printf "%s-token-key" (include "popgate.fullname" .)) .Values.tokenStore.keySecret.name }}
{{- end }}

{{- define "popgate.deviceHashesSecretName" -}}
{{- default (printf "%s-device-hashes" (include "popgate.fullname" .)) .Values.devicePasswordHashes.secretName }}
{{- end }}

{{- define "popgate.tokenStoreClaimName" -}}
{{- default (printf "%s-token-store" (include "popgate.fullname" .)) .Values.tokenStore.persistence.existingClaim }}
{{- end }}

{{/*
One TOML value from a YAML value: strings quoted (JSON escapes are valid in
TOML basic strings), whole numbers without the ".0" or exponent Helm's
float64 numbers would otherwise print (popgate's integer keys reject them),
lists as inline arrays.
*/}}
{{- define "popgate.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- $v | toJson -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- if eq (float64 (int64 $v)) (float64 $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "popgate.tomlValue" $e }}{{ end -}}]
{{- else -}}
{{- fail (printf "popgate.toml: cannot write %v (%s) as a TOML value" $v (kindOf $v)) -}}
{{- end -}}
{{- end }}

{{/*
The `key = value` lines of a flat table, sorted, without a trailing newline
(empty for an empty table); `skip` lists keys the chart sets itself.
*/}}
{{- define "popgate.tomlKeys" -}}
{{- $table := .table -}}
{{- $lines := list -}}
{{- range $key := keys $table | sortAlpha -}}
{{- if not (has $key $.skip) -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" $key) -}}
{{- fail (printf "popgate.toml: %q is not a popgate setting name" $key) -}}
{{- end -}}
{{- $lines = append $lines (printf "%s = %s" $key (include "popgate.tomlValue" (index $table $key))) -}}
{{- end -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end }}

{{/* A device's key in the device-hashes Secret: secretKey, else its user name. */}}
{{- define "popgate.deviceHashKey" -}}
{{- $key := default .user .secretKey -}}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+$" $key) -}}
{{- fail (printf "accounts: device %q: %q is not a Secret key (letters, digits, -, _, .): set its secretKey" .user $key) -}}
{{- end -}}
{{- $key -}}
{{- end }}
