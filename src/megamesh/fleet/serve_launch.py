"""`megamesh launch --serve --plan PLAN`: the Kubernetes objects that serve a planned model
on GKE TPUs behind GKE Inference Gateway, from `megamesh plan --serve --json`.

What it writes (`serve_manifests`), and why each:

- a **LeaderWorkerSet** (leaderworkerset.x-k8s.io/v1): `replicas` groups, each one replica
  of the model over `size` TPU hosts (one pod per host: the leader, worker index 0, and
  size - 1 workers), as GKE documents for multi-host TPU serving. Every pod runs
  `megamesh serve` with the plan's mesh and weights; in a multi-host group the pods find
  each other through the variables LWS injects (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE,
  LWS_WORKER_INDEX: the coordinator, process count and process id of `jax.distributed`,
  as `megamesh train` reads them; the leader serves HTTP and sends each step to the
  others: `serve.multihost`). A group is recreated whole when any of its pods
  restarts (RecreateGroupOnPodRestart): one host of a sharded replica cannot come back
  alone. Probes: startup and liveness on /health/live (loading and compiling take
  minutes), readiness on /health (503 while draining); a preStop pause lets the
  endpoints drop the pod before SIGTERM starts `serve`'s drain.
- a **Service** over the leaders (only the leader speaks HTTP): direct access, and the
  port the gateway's backends use.
- a **PodMonitoring** (Google Cloud Managed Service for Prometheus) scraping the leaders'
  /metrics, so that the autoscaler can read them as `prometheus.googleapis.com|NAME|gauge`
  through the custom metrics adapter;
- a **HorizontalPodAutoscaler** (autoscaling/v2) on the LeaderWorkerSet (its scale
  subresource; LWS points the HPA at the leader pods): scales replica groups on the
  server's own queue length and KV cache use (`vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc`, the names the endpoint picker reads too), the signals GKE's
  autoscaling guidance prefers for LLM servers over CPU or accelerator duty cycle;
- the **Gateway API Inference Extension** objects: an **InferencePool**
  (inference.networking.k8s.io/v1) selecting the leaders on the serving port, with its
  **endpoint picker** (EPP, llm-d-router's: a Deployment, its Service, ServiceAccount,
  Role and RoleBinding, and a ConfigMap with its scheduling profile: queue 2, KV cache
  use 2, prefix-cache affinity 3, the published example weights), and two
  **InferenceObjective**s (llm-d.ai/v1alpha2: interactive priority 0, batch -1, sheddable
  first under load);
- a **Gateway** (GKE's regional internal L7 class, `--gateway-class`) and an **HTTPRoute**
  sending every path to the InferencePool.

Replicas are whole TPU hosts: a plan whose replica needs fewer chips than a host holds
gets a host per replica (more KV room; the replica count is scaled to the same chips).
Pure Python (no cluster needed); the tests validate every object against the published
CRDs (LWS, InferencePool, InferenceObjective, Gateway, HTTPRoute, PodMonitoring, shipped
as test data) and Kubernetes' own schemas.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any

from megamesh.errors import ConfigError
from megamesh.fleet.launch import CHIPS_PER_HOST, COORDINATOR_PORT, GKE_ACCELERATOR
from megamesh.hardware import CHIPS
from megamesh.plan.target import from_chip_count

SERVE_PORT = 8000
EPP_PORT, EPP_HEALTH_PORT, EPP_METRICS_PORT = 9002, 9003, 9090
# llm-d-router's endpoint picker (the EPP moved there from gateway-api-inference-extension
# in 2026-06); its newest release tag when this was written
EPP_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.9.0"
# GKE Gateway classes: gke-l7-rilb (regional internal), gke-l7-regional-external-managed
GATEWAY_CLASS = "gke-l7-rilb"
# the endpoint picker's scheduling profile: the published example weights (llm-d-router's
# chart default profile: queue 2, KV cache utilization 2, prefix cache 3)
SCORER_WEIGHTS = {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
PRESTOP_SECONDS = 10  # endpoints drop the pod before SIGTERM starts the drain
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def serve_layout(plan: dict[str, Any]) -> dict[str, Any]:
    """The replica layout of a `plan --serve --json` answer on whole TPU hosts: chip, hosts
    and chips per replica, replicas, the GKE topology of a replica's slice, the mesh
    (`tensor` over every device of the replica) and the context and slots to serve."""
    serve = plan.get("serve")
    if not isinstance(serve, dict):
        raise ConfigError("the plan has no 'serve' section: launch --serve reads `megamesh plan "
                          "--serve --json` output")
    need = ("tensor", "chips_per_replica", "replicas", "batch", "weights", "context_tokens")
    missing = [k for k in need if k not in serve]
    if missing or "model" not in plan or "target" not in plan:
        raise ConfigError(f"the serving plan lacks {', '.join(missing or ['model/target'])}: write "
                          "it again with this megamesh's `plan --serve --json`")
    chip_name = str(plan["target"]).partition(":")[0].strip().lower()
    if chip_name not in GKE_ACCELERATOR:
        raise ConfigError(f"the plan's target is {chip_name}: launch writes GKE TPU manifests (one of "
                          f"{', '.join(GKE_ACCELERATOR)})")
    chip = CHIPS[chip_name]
    per_host = CHIPS_PER_HOST[chip_name]
    planned = int(serve["chips_per_replica"])
    hosts = max(1, math.ceil(planned / per_host))
    chips = hosts * per_host
    replicas = max(1, math.ceil(int(serve["replicas"]) * planned / chips))
    topology = "x".join(map(str, from_chip_count(chip, chips).topology))
    return {"chip": chip_name, "accelerator": GKE_ACCELERATOR[chip_name], "hosts": hosts,
            "chips_per_host": per_host, "chips": chips, "replicas": replicas, "topology": topology,
            "tensor": chips * chip.devices_per_chip, "planned_chips": planned,
            "planned_replicas": int(serve["replicas"]), "weights": serve["weights"],
            "max_len": int(serve["context_tokens"]), "slots": max(1, int(serve["batch"])),
            "model": plan["model"]}


def serve_manifests(plan: dict[str, Any], *, name: str, image: str, model_dir: str | None = None,
                    namespace: str = "default", volume_claim: str | None = None,
                    mount_path: str = "/models",
                    max_replicas: int | None = None, queue_target: float | None = None,
                    kv_target: float = 0.8, drain_seconds: float = 30.0,
                    epp_image: str = EPP_IMAGE, gateway_class: str = GATEWAY_CLASS) -> dict[str, Any]:
    """Every object for serving `plan` (see the module's docstring), with `layout`
    (`serve_layout`) beside them. `model_dir`: the checkpoint (a megamesh run or a Hugging
    Face directory) inside the pods (default `mount_path`/MODEL), where `volume_claim` is
    mounted read-only if given (e.g. a GCS FUSE volume); `queue_target`: waiting
    requests per replica the autoscaler holds (default: a quarter of the slots);
    `kv_target`: KV cache use (0-1) it holds; `max_replicas` default: 4x the plan's."""
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r} is not allowed: lowercase letters, digits and '-', starting "
                          "with a letter, at most 40 characters")
    if not 0 < kv_target <= 1:
        raise ConfigError(f"--kv-target {kv_target} is not allowed: a fraction in (0, 1]")
    lay = serve_layout(plan)
    model_dir = model_dir or f"{mount_path.rstrip('/')}/{lay['model']}"
    max_replicas = 4 * lay["replicas"] if max_replicas is None else max_replicas
    if max_replicas < lay["replicas"]:
        raise ConfigError(f"--max-replicas {max_replicas} is not allowed: at least the plan's "
                          f"{lay['replicas']} replica groups")
    queue_target = max(1.0, lay["slots"] / 4) if queue_target is None else queue_target
    if queue_target <= 0:
        raise ConfigError(f"--queue-target {queue_target} is not allowed: > 0")
    labels = {"app.kubernetes.io/name": "megamesh-serve", "app.kubernetes.io/instance": name}
    leaders = {LWS_NAME_LABEL: name, LWS_INDEX_LABEL: "0"}
    meta = lambda n, **extra: {"name": n, "namespace": namespace, "labels": dict(labels), **extra}  # noqa: E731
    epp = f"{name}-epp"
    return {
        "layout": lay,
        "leaderworkerset": _leaderworkerset(lay, meta(name), labels, image=image, model_dir=model_dir,
                                            volume_claim=volume_claim, mount_path=mount_path,
                                            drain_seconds=drain_seconds),
        "service": {"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
                    "spec": {"selector": leaders, "ports": [
                        {"name": "http", "port": SERVE_PORT, "targetPort": "http", "protocol": "TCP"}]}},
        "pod_monitoring": {
            "apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring", "metadata": meta(name),
            "spec": {"selector": {"matchLabels": leaders},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]}},
        "hpa": {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(name),
            "spec": {
                "scaleTargetRef": {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                                   "name": name},
                "minReplicas": lay["replicas"], "maxReplicas": max_replicas,
                "metrics": [_pods_metric("vllm:num_requests_waiting", str(_quantity(queue_target))),
                            _pods_metric("vllm:kv_cache_usage_perc", str(_quantity(kv_target)))],
                # new replicas take minutes to load and compile: scale in slowly
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
            }},
        "inference_pool": {
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": meta(name),
            "spec": {"selector": {"matchLabels": leaders}, "targetPorts": [{"number": SERVE_PORT}],
                     "appProtocol": "http",
                     "endpointPickerRef": {"name": epp, "port": {"number": EPP_PORT},
                                           "failureMode": "FailOpen"}}},
        "objectives": [
            {"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
             "metadata": meta(f"{name}-{what}"),
             "spec": {"priority": priority,
                      "poolRef": {"group": "inference.networking.k8s.io", "name": name}}}
            for what, priority in (("interactive", 0), ("batch", -1))],
        "epp": _endpoint_picker(epp, name, namespace, labels, epp_image),
        "gateway": {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta(name),
            "spec": {"gatewayClassName": gateway_class,
                     "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
        "route": {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta(name),
            "spec": {"parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [{"group": "inference.networking.k8s.io",
                                                 "kind": "InferencePool", "name": name}]}]}},
    }


