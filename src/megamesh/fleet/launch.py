"""`megamesh launch --plan plan.json`: Kubernetes JobSet manifests for a planned multi-slice
TPU training job on GKE, the way xpk lays them out.

One JobSet (jobset.x-k8s.io/v1alpha2) with one replicatedJob `slice` of `replicas` =
number of slices; each child Job is an Indexed Job with one pod per TPU host of the slice
(parallelism = completions = hosts per slice, backoffLimit 0 so a failed host fails the
slice and the JobSet's failurePolicy restarts the whole job from the last checkpoint).
Pods select TPU nodes with GKE's labels (`cloud.google.com/gke-tpu-accelerator`,
`cloud.google.com/gke-tpu-topology`), request the host's chips (`google.com/tpu`), and get
the environment `jax.distributed` needs: the coordinator (pod 0 of slice 0, reachable by
DNS hostname: network.enableDNSHostnames), the process count and this process's id
(slice index x hosts + completion index), and xpk's MEGASCALE_* variables for multi-slice.

Failures (`manifests`): a Job template's podFailurePolicy tells a fatal exit (megamesh's
user-error 2 and diverged 3) and an infrastructure disruption (the DisruptionTarget pod
condition: node failure, maintenance, preemption) from a crash; the JobSet fails on the
first, restarts without counting the second, and counts the third against maxRestarts,
sized to the job's expected failures (`restart_budget`), not a fixed 10. With --diloco
each slice is an island (its own jax job) and a failed island's Job is recreated alone
(JobSet's RestartJob actions, v0.12+ behind the RestartJob feature gate); a synchronous
job restarts whole, as jax needs. Spare slices are held by placeholder pods of a
negative-priority class that the training pods preempt (the usual Kubernetes headroom
pattern), sized like the fleet simulator's hot spares.

The schema in JOBSET_SCHEMA describes the JobSet v1alpha2 API's spec (written from
kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go); tests validate the manifest
against it and each Job template against Kubernetes' own batch/v1 JobTemplateSpec schema.
Pure Python (no cluster needed).
"""

from __future__ import annotations

import math
import re
from typing import Any

from megamesh.errors import ConfigError
from megamesh.fleet.scenario import Failures
from megamesh.hardware import CHIPS
from megamesh.plan.target import parse_target
from megamesh.platform import MULTISLICE_LIBTPU_FLAGS
from megamesh.runspec import PlanFile
from megamesh.sharding.logical import format_layout, parse_layout

CHIPS_PER_HOST = {"tpu7x": 4, "v5p": 4, "v4": 4, "v6e": 4, "v5e": 4}
GKE_ACCELERATOR = {
    "tpu7x": "tpu7x",
    "v5p": "tpu-v5p-slice",
    "v4": "tpu-v4-podslice",
    "v6e": "tpu-v6e-slice",
    "v5e": "tpu-v5-lite-podslice",
}
COORDINATOR_PORT = 8476
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")

_STR_LIST = {"type": "array", "items": {"type": "string"}}
JOBSET_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "JobSet (jobset.x-k8s.io/v1alpha2)",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": {"type": "object"},
                "annotations": {"type": "object"},
            },
        },
        "spec": {
            "type": "object",
            "required": ["replicatedJobs"],
            "additionalProperties": False,
            "properties": {
                "replicatedJobs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                            "template": {"type": "object"},  # batch/v1 JobTemplateSpec: checked separately
                            "dependsOn": {
                                "type": "array",
                                "maxItems": 5,
                                "items": {
                                    "type": "object",
                                    "required": ["name", "status"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "name": {"type": "string"},
                                        "status": {"enum": ["Ready", "Complete"]},
                                    },
                                },
                            },
                        },
                    },
                },
                "network": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "enableDNSHostnames": {"type": "boolean"},
                        "subdomain": {"type": "string"},
                        "publishNotReadyAddresses": {"type": "boolean"},
                    },
                },
                "successPolicy": {
                    "type": "object",
                    "required": ["operator"],
                    "additionalProperties": False,
                    "properties": {"operator": {"enum": ["All", "Any"]}, "targetReplicatedJobs": _STR_LIST},
                },
                "failurePolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "maxRestarts": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                        "restartStrategy": {"enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "action"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {
                                        "type": "string",
                                        "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                                    },
                                    "action": {
                                        "enum": [
                                            "FailJobSet",
                                            "RestartJobSet",
                                            "RestartJobSetAndIgnoreMaxRestarts",
                                            "RestartJob",
                                            "RestartJobAndIgnoreMaxRestarts",
                                        ]
                                    },
                                    "onJobFailureReasons": _STR_LIST,
                                    "onJobFailureMessagePatterns": _STR_LIST,
                                    "targetReplicatedJobs": _STR_LIST,
                                },
                            },
                        },
                    },
                },
                "startupPolicy": {
                    "type": "object",
                    "required": ["startupPolicyOrder"],
                    "properties": {"startupPolicyOrder": {"enum": ["AnyOrder", "InOrder"]}},
                },
                "suspend": {"type": "boolean"},
                "coordinator": {
                    "type": "object",
                    "required": ["replicatedJob"],
                    "additionalProperties": False,
                    "properties": {
                        "replicatedJob": {"type": "string"},
                        "jobIndex": {"type": "integer"},
                        "podIndex": {"type": "integer"},
                    },
                },
                "managedBy": {"type": "string", "maxLength": 63},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            },
        },
    },
}


