"""Regenerate kserve-inferenceservice-v1beta1.json, the JSON schema the InferenceService is validated against.

    pip download --no-deps kserve==0.21.0            # the KServe Python SDK: no need to install it
    python tests/deploy/schemas/make_kserve_schema.py kserve-0.21.0-py3-none-any.whl 1.36 \
        > tests/deploy/schemas/kserve-inferenceservice-v1beta1.json

Where it comes from. KServe's InferenceService CRD (config/crd/full/serving.kserve.io_inferenceservices.yaml, 1 MB)
and its Python SDK are both generated from the same Go API types (pkg/apis/serving/v1beta1). The SDK's models carry
every field's JSON name and type (`attribute_map`, `openapi_types`) and its required fields (the setters that refuse
None); this script reads them from the wheel (never imports it) and writes the schema:

- every KServe type as an object with exactly its fields (additionalProperties false: kubectl's default strict field
  validation refuses unknown fields, which the CRD's structural schema would otherwise prune silently);
- every Kubernetes type (Container, Volume, PodSecurityContext, ...) from kubernetes-validate's schema of the Kubernetes
  version given (the SDK 0.21 uses 1.36 types), descriptions removed, inlined under $defs;
- Knative and KEDA status types left open (the InferenceService written by cvdeploy sets none of them);
- the CRD's own constraints from the Go markers (kserve pkg/apis/serving/v1beta1/component.go): scaleMetric is one of
  cpu, memory, concurrency, rps; and the admission webhook's (same file): min/maxReplicas >= 0, the name a DNS label
  starting with a letter.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"}, "float": {"type": "number"},
    "object": {}, "datetime": {"type": "string"}, "date": {"type": "string"},
}
OPEN = {"type": "object", "$comment": "a Knative/KEDA/net type cvdeploy does not set: left open"}
K8S_ALIASES = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior",
}


def read_models(wheel: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not re.fullmatch(r"kserve/models/v1(alpha\d|beta\d)_\w+\.py", name):
                continue
            src = z.read(name).decode()
            cls = re.search(r"^class (\w+)\(object\):", src, re.M)
            types = re.search(r"openapi_types = (\{.*?\})\n", src, re.S)
            attrs = re.search(r"attribute_map = (\{.*?\})\n", src, re.S)
            if not (cls and types and attrs):
                continue
            required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", src)
            out[cls.group(1)] = {"types": ast.literal_eval(types.group(1)), "json": ast.literal_eval(attrs.group(1)),
                                 "required": sorted(set(required))}
    return out


def k8s_name(py: str, defs: dict[str, Any]) -> str | None:
    if py in K8S_ALIASES:
        return K8S_ALIASES[py]
    m = re.fullmatch(r"V1(\w+)", py)
    if not m:
        return None
    for prefix in ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1.", "io.k8s.api.apps.v1."):
        if prefix + m.group(1) in defs:
            return prefix + m.group(1)
    return None


def build(wheel: Path, k8s_version: str) -> dict[str, Any]:
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{k8s_version}.0-local-strict"
    k8s_defs = json.loads((base / "_definitions.json").read_text())["$defs"]
    models = read_models(wheel)
    defs: dict[str, Any] = {}
    k8s_wanted: set[str] = set()

    def type_schema(t: str) -> dict[str, Any]:
        t = t.strip()
        if t in PRIMITIVES:
            return dict(PRIMITIVES[t])
        if m := re.fullmatch(r"list\[(.+)\]", t):
            return {"type": "array", "items": type_schema(m.group(1))}
        if m := re.fullmatch(r"dict\(str, (.+)\)", t):
            return {"type": "object", "additionalProperties": type_schema(m.group(1))}
        if t in models:
            add_model(t)
            return {"$ref": f"#/$defs/{t}"}
        if (k := k8s_name(t, k8s_defs)) is not None:
            k8s_wanted.add(k)
            return {"$ref": f"#/$defs/{k}"}
        return dict(OPEN)

    def add_model(name: str) -> None:
        if name in defs:
            return
        defs[name] = {}  # a placeholder against recursion
        m = models[name]
        props = {m["json"][attr]: type_schema(t) for attr, t in m["types"].items()}
        schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
        if m["required"]:
            schema["required"] = [m["json"][a] for a in m["required"]]
        defs[name] = schema

    add_model("V1beta1InferenceService")
    root = defs["V1beta1InferenceService"]
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    root["properties"]["status"] = dict(OPEN)
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    # The CRD's and the webhook's constraints (kserve pkg/apis/serving/v1beta1/component.go).
    for comp in ("V1beta1PredictorSpec", "V1beta1TransformerSpec", "V1beta1ExplainerSpec"):
        props = defs[comp]["properties"]
        props["scaleMetric"] = {"enum": ["cpu", "memory", "concurrency", "rps"], "$comment": "kubebuilder:validation:Enum"}
        props["minReplicas"] = {"type": "integer", "minimum": 0, "$comment": "webhook: validateReplicas"}
        props["maxReplicas"] = {"type": "integer", "minimum": 0, "$comment": "webhook: validateReplicas"}
    root["properties"]["metadata"] = {"allOf": [
        {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        {"properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}},
         "required": ["name"], "$comment": "webhook: InvalidISVCNameFormatError"}]}
    k8s_wanted.add("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")

    todo = list(k8s_wanted)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        d = strip(k8s_defs[name])
        defs[name] = d
        todo += [r.split("/")[-1] for r in refs(d) if r.split("/")[-1] not in defs]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"KServe InferenceService serving.kserve.io/v1beta1, from the kserve {wheel.name} SDK models and "
                        f"Kubernetes {k8s_version} types (kubernetes-validate); made by make_kserve_schema.py",
            "$ref": "#/$defs/V1beta1InferenceService", "$defs": dict(sorted(defs.items()))}


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description" and not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


if __name__ == "__main__":
    json.dump(build(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "1.36"), sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")
