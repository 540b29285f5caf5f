{{/* Names and labels. */}}
{{- define "xdc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "xdc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "xdc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xdc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "xdc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "xdc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
xdc.example.com/datacenter: {{ .Values.dc | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "xdc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The state URL of a datacenter (call with (dict "root" $ "dc" NAME)); the config's default is SQLite.
*/}}
{{- define "xdc.stateUrl" -}}
{{- (index .root.Values.config.datacenters .dc).state_url | default "sqlite:///state.db" -}}
{{- end -}}

{{/* "true" when the datacenter's state takes several writers (PostgreSQL), else "". */}}
{{- define "xdc.stateTakesReplicas" -}}
{{- if regexMatch "^postgres(ql)?://" (include "xdc.stateUrl" .) }}true{{ end -}}
{{- end -}}

{{/* The datacenter whose state a component writes: the resize worker's config.resize.dc, else `dc`. */}}
{{- define "xdc.stateDc" -}}
{{- if and (eq .name "resize") .root.Values.config.resize -}}
{{- .root.Values.config.resize.dc | default .root.Values.dc -}}
{{- else -}}
{{- .root.Values.dc -}}
{{- end -}}
{{- end -}}

{{/*
Checks the values cannot express in values.schema.json, so a bad release fails at render time:
`dc` names a datacenter of the config, the metrics endpoint is reachable by probes and scrapes,
and the mirror and resize worker run more than one replica only on a state that takes several
writers (PostgreSQL; SQLite takes one process of each).
*/}}
{{- define "xdc.validate" -}}
{{- if not (hasKey .Values.config.datacenters .Values.dc) -}}
{{- fail (printf "dc %q is not one of config.datacenters (%s)" .Values.dc (keys .Values.config.datacenters | sortAlpha | join ", ")) -}}
{{- end -}}
{{- range $name := list "mirror" "resize" }}
{{- $c := index $.Values $name }}
{{- if and $c.enabled (gt (int $c.replicas) 1) (or (eq $name "mirror") $.Values.config.resize) }}
{{- $dc := include "xdc.stateDc" (dict "root" $ "name" $name) }}
{{- if not (hasKey $.Values.config.datacenters $dc) }}
{{- fail (printf "config.resize.dc %q is not one of config.datacenters" $dc) }}
{{- end }}
{{- if not (include "xdc.stateTakesReplicas" (dict "root" $ "dc" $dc)) }}
{{- fail (printf "%s.replicas is %d, but the state of datacenter %s is SQLite (%s), which takes one %s process: run 1 replica, or set config.datacenters.%s.state_url to postgresql://... (see docs/scale.md)" $name (int $c.replicas) $dc (include "xdc.stateUrl" (dict "root" $ "dc" $dc)) $name $dc) }}
{{- end }}
{{- end }}
{{- end }}
{{- $m := .Values.config.metrics | default dict -}}
{{- if not (gt (int ($m.port | default 0)) 0) -}}
{{- fail "config.metrics.port must be > 0: the probes and the scrape use it" -}}
{{- end -}}
{{- if eq (toString ($m.host | default "127.0.0.1")) "127.0.0.1" -}}
{{- fail "config.metrics.host must be 0.0.0.0 (or the pod IP) in Kubernetes: probes cannot reach 127.0.0.1" -}}
{{- end -}}
{{- if not $m.token_env -}}
{{- fail "config.metrics.token_env: off loopback, /metrics and the dashboard need a token (an env var filled from secrets.metricsToken)" -}}
{{- end -}}
{{- end -}}

{{- define "xdc.metricsPort" -}}
{{- int .Values.config.metrics.port -}}
{{- end -}}

{{/*
Env of every xdc container: which DC, where the config is, and each credential env var the config
names, filled from the Secret `secrets.s3.<dc>` (required for every DC whose credentials are env vars).
*/}}
{{- define "xdc.env" -}}
- name: XDC_DC
  value: {{ .Values.dc | quote }}
- name: XDC_CONFIG
  value: /etc/xdc/xdc.yaml
- name: PYTHONUNBUFFERED
  value: "1"
{{- range $dcName := keys .Values.config.datacenters | sortAlpha }}
{{- $creds := (index $.Values.config.datacenters $dcName).s3.credentials }}
{{- if $creds.access_key_env }}
{{- $sec := index ($.Values.secrets.s3 | default dict) $dcName | default dict }}
{{- $secretName := required (printf "secrets.s3.%s.secretName: the Secret with %s's S3 keys (env %s / %s)" $dcName $dcName $creds.access_key_env $creds.secret_key_env) $sec.secretName }}
- name: {{ $creds.access_key_env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ required (printf "secrets.s3.%s.accessKeyKey" $dcName) $sec.accessKeyKey }}
- name: {{ $creds.secret_key_env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ required (printf "secrets.s3.%s.secretKeyKey" $dcName) $sec.secretKeyKey }}
{{- end }}
{{- end }}
{{- with .Values.config.metrics.token_env }}
{{- $tok := $.Values.secrets.metricsToken | default dict }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ required "secrets.metricsToken.secretName: the Secret with the metrics and dashboard token" $tok.secretName }}
      key: {{ required "secrets.metricsToken.key" $tok.key }}
{{- end }}
{{- range concat (.Values.secrets.kafka | default list) (.Values.secrets.extraEnv | default list) }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end -}}

