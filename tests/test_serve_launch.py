"""`megamesh launch --serve`: the GKE serving deployment for a serving plan, every object
validated against the published CRDs (tests/data/crds, see SOURCES.md there) and
Kubernetes' own schemas, all offline."""

from __future__ import annotations

import functools
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

CRDS = Path(__file__).parent / "data" / "crds"
CRD_FILES = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkersets",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools",
    ("llm-d.ai/v1alpha2", "InferenceObjective"): "llm-d.ai_inferenceobjectives",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway.networking.k8s.io_gateways",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes",
    ("monitoring.googleapis.com/v1", "PodMonitoring"): "monitoring.googleapis.com_podmonitorings",
}


def megamesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megamesh.cli", *args], capture_output=True,
                          text=True, timeout=300)


def _strict(node):
    """A CRD's openAPIV3Schema as JSON Schema that also refuses fields it does not name
    (the API server would prune them silently: a typo in a manifest is lost)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")
               or k == "x-kubernetes-int-or-string"}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("x-kubernetes-int-or-string")
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        out.pop("nullable", None)
        if ("properties" in out and "additionalProperties" not in out
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.decompress((CRDS / f"{CRD_FILES[(api_version, kind)]}.yaml.gz").read_bytes()),
                    Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = api_version.rsplit("/", 1)[1]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], (kind, version)
    schema = _strict(v["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked on its own
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "spec"})
    return schema


def validate(doc: dict) -> None:
    """A manifest against its CRD (the kinds in CRD_FILES) or Kubernetes' own schema."""
    import jsonschema
    import kubernetes_validate

    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_FILES:
        jsonschema.validate(doc, crd_schema(*key))
        meta = doc["metadata"]
        assert set(meta) <= {"name", "namespace", "labels", "annotations"}, meta
    else:
        kubernetes_validate.validate(doc, "1.34", strict=True)


@pytest.fixture(scope="module")
def plan_405b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "serve.json"
    r = megamesh("plan", "--serve", "--model", "llama3.1-405b", "--target", "tpu7x:256", "--qps", "40",
                 "--json")
    assert r.returncode == 0, r.stderr
    path.write_text(r.stdout)
    return path