def ordered(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects in the order to apply them (the pool's picker before the pool)."""
    return [*m["epp"], m["leaderworkerset"], m["service"], m["pod_monitoring"], m["hpa"],
            m["inference_pool"], *m["objectives"], m["gateway"], m["route"]]


def _quantity(x: float) -> int | str:
    """A Kubernetes quantity: an integer as is, a fraction in milli-units (0.8 -> 800m)."""
    return int(x) if float(x).is_integer() else f"{round(x * 1000)}m"


def _pods_metric(metric: str, average: str) -> dict[str, Any]:
    """An HPA Pods metric on a gauge the leaders export, as Managed Service for Prometheus
    names it for the custom metrics adapter."""
    return {"type": "Pods", "pods": {"metric": {"name": f"prometheus.googleapis.com|{metric}|gauge"},
                                     "target": {"type": "AverageValue", "averageValue": average}}}


def _leaderworkerset(lay: dict[str, Any], metadata: dict[str, Any], labels: dict[str, str], *,
                     image: str, model_dir: str, volume_claim: str | None, mount_path: str,
                     drain_seconds: float) -> dict[str, Any]:
    serve = ["megamesh", "serve", "--model", model_dir, "--name", lay["model"],
             "--mesh", f"tensor={lay['tensor']}", "--weights", lay["weights"],
             "--max-len", str(lay["max_len"]), "--slots", str(lay["slots"]),
             "--host", "0.0.0.0", "--port", str(SERVE_PORT), "--drain-seconds", f"{drain_seconds:g}"]
    script = "exec " + shlex.join(serve)
    if lay["hosts"] > 1:  # one jax job over the group's hosts: LWS says who and where
        script = (f'export MEGAMESH_COORDINATOR="$LWS_LEADER_ADDRESS:{COORDINATOR_PORT}" '
                  'MEGAMESH_NUM_PROCESSES="$LWS_GROUP_SIZE" MEGAMESH_PROCESS_ID="$LWS_WORKER_INDEX"; '
                  + script)

    def pod(leader: bool) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "megamesh",
            "image": image,
            "command": ["/bin/sh", "-c", script],
            # jax's coordinator, and the leader's control port for its followers (the next
            # one: serve.multihost)
            "ports": [{"name": "http", "containerPort": SERVE_PORT},
                      {"name": "coordinator", "containerPort": COORDINATOR_PORT},
                      {"name": "control", "containerPort": COORDINATOR_PORT + 1}],
            "resources": {"requests": {"google.com/tpu": lay["chips_per_host"]},
                          "limits": {"google.com/tpu": lay["chips_per_host"]}},
        }
        if leader:
            container.update({
                # loading and compiling take minutes: liveness starts once the server is up
                "startupProbe": {"httpGet": {"path": "/health/live", "port": "http"},
                                 "periodSeconds": 10, "failureThreshold": 360},
                "livenessProbe": {"httpGet": {"path": "/health/live", "port": "http"},
                                  "periodSeconds": 10, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                                   "periodSeconds": 5, "failureThreshold": 1},
                "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
            })
        if volume_claim:
            container["volumeMounts"] = [{"name": "models", "mountPath": mount_path, "readOnly": True}]
        spec: dict[str, Any] = {
            "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": lay["accelerator"],
                             "cloud.google.com/gke-tpu-topology": lay["topology"]},
            "containers": [container],
            # preStop, then the drain, then a margin before KILL
            "terminationGracePeriodSeconds": int(PRESTOP_SECONDS + drain_seconds + 15),
        }
        if volume_claim:
            spec["volumes"] = [{"name": "models",
                                "persistentVolumeClaim": {"claimName": volume_claim, "readOnly": True}}]
        role = "leader" if leader else "worker"
        return {"metadata": {"labels": {**labels, "megamesh.ai/role": role}}, "spec": spec}

    template: dict[str, Any] = {"size": lay["hosts"], "restartPolicy": "RecreateGroupOnPodRestart",
                                "workerTemplate": pod(leader=lay["hosts"] == 1)}
    if lay["hosts"] > 1:
        template["leaderTemplate"] = pod(leader=True)
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": metadata,
            "spec": {"replicas": lay["replicas"], "startupPolicy": "LeaderCreated",
                     "leaderWorkerTemplate": template}}


