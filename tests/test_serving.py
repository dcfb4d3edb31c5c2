"""Serving: a registered champion served as `make serve-model` serves it (deploy/model_server.py:
MLflow's scoring app behind the guard) on a free loopback port answers /invocations (base64-encoded
PNG in `dataframe_records`, the README's format) with a score and a label, and refuses what an
attacker or a careless client sends (path probing, FIFOs, decompression bombs, too many rows, tiny
images, foreign Host and Origin headers, simple cross-origin content types) with a one-line 4xx
message and no stack trace; the server is stopped (its process group killed) at the end."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import PARAMS, REPO, free_port, pipeline_home, tiny_overrides
from PIL import Image

TINY = tiny_overrides()
START_TIMEOUT_S = 120


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
    roots = tmp_path_factory.mktemp("allowed-images")
    env["PATCHCORE_SERVE_PATH_ROOTS"] = str(roots)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy.model_server",
                "--model",
                "models:/patchcore-tiles@champion",
                "--port",
                str(port),
            ],
            cwd=REPO,
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
        yield {"url": url, "pid": proc.pid, "roots": roots, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def png(width: int, height: int, value: int = 128) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height), value).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def rss_kib(pid: int) -> int:
    """Resident memory of the server's process tree (uvicorn runs the app in the started process)."""
    return int(
        next(
            line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS")
        )
    )


def test_served_champion_scores_base64_images_with_a_label(server, champion):
    good = champion["product"] / "test" / "good" / "000.png"
    defect = next((champion["product"] / "test").glob("scratch/*.png"))
    body = {"dataframe_records": [{"image": base64.b64encode(p.read_bytes()).decode()} for p in (good, defect)]}
    status, answer = post(server["url"], body)
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 2
    for row in rows:
        assert isinstance(row["score"], float) and isinstance(row["is_anomalous"], bool)
        assert row["threshold"] == pytest.approx(champion["threshold"], rel=1e-6)
        assert row["is_anomalous"] == (row["score"] >= row["threshold"])


