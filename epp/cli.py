"""`epp serve | reconcile | render | pool | sidecar | sim`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand is used, so
`epp serve` never pays for the reconciler's or simulator's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("epp.serve", "run the endpoint picker (Envoy ext_proc service)"),
    "reconcile": ("epp.reconcile.cli_reconcile", "run the ModelPool reconciler"),
    "render": ("epp.reconcile.cli_render", "render a ModelPool's objects offline"),
    "pool": ("epp.reconcile.cli_pool", "business assignment: status | assign | distribute"),
    "sidecar": ("epp.sidecar.cli", "run the P/D decode-pod sidecar (remote prefill proxy)"),
    "sim": ("epp.sim.cli", "run vLLM-compatible model-server simulators"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="epp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not args_list or args_list[0] not in SUBCOMMANDS:
        parser.parse_args(args_list)  # prints usage / error and exits
        parser.print_help()
        return 2
    name = args_list[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"epp {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(args_list[1:])
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