def restart_budget(chips: int, days: float, pod_chips: int) -> tuple[int, float]:
    """(maxRestarts, failures per hour): the failures a job of `chips` expects over `days`
    at the fleet simulator's default rates (fleet.scenario.Failures: Llama 3's per-
    accelerator rate), x 1.5, + 10 for its own crashes. A fixed 10 is used up in under an
    hour by a 663,552-chip job (13 failures an hour)."""
    rate = sum(Failures().job_rates(chips, pod_chips))
    return math.ceil(rate * 24 * days * 1.5) + 10, rate


# Exit codes of `megamesh train` that a restart cannot fix: a user mistake (2), a diverged
# run (3), a lost DiLoCo quorum is retried (4 is not here). The Job fails with reason
# PodFailurePolicy and a message naming the rule's index.
FATAL_EXIT_CODES = [2, 3]


def _pod_failure_policy() -> dict[str, Any]:
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "megamesh", "operator": "In",
                                              "values": FATAL_EXIT_CODES}},
        # evicted by the node's failure, maintenance or preemption: infrastructure
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _failure_rules(replicated: str, alone: bool) -> list[dict[str, Any]]:
    """JobSet failure rules: a fatal exit fails the JobSet; an infrastructure disruption
    restarts without using the budget; any other failure (a crash) uses it. `alone`: only
    the failed child Job (a DiLoCo island) is recreated (JobSet >= v0.12, RestartJob gate)."""
    restart = "RestartJob" if alone else "RestartJobSet"
    return [
        {"name": "FatalExit", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
         "onJobFailureMessagePatterns": [".*matching FailJob rule at index 0.*"]},
        {"name": "Infrastructure", "action": f"{restart}AndIgnoreMaxRestarts",
         "onJobFailureReasons": ["PodFailurePolicy"], "targetReplicatedJobs": [replicated]},
        {"name": "Crash", "action": restart, "targetReplicatedJobs": [replicated]},
    ]


