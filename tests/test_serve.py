"""python -m boneage_jax.serve: the HTTP API over the session's tiny trained run (answers, bad
input, batching, a real uvicorn socket, the command's wiring) and its page in a headless browser."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import shutil
import socket
import threading
import time
import warnings

import cv2
import httpx
import numpy as np
import pytest

with warnings.catch_warnings():  # Starlette's TestClient asks for httpx2, httpx's successor; it runs on httpx
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from boneage_jax import chronological, evaluation, inference, serve, service  # noqa: E402
from helpers import write_dicom  # noqa: E402

# One worker under pytest-xdist (make test): the run is loaded once for every test here.
pytestmark = pytest.mark.xdist_group("test_serve")

UPLOAD_LIMIT = 1024 * 1024  # the test service's --max_upload_mb
MAX_SIDE = 4000


@pytest.fixture(scope="module")
def predictor(tiny_run) -> inference.Predictor:
    """The session's tiny trained run (conftest ``tiny_run``), loaded once for every service here."""
    return inference.Predictor(tiny_run, batch_size=8)


@pytest.fixture(scope="module")
def client(predictor):
    served = service.Service(predictor, service.Limits(max_upload_bytes=UPLOAD_LIMIT, max_side=MAX_SIDE))
    with TestClient(service.create_app(served)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def hand(phantom_dir) -> np.ndarray:
    """A phantom test radiograph (uint8 grey, 160x128)."""
    source = os.path.join(phantom_dir, "boneage-test-dataset")
    name = sorted(os.listdir(source), key=lambda n: int(n.split(".")[0]))[0]
    return cv2.imread(os.path.join(source, name), cv2.IMREAD_GRAYSCALE)


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def expected_age(predictor: inference.Predictor, image: np.ndarray, male: bool) -> float:
    """What ``predict`` gives for this image: the same Predictor path, one image at a time."""
    network_input = predictor.prepare(predictor.stored(image))[None]
    return float(predictor.predict_arrays(network_input, np.asarray([male], np.float32))["boneage"][0])


def post(client, data: bytes, name: str = "hand.png", **fields):
    return client.post("/predict", files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def test_png_jpeg_and_dicom_give_predicts_answer(client, predictor, hand, tmp_path):
    age = expected_age(predictor, hand, male=False)
    answer = post(client, png(hand), sex="F", age_months=100.5)
    assert answer.status_code == 200, answer.text
    a = answer.json()
    assert a["boneage_months"] == pytest.approx(age, abs=1e-4)
    assert a["boneage_years"] == pytest.approx(age / 12, abs=1e-5)
    assert a["sex"] == "F" and a["file"] == "hand.png"
    assert a["chronological_age_months"] == 100.5
    assert a["boneage_minus_chronological_months"] == pytest.approx(age - 100.5, abs=1e-4)
    assert a["quality"] == {"usable": True, "reason": None, "forced": False}
    assert a["interval"] is None and "regression head gives no spread" in a["interval_note"]
    assert a["batch"]["size"] == 1 and a["model"]["step"] == predictor.run.step
    assert "sds" not in str(sorted(a)).lower()  # no SDS without a reference table
    assert a["rdes14"] == {"chronological_age_months": 100.5, "skeletal_age_months": a["boneage_months"],
                           "difference_months": pytest.approx(age - 100.5, abs=1e-4),
                           "standard_deviation_for_age_months": None, "sds": None, "determination": "unknown",
                           "note": chronological.NO_REFERENCE}
    assert post(client, png(hand), sex="F", age_months="8y4.5m", heatmap="false").json()["rdes14"][
        "chronological_age_months"] == 100.5
    dated = post(client, png(hand), sex="F", birth_date="2015-03-02", exam_date="2024-09-02", heatmap="false")
    assert dated.json()["chronological_age_months"] == pytest.approx(114.0, abs=0.1), dated.text
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(a["heatmap"]["png_base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert heat.shape == (256, 256, 3) and heat.std() > 0 and a["heatmap"]["kind"] == "gradient saliency"

    male = post(client, png(hand), sex="male", heatmap="false").json()
    assert male["boneage_months"] == pytest.approx(expected_age(predictor, hand, male=True), abs=1e-4)
    assert male["heatmap"] is None and male["chronological_age_months"] is None
    assert male["boneage_minus_chronological_months"] is None and male["rdes14"] is None

    jpeg = cv2.imencode(".jpg", hand, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    assert abs(post(client, jpeg, "hand.jpg", sex="F").json()["boneage_months"] - age) < 5
    dicom = tmp_path / "hand.dcm"
    write_dicom(str(dicom), hand.astype(np.uint16) * 257, center=32768, width=65536)  # maps back to the PNG's grey
    a = post(client, dicom.read_bytes(), "scan", sex="F").json()  # no .dcm suffix: found by its DICM magic
    assert a["boneage_months"] == pytest.approx(age, abs=1e-4)


def test_health_openapi_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"]["head"] == "regression"
    assert health["limits"]["max_upload_bytes"] == UPLOAD_LIMIT and health["limits"]["max_side"] == MAX_SIDE
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/predict"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "sex"] and set(form["properties"]) == set(service.FIELDS)
    assert {"200", "413", "415", "422"} <= set(operation["responses"])
    assert "boneage_minus_chronological_months" in schema["components"]["schemas"]["PredictionAnswer"]["properties"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="drop"' in page.text and 'type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere: works offline
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (its data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_bad_requests_get_4xx_with_a_message(client, hand):
    good = png(hand)
    rng = np.random.default_rng(0)
    cases = [  # (status, words of the message, the request)
        (415, ["not a PNG, JPEG or DICOM file"], lambda: post(client, b"hello, not an image", "notes.txt", sex="F")),
        (422, ["the file is empty"], lambda: post(client, b"", sex="F")),
        (422, ["truncated"], lambda: post(client, good[:len(good) // 2], sex="F")),
        (413, ["upload limit of 1 MB"], lambda: post(client, rng.bytes(UPLOAD_LIMIT + 10), sex="F")),
        (422, ["40000x30000 px", f"at most {MAX_SIDE} px", "--max_side"],
         lambda: post(client, _png_claiming(40000, 30000), sex="F")),
        (422, ["sex: missing", "expected M or F"], lambda: post(client, good)),
        (422, ["sex 'X'", "expected M, F, male or female"], lambda: post(client, good, sex="X")),
        (422, ["age_months 'ten'", "from 0 to 240"], lambda: post(client, good, sex="F", age_months="ten")),
        (422, ["age_months '-3'"], lambda: post(client, good, sex="F", age_months=-3)),
        (422, ["age_months '500'"], lambda: post(client, good, sex="F", age_months=500)),
        (422, ["age_months 'nan'"], lambda: post(client, good, sex="F", age_months="nan")),
        (422, ["force 'maybe'", "expected true or false"], lambda: post(client, good, sex="F", force="maybe")),
        (422, ["unknown field 'age'", "age_months"], lambda: post(client, good, sex="F", age=100)),
        (422, ["birth_date and exam_date go together"], lambda: post(client, good, sex="F", birth_date="2015-03-02")),
        (422, ["give age_months or birth_date with exam_date, not both"],
         lambda: post(client, good, sex="F", age_months=100, birth_date="2015-03-02", exam_date="2024-09-02")),
        (422, ["exam_date '2024-13-01': expected a date as YYYY-MM-DD"],
         lambda: post(client, good, sex="F", birth_date="2015-03-02", exam_date="2024-13-01")),
        (422, ["image: missing", "file field 'image'"],
         lambda: client.post("/predict", files={"sex": (None, "F")})),  # multipart without a file
        (415, ["expected a multipart/form-data body", "application/json"],
         lambda: client.post("/predict", json={"sex": "F"})),
        (422, ["rejected: too small", "force=true"], lambda: post(client, png(hand[:10, :10]), sex="F")),
    ]
    for status, words, send in cases:
        answer = send()
        assert answer.status_code == status, (words, answer.status_code, answer.text)
        detail = answer.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        for word in words:
            assert word in detail, (word, detail)


def test_quality_rejection_names_the_reason_and_force_predicts(client, hand):
    blank = np.full((200, 160), 90, np.uint8)
    rejected = post(client, png(blank), "blank.png", sex="F")
    assert rejected.status_code == 422
    assert "blank.png: rejected: no contrast" in rejected.json()["detail"]
    assert rejected.json()["quality"] == {"usable": False, "reason": rejected.json()["quality"]["reason"],
                                          "forced": False}
    assert rejected.json()["quality"]["reason"].startswith("no contrast")
    forced = post(client, png(blank), "blank.png", sex="F", force="true")
    assert forced.status_code == 200, forced.text
    assert forced.json()["quality"]["forced"] is True and forced.json()["quality"]["usable"] is False
    assert np.isfinite(forced.json()["boneage_months"])


def test_concurrent_requests_are_served_by_one_batch(predictor, hand):
    """Two requests in flight together go through the model in one call (the batcher's record
    and both answers say so), and each gets its own image's answer."""
    other = cv2.flip(hand, 1)
    expected = {"F": expected_age(predictor, hand, male=False), "M": expected_age(predictor, other, male=True)}
    # A long wait and max_batch 2: the batch runs as soon as the second request arrives.
    served = service.Service(predictor, service.Limits(max_batch=2, batch_wait_s=5.0))
    app = service.create_app(served)

    async def both():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await asyncio.gather(*[
                http.post("/predict", files={"image": (f"{sex}.png", png(image))}, data={"sex": sex})
                for sex, image in (("F", hand), ("M", other))])

    start = time.monotonic()
    answers = [r.json() for r in asyncio.run(both())]
    assert time.monotonic() - start < 5.0  # not held for the full wait
    served.close()
    assert served.batcher.batch_sizes == [2]
    assert [a["batch"] for a in answers] == [{"id": 1, "size": 2}] * 2
    for a in answers:
        assert a["boneage_months"] == pytest.approx(expected[a["sex"]], abs=1e-4)


def test_batcher_groups_within_the_wait_and_splits_at_max_batch():
    calls = []

    def double(items):
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("boom")
        return [2 * x for x in items]

    batcher = service.Batcher(double, max_batch=3, wait_s=1.0)
    futures = [batcher.submit(x) for x in (1, 2, 3, 4)]
    results = [f.result(timeout=10) for f in futures]
    assert [r for r, _ in results] == [2, 4, 6, 8]
    assert calls[0] == [1, 2, 3] and calls[1] == [4]  # the first batch is full at 3; 4 waits for its own
    assert [info.size for _, info in results] == [3, 3, 3, 1]
    failing = [service.Batcher(double, max_batch=2, wait_s=1.0)]
    futures = [failing[0].submit(x) for x in ("boom", 5)]
    for future in futures:
        with pytest.raises(ValueError, match="boom"):
            future.result(timeout=10)
    batcher.close()
    failing[0].close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_tta_gives_a_prediction_interval(predictor, hand):
    served = service.Service(predictor, tta=True, tta_angles=(-5.0, 5.0))
    with TestClient(service.create_app(served)) as http:
        a = post(http, png(hand), sex="F", heatmap="false").json()
    network_input = predictor.prepare(predictor.stored(hand))[None]
    views = [predictor.predict_arrays(v, np.zeros(1, np.float32))["boneage"][0]
             for v in evaluation.tta_views(network_input, True, (-5.0, 5.0))]
    assert a["boneage_months"] == pytest.approx(float(np.mean(views)), abs=1e-4)
    interval = a["interval"]
    assert interval["std_months"] == pytest.approx(float(np.std(views)), abs=1e-4)
    assert interval["sources"] == ["spread over 4 TTA views"] and a["interval_note"] is None
    low68, high68 = interval["levels"]["68"]
    low95, high95 = interval["levels"]["95"]
    assert low95 < low68 < a["boneage_months"] < high68 < high95
    assert high95 - a["boneage_months"] == pytest.approx(1.959964 * interval["std_months"], rel=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Uvicorn:
    """The app served by uvicorn on a real localhost socket, in a thread."""

    def __init__(self, app, host: str):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=free_port(), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Uvicorn:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.server.servers[0].sockets[0].getsockname()[:2]

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_uvicorn_answers_over_a_localhost_socket(predictor, hand):
    served = service.Service(predictor, service.Limits(max_upload_bytes=UPLOAD_LIMIT))
    multipart = {"content-type": "multipart/form-data; boundary=b"}

    def chunks():  # no Content-Length: the limit is applied while the body streams in
        for _ in range(4):
            yield b"x" * (UPLOAD_LIMIT // 2)

    with Uvicorn(service.create_app(served), serve.FLAGS["host"].default) as server:
        host, port = server.address
        assert host == "127.0.0.1"  # the command's default: this machine only
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as http:
            assert http.get("/health").json()["status"] == "ok"
            answer = http.post("/predict", files={"image": ("hand.png", png(hand))}, data={"sex": "F"})
            declared = http.post("/predict", content=b"x" * (2 * UPLOAD_LIMIT), headers=multipart)
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as http:
            streamed = http.post("/predict", content=chunks(), headers=multipart)
    assert answer.status_code == 200, answer.text
    assert answer.json()["boneage_months"] == pytest.approx(expected_age(predictor, hand, male=False), abs=1e-4)
    assert declared.status_code == 413 and f"Content-Length {2 * UPLOAD_LIMIT}" in declared.json()["detail"]
    assert streamed.status_code == 413 and "larger than the upload limit of 1 MB" in streamed.json()["detail"]
    assert "Content-Length" not in streamed.json()["detail"]
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.2")


def test_command_wires_flags_into_the_app(tiny_run, hand, monkeypatch, capsys):
    """``serve.main`` builds the app with its limits and hands it to uvicorn on the given address;
    bad flags and a missing workdir stop it with a message."""
    import uvicorn
    from absl import app as absl_app

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert serve.main(["--workdir", tiny_run, "--port", "8123", "--max_upload_mb", "0.5", "--max_side", "100",
                       "--max_batch", "4", "--cache_dir", ""]) == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    with TestClient(started["app"]) as http:
        limits = http.get("/health").json()["limits"]
        assert limits["max_upload_bytes"] == 512 * 1024 and limits["max_batch"] == 4
        assert "at most 100 px" in post(http, png(hand), sex="F").json()["detail"]  # 160 px > --max_side
    for argv, message in [(["--workdir", tiny_run, "--max_upload_mb", "0"], "max_upload_mb"),
                          (["--workdir", tiny_run, "--port", "70000"], "port"),
                          (["--workdir", tiny_run, "extra"], "unexpected arguments"),
                          (["--workdir", tiny_run, "--tta_angles", "a"], "tta_angles")]:
        with pytest.raises(absl_app.UsageError, match=message):
            serve.main(argv)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        serve.main(["--workdir", os.path.join(tiny_run, "does-not-exist"), "--cache_dir", ""])


# ----------------------------------------------------------------------------- the page in a browser


def _browser_missing() -> str | None:
    """Why the browser test cannot run here (None: it can)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[browser]')"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_page_in_a_headless_browser(predictor, hand, tmp_path):
    """The page loads, a chosen and then a dropped image are answered, with the heatmap shown;
    the screenshots go to ``$BONEAGE_SCREENSHOTS`` when set (to look at), else to tmp_path."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = os.environ.get("BONEAGE_SCREENSHOTS") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    image_file = tmp_path / "hand.png"
    image_file.write_bytes(png(hand))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(argument)
    served = service.Service(predictor)
    with Uvicorn(service.create_app(served), "127.0.0.1") as server:
        host, port = server.address
        driver = webdriver.Chrome(service=DriverService(shutil.which("chromedriver")), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(f"http://{host}:{port}/")
            wait.until(lambda d: "step" in d.find_element(By.ID, "model").text)
            # Chosen through the file input.
            driver.find_element(By.ID, "file").send_keys(str(image_file))
            Select(driver.find_element(By.ID, "sex")).select_by_value("F")
            driver.find_element(By.ID, "age").send_keys("100")
            driver.find_element(By.ID, "submit").click()
            wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
            wait.until(lambda d: d.execute_script("return document.getElementById('heatmap').naturalWidth") > 0)
            age = expected_age(predictor, hand, male=False)
            assert driver.find_element(By.ID, "boneage").text.startswith(f"{age:.1f} months")
            assert driver.find_element(By.ID, "difference").text == f"{age - 100:+.1f} months"
            assert driver.find_element(By.ID, "quality").text == "accepted"
            assert driver.find_element(By.ID, "error").text == ""
            driver.save_screenshot(os.path.join(shots, "serve_chosen.png"))
            # Dropped: a drop event carrying a file, as a drag from the desktop delivers it.
            flipped = base64.b64encode(png(cv2.flip(hand, 1))).decode("ascii")
            driver.execute_script("""
                const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            """, flipped)
            assert "dropped.png" in driver.find_element(By.ID, "drop-text").text
            Select(driver.find_element(By.ID, "sex")).select_by_value("M")
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: "dropped.png" in d.find_element(By.ID, "file-info").text)
            age = expected_age(predictor, cv2.flip(hand, 1), male=True)
            assert driver.find_element(By.ID, "boneage").text.startswith(f"{age:.1f} months")
            assert driver.find_element(By.ID, "file-info").text == "male, dropped.png"
            driver.save_screenshot(os.path.join(shots, "serve_dropped.png"))
            # A bad file: the page shows the service's message.
            bad = tmp_path / "notes.txt"
            bad.write_text("not an image")
            driver.find_element(By.ID, "file").send_keys(str(bad))
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_element(By.ID, "error").text != "")
            assert driver.find_element(By.ID, "error").text.startswith("415: image notes.txt: not a PNG, JPEG or DICOM")
        finally:
            driver.quit()
