"""`megamesh launch`: Kubernetes manifests for a plan on GKE TPUs: a JobSet for a planned
training job, or (--serve) the LeaderWorkerSet, autoscaler and inference-gateway objects
for a planned serving deployment (`fleet.serve_launch`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from megamesh.cli.common import parse_diloco
from megamesh.errors import ConfigError
from megamesh.fileio import write_new_file
from megamesh.fleet.launch import manifests
from megamesh.runspec import read_plan


class _Dumper(yaml.SafeDumper):
    """YAML with multi-line strings (scripts, a ConfigMap's files) as literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump_all(docs: list) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="write the GKE manifests for a plan: a training JobSet, or (--serve) a serving deployment",
        description="Turn `megamesh plan --json` output into a Kubernetes JobSet for GKE "
        "(one Indexed Job per slice, one pod per TPU host), as xpk does; with --serve, turn "
        "`megamesh plan --serve --json` output into a LeaderWorkerSet of replicas (one pod per "
        "TPU host), its Service, autoscaler and metrics scrape, and the Gateway API Inference "
        "Extension objects (InferencePool, endpoint picker, objectives, Gateway, HTTPRoute).",
    )
    p.add_argument("--plan", required=True, help="a plan from `megamesh plan ... --json` (with "
                   "--serve: `megamesh plan --serve ... --json`)")
    p.add_argument("--serve", action="store_true",
                   help="write a serving deployment for a serving plan (default: a training JobSet)")
    p.add_argument("--name", help="JobSet or serving deployment name (prefixes pod hostnames; "
                   "default megamesh-train, or megamesh-serve with --serve)")
    p.add_argument(
        "--image",
        default="python:3.11-slim",
        help="container image with megamesh installed (default python:3.11-slim: replace it)",
    )
    p.add_argument(
        "--out-dir", default="/checkpoints", help="where runs go inside the pods (default /checkpoints)"
    )
    p.add_argument(
        "--volume-claim", help="PersistentVolumeClaim to mount at --out-dir (e.g. a GCS FUSE volume)"
    )
    p.add_argument("--steps", type=int, help="training steps (default: megamesh train's)")
    p.add_argument(
        "--max-restarts", type=int,
        help="JobSet restarts counted before giving up (default: the job's expected failures over "
        "--days x 1.5 + 10; infrastructure disruptions are not counted)",
    )
    p.add_argument("--days", type=float,
                   help="expected run length for the restart budget (default: the plan's time to "
                   "train, else 30)")
    p.add_argument("--diloco", metavar="islands=N,inner_steps=H",
                   help="run every slice as a DiLoCo island averaging every H steps, as `megamesh "
                   "train --diloco` (N, if given, must be the plan's slice count); a failed island "
                   "is recreated alone")
    p.add_argument("--spare-fraction", type=float,
                   help="spare slices to hold, as a fraction of the job's (default: the fleet "
                   "simulator's steady-state need, ~4.5%%; 0: none)")
    srv = p.add_argument_group("serving (--serve)")
    srv.add_argument("--model-dir", help="the checkpoint to serve inside the pods (a megamesh run or a "
                     "Hugging Face directory; default MOUNT/MODEL)")
    srv.add_argument("--mount-path", default="/models",
                     help="where --volume-claim is mounted (read-only) in the serving pods")
    srv.add_argument("--max-replicas", type=int,
                     help="the autoscaler's ceiling in replica groups (default 4x the plan's)")
    srv.add_argument("--queue-target", type=float,
                     help="waiting requests per replica the autoscaler holds (default: a quarter of "
                     "the plan's batch)")
    srv.add_argument("--kv-target", type=float, default=0.8,
                     help="KV cache use per replica (0-1) the autoscaler holds (default 0.8)")
    srv.add_argument("--drain-seconds", type=float, default=30.0,
                     help="`megamesh serve --drain-seconds` in the pods (the grace period adds to it)")
    srv.add_argument("--epp-image", help="the endpoint picker's image (default llm-d-router's "
                     "endpoint picker v0.9.0)")
    srv.add_argument("--gateway-class", help="the Gateway's class (default gke-l7-rilb: regional "
                     "internal; gke-l7-regional-external-managed for an external one)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--out", help="write the YAML to this new file (default: print it)")
    p.set_defaults(run=run)


