"""Drive headless Chromium through the DevTools protocol over a pipe (standard library only).

Used by the browser tests and ``benchmarks/screenshots.py`` to open the report and the viewer,
wait until they have rendered, read the DOM, record every network request, and save screenshots.
Chromium is started with ``--remote-debugging-pipe`` (commands on fd 3, replies on fd 4, one JSON
message per NUL-terminated chunk), so no debugging port is opened. Every host name other than
127.0.0.1/localhost is made unresolvable (``--host-resolver-rules``): nothing outside loopback can
be reached, whatever a page asks for.

Example::

    with HeadlessChromium() as browser:
        browser.open("file:///tmp/report.html")
        browser.wait_for("document.querySelectorAll('svg.plot').length >= 3")
        browser.screenshot("report.png", full_page=True)
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


class BrowserError(LpError):
    """Chromium is missing, died, or a page did not reach the expected state in time."""


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for c in CHROMIUM_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("chromium")


class HeadlessChromium:
    """One headless Chromium with one page (a context manager).

    Attributes:
        requests: URLs of every request the page sent (``Network.requestWillBeSent``), in order.
    """

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 900, timeout: float = 60.0) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError("chromium not found (apt-get install chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._to_chrome = self._from_chrome = -1
        self._buf = b""
        self._next_id = 0
        self._session: str | None = None
        self._events: list[dict[str, Any]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> HeadlessChromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="lpcompile-chromium-")
        cmd_r, cmd_w = os.pipe()  # we write commands -> chrome reads fd 3
        out_r, out_w = os.pipe()  # chrome writes replies on fd 4 -> we read
        # move the child's ends above 10 so that dup2 onto 3 and 4 cannot clobber one another
        high_r, high_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(out_w)
        args = [
            self.binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-unsafe-swiftshader",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={self._tmp.name}",
            f"--window-size={self.width},{self.height}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        def _wire_fds() -> None:  # runs in the child before exec; dup2 makes 3 and 4 inheritable
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=False,
                preexec_fn=_wire_fds,
                start_new_session=True,
            )
        finally:
            os.close(high_r)
            os.close(high_w)
        self._to_chrome, self._from_chrome = cmd_w, out_r
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Network.enable", "Runtime.enable"):
            self._call(method)
        self._call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self._call("Browser.close", session=False, timeout=5.0)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        for fd in (self._to_chrome, self._from_chrome):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_chrome = self._from_chrome = -1
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- page --------------------------------------------------------------------------------
    def open(self, url: str, timeout: float | None = None) -> None:
        """Navigate and wait for the load event."""
        self._events = [e for e in self._events if e.get("method") != "Page.loadEventFired"]
        reply = self._call("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")
        self._wait_event("Page.loadEventFired", timeout or self.timeout)

    def set_offline(self, offline: bool = True) -> None:
        """Emulate a page with no network at all (DevTools network emulation)."""
        self._call(
            "Network.emulateNetworkConditions",
            {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )

    def click(self, selector: str) -> bool:
        """Click the first element matching ``selector``; False when there is none."""
        query = f"document.querySelector({json.dumps(selector)})"
        return bool(self.evaluate(f"(e => e ? (e.click(), true) : false)({query})"))

    def mouse(
        self,
        kind: str,
        x: float,
        y: float,
        *,
        delta_y: float = 0.0,
        ctrl: bool = False,
        button: str = "none",
        clicks: int = 0,
    ) -> None:
        """One mouse event (``kind``: mouseMoved, mousePressed, mouseReleased, mouseWheel) at page (x, y)."""
        params: dict[str, Any] = {
            "type": kind,
            "x": x,
            "y": y,
            "modifiers": 2 if ctrl else 0,
            "button": button,
            "clickCount": clicks,
        }
        if kind == "mouseWheel":
            params.update(deltaX=0, deltaY=delta_y)
        self._call("Input.dispatchMouseEvent", params)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaits promises)."""
        reply = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"page script failed: {reply['exceptionDetails'].get('text', '')}")
        return reply.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None, poll: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for: {expression}")
            self._pump(poll)

    def sleep(self, seconds: float) -> None:
        """Let the page run for ``seconds`` (events are still collected)."""
        self._pump(seconds)

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: str | os.PathLike[str], full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or of the whole page)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self._call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        data = base64.b64decode(self._call("Page.captureScreenshot", params)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    # -- protocol ----------------------------------------------------------------------------
    def _call(
        self, method: str, params: dict[str, Any] | None = None, session: bool = True, timeout: float | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session is not None:
            msg["sessionId"] = self._session
        data = json.dumps(msg).encode("utf-8") + b"\0"
        while data:
            n = os.write(self._to_chrome, data)
            data = data[n:]
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for m in self._read(deadline):
                if m.get("id") == self._next_id:
                    if "error" in m:
                        raise BrowserError(f"{method}: {m['error'].get('message', m['error'])}")
                    return m.get("result", {})
                self._on_event(m)

    def _wait_event(self, method: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self._events:
                if e.get("method") == method:
                    self._events.remove(e)
                    return e
            for m in self._read(deadline):
                self._on_event(m)

    def _pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for m in self._read(end, allow_timeout=True):
                self._on_event(m)

    def _on_event(self, m: dict[str, Any]) -> None:
        method = m.get("method")
        if method == "Network.requestWillBeSent":
            self.requests.append(m["params"]["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(str(m["params"].get("exceptionDetails", {}).get("text", "")))
        elif method is not None and not method.startswith("Network."):
            self._events.append(m)
            del self._events[:-200]

    def _read(self, deadline: float, allow_timeout: bool = False) -> list[dict[str, Any]]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                if allow_timeout:
                    return []
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], min(left, 0.5))
            if not ready:
                if self._proc is not None and self._proc.poll() is not None:
                    raise BrowserError(f"chromium exited with status {self._proc.returncode}")
                continue
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed the DevTools pipe")
            self._buf += chunk
        *msgs, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in msgs if m]
