"""`epp serve | reconcile | render | pool | sim`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand is used, so
`epp serve` never pays for the reconciler's or simulator's imports.

User errors (bad flags, config or endpoints files, kubeconfig, render input) end as one
line on stderr and exit status 2: `UserError` from anywhere below, and argparse's own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from epp.api.errors import UserError, one_line

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("epp.serve", "run the endpoint picker (Envoy ext_proc service)"),
    "reconcile": ("epp.reconcile.cli_reconcile", "run the ModelPool reconciler"),
    "render": ("epp.reconcile.cli_render", "render a ModelPool's objects offline"),
    "pool": ("epp.reconcile.cli_pool", "business assignment: status | assign | distribute"),
    "sidecar": ("epp.sidecar.cli", "run the P/D decode-pod sidecar (remote prefill proxy)"),
    "sim": ("epp.sim.cli", "run vLLM-compatible model-server simulators"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default unless the help already says it, or it is off/empty."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or default in (None, False, "", [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An argument error is one line (with a pointer to --help), not the whole usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)  # sub-subcommands too
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, with its flags (tests check every flag's help)."""
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = Parser(prog=f"epp {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="epp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not args_list or args_list[0] not in SUBCOMMANDS:
        parser.parse_args(args_list)  # prints usage / error and exits
        parser.print_help()
        return 2
    name = args_list[0]
    args = make_parser(name).parse_args(args_list[1:])
    args.raw_argv = args_list[1:]  # `epp serve --workers N` re-runs itself per worker
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        result: int = module.run(args)
    except UserError as e:
        print(f"epp {name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