def manifests(
    plan: PlanFile,
    *,
    name: str,
    image: str,
    out_dir: str,
    steps: int | None = None,
    max_restarts: int | None = None,
    days: float = 30.0,
    namespace: str = "default",
    volume_claim: str | None = None,
    diloco_inner_steps: int | None = None,
    diloco_islands: int | None = None,
    spare_fraction: float | None = None,
) -> dict[str, Any]:
    """The JobSet (and its spare capacity) for a plan. `diloco_inner_steps`: every slice is
    a DiLoCo island (its own jax job; a failed island is recreated alone). `max_restarts`
    default: `restart_budget` over `days`. `spare_fraction` (default: the fleet scenario's
    steady-state need): spare slices held by low-priority placeholder pods that the
    training pods preempt (PriorityClasses)."""
    if not _NAME.match(name):
        raise ConfigError(
            f"--name {name!r} is not allowed: lowercase letters, digits and '-', starting "
            "with a letter, at most 40 characters (it prefixes pod hostnames)"
        )
    target = parse_target(plan.target)
    chip = target.chip.name
    if chip not in GKE_ACCELERATOR:
        raise ConfigError(
            f"the plan's target is {chip}: launch writes GKE TPU manifests (one of "
            f"{', '.join(GKE_ACCELERATOR)})"
        )
    per_host = CHIPS_PER_HOST[chip]
    hosts = max(1, target.slice_chips // per_host)
    topology = "x".join(map(str, target.topology))
    islands = target.n_slices if diloco_inner_steps else 0
    if diloco_islands is not None and diloco_islands != islands:
        raise ConfigError(f"--diloco islands={diloco_islands} is not allowed: launch runs one island "
                          f"per slice, and the plan's target {plan.target} has {target.n_slices} "
                          f"(write islands={target.n_slices}, or leave it out)")
    if diloco_inner_steps and islands < 2:
        raise ConfigError(f"--diloco needs islands: the plan's target {plan.target} is one slice")
    if islands > 1024:
        raise ConfigError(f"--diloco with {islands} islands: JobSet recreates a child Job alone "
                          "for at most 1,024 replicas")
    n_procs = hosts if islands else hosts * target.n_slices
    spec = plan.spec
    layout = spec.layout or "data=1"
    spec.check_runnable(f"the plan's layout {layout}", "launch")
    budget, rate = restart_budget(target.chips, days, target.chip.pod_chips)
    max_restarts = budget if max_restarts is None else max_restarts
    replicated = "island" if islands else "slice"
    coordinator = f"{name}-{replicated}-0-0.{name}"
    train = [
        "megamesh",
        "train",
        "--model",
        plan.model,
        *spec.train_args(),
        "--seq",
        str(plan.seq_len),
        "--batch",
        str(plan.global_batch),
        "--out",
        f"{out_dir.rstrip('/')}/{name}",
        "--no-progress",
        "--resume",
    ]
    if steps:
        train += ["--steps", str(steps)]
    if islands:
        # each island is its own jax job over its slice; the layout's dcn axis becomes islands
        sizes = parse_layout(layout)
        if sizes.get("dcn", 1) != islands:
            raise ConfigError(
                f"--diloco: the plan's layout {layout} does not split into {islands} slice-sized "
                f"islands (it needs dcn={islands}: plan with --mesh dcn={islands},...)")
        mesh = format_layout({k: v for k, v in sizes.items() if k != "dcn"}) or "data=1"
        train[train.index("--mesh") + 1] = mesh
        train += ["--diloco", f"islands={islands},inner_steps={diloco_inner_steps}",
                  "--island", "$ISLAND"]
        script = (
            "export ISLAND=$MEGASCALE_SLICE_ID MEGAMESH_PROCESS_ID=$JOB_COMPLETION_INDEX "
            f"MEGAMESH_COORDINATOR={name}-island-${{MEGASCALE_SLICE_ID}}-0.{name}:{COORDINATOR_PORT}; "
            f"exec {' '.join(train)}"
        )
    else:
        script = (
            f"export MEGAMESH_PROCESS_ID=$(( MEGASCALE_SLICE_ID * {hosts} + JOB_COMPLETION_INDEX )); "
            f"exec {' '.join(train)}"
        )
    env = [
        {"name": "MEGAMESH_NUM_PROCESSES", "value": str(n_procs)},
        {
            "name": "MEGASCALE_SLICE_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}},
        },
    ]  # JOB_COMPLETION_INDEX (the host within its slice) is set by the Indexed Job itself
    if not islands:
        env = [{"name": "MEGAMESH_COORDINATOR", "value": f"{coordinator}:{COORDINATOR_PORT}"},
               env[0],
               {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": coordinator},
               {"name": "MEGASCALE_NUM_SLICES", "value": str(target.n_slices)},
               env[1]]
        if target.n_slices > 1:  # libtpu 0.0.42.1 aborts on some cross-slice all-gathers
            # lowered to the SparseCore (megamesh.platform; `megamesh compile` sets the same)
            env.append({"name": "LIBTPU_INIT_ARGS", "value": " ".join(MULTISLICE_LIBTPU_FLAGS)})
    resources = {"limits": {"google.com/tpu": per_host}, "requests": {"google.com/tpu": per_host}}
    container: dict[str, Any] = {
        "name": "megamesh",
        "image": image,
        "command": ["bash", "-c", script],
        "env": env,
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": resources,
        "securityContext": {"privileged": False},
    }
    node_selector = {
        "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATOR[chip],
        "cloud.google.com/gke-tpu-topology": topology,
    }
    tolerations = [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,
        "priorityClassName": TRAIN_PRIORITY,
        "nodeSelector": node_selector,
        "tolerations": tolerations,
        "terminationGracePeriodSeconds": 300,  # megamesh saves a checkpoint on SIGTERM
        "containers": [container],
    }
    if volume_claim:
        container["volumeMounts"] = [{"name": "checkpoints", "mountPath": out_dir}]
        pod_spec["volumes"] = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": volume_claim}}]
    exclusive = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    job_template = {
        "metadata": {"annotations": exclusive},
        "spec": {
            "parallelism": hosts,
            "completions": hosts,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "podFailurePolicy": _pod_failure_policy(),
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "megamesh"},
            "annotations": {
                "megamesh.dev/plan": f"{plan.model} on {plan.target}, "
                f"layout {layout}, predicted MFU {plan.mfu:.3f}",
                "megamesh.dev/restart-budget": f"{max_restarts} restarts: {rate:.2f} failures/hour "
                f"expected x {days:.1f} days x 1.5 + 10 (infrastructure disruptions do not count)",
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts, "restartStrategy": "Recreate",
                              "rules": _failure_rules(replicated, alone=bool(islands))},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [replicated]},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{"name": replicated, "replicas": target.n_slices, "template": job_template}],
        },
    }
    if islands:
        jobset["metadata"]["annotations"]["megamesh.dev/islands"] = (
            f"{islands} DiLoCo islands, an outer step every {diloco_inner_steps} steps; a failed "
            "island is recreated alone (JobSet >= v0.12 with the RestartJob feature gate)")
    spare_fraction = Failures().steady_spares() if spare_fraction is None else spare_fraction
    spare_slices = math.ceil(target.n_slices * spare_fraction) if spare_fraction > 0 else 0
    spares = _spares(name, namespace, spare_slices, hosts, node_selector, tolerations,
                     resources, exclusive) if spare_slices else None
    return {
        "jobset": jobset,
        "spares": spares,
        "priority_classes": _priority_classes(),
        "slices": target.n_slices,
        "spare_slices": spare_slices,
        "islands": islands,
        "max_restarts": max_restarts,
        "failures_per_hour": rate,
        "hosts_per_slice": hosts,
        "processes": n_procs,
        "topology": topology,
        "chips": target.chips,
        "accelerator": GKE_ACCELERATOR[chip],
        "devices_per_chip": CHIPS[chip].devices_per_chip,
    }


