"""`megamesh launch`: Kubernetes JobSet manifests for a planned TPU training job (GKE)."""

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="write the JobSet manifests for a planned multi-slice TPU job",
        description="Turn `megamesh plan --json` output into a Kubernetes JobSet for GKE "
        "(one Indexed Job per slice, one pod per TPU host), as xpk does.",
    )
    p.add_argument("--plan", required=True, help="a training plan from `megamesh plan ... --json`")
    p.add_argument("--name", default="megamesh-train", help="JobSet name (prefixes pod hostnames)")
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
    p.add_argument("--namespace", default="default")
    p.add_argument("--out", help="write the YAML to this new file (default: print it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
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
    text = yaml.safe_dump_all(docs, sort_keys=False, width=120)
    what = (f"{m['islands']} DiLoCo islands" if m["islands"] else f"{m['slices']} slice(s)")
    header = (
        f"# megamesh launch: {what} of {m['topology']} {m['accelerator']} "
        f"({m['chips']:,} chips), {m['hosts_per_slice']} hosts per slice, {m['processes']} processes"
        f" per jax job; restart budget {m['max_restarts']} ({m['failures_per_hour']:.2f} failures/h "
        f"over {days:.1f} days); {m['spare_slices']} spare slice(s)\n"
    )
    if args.out:
        write_new_file(args.out, header + text)
        print(f"wrote {args.out}: " + header[2:].strip())
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
