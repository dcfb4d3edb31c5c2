"""The `patchcore` console script: the library's commands (fit, predict, demo-data) plus the
pipeline's (validate, data, train, evaluate, promote, rollback, inspect, status).

build_parser is the one place the parser is put together: the library's add_* functions
(patchcore/cli.py), then apps/data_commands.py and apps/commands.py register theirs. Its `evaluate`
is the application's (apps/commands.py), which also takes the library's form (--model DIR --data DIR).
"""

from __future__ import annotations

import argparse
import sys

from apps import commands, data_commands
from patchcore import cli as library_cli
from patchcore.errors import ConfigError
from pipeline import credentials


def build_parser() -> argparse.ArgumentParser:
    parser, sub = library_cli.new_parser()
    library_cli.add_fit(sub)
    library_cli.add_predict(sub)
    library_cli.add_demo_data(sub)
    data_commands.register(sub)
    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before Prefect is imported (it reads its settings once): the servers' credentials, from the
    # environment or the file `make serve` wrote (pipeline/credentials.py).
    try:
        credentials.apply()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return library_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
