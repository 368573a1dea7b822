"""`cvdeploy package docker|k8s`: a container build context, Kubernetes/KServe manifests and a Helm chart."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console, fail

package_app = typer.Typer(no_args_is_help=True, help="Package bundles for deployment: a container image, Kubernetes and KServe "
                          "manifests, a Helm chart (see docs/deploy.md).")
app.add_typer(package_app, name="package")

SOURCE_HELP = "A bundle (served as version 1 of its model) or a model repository (DIR/<model>/<version>/ bundles)."


@package_app.command("docker")
def docker(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="The build context to write (a new directory)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port the server listens on in the container."),
    image: str | None = typer.Option(None, help="Image name:tag for compose.yaml [default: <model>:<digest of the bundles>]."),
    base_image: str | None = typer.Option(None, help="Python base image (pin a tag or digest) [default: this Python's "
                                          "exact version, slim]."),
    wheel: Path | None = typer.Option(None, help="cvdeploy's wheel to install [default: built from this source tree]."),
    from_index: bool = typer.Option(False, "--from-index", help="Install cvdeploy==<this version> from the package index "
                                    "instead of a wheel."),
    max_batch: int = typer.Option(8, min=1, help="Largest batch the server forms (enters the memory estimate)."),
    max_inflight_mb: int = typer.Option(256, min=1, help="Request memory the server admits at once (503 beyond)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a Dockerfile (slim runtime without torch, non-root, read-only root filesystem, HEALTHCHECK), .dockerignore,
    compose.yaml, the pinned requirements-runtime.txt, cvdeploy's wheel and the bundles (models/)."""
    from cvdeploy.deploy import load_source
    from cvdeploy.deploy.docker import check_dockerfile, write_docker

    ctx = write_docker(load_source(source), out, port=port, base_image=base_image, image=image, wheel=wheel,
                       from_index=from_index, force=force, max_batch=max_batch, inflight_mib=max_inflight_mb)
    broken = check_dockerfile(ctx.dockerfile.read_text(), port)
    if broken:  # a generator bug, said plainly rather than shipped
        raise fail(f"the generated Dockerfile breaks {'; '.join(broken)}")
    pins = sum(1 for line in ctx.lock.read_text().splitlines() if "==" in line)
    console.print(f"wrote {ctx.root}: Dockerfile, .dockerignore, compose.yaml, {ctx.lock.name} ({pins} pins), "
                  f"cvdeploy from {ctx.wheel}, models/", highlight=False)
    console.print(f"build: docker build -t {ctx.image} {ctx.root}", highlight=False)
    console.print(f"run:   docker compose -f {ctx.compose} up --build", highlight=False)


@package_app.command("k8s")
def k8s(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write k8s/, kserve/ and helm/ (a new directory)."),
    image: str | None = typer.Option(None, help="The image (from `cvdeploy package docker`), with a tag or digest "
                                     "[default: <model>:<digest of the bundles>, as package docker names it]."),
    name: str | None = typer.Option(None, help="Object name [default: the model's name]."),
    namespace: str | None = typer.Option(None, help="Namespace written into the manifests [default: none: kubectl -n]."),
    replicas: int = typer.Option(2, min=1, help="Replicas at least (the autoscaler's floor)."),
    max_replicas: int = typer.Option(10, min=1, help="Replicas at most."),
    target_cpu: int = typer.Option(70, min=1, max=100, help="Average CPU use (%) the autoscaler keeps pods at."),
    cpu: int | None = typer.Option(None, min=1, help="CPUs per pod [default: the threads the bundle's latency was measured with, "
                                   "at most 4]."),
    memory_mb: int | None = typer.Option(None, min=64, help="Memory per pod in MiB [default: estimated from the bundles]."),
    max_batch: int = typer.Option(8, min=1, help="Largest batch the server forms."),
    instances: int = typer.Option(1, min=1, help="Engine instances per model in each pod."),
    max_inflight_mb: int = typer.Option(256, min=1, help="Request memory the server admits at once (503 beyond)."),
    api_key_secret: str | None = typer.Option(None, help="Secret holding the API key store as keys.db: authentication on; "
                                              "probes use the server's --public-health."),
    tls_secret: str | None = typer.Option(None, help="kubernetes.io/tls Secret (tls.crt, tls.key): serve HTTPS."),
    audit_key_secret: str | None = typer.Option(None, help="Secret holding the audit log's key as audit.key: the audit log on, "
                                                "one file per pod on a ReadWriteMany volume."),
    audit_claim: str | None = typer.Option(None, help="An existing claim for the audit volume [default: one is created]."),
    audit_size: str = typer.Option("1Gi", help="Size of the audit claim created."),
    audit_storage_class: str | None = typer.Option(None, help="Storage class of the audit claim created."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget (k8s/), a KServe InferenceService
    (kserve/) and a Helm chart (helm/), sized from what the bundles record."""
    from cvdeploy.deploy import dns_name, load_source
    from cvdeploy.deploy.k8s import K8sOptions, default_image, size_for, write_k8s

    src = load_source(source)
    options = K8sOptions(name=name or dns_name(src.name), image=image or default_image(src), namespace=namespace,
                         replicas=replicas, max_replicas=max_replicas, target_cpu=target_cpu, max_batch=max_batch,
                         instances=instances, api_key_secret=api_key_secret, tls_secret=tls_secret,
                         audit_key_secret=audit_key_secret, audit_claim=audit_claim, audit_size=audit_size,
                         audit_storage_class=audit_storage_class)
    sizing = size_for(src, cpu=cpu, memory_mib=memory_mb, inflight_mib=max_inflight_mb, max_batch=max_batch, instances=instances)
    files = write_k8s(src, out, options, sizing, force=force)
    console.print(f"wrote {len(files)} files under {out}: k8s/ (kubectl apply -f), kserve/inferenceservice.yaml, "
                  f"helm/{options.name}/ (helm install {options.name} {out / 'helm' / options.name})", highlight=False)
    console.print(f"pod: {sizing.cpu} CPU, {sizing.memory_mib} MiB, image {options.image}", highlight=False)
    for note in sizing.notes:
        console.print(f"  {note}", highlight=False)



@package_app.command("monitoring")
def monitoring(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write prometheus/ and grafana/ (a new directory)."),
    p99_budget_ms: float | None = typer.Option(None, min=0.001, help="The p99 latency the alert holds the server to "
                                               "[default: --budget-factor x the bundle's recorded engine latency]."),
    budget_factor: float = typer.Option(5.0, min=1.0, help="p99 budget as a multiple of the recorded median engine latency."),
    error_ratio: float = typer.Option(0.05, min=0.0, max=1.0, help="Share of failed requests that fires the error alert."),
    drift_threshold: float = typer.Option(1.0, min=0.0, help="cvdeploy_drift_score that fires the drift alert (1: serious)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write Prometheus alert rules (errors, p99 latency, readiness, drift) and a Grafana dashboard for the server's
    metrics (see docs/monitoring.md)."""
    from cvdeploy.deploy import load_source
    from cvdeploy.deploy.monitoring import AlertOptions, models_of, write_monitoring

    files = write_monitoring(models_of(load_source(source)), out,
                             AlertOptions(p99_budget_s=None if p99_budget_ms is None else p99_budget_ms / 1000,
                                          budget_factor=budget_factor, error_ratio=error_ratio,
                                          drift_threshold=drift_threshold), force=force)
    console.print(f"wrote {files.rules} and {files.dashboard}", highlight=False)
    for name, budget in files.budgets.items():
        console.print(f"  {name}: p99 budget {budget.seconds * 1000:.1f} ms ({budget.why})", highlight=False)
