"""What `cvdeploy package k8s` asks for (`K8sOptions`, checked when built) and the names it derives from the bundles:
the default image tag and the bundles' content hashes every object carries."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cvdeploy.deploy import ModelSource, check_dns_name, dns_name
from cvdeploy.errors import InputError

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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
    digest = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(_content_hashes(source).items())).encode())
    return f"{dns_name(source.name)}:{digest.hexdigest()[:12]}"


def _content_hashes(source: ModelSource) -> dict[str, str]:
    out = {}
    for name, versions in source.models.items():
        for v, b in versions.items():
            out[f"{name}/{v}"] = b.manifest.content_sha256 or b.manifest.created_at
    return out


def bundles_annotation(source: ModelSource) -> str:
    """`<model>/<version>=<content hash>,...`: what an image or an object serves, written on each."""
    return ",".join(f"{k}={v}" for k, v in _content_hashes(source).items())
