"""The single-machine servers behind `make serve`, `make stop` and `make env`, with authentication:

    python -m deploy.servers up [--prefect-port 4200] [--mlflow-port 5000] [-- <deploy.serve args>]
    python -m deploy.servers down
    python -m deploy.servers env        # eval "$(python -m deploy.servers env)" in another shell

`up` starts, each bound to 127.0.0.1 and in its own process group:
  - a Prefect server with its API auth string, CSRF protection and CORS limited to its own UI origin;
  - an MLflow tracking server running MLflow's `basic-auth` app on the pipeline's SQLite store, with
    proxied artifacts (clients upload through it over HTTP). Accounts: `pipeline` (MLflow's admin:
    the one that registers models and moves aliases) and `viewer` (read-only: default permission
    READ; the model server and people in the UI);
  - the deployments and the new-data watcher (`python -m deploy.serve`), as the pipeline account.
Credentials are generated once into `$PATCHCORE_HOME/run/credentials.env` (clients'; mode 0600, see
pipeline/credentials.py) and `server-secrets.env` (the servers' own), logs and pid files into
`$PATCHCORE_HOME/run/`. `up` refuses to start twice, clears pid files of processes that are gone
(after a crash or a reboot), and stops what it started if a server does not come up. `down` stops
exactly the process groups its pid files name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from patchcore.errors import ConfigError
from patchcore.paths import home
from pipeline import credentials

# Stopped in this order (the reverse of start).
PROCESSES = ("model", "deployments", "mlflow", "prefect")
PIPELINE_ACCOUNT, VIEWER_ACCOUNT = "pipeline", "viewer"
HEALTH_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Servers:
    home: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow" / "mlflow.db"

    @property
    def credentials_file(self) -> Path:
        return self.run_dir / "credentials.env"

    @property
    def secrets_file(self) -> Path:
        return self.run_dir / "server-secrets.env"

    @property
    def auth_config(self) -> Path:
        return self.run_dir / "mlflow-auth.ini"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"


# -- credentials -----------------------------------------------------------------------------------
def _password() -> str:
    return secrets.token_urlsafe(24)  # 32 characters: above MLflow's 12-character minimum


def ensure_credentials(servers: Servers) -> tuple[dict[str, str], dict[str, str]]:
    """(clients' credentials, servers' secrets), generated on first use. New credentials start a new
    MLflow account store (its users are only the pipeline's two accounts)."""
    if servers.credentials_file.is_file() and servers.secrets_file.is_file():
        return credentials.read(servers.credentials_file), credentials.read(servers.secrets_file)
    client = {
        credentials.PREFECT_AUTH: f"{PIPELINE_ACCOUNT}:{_password()}",
        credentials.MLFLOW_USER: PIPELINE_ACCOUNT,
        credentials.MLFLOW_PASSWORD: _password(),
        credentials.VIEWER_USER: VIEWER_ACCOUNT,
        credentials.VIEWER_PASSWORD: _password(),
    }
    server = {"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    (servers.run_dir / "mlflow-auth.db").unlink(missing_ok=True)
    credentials.write(servers.credentials_file, client, "patchcore clients' credentials (deploy/servers.py); keep 0600")
    credentials.write(servers.secrets_file, server, "patchcore servers' secrets (deploy/servers.py); keep 0600")
    return client, server


def _write_auth_config(servers: Servers, client: dict[str, str], database_uri: str | None = None) -> None:
    default_uri = f"sqlite:///{servers.run_dir / 'mlflow-auth.db'}"
    text = "\n".join(
        [
            "[mlflow]",
            "default_permission = READ",
            f"database_uri = {database_uri or default_uri}",
            f"admin_username = {client[credentials.MLFLOW_USER]}",
            f"admin_password = {client[credentials.MLFLOW_PASSWORD]}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "grant_default_workspace_access = true",
            "",
        ]
    )
    credentials.write_private(servers.auth_config, text)


# -- processes -------------------------------------------------------------------------------------
def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) and None for a process that is gone or a
    zombie: with the pid it identifies the process across pid reuse (after a reboot)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def running(servers: Servers, name: str) -> int | None:
    """The pid in `name`.pid when that very process still runs; a stale pid file (the process is
    gone, a zombie, or the pid now belongs to another process) is removed."""
    path = servers.pid_file(name)
    try:
        pid_text, _, started = path.read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    now = _started(pid)
    if now is None or (started and now != started):
        path.unlink(missing_ok=True)
        return None
    return pid


def start(
    servers: Servers, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None, user: str | None = None
) -> int:
    """Start `argv` in its own process group (as `user` when given), output appended to `name`.log."""
    servers.run_dir.mkdir(parents=True, exist_ok=True)
    with open(servers.log_file(name), "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=user,
            group=user,
        )
    servers.pid_file(name).write_text(f"{proc.pid} {_started(proc.pid) or ''}\n")
    return proc.pid


def stop(servers: Servers, name: str, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> bool:
    """`sig` to the process group `name`.pid names, SIGKILL after `timeout_s`; False if none ran."""
    pid = running(servers, name)
    if pid is None:
        return False
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)  # our own child (tests): reap it
        except ChildProcessError:
            waited = 0
        if waited == pid or _started(pid) is None:  # reaped, gone, or a zombie nobody reaps
            break
        time.sleep(0.25)
    try:
        os.killpg(pid, signal.SIGKILL)  # what is left of the group
    except ProcessLookupError:
        pass
    servers.pid_file(name).unlink(missing_ok=True)
    return True


def wait_healthy(url: str, log: Path, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.is_file() else ""
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s; the end of {log}:\n{tail}")


def base_env(servers: Servers) -> dict[str, str]:
    # Not inherited: Prefect's settings and MLflow's store addresses (mlflow.set_registry_uri exports
    # MLFLOW_REGISTRY_URI: a registry named there would take every registration away from these servers).
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))
    }
    for key in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.setdefault("PREFECT_HOME", str(servers.home / "prefect"))
    env |= {
        "PATCHCORE_HOME": str(servers.home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return env


def client_env(servers: Servers, client: dict[str, str], role: str = "pipeline") -> dict[str, str]:
    """What a client process of these servers needs (the pipeline account, or the viewer's)."""
    user, password = (
        (client[credentials.MLFLOW_USER], client[credentials.MLFLOW_PASSWORD])
        if role == "pipeline"
        else (client[credentials.VIEWER_USER], client[credentials.VIEWER_PASSWORD])
    )
    return {
        "PREFECT_API_URL": servers.prefect_api,
        credentials.PREFECT_AUTH: client[credentials.PREFECT_AUTH],
        "MLFLOW_TRACKING_URI": servers.mlflow_uri,
        "MLFLOW_REGISTRY_URI": servers.mlflow_uri,
        credentials.MLFLOW_USER: user,
        credentials.MLFLOW_PASSWORD: password,
        "PATCHCORE_CREDENTIALS": str(servers.credentials_file),
    }


def start_prefect(servers: Servers, client: dict[str, str], extra_env: dict[str, str] | None = None) -> int:
    env = (
        base_env(servers)
        | (extra_env or {})
        | {
            "PREFECT_SERVER_API_AUTH_STRING": client[credentials.PREFECT_AUTH],
            "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": servers.prefect_ui,
            "PREFECT_UI_API_URL": servers.prefect_api,
            # concurrency leases on disk, not in the server's memory: they survive a restart of the server
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        }
    )
    for key in ("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS",):
        if key in os.environ:
            env[key] = os.environ[key]
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    return start(servers, "prefect", [*argv, "--port", str(servers.prefect_port)], env)


def start_mlflow(
    servers: Servers,
    client: dict[str, str],
    server: dict[str, str],
    stores: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> int:
    """stores: {"backend": URI, "artifacts": URI, "auth": URI} (default: SQLite and a folder under
    $PATCHCORE_HOME/mlflow, the single-machine set-up); extra_env: e.g. the S3 endpoint and keys."""
    stores = stores or {}
    _write_auth_config(servers, client, stores.get("auth"))
    if not stores.get("backend"):  # the single-machine SQLite store lives here
        servers.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
    env = base_env(servers) | (extra_env or {}) | server | {"MLFLOW_AUTH_CONFIG_PATH": str(servers.auth_config)}
    argv = [
        *(sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"),
        *("--host", "127.0.0.1", "--port", str(servers.mlflow_port), "--workers", "1"),
        *("--backend-store-uri", stores.get("backend") or f"sqlite:///{servers.mlflow_db}"),
        *("--artifacts-destination", stores.get("artifacts") or str(servers.home / "mlflow" / "artifacts")),
        *("--allowed-hosts", f"127.0.0.1:{servers.mlflow_port},localhost:{servers.mlflow_port}"),
        *("--cors-allowed-origins", servers.mlflow_uri),
    ]
    return start(servers, "mlflow", argv, env)


def ensure_viewer(servers: Servers, client: dict[str, str]) -> None:
    """The read-only account (default permission READ), created once by the pipeline (admin) account."""
    import requests  # noqa: PLC0415  (MLflow's dependency)

    auth = (client[credentials.MLFLOW_USER], client[credentials.MLFLOW_PASSWORD])
    viewer = {"username": client[credentials.VIEWER_USER], "password": client[credentials.VIEWER_PASSWORD]}
    url = f"{servers.mlflow_uri}/api/2.0/mlflow/users"
    found = requests.get(f"{url}/get", params={"username": viewer["username"]}, auth=auth, timeout=30)
    if found.status_code == 200:
        return
    made = requests.post(f"{url}/create", json=viewer, auth=auth, timeout=30)
    if made.status_code != 200:
        raise RuntimeError(f"could not create the MLflow account {viewer['username']!r}: HTTP {made.status_code}")


def start_deployments(servers: Servers, client: dict[str, str], serve_args: list[str], cwd: Path | None = None) -> int:
    env = base_env(servers) | client_env(servers, client)
    return start(servers, "deployments", [sys.executable, "-m", "deploy.serve", *serve_args], env, cwd)


def up(servers: Servers, serve_args: list[str], deployments: bool = True) -> dict[str, int]:
    """Start the servers (and the deployments); stops what it started when something fails."""
    already = {name: pid for name in PROCESSES if (pid := running(servers, name))}
    if already:
        names = ", ".join(f"{name} ({pid})" for name, pid in already.items())
        raise ConfigError(f"already running: {names}; stop them first with `make stop`")
    servers.run_dir.mkdir(parents=True, exist_ok=True)
    servers.run_dir.chmod(0o700)  # credentials, the MLflow account store, logs: the owner's only
    client, server = ensure_credentials(servers)
    started: dict[str, int] = {}
    try:
        started["prefect"] = start_prefect(servers, client)
        started["mlflow"] = start_mlflow(servers, client, server)
        wait_healthy(f"{servers.prefect_api}/health", servers.log_file("prefect"))
        wait_healthy(f"{servers.mlflow_uri}/health", servers.log_file("mlflow"))
        ensure_viewer(servers, client)
        if deployments:
            started["deployments"] = start_deployments(servers, client, serve_args, Path.cwd())
    except BaseException:
        for name in reversed(list(started)):
            stop(servers, name)
        raise
    return started


def down(servers: Servers) -> list[str]:
    return [name for name in PROCESSES if stop(servers, name)]


def env_lines(servers: Servers) -> list[str]:
    """Shell lines that give another shell the servers' addresses and the pipeline's credentials
    (sourced from the 0600 file, never printed)."""
    lines = [
        f"export PATCHCORE_HOME={servers.home}",
        f"export PREFECT_API_URL={servers.prefect_api}",
        f"export MLFLOW_TRACKING_URI={servers.mlflow_uri}",
        f"export MLFLOW_REGISTRY_URI={servers.mlflow_uri}",
        f"export PATCHCORE_CREDENTIALS={servers.credentials_file}",
    ]
    if servers.credentials_file.is_file():
        lines.append(f"set -a; . {servers.credentials_file}; set +a")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: arguments of deploy.serve")
    args = parser.parse_args(argv)
    servers = Servers(home(), args.prefect_port, args.mlflow_port)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    if args.command == "env":
        print("\n".join(env_lines(servers)))
        return 0
    if args.command == "down":
        stopped = down(servers)
        print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        return 0
    try:
        up(servers, serve_args)
    except (ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Prefect UI   {servers.prefect_ui}  (API auth string: {credentials.PREFECT_AUTH} in the file below)")
    print(
        f"MLflow UI    {servers.mlflow_uri}/#/experiments?workflowType=machine_learning  "
        f"(log in as {VIEWER_ACCOUNT}, or {PIPELINE_ACCOUNT} to change things)"
    )
    print(f"credentials  {servers.credentials_file} (mode 0600)")
    print(f"logs         {servers.run_dir}/{{prefect,mlflow,deployments}}.log; stop with: make stop")
    print('other shell  source .venv/bin/activate; eval "$(make -s env)"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