def test_serving_deployment_validates_against_the_published_crds_and_kubernetes(plan_405b, tmp_path):
    import yaml

    out = tmp_path / "serve.yaml"
    r = megamesh("launch", "--serve", "--plan", str(plan_405b), "--name", "llama405b",
                 "--volume-claim", "models", "--out", str(out))
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
                     "LeaderWorkerSet", "Service", "PodMonitoring", "HorizontalPodAutoscaler",
                     "InferencePool", "InferenceObjective", "InferenceObjective", "Gateway", "HTTPRoute"]
    for d in docs:
        validate(d)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    plan = json.loads(plan_405b.read_text())["serve"]
    # a replica is the plan's 8 chips: two 4-chip Ironwood hosts, one group of 2 pods each
    lws = by[("LeaderWorkerSet", "llama405b")]["spec"]
    assert plan["chips_per_replica"] == 8 and lws["replicas"] == plan["replicas"]
    tmpl = lws["leaderWorkerTemplate"]
    assert tmpl["size"] == 2 and tmpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = tmpl["leaderTemplate"]["spec"], tmpl["workerTemplate"]["spec"]
    for pod in (leader, worker):
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu7x",
                                       "cloud.google.com/gke-tpu-topology": "2x2x2"}
        c = pod["containers"][0]
        assert c["resources"]["limits"] == {"google.com/tpu": 4}
        script = c["command"][2]
        assert 'MEGAMESH_COORDINATOR="$LWS_LEADER_ADDRESS:8476"' in script
        assert 'MEGAMESH_PROCESS_ID="$LWS_WORKER_INDEX"' in script
        assert (f"megamesh serve --model /models/llama3.1-405b --name llama3.1-405b --mesh tensor=16 "
                f"--weights bf16 --max-len {plan['context_tokens']} --slots {plan['batch']}") in script
        assert c["volumeMounts"][0]["mountPath"] == "/models"
    lc = leader["containers"][0]
    assert lc["readinessProbe"]["httpGet"]["path"] == "/health"
    assert lc["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert leader["terminationGracePeriodSeconds"] > 30 + lc["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert "readinessProbe" not in worker["containers"][0]  # workers speak no HTTP
    # the leaders (worker index 0) are the endpoints: Service, scrape, pool
    leaders = {"leaderworkerset.sigs.k8s.io/name": "llama405b",
               "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    assert by[("Service", "llama405b")]["spec"]["selector"] == leaders
    assert by[("PodMonitoring", "llama405b")]["spec"]["selector"]["matchLabels"] == leaders
    pool = by[("InferencePool", "llama405b")]["spec"]
    assert pool["selector"]["matchLabels"] == leaders and pool["targetPorts"] == [{"number": 8000}]
    assert pool["endpointPickerRef"]["name"] == "llama405b-epp"
    assert by[("Service", "llama405b-epp")]["spec"]["ports"][0]["port"] == pool["endpointPickerRef"]["port"][
        "number"]
    # the autoscaler scales the LeaderWorkerSet on the server's own queue and KV gauges
    hpa = by[("HorizontalPodAutoscaler", "llama405b")]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "LeaderWorkerSet" and hpa["minReplicas"] == plan["replicas"]
    assert [m["pods"]["metric"]["name"] for m in hpa["metrics"]] == [
        "prometheus.googleapis.com|vllm:num_requests_waiting|gauge",
        "prometheus.googleapis.com|vllm:kv_cache_usage_perc|gauge"]
    assert hpa["metrics"][1]["pods"]["target"]["averageValue"] == "800m"
    # the picker scores queue, KV use and prefix affinity, scraping the pods' /metrics
    config = yaml.safe_load(by[("ConfigMap", "llama405b-epp")]["data"]["plugins.yaml"])
    assert {p["pluginRef"]: p["weight"] for p in config["schedulingProfiles"][0]["plugins"]} == {
        "queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
    route = by[("HTTPRoute", "llama405b")]["spec"]
    assert route["rules"][0]["backendRefs"][0]["kind"] == "InferencePool"
    assert route["parentRefs"][0]["name"] == "llama405b"


def test_the_schemas_catch_broken_manifests(plan_405b):
    """The checks can fail: a wrong enum, a misspelt field, a wrong type."""
    import jsonschema
    import kubernetes_validate

    from megamesh.fleet.serve_launch import serve_manifests

    m = serve_manifests(json.loads(plan_405b.read_text()), name="x", image="img")
    bad = json.loads(json.dumps(m["leaderworkerset"]))
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = json.loads(json.dumps(m["inference_pool"]))
    bad["spec"]["targetPort"] = bad["spec"].pop("targetPorts")
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = json.loads(json.dumps(m["hpa"]))
    bad["spec"]["minReplicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_a_small_model_gets_a_host_per_replica(tmp_path):
    """llama3.1-8b fits one chip: replicas are rounded up to whole 4-chip hosts (fewer of
    them, the same chips), one pod per group, no multi-host environment."""
    from megamesh.fleet.serve_launch import serve_manifests

    r = megamesh("plan", "--serve", "--model", "llama3.1-8b", "--target", "tpu7x:64", "--qps", "300",
                 "--json", "--weights", "int8")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    m = serve_manifests(plan, name="small", image="img")
    lay = m["layout"]
    assert plan["serve"]["chips_per_replica"] < 4 and lay["hosts"] == 1 and lay["chips"] == 4
    assert lay["replicas"] == -(-plan["serve"]["replicas"] * plan["serve"]["chips_per_replica"] // 4)
    tmpl = m["leaderworkerset"]["spec"]["leaderWorkerTemplate"]
    assert tmpl["size"] == 1 and "leaderTemplate" not in tmpl
    pod = tmpl["workerTemplate"]["spec"]
    script = pod["containers"][0]["command"][2]
    assert "MEGAMESH_COORDINATOR" not in script and "--weights int8" in script and "--mesh tensor=8" in script
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2x1"
    validate(m["leaderworkerset"])


def test_launch_serve_bad_input(tmp_path, plan_405b):
    training = tmp_path / "train.json"
    r = megamesh("plan", "--model", "llama3.1-8b", "--target", "tpu7x:256", "--json")
    training.write_text(r.stdout)
    cases = [
        (["--plan", str(training)], "no 'serve' section"),
        (["--plan", str(tmp_path / "missing.json")], "cannot read it"),
        (["--plan", str(plan_405b), "--steps", "10"], "--steps is not allowed with --serve"),
        (["--plan", str(plan_405b), "--kv-target", "1.5"], "--kv-target 1.5 is not allowed"),
        (["--plan", str(plan_405b), "--max-replicas", "1"], "--max-replicas 1 is not allowed"),
        (["--plan", str(plan_405b), "--name", "Bad_Name"], "--name 'Bad_Name' is not allowed"),
    ]
    for args, message in cases:
        r = megamesh("launch", "--serve", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = megamesh("launch", "--plan", str(training), "--max-replicas", "3")
    assert r.returncode == 2 and "--max-replicas is not allowed without --serve" in r.stderr
    (tmp_path / "gpu.json").write_text(json.dumps({**json.loads(plan_405b.read_text()), "target": "h100:8"}))
    r = megamesh("launch", "--serve", "--plan", str(tmp_path / "gpu.json"))
    assert r.returncode == 2 and "GKE TPU manifests" in r.stderr
