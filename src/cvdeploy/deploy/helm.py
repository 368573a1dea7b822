"""A Helm chart for the same Deployment, Service, autoscaler, disruption budget and audit claim as `k8s.manifests`.

The values come from `values_for` (the options and the sizing); the templates below are Go templates that render,
with those values, exactly the objects `k8s.manifests` writes (tests/deploy/test_k8s.py renders them with helm and
compares), so the chart and the plain manifests cannot drift apart. Helm also checks the values against
values.schema.json before it renders anything. What every object repeats (its metadata, the container's probes) is
written once here (`_metadata`, `_probe`), with the figures `k8s_pod` gives the manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cvdeploy import __version__
from cvdeploy.deploy import MODELS_DIR, ModelSource, dump_yaml
from cvdeploy.deploy import k8s as k

HELPERS = """\
{{/* Labels on every object; the selector's two are the only ones a Deployment may never change. */}}
{{- define "cvdeploy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cvdeploy.labels" -}}
{{ include "cvdeploy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: predictor
app.kubernetes.io/part-of: cvdeploy
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{- define "cvdeploy.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end }}

{{- define "cvdeploy.scheme" -}}
{{ if .Values.tls.secretName }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{- define "cvdeploy.auditClaim" -}}
{{ .Values.audit.existingClaim | default (printf "%s-audit" .Release.Name) }}
{{- end }}
"""


def _metadata(name: str = "{{ .Release.Name }}") -> str:
    """The metadata every object of the chart opens with: its name (the release's) and the chart's labels."""
    return ("metadata:\n"
            f"  name: {name}\n"
            "  labels:\n"
            '    {{- include "cvdeploy.labels" . | nindent 4 }}\n')


def _probe(kind: str, path: str, period: int, failures: int | str) -> str:
    """One of the server container's probes, as `k8s_pod.container` makes them: over the scheme the values choose."""
    return (f"          {kind}:\n"
            "            httpGet:\n"
            f"              path: {path}\n"
            "              port: http\n"
            '              scheme: {{ include "cvdeploy.scheme" . }}\n'
            f"            periodSeconds: {period}\n"
            f"            timeoutSeconds: {k.PROBE_TIMEOUT_S}\n"
            f"            failureThreshold: {failures}\n")


DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
""" + _metadata() + """\
  annotations:
    cvdeploy.io/sizing: {{ .Values.sizingNotes | quote }}
spec:
  # No replicas: the autoscaler owns the count (a re-apply would reset it); it starts at its floor.
  selector:
    matchLabels:
      {{- include "cvdeploy.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "cvdeploy.labels" . | nindent 8 }}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ .Values.port | quote }}
        prometheus.io/path: /metrics
        prometheus.io/scheme: {{ include "cvdeploy.scheme" . | lower }}
        cvdeploy.io/bundles: {{ .Values.bundles | quote }}
    spec:
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: {{ .Values.uid }}
        runAsGroup: {{ .Values.uid }}
        fsGroup: {{ .Values.uid }}
        seccompProfile:
          type: RuntimeDefault
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "cvdeploy.selectorLabels" . | nindent 14 }}
      containers:
        - name: server
          image: {{ include "cvdeploy.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args:
            - --repository
            - {{ .Values.modelRepository | quote }}
            - --host
            - 0.0.0.0
            - --port
            - {{ .Values.port | quote }}
            - --threads
            - {{ div .Values.server.threads .Values.server.instances | quote }}
            - --instances
            - {{ .Values.server.instances | quote }}
            - --max-batch
            - {{ .Values.server.maxBatch | quote }}
            - --max-inflight-mb
            - {{ .Values.server.maxInflightMb | quote }}
            {{- if .Values.tls.secretName }}
            - --tls-cert
            - {{ .Values.paths.tls }}/tls.crt
            - --tls-key
            - {{ .Values.paths.tls }}/tls.key
            {{- end }}
            {{- if .Values.apiKeys.secretName }}
            - --auth-keys
            - {{ .Values.paths.apiKeys }}/keys.db
            - --public-health
            {{- end }}
            {{- if .Values.audit.keySecretName }}
            - --audit-log
            - {{ .Values.paths.audit }}/$(POD_NAME).db
            - --audit-key-file
            - {{ .Values.paths.auditKey }}/audit.key
            {{- end }}
          ports:
            - name: http
              containerPort: {{ .Values.port }}
              protocol: TCP
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
""" + _probe("startupProbe", k.READY_PATH, 5, "{{ .Values.startupProbe.failureThreshold }}") \
  + _probe("readinessProbe", k.READY_PATH, 5, 3) + _probe("livenessProbe", k.LIVE_PATH, 10, 3) + """\
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ .Values.preStopSeconds | quote }}]
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            runAsNonRoot: true
            capabilities:
              drop: ["ALL"]
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if .Values.tls.secretName }}
            - name: tls
              mountPath: {{ .Values.paths.tls }}
              readOnly: true
            {{- end }}
            {{- if .Values.apiKeys.secretName }}
            - name: api-keys
              mountPath: {{ .Values.paths.apiKeys }}
              readOnly: true
            {{- end }}
            {{- if .Values.audit.keySecretName }}
            - name: audit-key
              mountPath: {{ .Values.paths.auditKey }}
              readOnly: true
            - name: audit
              mountPath: {{ .Values.paths.audit }}
            {{- end }}
      volumes:
        # /tmp: the root filesystem is read-only; large multipart uploads spool here.
        - name: tmp
          emptyDir:
            sizeLimit: {{ .Values.tmpSize }}
        {{- if .Values.tls.secretName }}
        - name: tls
          secret:
            secretName: {{ .Values.tls.secretName }}
            defaultMode: 288
        {{- end }}
        {{- if .Values.apiKeys.secretName }}
        - name: api-keys
          secret:
            secretName: {{ .Values.apiKeys.secretName }}
            defaultMode: 288
            items:
              - key: keys.db
                path: keys.db
        {{- end }}
        {{- if .Values.audit.keySecretName }}
        - name: audit-key
          secret:
            secretName: {{ .Values.audit.keySecretName }}
            defaultMode: 288
            items:
              - key: audit.key
                path: audit.key
        - name: audit
          persistentVolumeClaim:
            claimName: {{ include "cvdeploy.auditClaim" . }}
        {{- end }}
"""

SERVICE = """\
apiVersion: v1
kind: Service
""" + _metadata() + """\
spec:
  type: ClusterIP
  selector:
    {{- include "cvdeploy.selectorLabels" . | nindent 4 }}
  ports:
    - name: http
      port: {{ .Values.port }}
      targetPort: http
      protocol: TCP
"""

HPA = """\
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
""" + _metadata() + """\
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .Release.Name }}
  minReplicas: {{ .Values.autoscaling.minReplicas }}
  maxReplicas: {{ .Values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .Values.autoscaling.targetCPUUtilizationPercentage }}
  # Up at once (a new pod needs its warm-up anyway), down only after five calm minutes.
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
"""

PDB = """\
apiVersion: policy/v1
kind: PodDisruptionBudget
""" + _metadata() + """\
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "cvdeploy.selectorLabels" . | nindent 6 }}
"""

AUDIT_PVC = """\
{{- if and .Values.audit.keySecretName (not .Values.audit.existingClaim) }}
# Every replica writes its own log file on it: ReadWriteMany, on storage with POSIX locks (SQLite).
apiVersion: v1
kind: PersistentVolumeClaim
""" + _metadata('{{ include "cvdeploy.auditClaim" . }}') + """\
spec:
  accessModes: ["ReadWriteMany"]
  resources:
    requests:
      storage: {{ .Values.audit.size }}
  {{- if .Values.audit.storageClassName }}
  storageClassName: {{ .Values.audit.storageClassName }}
  {{- end }}
{{- end }}
"""

NOTES = """\
{{ .Release.Name }}: cvdeploy serving {{ .Values.bundles }}
  kubectl port-forward svc/{{ .Release.Name }} {{ .Values.port }}:{{ .Values.port }}
  curl {{ if .Values.tls.secretName }}--insecure https{{ else }}http{{ end }}://127.0.0.1:{{ .Values.port }}/v2/health/ready
{{- if .Values.apiKeys.secretName }}
Requests other than health checks need an API key from the store in Secret {{ .Values.apiKeys.secretName }}.
{{- end }}
"""

TEMPLATES = {"_helpers.tpl": HELPERS, "deployment.yaml": DEPLOYMENT, "service.yaml": SERVICE, "hpa.yaml": HPA,
             "pdb.yaml": PDB, "audit-pvc.yaml": AUDIT_PVC, "NOTES.txt": NOTES}


def _image_parts(image: str) -> dict[str, str]:
    if "@" in image:
        repo, digest = image.split("@", 1)
        return {"repository": repo, "tag": "", "digest": digest}
    repo, tag = image.rsplit(":", 1)
    return {"repository": repo, "tag": tag, "digest": ""}


def values_for(source: ModelSource, o: k.K8sOptions, s: k.Sizing) -> dict[str, Any]:
    """The chart's values for these options: with them the chart renders what `k8s.manifests` writes."""
    return {
        "image": {**_image_parts(o.image), "pullPolicy": k.PULL_POLICY},
        "modelRepository": MODELS_DIR,
        "port": k.PORT,
        "uid": k.UID,
        "server": {"threads": s.threads, "instances": o.instances, "maxBatch": o.max_batch, "maxInflightMb": s.inflight_mib},
        "resources": s.resources(),
        "startupProbe": {"failureThreshold": -(-s.startup_s // 5)},
        "autoscaling": {"minReplicas": o.replicas, "maxReplicas": o.max_replicas, "targetCPUUtilizationPercentage": o.target_cpu},
        "tls": {"secretName": o.tls_secret or ""},
        "apiKeys": {"secretName": o.api_key_secret or ""},
        "audit": {"keySecretName": o.audit_key_secret or "", "existingClaim": o.audit_claim or "", "size": o.audit_size,
                  "storageClassName": o.audit_storage_class or ""},
        "paths": {"tls": k.TLS_DIR, "apiKeys": k.KEYS_DIR, "auditKey": k.AUDIT_KEY_DIR, "audit": k.AUDIT_DIR},
        "tmpSize": k.TMP_SIZE,
        "preStopSeconds": k.PRE_STOP_S,
        "terminationGracePeriodSeconds": k.termination_grace_s(),
        "bundles": k.bundles_annotation(source),
        "sizingNotes": " | ".join(s.notes),
    }


def _schema(value: Any) -> dict[str, Any]:
    """A strict JSON schema of the values' shape: types as in values.yaml, no unknown keys (a typo is an error)."""
    if isinstance(value, dict):
        return {"type": "object", "additionalProperties": False, "properties": {k_: _schema(v) for k_, v in value.items()}}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    return {"type": "string"}


def values_schema(values: dict[str, Any]) -> dict[str, Any]:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **_schema(values)}
    props = schema["properties"]
    props["resources"] = {"type": "object"}  # any Kubernetes ResourceRequirements
    for key in ("minReplicas", "maxReplicas"):
        props["autoscaling"]["properties"][key]["minimum"] = 1
    props["autoscaling"]["properties"]["targetCPUUtilizationPercentage"].update(minimum=1, maximum=100)
    for key in ("threads", "instances", "maxBatch", "maxInflightMb"):
        props["server"]["properties"][key]["minimum"] = 1
    props["port"].update(minimum=1, maximum=65535)
    return schema


def write_chart(source: ModelSource, out: Path, o: k.K8sOptions, s: k.Sizing) -> Path:
    """Write the chart to `out/<name>/`; return that directory."""
    root = out / o.name
    (root / "templates").mkdir(parents=True, exist_ok=True)
    chart = {"apiVersion": "v2", "name": o.name, "description": f"cvdeploy inference server for {o.name}",
             "type": "application", "version": __version__, "appVersion": __version__, "kubeVersion": ">=1.23.0-0"}
    values = values_for(source, o, s)
    (root / "Chart.yaml").write_text(dump_yaml(chart, sort_keys=False))
    (root / "values.yaml").write_text(VALUES_HEADER + dump_yaml(values, sort_keys=False, width=1000))
    (root / "values.schema.json").write_text(json.dumps(values_schema(values), indent=2) + "\n")
    (root / ".helmignore").write_text("*.orig\n*.tmp\n.git/\n")
    for name, text in TEMPLATES.items():
        (root / "templates" / name).write_text(text)
    return root


VALUES_HEADER = """\
# cvdeploy's chart values. Sizing (resources, startupProbe, server.threads) was derived from the bundles: see
# sizingNotes and docs/deploy.md. Switches: tls.secretName (a kubernetes.io/tls Secret: HTTPS), apiKeys.secretName (a
# Secret with the key store as keys.db: API keys required, health probes open through --public-health),
# audit.keySecretName (a Secret with audit.key: the audit log, on a ReadWriteMany claim, one file per pod).
"""
