{{/* The chart name, or nameOverride. */}}
{{- define "keyward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of the release's objects: fullnameOverride, or <release>-keyward (just <release>
when it already contains the chart name). */}}
{{- define "keyward.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "keyward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "keyward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyward
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "keyward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keyward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository, then @digest, or :tag (default: the chart's appVersion). */}}
{{- define "keyward.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The namespace holding the leader-election Lease. */}}
{{- define "keyward.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{/* The watched namespaces, de-duplicated, in the given order. */}}
{{- define "keyward.watchNamespaces" -}}
{{- .Values.watchNamespaces | uniq | join "," }}
{{- end }}

{{/* The verifier's StatefulSet name (also the prefix of its pod names, the replica ids):
<fullname>-verifier, at most 52 characters so that its pods' controller-revision-hash label
stays within 63. */}}
{{- define "keyward.verifier.fullname" -}}
{{- printf "%s-verifier" (include "keyward.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* The Secret (kubernetes.io/tls) the verifier mounts: verifier.tls.secretName, else <verifier fullname>-tls. */}}
{{- define "keyward.verifier.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "keyward.verifier.fullname" .)) .Values.verifier.tls.secretName }}
{{- end }}

{{/* The verifier's DNS names (its Service's), for a cert-manager Certificate without dnsNames. */}}
{{- define "keyward.verifier.dnsNames" -}}
{{- $svc := include "keyward.verifier.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- toYaml (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) }}
{{- end }}

{{/* Labels on the verifier's objects. */}}
{{- define "keyward.verifier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "keyward.verifier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyward
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the verifier's pods. */}}
{{- define "keyward.verifier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: verifier
{{- end }}

{{/* The ServiceAccount the verifier runs as (its own, never the operator's). */}}
{{- define "keyward.verifier.serviceAccountName" -}}
{{- if .Values.verifier.serviceAccount.create }}
{{- default (include "keyward.verifier.fullname" .) .Values.verifier.serviceAccount.name }}
{{- else }}
{{- required "verifier.serviceAccount.name is required when verifier.serviceAccount.create is false" .Values.verifier.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The verifier's replica ids (its pod names, <statefulset>-<i> for each ordinal),
comma-separated: the operator's --verifier-replicas, so a deleted Lease holds a key instead of
shrinking the coverage. */}}
{{- define "keyward.verifier.replicaIds" -}}
{{- $sts := include "keyward.verifier.fullname" . }}
{{- $ids := list }}
{{- range $i := until (int .Values.verifier.replicas) }}
{{- $ids = append $ids (printf "%s-%d" $sts $i) }}
{{- end }}
{{- $ids | join "," }}
{{- end }}

{{/* The usage Leases the verifier's pods write, one per StatefulSet ordinal, as a JSON list:
keyward-verifier-<statefulset>-<i> (src/usage.rs lease_name of the replica id = pod name). */}}
{{- define "keyward.verifier.leaseNames" -}}
{{- $sts := include "keyward.verifier.fullname" . }}
{{- $names := list }}
{{- range $i := until (int .Values.verifier.replicas) }}
{{- $names = append $names (printf "keyward-verifier-%s-%d" $sts $i) }}
{{- end }}
{{- $names | toJson }}
{{- end }}

{{/*
The ProvisioningKey whose key signs the token endpoint's access tokens (release namespace).
*/}}
{{- define "keyward.verifier.signerName" -}}
{{- default (printf "%s-access-tokens" (include "keyward.verifier.fullname" .)) .Values.verifier.tokenEndpoint.signer.name -}}
{{- end }}

{{/*
The token endpoint's URL: the value, else the verifier Service's cluster DNS name.
*/}}
{{- define "keyward.verifier.tokenEndpointUrl" -}}
{{- if .Values.verifier.tokenEndpoint.url -}}
{{- .Values.verifier.tokenEndpoint.url -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%v/oauth2/token" (include "keyward.verifier.fullname" .) .Release.Namespace .Values.verifier.service.port -}}
{{- end -}}
{{- end }}
