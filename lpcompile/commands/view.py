"""``lpcompile view MODEL.lp.onnx``: serve the model in Model Explorer (or Netron) on 127.0.0.1.

Writes two Model Explorer node-data overlays beside the model (``STEM.format.json``: colour by
format; ``STEM.loss.json``: colour by predicted loss, log scale) from the model's ``lpcompile.*``
node metadata (or from ``--plan``), starts the viewer on loopback, prints the URL, opens a
browser unless ``--no-browser``, and stops on Ctrl-C or after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import webbrowser
from pathlib import Path

from lpcompile.console import Output
from lpcompile.errors import ModelLoadError, UsageError
from lpcompile.io_utils import OutputSession
from lpcompile.plan import PrecisionPlan
from lpcompile.report.overlay import OverlayNode, precision_map, write_overlays
from lpcompile.report.server import (
    DEFAULT_VIEWER,
    READY_TIMEOUT_S,
    VIEWERS,
    ViewerError,
    ViewerProcess,
    check_viewer,
    serve,
)

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("view", help="serve the model with its precision map in Model Explorer or Netron (loopback)")
    p.add_argument("model", help="ONNX model, normally the rewritten MODEL.lp.onnx")
    p.add_argument(
        "--viewer", choices=sorted(VIEWERS), default=DEFAULT_VIEWER, help="graph viewer (default: %(default)s)"
    )
    p.add_argument(
        "--plan",
        help="plan JSON for the overlays (default: the model's lpcompile metadata, "
        "else STEM.plan.json beside the model)",
    )
    p.add_argument("--overlay-dir", help="folder for the node-data overlays (default: beside the model)")
    p.add_argument("--select", metavar="NODE", help="open Model Explorer with this node (name) selected")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-browser", action="store_true", help="only serve and print the URL")
    p.add_argument("--timeout", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--start-timeout", type=float, default=READY_TIMEOUT_S, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    out = Output(quiet=args.quiet, json=args.json)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    if not 0 <= args.port < 65536:
        raise UsageError("--port must be between 0 and 65535")
    model = Path(args.model)
    if not model.is_file():
        raise ModelLoadError(f"model file not found: {model}")
    check_viewer(args.viewer)  # one line and exit 1 when it is not installed
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    folder = Path(args.overlay_dir) if args.overlay_dir else model.parent
    plan_in = args.plan or _sibling_plan(model)
    with OutputSession(inputs=[model, plan_in]) as session:
        # the overlays never replace the model, its external data or the plan; both are written or neither
        session.declare(folder / f"{stem}.format.json", folder / f"{stem}.loss.json")
        overlays = write_overlays(_overlay_source(model, args.plan), folder, stem)
    for p in overlays:
        out.line(f"overlay: {p}")
    # Model Explorer shows the last overlay it loads: the format overlay goes last
    shown = list(reversed(overlays)) if args.viewer == "model-explorer" else []
    proc = ViewerProcess(args.viewer, model, shown, port=args.port, select=args.select)

    def ready(url: str) -> None:
        out.line(f"{proc.spec.title} serving {model} at:")
        if not args.quiet and not args.json:
            print(url, flush=True)
        out.emit_json({"url": url, "viewer": args.viewer, "port": proc.port, "overlays": [str(p) for p in overlays]})
        stop_hint = f"stops after {args.timeout:g} s or on Ctrl-C" if args.timeout else "press Ctrl-C to stop"
        out.line(stop_hint)
        if not args.no_browser:
            webbrowser.open(url)

    reason = serve(proc, timeout=args.timeout, on_ready=ready, ready_timeout=args.start_timeout)
    if reason == "timeout":
        out.line(f"stopped after {args.timeout:g} s")
    elif reason == "interrupted":
        out.line("stopped")
    else:
        raise ViewerError(f"{proc.spec.title} exited" + (f": {proc.log_tail()}" if proc.log_tail() else ""))
    return 0


def _overlay_source(model: Path, plan_path: str | None) -> list[OverlayNode]:
    """The precision map from ``--plan``, else the model's metadata, else a plan beside the model."""
    if plan_path:
        return precision_map(PrecisionPlan.load(plan_path))
    nodes = precision_map(model)
    if nodes:
        return nodes
    sibling = _sibling_plan(model)
    if sibling is not None:
        logger.info("model has no lpcompile metadata; colouring from %s", sibling)
        return precision_map(PrecisionPlan.load(sibling))
    logger.warning("%s has no lpcompile metadata and no plan beside it: the overlays will be empty", model)
    return nodes


def _sibling_plan(model: Path) -> Path | None:
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    sibling = model.with_name(stem + ".plan.json")
    return sibling if sibling.is_file() else None
