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

The schema in JOBSET_SCHEMA describes the JobSet v1alpha2 API's spec (written from
kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go); tests validate the manifest
against it and each Job template against Kubernetes' own batch/v1 JobTemplateSpec schema.
Pure Python (no cluster needed).
"""

from __future__ import annotations

import re
from typing import Any

from megamesh.errors import ConfigError
from megamesh.hardware import CHIPS
from megamesh.plan.target import parse_target
from megamesh.runspec import PlanFile

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


def manifests(
    plan: PlanFile,
    *,
    name: str,
    image: str,
    out_dir: str,
    steps: int | None = None,
    max_restarts: int = 10,
    namespace: str = "default",
    volume_claim: str | None = None,
) -> dict[str, Any]:
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
    n_procs = hosts * target.n_slices
    spec = plan.spec
    layout = spec.layout or "data=1"
    spec.check_runnable(f"the plan's layout {layout}", "launch")
    coordinator = f"{name}-slice-0-0.{name}"
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
    script = (
        f"export MEGAMESH_PROCESS_ID=$(( MEGASCALE_SLICE_ID * {hosts} + JOB_COMPLETION_INDEX )); "
        f"exec {' '.join(train)}"
    )
    env = [
        {"name": "MEGAMESH_COORDINATOR", "value": f"{coordinator}:{COORDINATOR_PORT}"},
        {"name": "MEGAMESH_NUM_PROCESSES", "value": str(n_procs)},
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": coordinator},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(target.n_slices)},
        {
            "name": "MEGASCALE_SLICE_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}},
        },
    ]  # JOB_COMPLETION_INDEX (the host within its slice) is set by the Indexed Job itself
    container: dict[str, Any] = {
        "name": "megamesh",
        "image": image,
        "command": ["bash", "-c", script],
        "env": env,
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": {"limits": {"google.com/tpu": per_host}, "requests": {"google.com/tpu": per_host}},
        "securityContext": {"privileged": False},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATOR[chip],
            "cloud.google.com/gke-tpu-topology": topology,
        },
        "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 300,  # megamesh saves a checkpoint on SIGTERM
        "containers": [container],
    }
    if volume_claim:
        container["volumeMounts"] = [{"name": "checkpoints", "mountPath": out_dir}]
        pod_spec["volumes"] = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": volume_claim}}]
    job_template = {
        "metadata": {
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
        },
        "spec": {
            "parallelism": hosts,
            "completions": hosts,
            "completionMode": "Indexed",
            "backoffLimit": 0,
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
                f"layout {layout}, predicted MFU {plan.mfu:.3f}"
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts, "restartStrategy": "Recreate"},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": ["slice"]},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{"name": "slice", "replicas": target.n_slices, "template": job_template}],
        },
    }
    return {
        "jobset": jobset,
        "slices": target.n_slices,
        "hosts_per_slice": hosts,
        "processes": n_procs,
        "topology": topology,
        "chips": target.chips,
        "accelerator": GKE_ACCELERATOR[chip],
        "devices_per_chip": CHIPS[chip].devices_per_chip,
    }
