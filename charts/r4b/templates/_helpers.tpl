{{/* Names: every helper is prefixed "r4b." so a parent chart's helpers cannot collide. */}}

{{- define "r4b.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-r4b, or <release> when it already contains the chart name; 40 chars leave room for suffixes. */}}
{{- define "r4b.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "r4b.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "r4b.selectorLabels" -}}
app.kubernetes.io/name: {{ include "r4b.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "r4b.labels" -}}
helm.sh/chart: {{ include "r4b.chart" . }}
{{ include "r4b.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: r4b
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "mlflow") */}}
{{- define "r4b.componentLabels" -}}
{{ include "r4b.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "r4b.componentSelector" -}}
{{ include "r4b.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images */}}
{{- define "r4b.platformImage" -}}
{{- printf "%s:%s" .Values.images.platform.repository (default .Chart.AppVersion .Values.images.platform.tag) }}
{{- end }}

{{- define "r4b.vllmImage" -}}
{{- printf "%s:%s" .Values.images.vllm.repository (default .Chart.AppVersion .Values.images.vllm.tag) }}
{{- end }}

{{/* Pod-level settings every pod shares. */}}
{{- define "r4b.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "r4b.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/* Required values, each failing with the value path and what to put there. */}}
{{- define "r4b.s3Secret" -}}
{{- required "s3.existingSecret is required: the name of a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (kubectl create secret generic r4b-credentials --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...)" .Values.s3.existingSecret }}
{{- end }}

{{/* S3 endpoint: the configured one, else the dev object store's Service, else empty (AWS). */}}
{{- define "r4b.s3Endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.objectStore.enabled }}
{{- printf "http://%s-objectstore.%s.svc.%s:%d" (include "r4b.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.objectStore.port) }}
{{- end }}
{{- end }}

{{- define "r4b.s3Env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with include "r4b.s3Endpoint" . }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* MLflow */}}
{{- define "r4b.mlflow.service" -}}
{{- printf "%s-mlflow" (include "r4b.fullname" .) }}
{{- end }}

{{- define "r4b.mlflow.url" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "r4b.mlflow.service" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.port) }}
{{- end }}

{{/* Every name a client may put in the Host header; MLflow matches host:port literally, so list both. */}}
{{- define "r4b.mlflow.allowedHosts" -}}
{{- $svc := include "r4b.mlflow.service" . }}
{{- $port := int .Values.mlflow.port }}
{{- $hosts := list }}
{{- range $name := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.%s" $svc .Release.Namespace .Values.clusterDomain) }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:%d" $name $port) }}
{{- end }}
{{- $hosts = concat $hosts (list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*") .Values.mlflow.allowedHosts }}
{{- join "," $hosts }}
{{- end }}

{{- define "r4b.serving.service" -}}
{{- printf "%s-serving" (include "r4b.fullname" .) }}
{{- end }}

{{/* Labels that admit a pod through the NetworkPolicies of the services it calls (networkpolicy.yaml):
     (list "mlflow" "objectstore"). The launcher's PyTorchJob pods carry the same (launch/pytorchjob.py). */}}
{{- define "r4b.clientLabels" -}}
{{- $lines := list }}
{{- range . }}{{ $lines = append $lines (printf "r4b.dev/%s-client: \"true\"" .) }}{{ end }}
{{- join "\n" $lines }}
{{- end }}
