"""deploy/k8s against the operators' own schemas: the PyTorchJob against training-operator
v1.9's CRD, the PodMonitor and PrometheusRule against prometheus-operator's (vendored
under tests/data/crds, see its README). A misspelt field or a wrong type fails here,
not silently on a cluster; the planted cases show that it does."""

from __future__ import annotations

import copy
import functools

import jsonschema
import pytest
import yaml

from conftest import REPO

CRDS = REPO / "tests" / "data" / "crds"
K8S = REPO / "deploy" / "k8s"
CRD_FILES = {
    ("kubeflow.org", "PyTorchJob"): CRDS / "kubeflow.org_pytorchjobs.yaml",
    ("monitoring.coreos.com", "PodMonitor"): CRDS / "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): CRDS / "monitoring.coreos.com_prometheusrules.yaml",
}


def strict(schema):
    """The CRD's schema as the API server applies it with `kubectl apply --validate=strict`,
    in JSON Schema terms.

    Kubernetes *prunes* fields a structural schema does not declare (and strict field
    validation rejects them), unless the object says x-kubernetes-preserve-unknown-fields;
    JSON Schema allows undeclared properties unless additionalProperties is false. So every
    object schema that lists `properties`, declares no `additionalProperties` (a map) and
    does not preserve unknown fields gets additionalProperties: false. An object schema
    without `properties` (the CRD's `metadata`, checked by the API server as ObjectMeta)
    stays open. x-kubernetes-int-or-string becomes "integer or string". CEL rules
    (x-kubernetes-validations) and formats are not evaluated."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str) -> dict:
    group, version = api_version.split("/")
    crd = yaml.load(CRD_FILES[(group, kind)].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{kind} {api_version} is not served by this CRD"
    return strict(v["schema"]["openAPIV3Schema"])


def manifests() -> dict[str, dict]:
    objs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objs[doc["kind"]] = doc
    return objs


def errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(obj["apiVersion"], obj["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict]:
    return manifests()


@pytest.mark.parametrize("kind", ["PyTorchJob", "PodMonitor", "PrometheusRule"])
def test_shipped_manifest_matches_its_crd(shipped, kind):
    assert errors(shipped[kind]) == []


def _container(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


def _rule(pr: dict) -> dict:
    return pr["spec"]["groups"][0]["rules"][0]


# (kind, what is planted, how, the path the error must name)
PLANTED = [
    ("PyTorchJob", "unknown field at the top of spec",
     lambda o: o["spec"].__setitem__("nprocsPerNode", "1"), "spec"),
    ("PyTorchJob", "unknown field in elasticPolicy",
     lambda o: o["spec"]["elasticPolicy"].__setitem__("minReplica", 2), "spec.elasticPolicy"),
    ("PyTorchJob", "unknown field deep in the pod template",
     lambda o: _container(o).__setitem__("envs", []), "spec.pytorchReplicaSpecs.Worker.template.spec.containers.0"),
    ("PyTorchJob", "nprocPerNode as a number (the schema says string)",
     lambda o: o["spec"].__setitem__("nprocPerNode", 1), "spec.nprocPerNode"),
    ("PyTorchJob", "replicas as a string",
     lambda o: o["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("replicas", "4"),
     "spec.pytorchReplicaSpecs.Worker.replicas"),
    ("PyTorchJob", "an env value that is a number",
     lambda o: _container(o)["env"][0].__setitem__("value", 2),
     "spec.pytorchReplicaSpecs.Worker.template.spec.containers.0.env.0.value"),
    ("PyTorchJob", "an unknown top-level key",
     lambda o: o.__setitem__("specs", {}), "(top)"),
    ("PodMonitor", "unknown field in an endpoint",
     lambda o: o["spec"]["podMetricsEndpoints"][0].__setitem__("intervall", "5s"), "spec.podMetricsEndpoints.0"),
    ("PodMonitor", "selector as a list",
     lambda o: o["spec"].__setitem__("selector", [o["spec"]["selector"]]), "spec.selector"),
    ("PrometheusRule", "unknown field in a rule",
     lambda o: _rule(o).__setitem__("exprs", "up"), "spec.groups.0.rules.0"),
    ("PrometheusRule", "a group interval as a number",
     lambda o: o["spec"]["groups"][0].__setitem__("interval", 5), "spec.groups.0.interval"),
]


@pytest.mark.parametrize("kind, what, plant, where", PLANTED, ids=[p[1] for p in PLANTED])
def test_planted_mistake_is_rejected_naming_where(shipped, kind, what, plant, where):
    obj = copy.deepcopy(shipped[kind])
    plant(obj)
    found = errors(obj)
    assert found, f"{what}: not rejected"
    assert any(e.startswith(where + ":") for e in found), found


def test_strict_keeps_maps_and_preserved_objects_open():
    schema = strict({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "raw": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "fixed": {"type": "object", "properties": {"a": {"type": "string"}}},
    }})
    v = jsonschema.Draft7Validator(schema)
    assert not list(v.iter_errors({"labels": {"any": "x"}, "raw": {"b": 1}, "fixed": {"a": "x"}}))
    assert [e.message for e in v.iter_errors({"fixed": {"b": 1}})] == \
        ["Additional properties are not allowed ('b' was unexpected)"]
