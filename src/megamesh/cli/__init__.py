"""The `megamesh` command: one subcommand per verb; modules here only parse, build and run.

Start-up stays fast for every verb: subcommand modules import pure-Python layers (plan,
fleet, configs) at the top and the jax-side ones (train, serve, compile's lowering)
inside `run()`, so `megamesh plan` and `megamesh fleet` never load jax."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megamesh.cli import bench, compile_cmd, data, fleet, inspect_cmd, launch, plan, quickstart, serve, train
from megamesh.errors import MegameshError
from megamesh.platform import default_to_cpu_without_accelerator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamesh",
        description="Plan, compile, train and serve decoder-only LLMs from one CPU to a TPU fleet.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    quickstart.add_parser(sub)
    inspect_cmd.add_parser(sub)
    train.add_parser(sub)
    data.add_parser(sub)
    plan.add_parser(sub)
    compile_cmd.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    fleet.add_parser(sub)
    launch.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    default_to_cpu_without_accelerator()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return int(args.run(args, extra) or 0)
    except MegameshError as e:
        print(f"megamesh {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file the command reads or writes: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"megamesh {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"megamesh {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
