"""The `patchcore` console script: the library's commands (fit, predict, evaluate, demo-data)
plus the pipeline's. Each pipeline module registers its own sub-commands here."""

from __future__ import annotations

import sys

from patchcore import cli as library_cli


def build_parser():
    parser = library_cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    # Pipeline modules add their commands here: each exposes register(subparsers).
    from pipeline import commands, data_commands

    return [data_commands.register, commands.register]


def main(argv: list[str] | None = None) -> int:
    return library_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
