"""The pod every object runs (the Deployment's, the InferenceService's, the chart's): its container, volumes, labels,
security context, the `cvdeploy serve` arguments, and the paths and figures the chart and the image share with it."""

from __future__ import annotations

import math
from typing import Any

from cvdeploy import __version__
from cvdeploy.deploy import MODELS_DIR, ModelSource
from cvdeploy.deploy.k8s_options import K8sOptions, bundles_annotation
from cvdeploy.deploy.k8s_sizing import Sizing

PORT = 8000
KSERVE_PORT = 8080  # KServe's default port for a custom predictor container
UID = 10001  # the image's user (docker.py creates it)
TLS_DIR = "/var/run/secrets/cvdeploy/tls"  # a kubernetes.io/tls Secret: tls.crt, tls.key
KEYS_DIR = "/var/run/secrets/cvdeploy/keys"  # a Secret with the API key store (`cvdeploy security keys`) as keys.db
AUDIT_KEY_DIR = "/var/run/secrets/cvdeploy/audit"  # a Secret with the audit log's key as audit.key
AUDIT_DIR = "/var/lib/cvdeploy/audit"  # the audit volume: one log per pod, named after it
KEYS_FILE, AUDIT_KEY_FILE = "keys.db", "audit.key"
PRE_STOP_S = 5  # endpoints drop a terminating pod a moment after it is told to stop: keep serving meanwhile
# Shared with the Helm chart's templates and values, so that the chart renders what the manifests say.
PULL_POLICY = "IfNotPresent"
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"
PROBE_TIMEOUT_S = 2
SECRET_MODE = 0o440  # secrets readable by the pod's user and group only
TMP_SIZE = "256Mi"


def labels(o: K8sOptions) -> dict[str, str]:
    return {**selector(o), "app.kubernetes.io/version": __version__, "app.kubernetes.io/component": "predictor",
            "app.kubernetes.io/part-of": "cvdeploy", "app.kubernetes.io/managed-by": "cvdeploy"}


def selector(o: K8sOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": o.name, "app.kubernetes.io/instance": o.name}


def serve_args(o: K8sOptions, s: Sizing, port: int = PORT) -> list[str]:
    """`cvdeploy serve` arguments (the image's entrypoint) for the pod."""
    args = ["--repository", MODELS_DIR, "--host", "0.0.0.0", "--port", str(port), "--threads", str(s.threads // o.instances),
            "--instances", str(o.instances), "--max-batch", str(o.max_batch), "--max-inflight-mb", str(s.inflight_mib)]
    if o.tls_secret:
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    if o.api_key_secret:
        # Probes carry no credentials: the health routes stay open, everything else needs a key.
        args += ["--auth-keys", f"{KEYS_DIR}/{KEYS_FILE}", "--public-health"]
    if o.audit:
        args += ["--audit-log", f"{AUDIT_DIR}/$(POD_NAME).db", "--audit-key-file", f"{AUDIT_KEY_DIR}/{AUDIT_KEY_FILE}"]
    return args


def _probe(path: str, port: int | str, scheme: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port, "scheme": scheme}, "periodSeconds": period,
            "timeoutSeconds": PROBE_TIMEOUT_S, "failureThreshold": failures}


def container(o: K8sOptions, s: Sizing, *, name: str = "server", port: int = PORT, port_name: str = "http",
              probe_port: int | str = "http") -> dict[str, Any]:
    ref = probe_port
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if o.tls_secret:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if o.api_key_secret:
        mounts.append({"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True})
    if o.audit:
        mounts += [{"name": "audit-key", "mountPath": AUDIT_KEY_DIR, "readOnly": True}, {"name": "audit", "mountPath": AUDIT_DIR}]
    c: dict[str, Any] = {
        "name": name,
        "image": o.image,
        "imagePullPolicy": PULL_POLICY,
        "args": serve_args(o, s, port),
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": s.resources(),
        "startupProbe": _probe(READY_PATH, ref, o.scheme, 5, math.ceil(s.startup_s / 5)),
        "readinessProbe": _probe(READY_PATH, ref, o.scheme, 5, 3),
        "livenessProbe": _probe(LIVE_PATH, ref, o.scheme, 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    return c


def volumes(o: K8sOptions) -> list[dict[str, Any]]:
    # /tmp: the root filesystem is read-only; large multipart uploads spool here.
    out: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}}]
    if o.tls_secret:
        out.append({"name": "tls", "secret": {"secretName": o.tls_secret, "defaultMode": SECRET_MODE}})
    if o.api_key_secret:
        out.append({"name": "api-keys", "secret": {"secretName": o.api_key_secret, "defaultMode": SECRET_MODE,
                                                   "items": [{"key": KEYS_FILE, "path": KEYS_FILE}]}})
    if o.audit:
        out += [{"name": "audit-key", "secret": {"secretName": o.audit_key_secret, "defaultMode": SECRET_MODE,
                                                 "items": [{"key": AUDIT_KEY_FILE, "path": AUDIT_KEY_FILE}]}},
                {"name": "audit", "persistentVolumeClaim": {"claimName": o.audit_claim_name}}]
    return out


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def pod_annotations(o: K8sOptions, source: ModelSource) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics",
            "prometheus.io/scheme": o.scheme.lower(), "cvdeploy.io/bundles": bundles_annotation(source)}


def termination_grace_s() -> int:
    return PRE_STOP_S + 30 + 10  # the pre-stop pause, the request timeout, the drain
