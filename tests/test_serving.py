"""Serving smoke test: a registered champion served by `mlflow models serve --env-manager local` on
a free loopback port answers /invocations (base64-encoded PNG in `dataframe_records`, the README's
format) with a score and a label; the server is stopped (its process group killed) at the end."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import PARAMS, REPO, pipeline_home, tiny_overrides

TINY = tiny_overrides()
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, product):
    """patchcore-tiles v1, trained by the flow on the tiny config and made champion, in a temporary store."""
    root = tmp_path_factory.mktemp("serving")
    with pipeline_home(root):
        from flows.train import train
        from pipeline.config import MlflowConfig
        from pipeline.registry import Registry

        result = train("tiles", str(product), PARAMS, TINY)
        registry = Registry(MlflowConfig())
        registry.set_alias("tiles", "champion", result["registry"]["version"])
        yield {"uri": registry.uri, "threshold": result["calibration"]["threshold"], "product": product}


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion["uri"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/patchcore-tiles@champion",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow models serve did not answer /ping within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_served_champion_scores_base64_images_with_a_label(server, champion):
    good = champion["product"] / "test" / "good" / "000.png"
    defect = next((champion["product"] / "test").glob("scratch/*.png"))
    body = {"dataframe_records": [{"image": base64.b64encode(p.read_bytes()).decode()} for p in (good, defect)]}
    status, answer = post(server, body)
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 2
    for row in rows:
        assert isinstance(row["score"], float) and isinstance(row["is_anomalous"], bool)
        assert row["threshold"] == pytest.approx(champion["threshold"], rel=1e-6)
        assert row["is_anomalous"] == (row["score"] >= row["threshold"])


def test_served_model_rejects_a_row_that_is_not_an_image(server):
    status, answer = post(server, {"dataframe_records": [{"image": base64.b64encode(b"not an image").decode()}]})
    assert status >= 400 and "not a decodable image" in json.dumps(answer)


def readme_block(containing: str) -> str:
    """The README's bash code block that contains `containing`, as written."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"expected one README bash block with {containing!r}, found {len(found)}"
    return found[0]


def test_the_readme_curl_example_works_as_written(server, champion, tmp_path):
    """The README's request-file + curl commands, pasted into bash in a folder with `data/tiles`, against
    the served champion; only the port differs (the test server's free port instead of 5001). A real
    demo image in base64 is longer than one shell argument may be: the block must not need one."""
    block = readme_block("--data @request.json")
    assert "http://127.0.0.1:5001/invocations" in block
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiles").symlink_to(champion["product"])
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.replace("http://127.0.0.1:5001", server)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert [set(row) for row in answer["predictions"]] == [{"score", "is_anomalous", "threshold"}] * 2
    assert (tmp_path / "request.json").stat().st_size > 1000
