"""`ns-viewer` of a tiny run in headless Chromium: `rgb_enhanced` is offered (not for a plain run),
and the frame the server sends for it differs from the `rgb` frame, at the viewer's resolution.

Needs Debian's `chromium` and `chromium-driver` (`make browser`); skipped where they are missing.
Chromium is driven through chromedriver's W3C WebDriver HTTP API (plain `urllib`, no client library).
Frames are captured as viser delivers them: JPEG blobs turned into object URLs (colour, then depth,
in one message handler: the first blob of each handler is the colour frame).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_plugin import BIN, ENV, ns_train

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Chromium is not installed: `make browser` installs Debian's chromium and chromium-driver", allow_module_level=True)

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--window-size=1000,700"]
VIEWER_MAX_RES = 512  # the viewer's default "Max res"
SCREENSHOT = os.environ.get("DIFIX3D_VIEWER_SCREENSHOT")  # where to save a screenshot of rgb_enhanced (README)

CAPTURE_FRAMES = """
window.__frames = [];
const create = URL.createObjectURL;
let sameMessage = false;  // viser's BackgroundImageMessage handler makes the colour blob, then the depth blob
URL.createObjectURL = function (blob) {
  if (blob instanceof Blob && blob.type === "image/jpeg") {
    if (!sameMessage) window.__frames.push(blob);
    sameMessage = true;
    queueMicrotask(() => { sameMessage = false; });
  }
  return create.call(URL, blob);
};
"""
OUTPUT_TYPE_VALUE = """
const label = [...document.querySelectorAll("label")].find((l) => l.textContent.trim() === "Output type");
const input = label ? document.getElementById(label.htmlFor) : null;
return input ? input.value : "";
"""
FRAME_DATA_URL = """
const done = arguments[arguments.length - 1];
const reader = new FileReader();
reader.onload = () => done(reader.result);
reader.readAsDataURL(window.__frames[arguments[0]]);
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Browser:
    """Headless Chromium through chromedriver's WebDriver HTTP API."""

    def __init__(self) -> None:
        port = free_port()
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_for(lambda: self._alive(), 30, "chromedriver")
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": CHROMIUM_FLAGS}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["sessionId"]

    def _alive(self) -> bool:
        try:
            return bool(self._call("GET", "/status")["ready"])
        except OSError:
            return False

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def command(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def run(self, script: str, *args):
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, script: str, *args):
        return self.command("POST", "/execute/async", {"script": script, "args": list(args)})

    def elements(self, selector: str, using: str = "css selector") -> list:
        return [next(iter(e.values())) for e in self.command("POST", "/elements", {"using": using, "value": selector})]

    def click(self, element: str) -> None:
        self.command("POST", f"/element/{element}/click", {})

    def close(self) -> None:
        try:
            self.command("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(10)


class Viewer:
    """`ns-viewer --load-config` on a free port, and a browser on it."""

    def __init__(self, config: Path, browser: Browser) -> None:
        self.port = free_port()
        self.log = config.parent / "viewer.log"
        self.process = subprocess.Popen(
            [BIN / "ns-viewer", "--load-config", config, "--viewer.websocket-port", str(self.port)],
            env=ENV, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )
        self.browser = browser
        wait_for(self._listening, 300, f"ns-viewer on port {self.port} (log: {self.log})")
        browser.command("POST", "/url", {"url": f"http://127.0.0.1:{self.port}"})
        browser.run(CAPTURE_FRAMES)
        wait_for(lambda: self.output_type() not in ("", "not set"), 300, "the viewer panel's Output type")

    def _listening(self) -> bool:
        assert self.process.poll() is None, f"ns-viewer exited:\n{self.log.read_text()[-3000:]}"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def output_type(self) -> str:
        return self.browser.run(OUTPUT_TYPE_VALUE)

    def displayed_options(self) -> list:
        return [e for e in self.browser.elements("[role='option']") if self.browser.command("GET", f"/element/{e}/displayed")]

    def output_options(self) -> dict[str, str]:
        """Opens the Output type dropdown (unless open): its options, by their text."""
        if not self.displayed_options():
            label = self.browser.elements("//label[normalize-space()='Output type']", using="xpath")[0]
            input_id = self.browser.command("GET", f"/element/{label}/attribute/for")
            self.browser.click(self.browser.elements(f"[id='{input_id}']")[0])
        options = wait_for(self.displayed_options, 30, "the Output type options")
        return {self.browser.command("GET", f"/element/{e}/text"): e for e in options}

    def choose(self, output: str) -> None:
        options = self.output_options()
        assert output in options, f"{output} is not offered: {sorted(options)}"
        self.browser.click(options[output])
        wait_for(lambda: self.output_type() == output, 30, f"Output type {output}")

    def clear_frames(self) -> None:
        self.browser.run("window.__frames = [];")

    def wait_until_no_new_frames(self, quiet: float = 8, timeout: float = 300) -> None:
        counts = [-1]

        def quiet_now() -> bool:
            count = self.browser.run("return window.__frames.length;")
            unchanged = count == counts[-1]
            counts.append(count)
            return unchanged

        wait_for(quiet_now, timeout, "the viewer to stop sending frames", interval=quiet)

    def full_resolution_frame(self, timeout: float = 600) -> Image.Image:
        """The latest full-resolution colour frame received since `clear_frames` (waits for one)."""

        def frame():
            for index in reversed(range(self.browser.run("return window.__frames.length;"))):
                data = self.browser.run_async(FRAME_DATA_URL, index)
                image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")
                if max(image.size) == VIEWER_MAX_RES:
                    return image
            return None

        return wait_for(frame, timeout, "a full-resolution frame", interval=2)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def browser():
    browser = Browser()
    yield browser
    browser.close()


def test_viewer_shows_rgb_enhanced(small_scene: Path, tmp_path: Path, browser: Browser):
    run_dir = ns_train(small_scene, tmp_path / "outputs", 30)
    viewer = Viewer(run_dir / "config.yml", browser)
    try:
        assert viewer.output_type() == "rgb"  # the viewer's first output: its frames are rgb frames
        viewer.full_resolution_frame()
        viewer.wait_until_no_new_frames()  # the page's layout (so the frame size) settles after loading
        rgb = viewer.full_resolution_frame()
        viewer.clear_frames()
        viewer.choose("rgb_enhanced")
        enhanced = viewer.full_resolution_frame()
        if SCREENSHOT:
            Path(SCREENSHOT).write_bytes(base64.b64decode(browser.command("GET", "/screenshot")))
    finally:
        viewer.close()
    assert enhanced.size == rgb.size and max(rgb.size) == VIEWER_MAX_RES
    difference = np.abs(np.asarray(enhanced, dtype=np.float32) - np.asarray(rgb, dtype=np.float32)).mean()
    assert difference > 2.0, f"the rgb_enhanced frame is the rgb frame (mean difference {difference:.2f})"


def test_plain_run_offers_no_rgb_enhanced(small_scene: Path, tmp_path: Path, browser: Browser):
    run_dir = ns_train(small_scene, tmp_path / "outputs", 10, "--pipeline.difix.enabled", "False")
    viewer = Viewer(run_dir / "config.yml", browser)
    try:
        options = viewer.output_options()
    finally:
        viewer.close()
    assert "rgb" in options and "rgb_enhanced" not in options
