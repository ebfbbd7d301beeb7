"""Serve a model in a graph viewer on loopback: Model Explorer (default) or Netron.

The viewer runs in a child process (its own session, so a terminal Ctrl-C reaches only the
parent, which then stops the child by its process-group id); :func:`serve` waits until the page
answers on ``127.0.0.1``, reports the URL, and stops the child on Ctrl-C, on SIGTERM, when it
exits, or after ``timeout`` seconds.

The child is this module run as ``python -m lpcompile.report.server VIEWER --port P --model M
[--node-data J ...]``: for Model Explorer it loads the ``model_explorer_onnx`` extension, turns
off the release check (no network is reached) and never opens a browser; for Netron it calls
``netron.serve`` on the loopback address.

Model Explorer takes the model and the node-data overlays from the URL (``?data=`` holds the
JSON ``{"models": [{"url": PATH}], "nodeData": [PATH, ...], "nodeDataTargets": ["", ...]}``,
as ``model_explorer.config.ModelExplorerConfig.to_url_param_value`` writes it).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_VIEWER = "model-explorer"
READY_TIMEOUT_S = 180.0
_POLL_S = 0.25


class ViewerError(LpError):
    """The viewer is not installed, could not start, or the port is taken."""


@dataclass(frozen=True)
class ViewerSpec:
    """A graph viewer lpcompile can serve.

    Attributes:
        name: the ``--viewer`` choice.
        title: what users call it.
        modules: importable modules it needs.
        pip: the pip packages that provide them.
    """

    name: str
    title: str
    modules: tuple[str, ...]
    pip: tuple[str, ...]


VIEWERS: dict[str, ViewerSpec] = {
    "model-explorer": ViewerSpec(
        "model-explorer",
        "Model Explorer",
        ("model_explorer", "model_explorer_onnx"),
        ("ai-edge-model-explorer", "model-explorer-onnx"),
    ),
    "netron": ViewerSpec("netron", "Netron", ("netron",), ("netron",)),
}


def check_viewer(name: str) -> ViewerSpec:
    """The viewer's spec; raises :class:`ViewerError` when it is unknown or not installed."""
    spec = VIEWERS.get(name)
    if spec is None:
        raise ViewerError(f"unknown viewer {name!r} (choose {', '.join(VIEWERS)})")
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ViewerError(
            f"{spec.title} is not installed (missing {', '.join(missing)}): "
            f"pip install 'lpcompile[view]'  or  pip install {' '.join(spec.pip)}"
        )
    return spec


TOKEN_PARAM = "token"
TOKEN_COOKIE = "lpcompile_token"
TOKEN_ENV = "LPCOMPILE_VIEW_TOKEN"
ALLOWED_ENV = "LPCOMPILE_VIEW_FILES"
_BLOCKED_PATHS = frozenset({"/apipost/v1/upload", "/apipost/v1/update_config", "/apipost/v1/refresh_page"})
_FILE_PARAM_PATHS = frozenset({"/api/v1/read_text_file", "/api/v1/notify_user_provided_model_path"})
_COMMAND_PATHS = frozenset({"/api/v1/send_command", "/apipost/v1/send_command"})