def test_served_model_rejects_a_row_that_is_not_an_image(server):
    status, answer = post(server["url"], {"dataframe_records": [{"image": base64.b64encode(b"not an image").decode()}]})
    assert status == 400 and answer["message"].startswith("row 0: `image` bytes are not a decodable image")
    assert set(answer) == {"error_code", "message"}  # no stack trace, no echo of the request


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
        ["bash", "-euo", "pipefail", "-c", block.replace("http://127.0.0.1:5001", server["url"])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert [set(row) for row in answer["predictions"]] == [{"score", "is_anomalous", "threshold"}] * 2
    assert (tmp_path / "request.json").stat().st_size > 1000


def test_path_inputs_are_off_outside_the_allowed_folders_and_do_not_reveal_what_exists(server, champion):
    secret = "/etc/hostname"
    missing = "/nonexistent/secret.png"
    answers = [post(server["url"], {"dataframe_records": [{"path": p}]}) for p in (secret, missing)]
    assert [status for status, _ in answers] == [400, 400]
    assert answers[0][1]["message"] == answers[1][1]["message"]  # the same words: no probing of what exists
    escape = f"{server['roots']}/../../../../etc/hostname"
    assert post(server["url"], {"dataframe_records": [{"path": escape}]})[1]["message"] == answers[0][1]["message"]
    link = server["roots"] / "link.png"
    link.symlink_to(champion["product"] / "test" / "good" / "000.png")  # a link out of the folder
    assert post(server["url"], {"dataframe_records": [{"path": str(link)}]})[0] == 400
    inside = server["roots"] / "good.png"
    inside.write_bytes((champion["product"] / "test" / "good" / "000.png").read_bytes())
    status, answer = post(server["url"], {"dataframe_records": [{"path": str(inside)}]})
    assert status == 200 and len(answer["predictions"]) == 1


def test_a_fifo_under_the_allowed_folder_is_refused_at_once_and_the_server_stays_responsive(server):
    fifo = server["roots"] / "blocker.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    status, answer = post(server["url"], {"dataframe_records": [{"path": str(fifo)}]})
    assert status == 400 and time.monotonic() - start < 10  # not blocked until someone writes to it
    assert post(server["url"], {"dataframe_records": [{"image": png(64, 64)}]})[0] == 200


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(server):
    bomb = png(12000, 12000)  # ~140 KB of PNG, 144 Mpx (432 MB as RGB)
    before = rss_kib(server["pid"])
    status, answer = post(server["url"], {"dataframe_records": [{"image": bomb}]})
    assert status == 400 and "12000x12000 px" in answer["message"] and "not decoded" in answer["message"]
    assert rss_kib(server["pid"]) - before < 300 * 1024  # no 432 MB image was ever decoded


def test_tiny_images_and_too_many_rows_are_refused_with_the_row_named(server):
    for size in ((1, 1), (3, 200)):
        status, answer = post(server["url"], {"dataframe_records": [{"image": png(64, 64)}, {"image": png(*size)}]})
        assert status == 400 and answer["message"].startswith(f"row 1: {size[0]}x{size[1]} px; images need at least")
    status, answer = post(server["url"], {"dataframe_records": [{"image": png(64, 64)}] * 65})
    assert status == 400 and "65 rows in one request; at most 64" in answer["message"]


def test_foreign_hosts_cross_origin_requests_and_simple_content_types_are_refused(server):
    body = {"dataframe_records": [{"image": png(64, 64)}]}
    status, answer = post(server["url"], body, {"Host": "attacker.example"})  # DNS rebinding
    assert status == 400 and "not served here" in answer["message"]
    assert post(server["url"], body, {"Host": "localhost:1234"})[0] == 200
    status, answer = post(server["url"], body, {"Origin": "http://attacker.example"})
    assert status == 403 and "cross-origin" in answer["message"]
    status, answer = post(server["url"], b"image\nabc\n", {"Content-Type": "text/csv"})  # no CORS preflight
    assert status == 415
    # A body announced larger than the limit is refused before it is read.
    connection = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(65 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and b"larger than" in response.read()
    connection.close()


def test_error_answers_never_carry_a_stack_trace_or_the_servers_paths(server):
    status, answer = post(server["url"], {"dataframe_records": [{"wrong_column": 1}]})
    text = json.dumps(answer)
    assert 400 <= status < 500 and "Traceback" not in text and "stack_trace" not in answer
    assert str(REPO) not in text and "/site-packages/" not in text


def test_a_model_json_edited_after_registration_is_refused_when_loaded_or_served(champion, tmp_path):
    """The registered digest covers the whole saved model: raising the threshold to 1e9 in model.json
    (every defect would pass) is noticed by the registry download, by PatchCore.load with the digest
    and by the served pyfunc model, each with a clear message."""
    import mlflow

    from patchcore import PatchCore
    from patchcore.errors import ModelFileError
    from pipeline.config import MlflowConfig
    from pipeline.registry import Registry, RegistryError

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", champion["uri"])
        registry = Registry(MlflowConfig())
        version = registry.version("tiles", "champion")
        folder = registry.download("tiles", version.version)  # intact: loads
        PatchCore.load(folder, digest=version.tags["model_sha256"])
        copy = tmp_path / "served"
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/patchcore-tiles/{version.version}", dst_path=str(copy)
        )
        for model_json in (folder / "model.json", next(copy.rglob("model.json"))):
            meta = json.loads(model_json.read_text())
            meta["threshold"] = 1e9
            model_json.write_text(json.dumps(meta))
        with pytest.raises(RegistryError, match="differs from the registered one"):
            registry.download("tiles", version.version)
        with pytest.raises(ModelFileError, match="differs from the model that was registered"):
            PatchCore.load(folder, digest=version.tags["model_sha256"])
        with pytest.raises(Exception, match="differs from the model that was registered"):
            mlflow.pyfunc.load_model(str(copy))


def test_an_error_answer_never_echoes_the_request():
    from deploy.model_server import clean_error

    echoed = json.dumps({"error_code": "BAD_REQUEST", "message": "Invalid input. Ensure ...\nInput: \n" + "A" * 5000})
    cleaned = json.loads(clean_error(echoed.encode()))
    assert "AAAA" not in cleaned["message"] and len(cleaned["message"]) < 200
    model = json.dumps(
        {"error_code": "INVALID_PARAMETER_VALUE", "message": "Failed to predict data 'xyz'. \nError: row 3: bad"}
    )
    assert json.loads(clean_error(model.encode()))["message"] == "row 3: bad"


def test_a_16_bit_image_is_served_the_score_of_its_8_bit_conversion(server, champion):
    """Before the fix the server clipped a 16-bit image to flat white and called it anomalous."""
    import numpy as np

    grey = np.asarray(Image.open(champion["product"] / "test" / "good" / "000.png").convert("L"))
    encoded = []
    for array in (grey, grey.astype(np.uint16) * 257):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append({"image": base64.b64encode(buffer.getvalue()).decode()})
    status, answer = post(server["url"], {"dataframe_records": encoded})
    assert status == 200, answer
    eight, sixteen = (row["score"] for row in answer["predictions"])
    assert sixteen == pytest.approx(eight, rel=1e-5)