{{/* Volumes shared by every xdc pod: the config, the state volume, a writable /tmp. */}}
{{- define "xdc.volumes" -}}
- name: config
  configMap:
    name: {{ include "xdc.fullname" . }}-config
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (printf "%s-data" (include "xdc.fullname" .)) }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- range $i, $ca := .Values.caBundles }}
- name: ca-{{ $i }}
  configMap:
    name: {{ $ca.configMap }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
{{- end }}
{{- end -}}

{{- define "xdc.volumeMounts" -}}
- name: config
  mountPath: /etc/xdc
  readOnly: true
- name: data
  mountPath: {{ .Values.persistence.mountPath }}
- name: tmp
  mountPath: /tmp
{{- range $i, $ca := .Values.caBundles }}
- name: ca-{{ $i }}
  mountPath: {{ $ca.mountPath }}
  subPath: {{ $ca.key }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "xdc.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
{{- with .Values.probes.liveness }}
{{ toYaml . | indent 2 }}
{{- end }}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
{{- with .Values.probes.readiness }}
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{/*
Pod template annotations of a component: config checksum (roll on config change), scrape hints.
Call with (dict "root" $ "component" .Values.mirror).
*/}}
{{- define "xdc.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.monitoring.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "xdc.metricsPort" .root | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .component.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
One xdc Deployment. Call with (dict "root" $ "name" "mirror" "component" .Values.mirror "args" (list ...)
"ports" (list ...)).
*/}}
{{- define "xdc.deployment" -}}
{{- $root := .root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "xdc.fullname" $root }}-{{ .name }}
  labels:
    {{- include "xdc.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  replicas: {{ .component.replicas }}
  {{- if and (has .name (list "mirror" "resize")) (not (include "xdc.stateTakesReplicas" (dict "root" $root "dc" (include "xdc.stateDc" (dict "root" $root "name" .name))))) }}
  # SQLite state takes one process: a rolling update's second pod would be refused, so stop first
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "xdc.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ .name }}
  template:
    metadata:
      labels:
        {{- include "xdc.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .name }}
      annotations:
        {{- include "xdc.podAnnotations" (dict "root" $root "component" .component) | nindent 8 }}
    spec:
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "xdc.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["xdc"]
          args:
            {{- toYaml (concat .args (.component.extraArgs | default list)) | nindent 12 }}
          env:
            {{- include "xdc.env" $root | nindent 12 }}
          ports:
            - name: metrics
              containerPort: {{ include "xdc.metricsPort" $root }}
              protocol: TCP
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
          {{- include "xdc.probes" $root | nindent 10 }}
          {{- with .component.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- include "xdc.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "xdc.volumes" $root | nindent 8 }}
      {{- with .component.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .component.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .component.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
