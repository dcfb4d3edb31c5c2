"""The servers' credentials, as every client reads them (flows, the CLI, the deployments, the
watcher, the model server).

`make serve` (deploy/servers.py) generates them once into `$PATCHCORE_HOME/run/credentials.env`, a
file only its owner can read (mode 0600), in shell `KEY=value` form:

    PREFECT_API_AUTH_STRING     the Prefect server's API auth string (`user:password`)
    MLFLOW_TRACKING_USERNAME    the pipeline's MLflow account: the one that may move aliases
    MLFLOW_TRACKING_PASSWORD
    PATCHCORE_VIEWER_USERNAME   a read-only MLflow account (the model server, people in the UI)
    PATCHCORE_VIEWER_PASSWORD

A client takes each value from its environment when set there, else from the file named by
PATCHCORE_CREDENTIALS, else from the default file when it exists. A file that others can read is
refused (the message says `chmod 600 <file>`). No Prefect and no MLflow here: the CLI calls
`apply()` before either is imported (Prefect reads its settings once, at import).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from patchcore.errors import ConfigError
from patchcore.paths import home

PREFECT_AUTH = "PREFECT_API_AUTH_STRING"
MLFLOW_USER, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
VIEWER_USER, VIEWER_PASSWORD = "PATCHCORE_VIEWER_USERNAME", "PATCHCORE_VIEWER_PASSWORD"
# The S3 store's keys (`make stack`: botocore and s3fs read them from the environment).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CLIENT_KEYS = (PREFECT_AUTH, MLFLOW_USER, MLFLOW_PASSWORD, VIEWER_USER, VIEWER_PASSWORD, *S3_KEYS)


def default_path() -> Path:
    return home() / "run" / "credentials.env"


def path_in_use() -> Path | None:
    """The credentials file a client reads: PATCHCORE_CREDENTIALS, else the default one if present."""
    named = os.environ.get("PATCHCORE_CREDENTIALS")
    if named:
        return Path(named).expanduser()
    found = default_path()
    return found if found.is_file() else None


def check_private(path: Path) -> None:
    """Refuse a secrets file that its group or others can read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: holds passwords but is readable by others (mode {stat.filemode(mode)}): run `chmod 600 {path}`"
        )


def read(path: Path) -> dict[str, str]:
    """KEY=value lines (comments and blank lines skipped; no shell expansion)."""
    if not path.is_file():
        raise ConfigError(f"credentials file {path} does not exist: start the servers with `make serve`")
    check_private(path)
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=value, found {line[:40]!r}")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def write_private(path: Path, text: str) -> Path:
    """A file created with mode 0600 (never readable by others, not even for a moment), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
    return path


def write(path: Path, values: dict[str, str], comment: str) -> Path:
    """A KEY=value secrets file (mode 0600)."""
    return write_private(path, f"# {comment}\n" + "".join(f"{k}={v}\n" for k, v in values.items()))


def apply(role: str = "pipeline") -> Path | None:
    """Put the credentials file's client values into os.environ where the environment has none.
    role "viewer" uses the file's read-only MLflow account even over an inherited one (the model
    server). Returns the file used."""
    path = path_in_use()
    if path is None:
        return None
    values = read(path)
    if role == "viewer" and values.get(VIEWER_USER):  # least privilege wins over an inherited account
        os.environ[MLFLOW_USER], os.environ[MLFLOW_PASSWORD] = values[VIEWER_USER], values.get(VIEWER_PASSWORD, "")
    for key in CLIENT_KEYS:
        if values.get(key) and not os.environ.get(key):
            os.environ[key] = values[key]
    return path


__all__ = ["apply", "check_private", "default_path", "path_in_use", "read", "write", "write_private"]
