"""Kubernetes manifests (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget, the audit claim) and a KServe
InferenceService for the image `cvdeploy package docker` builds, with resources sized from what the bundles record.

Sizing (`size_for`; docs/deploy.md shows the figures for the demo bundle):

    memory  = baseline 192 MiB (Python, NumPy, OpenCV, ONNX Runtime, the server: 160-200 MiB measured idle)
              + per model version: 2 x its largest ONNX variant (the file, and the session's copy of the weights)
              + per instance and version: max_batch x the input tensor's bytes x 8 (activations, measured with YOLO11n)
              + the request budget (`--max-inflight-mb`, given to the server so that it answers 503 before the pod
                would be killed for memory)
              rounded up to 64 MiB; requests = limits (Guaranteed QoS: evicted last; whole CPUs can be pinned).
    cpu     = the engine threads the recorded latency was measured with (the `bench tune` hint, else the build
              machine's cores), at most 4; requests = limits, and the server gets `--threads` to match: ONNX Runtime
              otherwise starts one thread per core of the node, not of the pod, and is throttled.
    startup = 20 s + 1 s per 20 MiB of weights (hash check, session) + warm-up (2 runs at batch 1 and at max_batch per
              instance, at 3 x the recorded latency: the node may be slower), at least 30 s: the startup probe's budget.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cvdeploy import __version__
from cvdeploy.deploy import MODELS_DIR, ModelSource, check_dns_name
from cvdeploy.errors import InputError

PORT = 8000
KSERVE_PORT = 8080  # KServe's default port for a custom predictor container
UID = 10001  # the image's user (docker.py creates it)
TLS_DIR = "/var/run/secrets/cvdeploy/tls"  # a kubernetes.io/tls Secret: tls.crt, tls.key
KEYS_DIR = "/var/run/secrets/cvdeploy/keys"  # a Secret with the API key store (`cvdeploy security keys`) as keys.db
AUDIT_KEY_DIR = "/var/run/secrets/cvdeploy/audit"  # a Secret with the audit log's key as audit.key
AUDIT_DIR = "/var/lib/cvdeploy/audit"  # the audit volume: one log per pod, named after it
KEYS_FILE, AUDIT_KEY_FILE = "keys.db", "audit.key"
BASELINE_MIB = 192
ACTIVATION_FACTOR = 8
MAX_CPU = 4
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PRE_STOP_S = 5  # endpoints drop a terminating pod a moment after it is told to stop: keep serving meanwhile


class Sizing(BaseModel):
    """Pod resources and probe budgets derived from the bundles; `notes` say where each figure came from."""

    model_config = ConfigDict(extra="forbid")

    cpu: int = Field(ge=1)
    memory_mib: int = Field(ge=64)
    inflight_mib: int = Field(ge=1)
    startup_s: int = Field(ge=1)
    latency_ms: float | None = None  # the first model's default variant, batch 1, as recorded
    expected_rps: float | None = None  # per pod at batch 1 on a machine like the one that measured
    notes: list[str] = Field(default_factory=list)

    @property
    def threads(self) -> int:
        return self.cpu

    def resources(self) -> dict[str, Any]:
        both = {"cpu": str(self.cpu), "memory": f"{self.memory_mib}Mi"}
        return {"requests": dict(both), "limits": dict(both)}


def size_for(source: ModelSource, *, cpu: int | None = None, memory_mib: int | None = None, inflight_mib: int = 256,
             max_batch: int = 8, instances: int = 1, warmup_runs: int = 2) -> Sizing:
    """The pod's resources for serving `source` (see the module's docstring for the formulas)."""
    notes: list[str] = []
    weights = 0
    activations = 0
    for b in source.bundles:
        m = b.manifest
        onnx = [v for v in m.variants.values() if v.format == "onnx"]
        biggest = max((v.size_bytes + _companion_bytes(b, v) for v in onnx), default=0)
        h, w = m.preprocess.imgsz
        weights += biggest
        activations += instances * max_batch * 3 * h * w * 4 * ACTIVATION_FACTOR
    model_mib = math.ceil((2 * weights + activations) / 2**20)
    needed = BASELINE_MIB + model_mib + inflight_mib
    notes.append(f"memory: {BASELINE_MIB} MiB baseline + {model_mib} MiB for the models (2 x {weights / 2**20:.1f} MiB of "
                 f"weights, activations for batches of {max_batch} x {instances} instance(s)) + {inflight_mib} MiB of "
                 "requests in flight")
    mem = memory_mib if memory_mib is not None else 64 * math.ceil(needed / 64)
    if memory_mib is not None:
        notes.append(f"memory: {memory_mib} MiB as given (the estimate was {needed} MiB)")
    if mem < needed:
        raise InputError(f"--memory-mb {mem} is below what the models need ({needed} MiB with {inflight_mib} MiB of requests "
                         "in flight): raise it, or lower --max-inflight-mb or --max-batch")

    first = source.bundles[0]
    latency_ms, measured_threads, how = _recorded_latency(first)
    if cpu is None:
        if measured_threads:
            cpu = min(MAX_CPU, measured_threads)
            notes.append(f"cpu: {cpu}, the threads {first.name}'s latency was measured with ({how}; at most {MAX_CPU})")
        else:
            cpu = 2
            notes.append("cpu: 2, a default: the bundle records no latency measurement to size from (`cvdeploy bench tune`)")
    else:
        notes.append(f"cpu: {cpu} as given")
    if cpu % instances:
        raise InputError(f"--cpu {cpu} does not split evenly among {instances} instances")
    load_s = weights / 2**20 / 20
    warm_s = 0.0
    expected = None
    if latency_ms is not None:
        warm_s = len(source.bundles) * instances * warmup_runs * (1 + max_batch) * latency_ms * 3 / 1000
        expected = round(instances * 1000 / latency_ms, 1)
        notes.append(f"latency: {latency_ms:.2f} ms at batch 1 ({how}); about {expected} requests/s per pod at batch 1 on "
                     "such a machine")
    else:
        notes.append("latency: none recorded in the bundle (`cvdeploy bench tune` records it); the startup budget assumes "
                     "a quick warm-up")
        warm_s = 10.0
    startup = max(30, math.ceil(20 + load_s + warm_s))
    notes.append(f"startup: {startup} s for the startup probe (20 s + {load_s:.1f} s loading + {warm_s:.1f} s warming up)")
    return Sizing(cpu=cpu, memory_mib=mem, inflight_mib=inflight_mib, startup_s=startup, latency_ms=latency_ms,
                  expected_rps=expected, notes=notes)


def _companion_bytes(bundle: Any, variant: Any) -> int:
    if not variant.companions or bundle.root is None:
        return 0
    base = (bundle.root / variant.file).parent
    return sum((base / name).stat().st_size for name in variant.companions if (base / name).is_file())


def _recorded_latency(bundle: Any) -> tuple[float | None, int | None, str]:
    """(ms at batch 1 of the default variant, the engine threads it ran with, how it was measured), newest first:
    the tuned hint, else the newest latency record (measured with the engine's default: one thread per core)."""
    m = bundle.manifest
    hint = bundle.runtime_hint(m.default_variant)
    if hint is not None and hint.intra_op_threads > 0:
        return hint.tuned_ms, hint.intra_op_threads, f"`bench tune` on {hint.cpu or 'the tuning machine'}"
    record = next((r for r in reversed(m.latencies) if m.default_variant in r.variants), None)
    if record is None:
        return None, None, "nothing recorded"
    cpu = m.environment.get("cpu")
    cores = cpu.get("logical_cpus") if isinstance(cpu, dict) else None
    cores = cores if isinstance(cores, int) and cores > 0 else None
    return record.variants[m.default_variant], cores, f"{record.how or 'measured'} on {record.cpu or 'the build machine'}, " \
        f"{cores or 'an unknown number of'} cores, the engine's default threads"


# -- options -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class K8sOptions:
    """What `cvdeploy package k8s` asks for; every manifest, the InferenceService and the chart's values come from it."""

    name: str
    image: str
    namespace: str | None = None
    replicas: int = 2  # replicas at least (the autoscaler's floor)
    max_replicas: int = 10
    target_cpu: int = 70  # average CPU use the autoscaler keeps pods at (%)
    max_batch: int = 8
    instances: int = 1
    api_key_secret: str | None = None  # Secret holding keys.db: authentication on, probes through --public-health
    tls_secret: str | None = None  # kubernetes.io/tls Secret: HTTPS, probes over HTTPS
    audit_key_secret: str | None = None  # Secret holding audit.key: the audit log on, on a volume
    audit_claim: str | None = None  # an existing claim for the audit volume (else one is created)
    audit_size: str = "1Gi"
    audit_storage_class: str | None = None

    def __post_init__(self) -> None:
        check_dns_name(self.name)
        if self.namespace is not None:
            check_dns_name(self.namespace, "--namespace")
        for what, value in (("--replicas", self.replicas), ("--max-replicas", self.max_replicas),
                            ("--max-batch", self.max_batch), ("--instances", self.instances)):
            if value < 1:
                raise InputError(f"{what} must be at least 1, got {value}")
        if not 1 <= self.target_cpu <= 100:
            raise InputError(f"--target-cpu is a percentage (1 to 100), got {self.target_cpu}")
        if self.max_replicas < self.replicas:
            raise InputError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")
        for what, value in (("--api-key-secret", self.api_key_secret), ("--tls-secret", self.tls_secret),
                            ("--audit-key-secret", self.audit_key_secret), ("--audit-claim", self.audit_claim),
                            ("--audit-storage-class", self.audit_storage_class)):
            if value is not None and not _DNS_SUBDOMAIN.match(value):
                raise InputError(f"{what} {value!r} is not a Kubernetes object name (lower case letters, digits, '-' and '.')")
        if not _QUANTITY.match(self.audit_size):
            raise InputError(f"--audit-size {self.audit_size!r} is not a Kubernetes quantity (e.g. 1Gi, 500Mi)")
        last = self.image.rsplit("/", 1)[-1]
        if "@" not in last and (":" not in last or last.endswith(":latest")):
            raise InputError(f"--image {self.image!r}: give a tag or a digest other than `latest` (a rollout must know what it runs)")
        if self.audit_claim and not self.audit_key_secret:
            raise InputError("--audit-claim needs --audit-key-secret (the key that authenticates the log's chain)")

    @property
    def audit(self) -> bool:
        return self.audit_key_secret is not None

    @property
    def scheme(self) -> str:
        return "HTTPS" if self.tls_secret else "HTTP"

    @property
    def audit_claim_name(self) -> str:
        return self.audit_claim or f"{self.name}-audit"


def default_image(source: ModelSource) -> str:
    """`<name>:<tag>`, the tag a digest of the bundles' content hashes: a new bundle is a new tag, never `latest`."""
    from cvdeploy.deploy import dns_name

    digest = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(_content_hashes(source).items())).encode())
    return f"{dns_name(source.name)}:{digest.hexdigest()[:12]}"