TRAIN_PRIORITY, SPARE_PRIORITY = "megamesh-train", "megamesh-spare"


def _priority_classes() -> list[dict[str, Any]]:
    """Training pods preempt the spare placeholders (and nothing else does)."""
    return [
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
         "metadata": {"name": TRAIN_PRIORITY}, "value": 1000, "preemptionPolicy": "PreemptLowerPriority",
         "description": "megamesh training: may preempt the spare placeholders"},
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
         "metadata": {"name": SPARE_PRIORITY}, "value": -10, "preemptionPolicy": "Never",
         "description": "megamesh spare-slice placeholders: hold capacity, yield it at once"},
    ]


def _spares(name: str, namespace: str, slices: int, hosts: int, node_selector: dict[str, str],
            tolerations: list[dict[str, Any]], resources: dict[str, Any],
            exclusive: dict[str, str]) -> dict[str, Any]:
    """Hot spares as Kubernetes holds them: placeholder pods (pause containers) of the lowest
    priority on `slices` whole spare slices; a recreated training Job preempts them and
    lands at once instead of waiting for a repaired node pool."""
    pod = {"restartPolicy": "Never", "priorityClassName": SPARE_PRIORITY,
           "nodeSelector": node_selector, "tolerations": tolerations,
           "terminationGracePeriodSeconds": 0,
           "containers": [{"name": "placeholder", "image": "registry.k8s.io/pause:3.10",
                           "resources": resources}]}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": f"{name}-spares", "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "megamesh"}},
        "spec": {
            "failurePolicy": {"maxRestarts": 2**31 - 1, "restartStrategy": "Recreate"},
            "replicatedJobs": [{"name": "spare", "replicas": slices, "template": {
                "metadata": {"annotations": exclusive},
                "spec": {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
                         "backoffLimit": 0, "template": {"spec": pod}}}}],
        },
    }
