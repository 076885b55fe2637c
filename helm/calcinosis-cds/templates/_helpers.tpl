{{/*
Names, labels and the blocks every pod shares (environment, volumes, security context).
*/}}

{{- define "calcinosis-cds.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "calcinosis-cds.fullname" -}}
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

{{- define "calcinosis-cds.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; callers add app.kubernetes.io/component. */}}
{{- define "calcinosis-cds.selectorLabels" -}}
app.kubernetes.io/name: {{ include "calcinosis-cds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "calcinosis-cds.labels" -}}
helm.sh/chart: {{ include "calcinosis-cds.chart" . }}
{{ include "calcinosis-cds.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: calcinosis-cds
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "calcinosis-cds.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "calcinosis-cds.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "calcinosis-cds.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret name of one `secrets` entry: its own existingSecret, else the shared one. */}}
{{- define "calcinosis-cds.secretName" -}}
{{- $entry := index .root.Values.secrets .entry }}
{{- default .root.Values.secrets.existingSecret $entry.existingSecret }}
{{- end }}

{{/* One env entry read from an existing Secret. Args: root, entry (key under .Values.secrets), env (variable). */}}
{{- define "calcinosis-cds.secretEnv" -}}
{{- $entry := index .root.Values.secrets .entry -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "calcinosis-cds.secretName" . | quote }}
      key: {{ $entry.key | quote }}
{{- end }}

{{/* The path of a file mounted from a Secret or ConfigMap entry: <mountPath>/<key>. */}}
{{- define "calcinosis-cds.mountedFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .mountPath) .key -}}
{{- end }}

{{/* Environment entries that come from Secrets or are derived from values (never from the ConfigMap). */}}
{{- define "calcinosis-cds.secretEnvs" -}}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "databaseUrl" "env" "CDS_DATABASE_URL") }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "brokerUrl" "env" "CDS_BROKER_URL") }}
{{- if .Values.secrets.redisUrl.enabled }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "redisUrl" "env" "CDS_REDIS_URL") }}
{{- end }}
{{- if .Values.secrets.subscriptionSecret.enabled }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "subscriptionSecret" "env" "CDS_SUBSCRIPTION_SECRET") }}
{{- end }}
{{- if .Values.secrets.adminToken.enabled }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "adminToken" "env" "CDS_ADMIN_TOKEN") }}
{{- end }}
{{- if .Values.secrets.medplumHmacSecret.enabled }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "medplumHmacSecret" "env" "CDS_MEDPLUM_HMAC_SECRET") }}
{{- end }}
{{- if .Values.secrets.fhirBearerToken.enabled }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "fhirBearerToken" "env" "CDS_FHIR_BEARER_TOKEN") }}
{{- end }}
{{- if .Values.secrets.hookFetchProxy.enabled }}
{{ include "calcinosis-cds.secretEnv" (dict "root" . "entry" "hookFetchProxy" "env" "CDS_HOOK_FETCH_PROXY") }}
{{- end }}
{{- if .Values.trustedCa.enabled }}
- name: CDS_TLS_CA_FILE
  value: {{ include "calcinosis-cds.mountedFile" .Values.trustedCa | quote }}
{{- end }}
{{- if .Values.secrets.smartPrivateKey.enabled }}
- name: CDS_SMART_PRIVATE_KEY_FILE
  value: {{ include "calcinosis-cds.mountedFile" .Values.secrets.smartPrivateKey | quote }}
{{- end }}
{{- end }}

{{/* Non-secret settings as ConfigMap data / inline env (same CDS_* names as .env.example). */}}
{{- define "calcinosis-cds.configData" -}}
{{- range $name, $value := .Values.env }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
CDS_DATA_DIR: {{ .Values.volumes.data.mountPath | quote }}
{{- end }}

{{/* Container env for the long-running pods: the ConfigMap plus Secret references. */}}
{{- define "calcinosis-cds.envFrom" -}}
- configMapRef:
    name: {{ include "calcinosis-cds.fullname" . }}
{{- end }}

{{/* Checksum of the ConfigMap, so changed settings roll the pods. */}}
{{- define "calcinosis-cds.configChecksum" -}}
checksum/config: {{ include "calcinosis-cds.configData" . | sha256sum }}
{{- end }}

{{/* A pod template's annotations: the config checksum, and podAnnotations merged with the component's own
     ("own": api.podAnnotations, workers.podAnnotations), which win on a shared key (one key, never two). */}}
{{- define "calcinosis-cds.podAnnotations" -}}
{{ include "calcinosis-cds.configChecksum" .root }}
{{- with merge (deepCopy (.own | default dict)) (deepCopy (.root.Values.podAnnotations | default dict)) }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "calcinosis-cds.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ .Values.volumes.data.mountPath }}
{{- if .Values.secrets.smartPrivateKey.enabled }}
- name: smart-key
  mountPath: {{ .Values.secrets.smartPrivateKey.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.secrets.jwks.enabled }}
- name: jwks
  mountPath: {{ .Values.secrets.jwks.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.trustedCa.enabled }}
- name: trusted-ca
  mountPath: {{ .Values.trustedCa.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "calcinosis-cds.volumes" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.volumes.tmp.sizeLimit }}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.volumes.data.sizeLimit }}
{{- if .Values.secrets.smartPrivateKey.enabled }}
- name: smart-key
  secret:
    secretName: {{ include "calcinosis-cds.secretName" (dict "root" . "entry" "smartPrivateKey") }}
    defaultMode: 0400
    items:
      - key: {{ .Values.secrets.smartPrivateKey.key }}
        path: {{ .Values.secrets.smartPrivateKey.key }}
{{- end }}
{{- if .Values.secrets.jwks.enabled }}
- name: jwks
  secret:
    secretName: {{ include "calcinosis-cds.secretName" (dict "root" . "entry" "jwks") }}
    defaultMode: 0444
{{- end }}
{{- if .Values.trustedCa.enabled }}
- name: trusted-ca
  configMap:
    name: {{ .Values.trustedCa.configMap }}
    defaultMode: 0444
    items:
      - key: {{ .Values.trustedCa.key }}
        path: {{ .Values.trustedCa.key }}
{{- end }}
{{- end }}

{{/* Pod spec fields shared by every pod. */}}
{{- define "calcinosis-cds.podCommon" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "calcinosis-cds.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{/* Worker Deployment name for one queue. Args: root, queue. */}}
{{- define "calcinosis-cds.workerName" -}}
{{- printf "%s-worker-%s" (include "calcinosis-cds.fullname" .root) .queue.name | trunc 63 | trimSuffix "-" }}
{{- end }}
