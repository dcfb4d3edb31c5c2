"""The `patchcore` console script: the library's commands (fit, predict, demo-data) plus the
pipeline's (validate, data, train, evaluate, promote, rollback, inspect, status).

build_parser is the one place the parser is put together: the library's add_* functions
(patchcore/cli.py), then apps/data_commands.py and apps/commands.py register theirs. Its `evaluate`
is the application's (apps/commands.py), which also takes the library's form (--model DIR --data DIR).
"""

from __future__ import annotations

import argparse
import signal
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


def _terminated(signum: int, frame) -> None:
    # Called directly, or by Prefect after it marked the running flow Crashed (it re-sends the signal
    # to the handler it found): one line, then the conventional exit status 128 + signal.
    print(
        f"error: stopped by {signal.Signals(signum).name}: the steps that finished are in the store and a "
        "rerun reuses them; a half-made registration is marked orphaned by the next run",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    # Before Prefect is imported (it reads its settings once): the servers' credentials, from the
    # environment or the file `make serve` wrote (pipeline/credentials.py).
    try:
        credentials.apply()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return library_cli.run(build_parser(), argv)
    except BaseException as exc:
        signum = _termination(exc)
        if signum is None:
            raise
        _terminated(signum, None)
        raise  # not reached: _terminated exits


def _termination(exc: BaseException) -> int | None:
    """The signal number when `exc` is (or was raised while handling) Prefect's TerminationSignal:
    a flow stopped by SIGTERM whose crash report then failed too (its temporary server was stopped by
    the same signal)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "TerminationSignal" and isinstance(getattr(exc, "signal", None), int):
            return exc.signal
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
