{{/* Names and labels shared by every template. */}}
{{- define "ballast.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "ballast.labels" -}}
app.kubernetes.io/name: ballast
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ballast.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The CSI driver name: fixed in the binaries (csi/src/service/mod.rs). */}}
{{- define "ballast.driver" -}}csi.ballast.io{{- end -}}

{{- define "ballast.controllerAddress" -}}
{{- if .Values.controller.address -}}
{{ .Values.controller.address }}
{{- else -}}
http://{{ include "ballast.name" . }}-controller.{{ .Release.Namespace }}.svc:{{ .Values.controller.port }}
{{- end -}}
{{- end -}}

{{- define "ballast.store" -}}
{{- if .Values.store.endpoints -}}
etcd://{{ join "," .Values.store.endpoints }}/{{ .Values.store.namespace }}
{{- else -}}
etcd://{{ include "ballast.name" . }}-etcd.{{ .Release.Namespace }}.svc:2379/{{ .Values.store.namespace }}
{{- end -}}
{{- end -}}

{{/* The environment of the node pod's containers: who and where they are. */}}
{{- define "ballast.nodeEnv" -}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: NODE_IP
  valueFrom: {fieldRef: {fieldPath: status.hostIP}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end -}}
