"""Where the memory of ``lpcompile MODEL --budget B`` goes, phase by phase (issue 18).

Runs the bare compile **in this process** (``lpcompile.cli.main``) with a sampler thread that reads the
resident set size (``/proc/self/statm``) every ``--interval`` seconds, and marks a phase boundary

* at every log record of the ``lpcompile`` loggers (DEBUG for the streamed analysis, INFO elsewhere), and
* on entry to and exit from the compile's steps: load + normalise, calibration data, analysis, decide,
  apply (rewrite), write, the quality guard (and its two ONNX Runtime sessions).

Each mark records the RSS at the mark and the peak RSS since the previous mark, so the table says which
stretch of the compile reached the process' peak. The final line gives ``VmHWM`` (the kernel's peak RSS,
what ``/usr/bin/time -v`` reports for the process) beside the sampled peak.

    python benchmarks/compile_phases.py artifacts/bench/smollm2.onnx --calib artifacts/bench/smollm2/calib.npz \\
        --json-out /tmp/phases.json -- --stream on

Arguments after ``--`` go to the compile as they are.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # PYTHONPATH (another tree) first

logger = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss_bytes() -> int:
    """The resident set size of this process now."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


def vm_hwm_bytes() -> int:
    """The kernel's peak resident set size of this process (``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class Mark:
    """A phase boundary: what happened, when, the RSS then and the peak RSS since the previous mark."""

    t: float
    label: str
    rss_mib: float
    peak_since_prev_mib: float


class Sampler:
    """Samples the RSS on a thread; :meth:`mark` closes the current stretch."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.t0 = time.perf_counter()
        self.window = rss_bytes()
        self.peak = self.window
        self.marks: list[Mark] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            r = rss_bytes()
            with self.lock:
                self.window = max(self.window, r)
                self.peak = max(self.peak, r)
            self.done.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def mark(self, label: str) -> Mark:
        r = rss_bytes()
        with self.lock:
            peak = max(self.window, r)
            self.peak = max(self.peak, r)
            self.window = r
        m = Mark(round(time.perf_counter() - self.t0, 2), label, r / MIB, peak / MIB)
        self.marks.append(m)
        sys.stderr.write(f"[{m.t:8.1f}s rss {m.rss_mib:7.0f} peak-since-prev {m.peak_since_prev_mib:7.0f}] {label}\n")
        return m


class MarkHandler(logging.Handler):
    def __init__(self, sampler: Sampler) -> None:
        super().__init__(logging.DEBUG)
        self.sampler = sampler

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad log call must not stop the measurement
            msg = str(record.msg)
        self.sampler.mark(f"{record.name.removeprefix('lpcompile.')}: {msg[:160]}")


def wrap(module: Any, name: str, sampler: Sampler, label: str) -> None:
    """Mark entry to and exit from ``module.name``."""
    fn: Callable[..., Any] = getattr(module, name)

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        sampler.mark(f">> {label}")
        try:
            return fn(*args, **kwargs)
        finally:
            sampler.mark(f"<< {label}")

    setattr(module, name, inner)


def instrument(sampler: Sampler) -> None:
    import lpcompile.commands.compile as compile_cmd
    import lpcompile.evaluate as evaluate
    import lpcompile.files as files

    for name, label in [
        ("load_normalized", "load + normalise"),
        ("analysis_calib", "calibration data"),
        ("analyze", "analysis"),
        ("decide", "decide"),
        ("apply", "apply (rewrite)"),
        ("write_outputs", "write model + plan"),
        ("apply_file", "apply_file"),
    ]:
        wrap(files, name, sampler, label)
    wrap(compile_cmd, "_guard", sampler, "quality guard")
    wrap(evaluate, "make_session", sampler, "guard: ORT session")
    wrap(evaluate, "_run_all", sampler, "guard: run session")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--calib", help="calibration data (default: none, the compile's synthetic inputs)")
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("-o", "--output", default="/tmp/lpcompile-phases/out.lp.onnx")
    p.add_argument("--interval", type=float, default=0.01, help="RSS sampling period in seconds")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(args.interval)
    sampler.start()
    sampler.mark("start (python + this script)")
    from lpcompile.cli import main as cli_main

    sampler.mark("imported lpcompile.cli")
    lp = logging.getLogger("lpcompile")
    lp.setLevel(logging.INFO)
    logging.getLogger("lpcompile.analysis.streamed").setLevel(logging.DEBUG)
    lp.addHandler(MarkHandler(sampler))
    lp.propagate = False
    instrument(sampler)
    load = os.getloadavg()
    calib = ["--calib", args.calib] if args.calib else []
    cmd = [args.model, "--budget", args.budget, *calib, "-o", args.output, "--force", "-q", *extra]
    code = cli_main(cmd)
    sampler.mark(f"compile returned {code}")
    sampler.stop()
    hwm = vm_hwm_bytes() / MIB
    load_after = os.getloadavg()
    sys.stderr.write(
        f"VmHWM {hwm:.0f} MiB, sampled peak {sampler.peak / MIB:.0f} MiB; load {load[0]:.2f} → {load_after[0]:.2f}\n"
    )
    top = sorted(sampler.marks, key=lambda m: -m.peak_since_prev_mib)[:12]
    print("| t (s) | peak since previous mark (MiB) | RSS at mark (MiB) | mark |")
    print("|---|---|---|---|")
    for m in top:
        print(f"| {m.t:.1f} | {m.peak_since_prev_mib:.0f} | {m.rss_mib:.0f} | {m.label} |")
    if args.json_out:
        doc = {
            "command": " ".join(cmd),
            "exit": code,
            "vm_hwm_mib": hwm,
            "sampled_peak_mib": sampler.peak / MIB,
            "load_before": list(load),
            "load_after": list(load_after),
            "marks": [asdict(m) for m in sampler.marks],
        }
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