def _content_hashes(source: ModelSource) -> dict[str, str]:
    out = {}
    for name, versions in source.models.items():
        for v, b in versions.items():
            out[f"{name}/{v}"] = b.manifest.content_sha256 or b.manifest.created_at
    return out


# -- the pod -----------------------------------------------------------------------------------------------------------


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
    return {"httpGet": {"path": path, "port": port, "scheme": scheme}, "periodSeconds": period, "timeoutSeconds": 2,
            "failureThreshold": failures}


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
        "imagePullPolicy": "IfNotPresent",
        "args": serve_args(o, s, port),
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": s.resources(),
        "startupProbe": _probe("/v2/health/ready", ref, o.scheme, 5, math.ceil(s.startup_s / 5)),
        "readinessProbe": _probe("/v2/health/ready", ref, o.scheme, 5, 3),
        "livenessProbe": _probe("/v2/health/live", ref, o.scheme, 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    return c


def volumes(o: K8sOptions) -> list[dict[str, Any]]:
    # /tmp: the root filesystem is read-only; large multipart uploads spool here.
    out: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
    if o.tls_secret:
        out.append({"name": "tls", "secret": {"secretName": o.tls_secret, "defaultMode": 0o440}})
    if o.api_key_secret:
        out.append({"name": "api-keys", "secret": {"secretName": o.api_key_secret, "defaultMode": 0o440,
                                                   "items": [{"key": KEYS_FILE, "path": KEYS_FILE}]}})
    if o.audit:
        out += [{"name": "audit-key", "secret": {"secretName": o.audit_key_secret, "defaultMode": 0o440,
                                                 "items": [{"key": AUDIT_KEY_FILE, "path": AUDIT_KEY_FILE}]}},
                {"name": "audit", "persistentVolumeClaim": {"claimName": o.audit_claim_name}}]
    return out


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def pod_annotations(o: K8sOptions, source: ModelSource) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics",
            "prometheus.io/scheme": o.scheme.lower(), "cvdeploy.io/bundles": _bundles_annotation(source)}


