"""Kubernetes manifests (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget, the audit claim) and a KServe
InferenceService for the image `cvdeploy package docker` builds, with resources sized from what the bundles record.

The objects are assembled here from the options (`k8s_options`), the sizing (`k8s_sizing`, whose docstring gives the
formulas) and the pod (`k8s_pod`); the public names of those modules are imported from here as they always were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cvdeploy import __version__
from cvdeploy.deploy import ModelSource, clear_output, dump_yaml
from cvdeploy.deploy.k8s_options import K8sOptions, bundles_annotation, default_image
from cvdeploy.deploy.k8s_pod import (
    AUDIT_DIR,
    AUDIT_KEY_DIR,
    AUDIT_KEY_FILE,
    KEYS_DIR,
    KEYS_FILE,
    KSERVE_PORT,
    LIVE_PATH,
    PORT,
    PRE_STOP_S,
    PROBE_TIMEOUT_S,
    PULL_POLICY,
    READY_PATH,
    SECRET_MODE,
    TLS_DIR,
    TMP_SIZE,
    UID,
    container,
    labels,
    pod_annotations,
    pod_security,
    selector,
    serve_args,
    termination_grace_s,
    volumes,
)
from cvdeploy.deploy.k8s_sizing import ACTIVATION_FACTOR, BASELINE_MIB, MAX_CPU, Sizing, size_for

__all__ = [
    "ACTIVATION_FACTOR",
    "AUDIT_DIR",
    "AUDIT_KEY_DIR",
    "AUDIT_KEY_FILE",
    "BASELINE_MIB",
    "KEYS_DIR",
    "KEYS_FILE",
    "KSERVE_PORT",
    "LIVE_PATH",
    "MAX_CPU",
    "PORT",
    "PRE_STOP_S",
    "PROBE_TIMEOUT_S",
    "PULL_POLICY",
    "READY_PATH",
    "SECRET_MODE",
    "TLS_DIR",
    "TMP_SIZE",
    "UID",
    "K8sOptions",
    "Sizing",
    "audit_claim",
    "bundles_annotation",
    "container",
    "default_image",
    "dump",
    "inference_service",
    "labels",
    "manifests",
    "pod_annotations",
    "pod_security",
    "selector",
    "serve_args",
    "size_for",
    "termination_grace_s",
    "volumes",
    "write_k8s",
]


def _meta(o: K8sOptions, name: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(o)}
    if o.namespace:
        meta["namespace"] = o.namespace
    if extra:
        meta["annotations"] = extra
    return meta


# -- the objects -------------------------------------------------------------------------------------------------------


def manifests(source: ModelSource, o: K8sOptions, s: Sizing) -> dict[str, dict[str, Any]]:
    """File name -> object: the Deployment, its Service, autoscaler and disruption budget, and the audit claim."""
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security(),
        "terminationGracePeriodSeconds": termination_grace_s(),
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector(o)}}],
        "containers": [container(o, s)],
        "volumes": volumes(o),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(o, o.name, {"cvdeploy.io/sizing": " | ".join(s.notes)}),
        "spec": {
            # No `replicas`: the autoscaler owns the count (a re-apply would reset it); it starts at its floor.
            "selector": {"matchLabels": selector(o)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(o), "annotations": pod_annotations(o, source)}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(o, o.name),
        "spec": {"type": "ClusterIP", "selector": selector(o),
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(o, o.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.name},
            "minReplicas": o.replicas, "maxReplicas": o.max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                                  "averageUtilization": o.target_cpu}}}],
            # Up at once (a new pod needs its warm-up anyway), down only after five calm minutes.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }
    pdb = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(o, o.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(o)}},
    }
    out = {"deployment.yaml": deployment, "service.yaml": service, "hpa.yaml": hpa, "pdb.yaml": pdb}
    if o.audit and not o.audit_claim:
        out["audit-pvc.yaml"] = audit_claim(o)
    return out


def audit_claim(o: K8sOptions) -> dict[str, Any]:
    # Every replica writes its own log file on it: ReadWriteMany, on storage with POSIX locks (SQLite).
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": o.audit_size}}}
    if o.audit_storage_class:
        spec["storageClassName"] = o.audit_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(o, o.audit_claim_name), "spec": spec}


def inference_service(source: ModelSource, o: K8sOptions, s: Sizing) -> dict[str, Any]:
    """A KServe InferenceService (serving.kserve.io/v1beta1): the same container as a custom predictor speaking the v2
    protocol, in RawDeployment mode (a Deployment and an HPA, no Knative) so that every pod field above is allowed."""
    c = container(o, s, name="kserve-container", port=KSERVE_PORT, port_name="http1", probe_port=KSERVE_PORT)
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": _meta(o, o.name, {"serving.kserve.io/deploymentMode": "RawDeployment",
                                      "serving.kserve.io/autoscalerClass": "hpa"}),
        "spec": {"predictor": {
            "minReplicas": o.replicas, "maxReplicas": o.max_replicas, "scaleMetric": "cpu", "scaleTarget": o.target_cpu,
            "labels": labels(o), "annotations": {**pod_annotations(o, source), "prometheus.io/port": str(KSERVE_PORT)},
            "deploymentStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "automountServiceAccountToken": False,
            "securityContext": pod_security(),
            "terminationGracePeriodSeconds": termination_grace_s(),
            "containers": [c],
            "volumes": volumes(o),
        }},
    }


# -- writing -----------------------------------------------------------------------------------------------------------


def dump(obj: dict[str, Any], header: str = "") -> str:
    return header + dump_yaml(obj, sort_keys=False, width=1000)


def write_k8s(source: ModelSource, out: str | os.PathLike[str], o: K8sOptions, s: Sizing, *, force: bool = False) -> list[Path]:
    """Write `out/k8s/*.yaml`, `out/kserve/inferenceservice.yaml` and the Helm chart `out/helm/<name>/`; return the files."""
    from cvdeploy.deploy.helm import write_chart

    root = clear_output(out, force)
    header = (f"# cvdeploy {__version__} for {bundles_annotation(source)}; generated by `cvdeploy package k8s`.\n"
              + "".join(f"# {note}\n" for note in s.notes))
    (root / "k8s").mkdir(parents=True)
    for name, obj in manifests(source, o, s).items():
        (root / "k8s" / name).write_text(dump(obj, header))
    (root / "kserve").mkdir()
    (root / "kserve" / "inferenceservice.yaml").write_text(dump(inference_service(source, o, s), header))
    write_chart(source, root / "helm", o, s)
    return sorted(p for p in root.rglob("*") if p.is_file())