TRAIN_ONLY = ("steps", "max_restarts", "days", "diloco", "spare_fraction")
SERVE_ONLY = ("model_dir", "max_replicas", "queue_target", "epp_image", "gateway_class")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    wrong = [f for f in (TRAIN_ONLY if args.serve else SERVE_ONLY) if getattr(args, f) is not None]
    if wrong:
        flags = ", ".join("--" + f.replace("_", "-") for f in wrong)
        raise ConfigError(f"{flags} {'is' if len(wrong) == 1 else 'are'} not allowed "
                          f"{'with --serve (training only)' if args.serve else 'without --serve'}")
    if args.serve:
        return run_serve(args)
    args.name = args.name or "megamesh-train"
    if args.max_restarts is not None and args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts} is not allowed: >= 0")
    if args.days is not None and args.days <= 0:
        raise ConfigError(f"--days {args.days} is not allowed: > 0")
    islands = inner = None
    if args.diloco is not None:
        islands, inner = parse_diloco(args.diloco, islands_required=False)
        if inner is None:
            raise ConfigError(f"--diloco {args.diloco!r} is not allowed: inner_steps=H is needed "
                              "(launch writes it into every island's train command)")
    if args.spare_fraction is not None and not 0 <= args.spare_fraction < 1:
        raise ConfigError(f"--spare-fraction {args.spare_fraction} is not allowed: 0 <= f < 1")
    plan = read_plan(args.plan)
    days = args.days or _plan_days(args.plan) or 30.0
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps} is not allowed: >= 1")
    m = manifests(
        plan,
        name=args.name,
        image=args.image,
        out_dir=args.out_dir,
        steps=args.steps,
        max_restarts=args.max_restarts,
        days=days,
        namespace=args.namespace,
        volume_claim=args.volume_claim,
        diloco_inner_steps=inner,
        diloco_islands=islands,
        spare_fraction=args.spare_fraction,
    )
    docs = [*m["priority_classes"], m["jobset"]] + ([m["spares"]] if m["spares"] else [])
    text = dump_all(docs)
    what = (f"{m['islands']} DiLoCo islands" if m["islands"] else f"{m['slices']} slice(s)")
    header = (
        f"# megamesh launch: {what} of {m['topology']} {m['accelerator']} "
        f"({m['chips']:,} chips), {m['hosts_per_slice']} hosts per slice, {m['processes']} processes"
        f" per jax job; restart budget {m['max_restarts']} ({m['failures_per_hour']:.2f} failures/h "
        f"over {days:.1f} days); {m['spare_slices']} spare slice(s)\n"
    )
    return _write(args.out, header, text)


def _write(out: str | None, header: str, text: str) -> int:
    """The manifests to a new file (never over one), or to stdout."""
    if out:
        write_new_file(out, header + text)
        print(f"wrote {out}: " + header[2:].strip())
    else:
        print(header + text, end="")
    return 0


def _plan_days(path: str) -> float | None:
    """The plan's predicted time to train, if it recorded one."""
    try:
        days = json.loads(Path(path).read_text()).get("training", {}).get("time_to_train_days")
    except (OSError, ValueError, AttributeError):
        return None
    return float(days) if isinstance(days, (int, float)) and days > 0 else None


def run_serve(args: argparse.Namespace) -> int:
    from megamesh.fleet.serve_launch import EPP_IMAGE, GATEWAY_CLASS, ordered, serve_manifests

    try:
        plan = json.loads(Path(args.plan).read_text())
    except OSError as e:
        raise ConfigError(f"--plan {args.plan}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"--plan {args.plan} is not JSON ({e}): write it with `megamesh plan "
                          "--serve ... --json`") from None
    if not isinstance(plan, dict):
        raise ConfigError(f"--plan {args.plan} is not a plan: write it with `megamesh plan --serve "
                          "... --json`")
    if not 0 <= args.drain_seconds <= 86400:
        raise ConfigError(f"--drain-seconds {args.drain_seconds} is not allowed: 0..86400")
    m = serve_manifests(plan, name=args.name or "megamesh-serve", image=args.image,
                        model_dir=args.model_dir, namespace=args.namespace,
                        volume_claim=args.volume_claim, mount_path=args.mount_path,
                        max_replicas=args.max_replicas, queue_target=args.queue_target,
                        kv_target=args.kv_target, drain_seconds=args.drain_seconds,
                        epp_image=args.epp_image or EPP_IMAGE,
                        gateway_class=args.gateway_class or GATEWAY_CLASS)
    lay = m["layout"]
    text = dump_all(ordered(m))
    rounded = ("" if lay["planned_chips"] == lay["chips"] else
               f" (the plan's {lay['planned_chips']}-chip replica rounded up to whole hosts; "
               f"{lay['planned_replicas']} planned replicas -> {lay['replicas']})")
    header = (f"# megamesh launch --serve: {lay['replicas']} replica group(s) of {lay['model']} "
              f"({lay['weights']} weights), each {lay['hosts']} {lay['accelerator']} host(s) = "
              f"{lay['chips']} chips ({lay['topology']}), mesh tensor={lay['tensor']}, context "
              f"{lay['max_len']:,} tokens, {lay['slots']} slots{rounded}; autoscaled up to "
              f"{m['hpa']['spec']['maxReplicas']} on queue and KV use; routed by the InferencePool's "
              "endpoint picker\n")
    return _write(args.out, header, text)
