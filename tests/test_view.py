"""``lpcompile view``: the viewer serves on 127.0.0.1, answers, and stops on timeout / Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from _report_data import digits_plan

from lpcompile.cli import main
from lpcompile.report import server
from lpcompile.report.server import (
    LOOPBACK,
    AccessPolicy,
    ViewerError,
    ViewerProcess,
    check_viewer,
    serve,
    served_files,
    viewer_url,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
MODEL = EXAMPLES / "digits_mlp.onnx"


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        return resp.status, resp.read()


class _Client:
    """A real HTTP client with a cookie jar (the token travels as ``?token=`` once, then as a cookie)."""

    def __init__(self) -> None:
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(CookieJar())
        )

    def get(self, url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(url, headers=headers or {}, data=data)
        try:
            with self.opener.open(req, timeout=20) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def _port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone when /proc says so or it is a zombie
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent for UDP connect
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    target = tmp_path / "m.lp.onnx"
    target.write_bytes(MODEL.read_bytes())
    digits_plan().save(tmp_path / "m.lp.plan.json")  # the fp32 model has no metadata: the plan beside it colours it
    return target


def test_unknown_or_missing_viewer(
    monkeypatch: pytest.MonkeyPatch, model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ViewerError, match="unknown viewer"):
        check_viewer("tensorboard")
    real = server.importlib.util.find_spec
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name, *a: None if name == "netron" else real(name))
    with pytest.raises(ViewerError, match=r"Netron is not installed .*pip install"):
        check_viewer("netron")
    assert main(["view", str(model_copy), "--viewer", "netron", "--no-browser", "--timeout", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed" in err[0]


def test_usage_errors(model_copy: Path, tmp_path: Path) -> None:
    assert main(["view", str(model_copy), "--timeout", "0", "-q"]) == 2
    assert main(["view", str(model_copy), "--port", "70000", "-q"]) == 2
    assert main(["view", str(tmp_path / "missing.onnx"), "-q"]) == 1


def test_viewer_url_carries_model_and_node_data(tmp_path: Path) -> None:
    url = viewer_url("model-explorer", 8123, tmp_path / "m.onnx", [tmp_path / "a.json"])
    assert url.startswith(f"http://{LOOPBACK}:8123/?data=")
    data = json.loads(urllib.request.unquote(url.split("data=", 1)[1]))
    assert data == {
        "models": [{"url": str(tmp_path / "m.onnx")}],
        "nodeData": [str(tmp_path / "a.json")],
        "nodeDataTargets": [""],
    }
    assert viewer_url("netron", 8123, tmp_path / "m.onnx") == f"http://{LOOPBACK}:8123/"
    selected = viewer_url("model-explorer", 8123, tmp_path / "m.onnx", select="fc1")
    state = json.loads(urllib.request.unquote(selected.split("data=", 1)[1]))["uiState"]["paneStates"][0]
    assert state["selectedNodeId"] == "fc1"


def test_netron_serves_on_loopback_and_stops_after_timeout(model_copy: Path) -> None:
    pytest.importorskip("netron")
    seen: dict[str, object] = {}

    def ready(url: str) -> None:
        status, body = _get(url)
        seen["status"], seen["url"] = status, url
        seen["has_app"] = b"<html" in body.lower()
        ip = _non_loopback_ip()
        if ip is not None:  # not reachable from another interface
            with socket.socket() as s:
                s.settimeout(1)
                seen["outside"] = s.connect_ex((ip, proc.port))

    proc = ViewerProcess("netron", model_copy)
    t0 = time.monotonic()
    assert serve(proc, timeout=1.0, on_ready=ready) == "timeout"
    assert time.monotonic() - t0 >= 1.0
    assert seen["status"] == 200 and seen["has_app"]
    assert str(seen["url"]).startswith(f"http://{LOOPBACK}:")
    assert seen.get("outside", 1) != 0
    assert not proc.running() and not _port_open(proc.port)


def test_serve_stops_child_on_interrupt(model_copy: Path) -> None:
    pytest.importorskip("netron")
    proc = ViewerProcess("netron", model_copy)

    def interrupt(url: str) -> None:
        raise KeyboardInterrupt

    assert serve(proc, timeout=30, on_ready=interrupt) == "interrupted"
    assert not proc.running() and not _port_open(proc.port)


def test_busy_port_is_refused(model_copy: Path) -> None:
    pytest.importorskip("netron")
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        s.listen(1)
        with pytest.raises(ViewerError, match="already in use"):
            ViewerProcess("netron", model_copy, port=s.getsockname()[1])


def _interruptible() -> None:
    """In the child: SIGINT at its default, as in a terminal. A process started with SIGINT ignored (as a
    shell's background jobs are, and as this test process may be after other tests) keeps it ignored, and
    lpcompile respects that, so Ctrl-C could not be simulated."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_ctrl_c_stops_cleanly(model_copy: Path) -> None:
    """The real command in a child: prints the URL, and SIGINT (Ctrl-C) stops it and its server with exit 0."""
    pytest.importorskip("netron")
    cmd = [
        sys.executable,
        "-m",
        "lpcompile.cli",
        "view",
        str(model_copy),
        "--viewer",
        "netron",
        "--no-browser",
        "--timeout",
        "120",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith(f"http://{LOOPBACK}:"), url
        port = _port_of(url)
        assert _get(url)[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not _port_open(port)
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert "stopped" in err and "Traceback" not in err
        assert (model_copy.parent / "m.lp.format.json").is_file()  # overlays written beside the model
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_model_explorer_serves_model_and_overlays(model_copy: Path) -> None:
    pytest.importorskip("model_explorer")
    pytest.importorskip("model_explorer_onnx")
    from lpcompile.report.overlay import write_overlays

    overlays = write_overlays(digits_plan(), model_copy.parent, "m.lp")
    proc = ViewerProcess("model-explorer", model_copy, overlays)
    checks: dict[str, object] = {}
    secret = model_copy.parent / "secret.txt"
    secret.write_text("do not serve me")

    def ready(url: str) -> None:
        client = _Client()
        status, body = client.get(url)  # sets the token cookie
        checks["page"] = status == 200 and b"<app-root" in body
        api = f"http://{LOOPBACK}:{proc.port}/api/v1/read_text_file?path="
        status, body = client.get(api + quote(str(overlays[0])))
        checks["overlay"] = json.loads(json.loads(body)["content"])["results"]["fc1"]["bgColor"]
        checks["secret"] = client.get(api + quote(str(secret)))
        checks["passwd"] = client.get(api + "/etc/passwd")
        checks["traversal"] = client.get(api + quote(f"{overlays[0].parent}/../../../etc/passwd"))
        checks["no_token"] = _Client().get(api + quote(str(overlays[0])))
        checks["foreign_host"] = client.get(
            api + quote(str(overlays[0])), headers={"Host": f"attacker.example:{proc.port}"}
        )
        status, body = client.get(f"http://{LOOPBACK}:{proc.port}/api/v1/get_extensions")
        ext = next(e["id"] for e in json.loads(body) if "onnx" in e["id"].lower())
        model_cmd = {
            "extensionId": ext,
            "cmdId": "convert",
            "modelPath": str(model_copy),
            "settings": {},
            "deleteAfterConversion": False,
        }
        status, body = client.get(
            f"http://{LOOPBACK}:{proc.port}/api/v1/send_command?json=" + quote(json.dumps(model_cmd))
        )
        checks["convert"] = (status, body[:300])  # the served model still converts
        cmd = {"extensionId": ext, "cmdId": "convert", "modelPath": str(secret), "settings": {}}
        checks["command"] = client.get(
            f"http://{LOOPBACK}:{proc.port}/api/v1/send_command?json=" + quote(json.dumps(cmd))
        )
        delete = {**cmd, "modelPath": str(model_copy), "deleteAfterConversion": True}
        checks["delete"] = client.get(
            f"http://{LOOPBACK}:{proc.port}/apipost/v1/send_command",
            headers={"Content-Type": "application/json"},
            data=json.dumps(delete).encode(),
        )
        checks["upload"] = client.get(f"http://{LOOPBACK}:{proc.port}/apipost/v1/upload", data=b"x")
        checks["pid"] = proc.pid

    assert serve(proc, timeout=0.5, on_ready=ready) == "timeout"
    assert checks["page"] is True
    assert checks["overlay"] == "#b07aa1"
    assert checks["convert"][0] == 200 and b"graphs" in checks["convert"][1], checks["convert"]
    for case in ("secret", "passwd", "traversal", "no_token", "foreign_host", "command", "delete", "upload"):
        status, body = checks[case]  # type: ignore[misc]
        assert status in (403, 404), (case, status, body[:200])
        assert b"do not serve" not in body and b"root:" not in body, case
    assert model_copy.is_file() and secret.is_file()
    assert not proc.running() and not _port_open(proc.port) and not _pid_alive(int(checks["pid"]))


def test_netron_serves_only_the_model(model_copy: Path) -> None:
    pytest.importorskip("netron")
    (model_copy.parent / "secret.txt").write_text("do not serve me")
    checks: dict[str, tuple[int, bytes]] = {}

    def ready(url: str) -> None:
        client = _Client()
        checks["page"] = client.get(url)
        base = f"http://{LOOPBACK}:{proc.port}/data/"
        checks["model"] = client.get(base + model_copy.name)
        checks["secret"] = client.get(base + "secret.txt")
        checks["plan"] = client.get(base + "m.lp.plan.json")
        checks["foreign_host"] = client.get(base + model_copy.name, headers={"Host": "rebind.example"})
        checks["no_token"] = _Client().get(base + model_copy.name)

    proc = ViewerProcess("netron", model_copy)
    assert serve(proc, timeout=0.5, on_ready=ready) == "timeout"
    assert checks["page"][0] == 200
    assert checks["model"] == (200, model_copy.read_bytes())
    for case in ("secret", "plan", "foreign_host", "no_token"):
        assert checks[case][0] in (403, 404), case
        assert b"do not serve" not in checks[case][1]


def test_access_policy_rules(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(MODEL.read_bytes())
    overlay = tmp_path / "m.format.json"
    overlay.write_text("{}")
    policy = AccessPolicy(8123, "tok", served_files(model, [overlay]))
    host = {"Host": "127.0.0.1:8123"}
    ok = {"token": ["tok"]}

    def check(path: str, query: dict[str, list[str]], headers: dict[str, str] = host, body: object = None) -> object:
        return policy.check("POST" if body is not None else "GET", path, query, headers, {}, body)

    assert check("/", ok) is None
    assert check("/", ok, {"Host": "localhost:8123"}) is None
    assert check("/", ok, {"Host": "evil.example:8123"}) == 403
    assert check("/", ok, {"Host": "127.0.0.1:9999"}) == 403
    assert check("/", {}) == 403
    assert check("/", {"token": ["nope"]}) == 403
    assert policy.check("GET", "/", {}, host, {"lpcompile_token": "tok"}) is None
    read = "/api/v1/read_text_file"
    assert check(read, {**ok, "path": [str(overlay)]}) is None
    assert check(read, {**ok, "path": [str(tmp_path / ".." / tmp_path.name / "m.format.json")]}) is None
    assert check(read, {**ok, "path": ["/etc/shadow"]}) == 403
    assert check(read, ok) == 403
    link = tmp_path / "link.json"
    link.symlink_to("/etc/passwd")
    assert check(read, {**ok, "path": [str(link)]}) == 403
    good = {"extensionId": "x", "modelPath": str(model)}
    assert check("/apipost/v1/send_command", ok, body=good) is None
    assert check("/apipost/v1/send_command", ok, body={**good, "deleteAfterConversion": True}) == 403
    assert check("/apipost/v1/send_command", ok, body={"settings": {"modelPath": "/etc/passwd"}}) == 403
    assert check("/api/v1/send_command", {**ok, "json": [json.dumps(good)]}) is None
    assert check("/api/v1/send_command", {**ok, "json": ["{not json"]}) == 403
    assert check("/apipost/v1/upload", ok, body={}) == 403
    assert check(f"/data/{model.name}", ok) is None
    assert check("/data/../../etc/passwd", ok) == 404
    assert len(AccessPolicy.new_token()) >= 32 and AccessPolicy.new_token() != AccessPolicy.new_token()


def test_cli_ctrl_c_without_timeout_stops_cleanly(model_copy: Path) -> None:
    """Ctrl-C with no --timeout used to end in a TypeError; it stops with exit 0 and one line."""
    pytest.importorskip("netron")
    cmd = [sys.executable, "-m", "lpcompile", "view", str(model_copy), "--viewer", "netron", "--no-browser"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert "token=" in url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert "Traceback" not in err and "TypeError" not in err and "stopped" in err
        assert not _port_open(_port_of(url))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