def _endpoint_picker(epp: str, pool: str, namespace: str, labels: dict[str, str],
                     image: str) -> list[dict[str, Any]]:
    """llm-d-router's endpoint picker for the pool: its ServiceAccount with read access to
    the pool's pods and objects, its scheduling profile, the Deployment and its Service
    (the ext-proc port the gateway calls)."""
    meta = {"name": epp, "namespace": namespace, "labels": {**labels, "app.kubernetes.io/component": "epp"}}
    select = {"app.kubernetes.io/instance": labels["app.kubernetes.io/instance"],
              "app.kubernetes.io/component": "epp"}
    plugins = "\n".join([
        "apiVersion: llm-d.ai/v1alpha1",
        "kind: EndpointPickerConfig",
        "plugins:",
        *[f"- type: {t}" for t in SCORER_WEIGHTS],
        "- type: metrics-data-source",
        "  parameters:",
        '    scheme: "http"',
        '    path: "/metrics"',
        "- type: core-metrics-extractor",
        "schedulingProfiles:",
        "- name: default",
        "  plugins:",
        *[line for t, w in SCORER_WEIGHTS.items() for line in (f"  - pluginRef: {t}", f"    weight: {w}")],
        "",
    ])
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "list"]},
                   {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
                    "verbs": ["get", "watch", "list"]},
                   {"apiGroups": ["llm-d.ai"], "resources": ["inferenceobjectives"],
                    "verbs": ["get", "watch", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "subjects": [{"kind": "ServiceAccount", "name": epp, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": epp}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"plugins.yaml": plugins}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": select},
                  "template": {"metadata": {"labels": {**labels, "app.kubernetes.io/component": "epp"}},
                               "spec": {
                                   "serviceAccountName": epp,
                                   "terminationGracePeriodSeconds": 130,
                                   "containers": [{
                                       "name": "epp", "image": image,
                                       "args": ["--pool-name", pool, "--pool-namespace", namespace,
                                                "--pool-group", "inference.networking.k8s.io",
                                                "--config-file", "/config/plugins.yaml",
                                                "--grpc-health-port", str(EPP_HEALTH_PORT),
                                                "--metrics-endpoint-auth=false", "--zap-encoder", "json"],
                                       "ports": [{"name": "grpc", "containerPort": EPP_PORT},
                                                 {"name": "grpc-health", "containerPort": EPP_HEALTH_PORT},
                                                 {"name": "metrics", "containerPort": EPP_METRICS_PORT}],
                                       "livenessProbe": {"grpc": {"port": EPP_HEALTH_PORT,
                                                                  "service": "inference-extension"},
                                                         "initialDelaySeconds": 5, "periodSeconds": 10},
                                       "readinessProbe": {"grpc": {"port": EPP_HEALTH_PORT,
                                                                   "service": "inference-extension"},
                                                          "periodSeconds": 2},
                                       "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {
                                           "fieldPath": "metadata.namespace"}}}],
                                       "volumeMounts": [{"name": "plugins", "mountPath": "/config"}],
                                   }],
                                   "volumes": [{"name": "plugins", "configMap": {"name": epp}}],
                               }}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"selector": select, "type": "ClusterIP",
                  "ports": [{"name": "grpc-ext-proc", "port": EPP_PORT, "protocol": "TCP",
                             "appProtocol": "kubernetes.io/h2c"},
                            {"name": "http-metrics", "port": EPP_METRICS_PORT, "protocol": "TCP"}]}},
    ]