def _resolved(path: str) -> Path | None:
    try:
        return Path(os.path.expanduser(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        return None


@dataclass(frozen=True)
class AccessPolicy:
    """What the viewer may answer: requests for ``Host: 127.0.0.1:PORT`` or ``localhost:PORT`` only,
    carrying the run's random token (``?token=`` once, then a cookie), and reading only ``files``
    (the model, its external data and the overlays) through the viewer's file APIs.

    Model Explorer's ``/api/v1/read_text_file?path=`` and its adapter commands (``modelPath``,
    ``deleteAfterConversion``) would otherwise read any file the process can, or delete the model's
    folder; Netron's ``/data/NAME`` serves any file beside the model. Uploads and config changes
    are refused.
    """

    port: int
    token: str
    files: frozenset[Path] = field(default_factory=frozenset)

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(24)

    def host_ok(self, host: str | None) -> bool:
        return (host or "").strip().lower() in {f"{LOOPBACK}:{self.port}", f"localhost:{self.port}"}

    def token_ok(self, query: Mapping[str, Sequence[str]], cookies: Mapping[str, str]) -> bool:
        given = [*query.get(TOKEN_PARAM, []), cookies.get(TOKEN_COOKIE, "")]
        return any(g and hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    def file_ok(self, path: str | None) -> bool:
        if not path:
            return False
        resolved = _resolved(path)
        return resolved is not None and resolved in self.files

    def check(
        self,
        method: str,
        path: str,
        query: Mapping[str, Sequence[str]],
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        body: object = None,
    ) -> int | None:
        """The status to refuse the request with (403/404), or None to let the viewer answer it."""
        if not self.host_ok(headers.get("Host") or headers.get("host")):
            return 403
        if not self.token_ok(query, cookies):
            return 403
        if method not in ("GET", "HEAD", "POST", "OPTIONS"):
            return 403
        if path in _BLOCKED_PATHS:
            return 403
        if path in _FILE_PARAM_PATHS:
            paths = query.get("path", [])
            return None if paths and all(self.file_ok(p) for p in paths) else 403
        if path in _COMMAND_PATHS:
            if path.startswith("/api/"):
                try:
                    body = json.loads(query.get("json", ["{}"])[0])
                except (ValueError, RecursionError):
                    return 403
            return None if self._command_ok(body) else 403
        if path.startswith("/data/"):  # Netron's model route
            name = unquote(path[len("/data/") :])
            if not any(self.file_ok(str(f.parent / name)) for f in self.files):
                return 404
        return None

    def _command_ok(self, cmd: object) -> bool:
        if not isinstance(cmd, dict) or cmd.get("deleteAfterConversion"):
            return False
        return all(self.file_ok(v) for v in _path_values(cmd))


def _path_values(obj: object, depth: int = 0) -> Iterable[str]:
    """Every string under a key that names a path, at any depth (``modelPath``, ``path``, ...)."""
    if depth > 20:
        yield ""  # refuse what is nested this deep
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and "path" in str(k).lower():
                yield v
            elif isinstance(v, dict | list):
                yield from _path_values(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            yield from _path_values(v, depth + 1)


def served_files(model: str | os.PathLike[str], node_data: Sequence[str | os.PathLike[str]] = ()) -> frozenset[Path]:
    """The files the viewer may read: the model, its external-data files and the overlays."""
    from lpcompile.io_utils import model_data_files

    files = {Path(model).resolve(), *(Path(p).resolve() for p in node_data)}
    files.update(model_data_files(model))
    return frozenset(files)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def viewer_url(
    viewer: str,
    port: int,
    model: str | os.PathLike[str] | None = None,
    node_data: Sequence[str | os.PathLike[str]] = (),
    select: str | None = None,
    token: str | None = None,
) -> str:
    """The page to open: Model Explorer's URL carries the model, the overlay paths and the node to select
    (its ``uiState``); Netron's is the root. ``token`` is added as ``?token=``."""
    base = f"http://{LOOPBACK}:{port}/"
    tok = f"{TOKEN_PARAM}={quote(token)}" if token else ""
    if viewer != "model-explorer" or model is None:
        return base + (f"?{tok}" if tok else "")
    data: dict[str, object] = {"models": [{"url": str(Path(model).resolve())}]}
    if node_data:
        data["nodeData"] = [str(Path(p).resolve()) for p in node_data]
        data["nodeDataTargets"] = ["" for _ in node_data]
    if select:
        data["uiState"] = {
            "paneStates": [
                {
                    "deepestExpandedGroupNodeIds": [],
                    "selectedNodeId": select,
                    "selectedGraphId": "",
                    "selectedCollectionLabel": "",
                    "widthFraction": 1,
                    "selected": True,
                }
            ]
        }
    return f"{base}?data={quote(json.dumps(data))}" + (f"&{tok}" if tok else "")


def _no_proxy_get(url: str, timeout: float = 2.0) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        resp.read(256)
        return int(resp.status)


class ViewerProcess:
    """One viewer child process serving ``model`` on ``127.0.0.1:port`` (use as a context manager)."""

    def __init__(
        self,
        viewer: str,
        model: str | os.PathLike[str],
        node_data: Sequence[str | os.PathLike[str]] = (),
        port: int = 0,
        select: str | None = None,
    ) -> None:
        self.spec = check_viewer(viewer)
        self.model = Path(model).resolve()
        self.node_data = [Path(p).resolve() for p in node_data]
        if port and port_in_use(port):
            raise ViewerError(f"port {port} on {LOOPBACK} is already in use")
        self.port = port or free_port()
        self.token = AccessPolicy.new_token()
        self.files = served_files(self.model, self.node_data)
        self.url = viewer_url(viewer, self.port, self.model, self.node_data, select, token=self.token)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "lpcompile.report.server",
            self.spec.name,
            "--port",
            str(self.port),
            "--model",
            str(self.model),
        ]
        for p in self.node_data:
            cmd += ["--node-data", str(p)]
        return cmd

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> str:
        """Start the child and wait until its page answers; returns the URL.

        Raises:
            ViewerError: the child exited or did not answer within ``ready_timeout`` seconds.
        """
        env = dict(os.environ)
        env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [LOOPBACK, "localhost", env.get("NO_PROXY")]))
        env[TOKEN_ENV] = self.token  # not on the command line (visible to every user in ps)
        env[ALLOWED_ENV] = json.dumps(sorted(str(p) for p in self.files))
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        logger.debug("starting %s", " ".join(self.command()))
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + ready_timeout
        root = f"http://{LOOPBACK}:{self.port}/?{TOKEN_PARAM}={quote(self.token)}"
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                self.stop()
                raise ViewerError(
                    f"{self.spec.title} exited with status {code} before serving" + (f": {tail}" if tail else "")
                )
            with contextlib.suppress(OSError, urllib.error.URLError):
                if _no_proxy_get(root) == 200:
                    return self.url
            if time.monotonic() > deadline:
                self.stop()
                raise ViewerError(
                    f"{self.spec.title} did not answer on http://{LOOPBACK}:{self.port}/ within {ready_timeout:g} s"
                )
            time.sleep(_POLL_S)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 1) -> str:
        """The last non-empty lines the child printed."""
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(kept[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """Stop the child (SIGTERM to its process group, SIGKILL after ``grace`` seconds). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
        if proc is not None and proc.poll() is not None:
            _signal_group(proc.pid, signal.SIGKILL)  # leftovers of the child's own session, if any
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ViewerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def serve(
    proc: ViewerProcess,
    timeout: float | None = None,
    on_ready: Callable[[str], None] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> str:
    """Start ``proc``, call ``on_ready(url)``, and block until it should stop; always stops it.

    Returns:
        Why it stopped: ``"timeout"``, ``"interrupted"`` (Ctrl-C or SIGTERM) or ``"exited"``.
    """
    restore: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM are the normal way to stop serving: handled here, not by the CLI's handlers
        def _on_stop(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) != signal.SIG_IGN:
                restore[signum] = signal.signal(signum, _on_stop)
    try:
        url = proc.start(ready_timeout=ready_timeout)
        if on_ready is not None:
            on_ready(url)
        deadline = None if timeout is None else time.monotonic() + timeout
        while proc.running():
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            time.sleep(_POLL_S)
        return "exited"
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        proc.stop()
        for signum, handler in restore.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]


# -- the child process --------------------------------------------------------------------------
def _guard_flask(policy: AccessPolicy) -> None:
    """Make every Flask app created from now on in this (child) process answer through ``policy``."""
    import flask

    base = flask.Flask

    class GuardedFlask(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)

            @self.before_request
            def _guard() -> flask.Response | None:
                req = flask.request
                body = req.get_json(silent=True) if req.method == "POST" else None
                status = policy.check(
                    req.method, req.path, req.args.to_dict(flat=False), dict(req.headers), dict(req.cookies), body
                )
                if status is not None:
                    return flask.Response("forbidden\n" if status == 403 else "not found\n", status=status)
                return None

            @self.after_request
            def _cookie(resp: flask.Response) -> flask.Response:
                if TOKEN_PARAM in flask.request.args:
                    resp.set_cookie(TOKEN_COOKIE, policy.token, httponly=True, samesite="Strict", path="/")
                return resp

    flask.Flask = GuardedFlask  # type: ignore[misc]


def _guard_netron(policy: AccessPolicy) -> None:
    """Wrap Netron's request handler with ``policy`` (and its token cookie)."""
    from netron import server as netron_server

    handler = netron_server._HTTPRequestHandler
    original_get = handler.do_GET
    original_end = handler.end_headers

    def do_get(self: object) -> None:
        parts = urlsplit(self.path)  # type: ignore[attr-defined]
        query = parse_qs(parts.query)
        cookies = _parse_cookies(self.headers.get("Cookie", ""))  # type: ignore[attr-defined]
        self._lp_set_cookie = TOKEN_PARAM in query  # type: ignore[attr-defined]
        status = policy.check("GET", parts.path, query, dict(self.headers.items()), cookies)  # type: ignore[attr-defined]
        if status is not None:
            self.send_response(status)  # type: ignore[attr-defined]
            self.send_header("Content-Length", "0")  # type: ignore[attr-defined]
            original_end(self)
            return
        original_get(self)

    def end_headers(self: object) -> None:
        if getattr(self, "_lp_set_cookie", False):
            self.send_header(  # type: ignore[attr-defined]
                "Set-Cookie", f"{TOKEN_COOKIE}={policy.token}; HttpOnly; SameSite=Strict; Path=/"
            )
        original_end(self)

    handler.do_GET = do_get
    handler.do_HEAD = do_get
    handler.end_headers = end_headers


def _parse_cookies(header: str) -> dict[str, str]:
    from http.cookies import CookieError, SimpleCookie

    jar: SimpleCookie = SimpleCookie()
    with contextlib.suppress(CookieError):
        jar.load(header)
    return {k: m.value for k, m in jar.items()}


def _policy_from_env(port: int) -> AccessPolicy:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit("lpcompile viewer: no access token given (run it through `lpcompile view`)")
    try:
        files = frozenset(Path(p) for p in json.loads(os.environ.get(ALLOWED_ENV, "[]")))
    except ValueError:
        files = frozenset()
    return AccessPolicy(port, token, files)


def _run_model_explorer(port: int, model: str, node_data: Sequence[str]) -> None:
    # Model Explorer imports torch when it can, for its PyTorch adapter; ONNX does not need it and the
    # import costs seconds: make ``import torch`` fail here (model_explorer guards it with try/except)
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    from model_explorer import server as me_server
    from model_explorer.config import ModelExplorerConfig

    # the release check asks PyPI and GitHub: nothing outside loopback is reached
    me_server._check_new_version = lambda print_msg=True: {"version": "", "runningVersion": ""}
    config = ModelExplorerConfig()
    config.add_model_from_path(model)
    for p in node_data:
        config.add_node_data_from_path(p)
    me_server.start(
        host=LOOPBACK, port=port, config=config, no_open_in_browser=True, extensions=["model_explorer_onnx"]
    )


def _run_netron(port: int, model: str) -> None:
    import netron

    netron.serve(model, None, address=(LOOPBACK, port), browse=False)
    netron.wait()


def _child_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lpcompile.report.server")
    p.add_argument("viewer", choices=sorted(VIEWERS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--node-data", action="append", default=[])
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    policy = _policy_from_env(args.port)
    if args.viewer == "model-explorer":
        _guard_flask(policy)
        _run_model_explorer(args.port, args.model, args.node_data)
    else:
        _guard_netron(policy)
        _run_netron(args.port, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
