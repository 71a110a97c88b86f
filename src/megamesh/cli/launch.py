"""`megamesh launch`: Kubernetes JobSet manifests for a planned TPU training job (GKE)."""

from __future__ import annotations

import argparse

import yaml

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
        "--max-restarts", type=int, default=10, help="JobSet restarts before giving up (default 10)"
    )
    p.add_argument("--namespace", default="default")
    p.add_argument("--out", help="write the YAML to this new file (default: print it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts} is not allowed: >= 0")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps} is not allowed: >= 1")
    m = manifests(
        read_plan(args.plan),
        name=args.name,
        image=args.image,
        out_dir=args.out_dir,
        steps=args.steps,
        max_restarts=args.max_restarts,
        namespace=args.namespace,
        volume_claim=args.volume_claim,
    )
    text = yaml.safe_dump(m["jobset"], sort_keys=False, width=120)
    header = (
        f"# megamesh launch: {m['slices']} slice(s) of {m['topology']} {m['accelerator']} "
        f"({m['chips']:,} chips), {m['hosts_per_slice']} hosts per slice, {m['processes']} processes\n"
    )
    if args.out:
        write_new_file(args.out, header + text)
        print(f"wrote {args.out}: " + header[2:].strip())
    else:
        print(header + text, end="")
    return 0