def _bundles_annotation(source: ModelSource) -> str:
    return ",".join(f"{k}={v}" for k, v in _content_hashes(source).items())


def _meta(o: K8sOptions, name: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(o)}
    if o.namespace:
        meta["namespace"] = o.namespace
    if extra:
        meta["annotations"] = extra
    return meta


def termination_grace_s() -> int:
    return PRE_STOP_S + 30 + 10  # the pre-stop pause, the request timeout, the drain


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
    return header + yaml.safe_dump(obj, sort_keys=False, width=1000)


def write_k8s(source: ModelSource, out: str | os.PathLike[str], o: K8sOptions, s: Sizing, *, force: bool = False) -> list[Path]:
    """Write `out/k8s/*.yaml`, `out/kserve/inferenceservice.yaml` and the Helm chart `out/helm/<name>/`; return the files."""
    from cvdeploy.deploy.helm import write_chart

    root = Path(out)
    if root.exists():
        if not force:
            raise InputError(f"{root} already exists; choose another -o or pass --force to replace it")
        shutil.rmtree(root)
    header = (f"# cvdeploy {__version__} for {_bundles_annotation(source)}; generated by `cvdeploy package k8s`.\n"
              + "".join(f"# {note}\n" for note in s.notes))
    (root / "k8s").mkdir(parents=True)
    for name, obj in manifests(source, o, s).items():
        (root / "k8s" / name).write_text(dump(obj, header))
    (root / "kserve").mkdir()
    (root / "kserve" / "inferenceservice.yaml").write_text(dump(inference_service(source, o, s), header))
    write_chart(source, root / "helm", o, s)
    return sorted(p for p in root.rglob("*") if p.is_file())
