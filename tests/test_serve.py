"""m2ae-serve as users run it: a real process on 127.0.0.1, a real HTTP client, bounded request loops.

One service for the module (``m2ae-serve --ray local``: its own one-machine cluster); the last test stops it
with Ctrl-C.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
pytest.importorskip("starlette", reason="needs the ray extra (ray[serve]): pip install -e '.[ray]'")

from PIL import Image  # noqa: E402

from m2ae_infer import cli  # noqa: E402
from m2ae_infer.shipped import EXAMPLE_PHOTO  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]   # ray's pydantic use
MAX_BYTES = 120_000
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 60):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Small test images (64x96 crops of the example photo, PNG, gray PNG and JPEG) and what m2ae-deblur writes
    for each as PNG: the bytes the service must answer with."""
    root = tmp_path_factory.mktemp("serve")
    photo = np.asarray(Image.open(EXAMPLE_PHOTO).convert("RGB"))
    made = {"rgb.png": Image.fromarray(photo[150:214, 150:246]),
            "gray.png": Image.fromarray(photo[100:164, 200:296]).convert("L"),
            "photo.jpg": Image.fromarray(photo[200:264, 100:196])}
    out = {}
    for name, img in made.items():
        img.save(root / name, quality=90) if name.endswith(".jpg") else img.save(root / name)
        ref = root / f"ref_{Path(name).stem}.png"
        assert cli.main([str(root / name), "-o", str(ref), "-q"]) == 0
        out[name] = ((root / name).read_bytes(), ref.read_bytes())
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    port = free_port()
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "m2ae_infer.serve", "--ray", "local", "--port", str(port),
                                 "--max-bytes", str(MAX_BYTES)], stdout=out, stderr=err, cwd=logs)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if request(url + "/healthz", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"m2ae-serve did not come up: exit {proc.poll()}, {(logs / 'err').read_text()[-2000:]}")
    yield url, proc, logs
    if proc.poll() is None:   # the Ctrl-C test did not run
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_healthz(service):
    url, _, _ = service
    status, _, body = request(url + "/healthz")
    assert (status, body) == (200, b"ok\n")


@pytest.mark.parametrize("name", ["rgb.png", "gray.png", "photo.jpg"])
def test_deblur_answers_the_png_m2ae_deblur_writes(service, images, name):
    url, _, _ = service
    body, expected = images[name]
    status, headers, png = request(url + "/deblur", body)
    assert status == 200 and headers["content-type"] == "image/png"
    assert png == expected   # byte for byte the file `m2ae-deblur IN -o OUT.png` writes
    info = json.loads(headers["x-m2ae-info"])
    assert {"active_fraction", "flops_dense", "flops_executed", "flops_untiled", "seconds", "execution", "backend",
            "tiles", "width", "height", "warnings"} <= set(info)
    assert (info["width"], info["height"]) == (96, 64) and 0 <= info["active_fraction"] <= 1
    assert 0 < info["flops_executed"] <= info["flops_dense"] and info["execution"] in ("sparse", "dense", "none")


def test_bad_requests_get_one_line_4xx_and_the_service_stays_up(service, images):
    url, _, _ = service
    good, expected = images["rgb.png"]
    cases = [
        ("/deblur", b"", "POST", 400, "the request body is empty"),
        ("/deblur", b"this is no image", "POST", 400, "the request body: not an image"),
        ("/deblur", good[: len(good) // 2], "POST", 400, "the request body: cannot decode, truncated or corrupt"),
        ("/deblur", b"\0" * (MAX_BYTES + 1), "POST", 413, f"over the {MAX_BYTES}-byte limit"),
        ("/deblur", None, "GET", 405, "GET /deblur: method not allowed; use POST"),
        ("/healthz", b"x", "POST", 405, "POST /healthz: method not allowed"),
        ("/nowhere", None, "GET", 404, "no route /nowhere"),
    ]
    for path, data, method, code, needle in cases:
        status, headers, body = request(url + path, data, method)
        text = body.decode()
        assert (status, needle in text, text.count("\n")) == (code, True, 1), (path, method, status, text)
        assert headers["content-type"].startswith("text/plain")
    assert request(url + "/deblur", None, "GET")[1]["allow"] == "POST"
    assert request(url + "/healthz")[0] == 200
    assert request(url + "/deblur", good)[2] == expected


def test_sequential_and_concurrent_requests_all_answered(service, images):
    url, _, _ = service
    body, expected = images["rgb.png"]
    answers = [request(url + "/deblur", body) for _ in range(12)]
    assert all(a[0] == 200 and a[2] == expected for a in answers)
    with ThreadPoolExecutor(6) as pool:   # several requests in flight: batched by the replica
        answers = list(pool.map(lambda i: request(url + "/deblur", images[["rgb.png", "gray.png"][i % 2]][0]),
                                range(12)))
    assert [a[0] for a in answers] == [200] * 12
    assert all(a[2] == images[["rgb.png", "gray.png"][i % 2]][1] for i, a in enumerate(answers))


def test_app_and_builder_are_importable_for_serve_run():
    from ray.serve import Application

    from m2ae_infer import serve
    assert isinstance(serve.app, Application)
    assert isinstance(serve.build_app({"max_bytes": "1000", "replicas": "2", "threads": "1"}), Application)
    with pytest.raises(ValueError, match="unknown option"):
        serve.build_app({"max_byte": "1000"})


def test_usage_errors_are_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "m2ae_infer.serve", "--replicas", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "m2ae-serve: error: --replicas must be >= 1, got 0 " \
                                                           "(see --help)", proc.stderr


def test_ctrl_c_stops_the_service_with_one_line_exit_130(service):
    url, proc, logs = service
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    assert (logs / "out").read_text().startswith("m2ae-serve: serving on http://127.0.0.1:")
    err = (logs / "err").read_text()
    assert err.strip().splitlines()[-1] == "m2ae-serve: interrupted" and "Traceback" not in err, err[-2000:]
    with pytest.raises(OSError):
        request(url + "/healthz", timeout=5)
