"""Headless Chromium opens the report from disk with the network off, and the viewer on loopback.

Needs ``/usr/bin/chromium`` (Debian: ``apt-get install -y chromium chromium-driver``); skipped elsewhere.
Screenshots go to the test's tmp dir (``benchmarks/screenshots.py`` writes the ones in docs/img).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _report_data import CHOSEN, digits_plan, digits_table

from lpcompile.report.browser import HeadlessChromium

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
ROWS = "[...document.querySelectorAll('#node-table tbody tr')].map(r => r.dataset.node)"


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("matplotlib")
    from lpcompile.report.html import write_report

    table = digits_table(validated=True)
    return write_report(tmp_path_factory.mktemp("report") / "report.html", digits_plan(table), table)


def test_report_offline_renders_and_sorts(report_file: Path, tmp_path: Path) -> None:
    with HeadlessChromium(width=1200, height=900, binary=CHROMIUM) as browser:
        browser.set_offline()
        browser.open(report_file.as_uri())
        assert browser.wait_for("document.querySelectorAll('svg.plot').length") == 5
        sections = browser.evaluate("[...document.querySelectorAll('section')].map(s => s.id)")
        assert sections == ["summary", "nodes", "bits", "heatmap", "validation", "pareto", "mix"]
        # every plot has a drawn size (rendered, not just present)
        sizes = browser.evaluate("[...document.querySelectorAll('svg.plot')].map(s => s.getBoundingClientRect().width)")
        assert all(w > 200 for w in sizes)
        assert browser.evaluate(ROWS) == list(CHOSEN)
        # sort by bits: click once ascending, twice descending
        bits = {"fc0": 8.0, "fc1": 4.125, "fc2": 4.125, "fc3": 16.0}
        assert browser.click("th[data-key=bits]")
        order = browser.evaluate(ROWS)
        assert [bits[n] for n in order] == sorted(bits.values())
        assert browser.click("th[data-key=bits]")
        order = browser.evaluate(ROWS)
        assert [bits[n] for n in order] == sorted(bits.values(), reverse=True)
        assert browser.evaluate("document.querySelector('th[data-key=bits]').getAttribute('aria-sort')") == "descending"
        shot = browser.screenshot(tmp_path / "report.png", full_page=True)
        # a sort named in the URL hash is applied on load
        browser.open("about:blank")
        browser.open(report_file.as_uri() + "#sort=name:desc")
        assert browser.evaluate(ROWS) == sorted(CHOSEN, reverse=True)
        assert not browser.console_errors
        # nothing but the file itself and inline data was requested
        assert browser.requests and all(u.startswith(("file://", "data:", "about:")) for u in browser.requests)
    assert shot.stat().st_size > 20_000


def test_model_explorer_page_shows_graph_and_overlays(tmp_path: Path) -> None:
    pytest.importorskip("model_explorer")
    pytest.importorskip("model_explorer_onnx")
    from lpcompile.report.overlay import write_overlays
    from lpcompile.report.server import ViewerProcess

    model = tmp_path / "m.lp.onnx"
    model.write_bytes((EXAMPLES / "digits_mlp.onnx").read_bytes())
    overlays = write_overlays(digits_plan(), tmp_path, "m.lp")
    with ViewerProcess("model-explorer", model, overlays) as proc:
        url = proc.start()
        with HeadlessChromium(width=1400, height=900, binary=CHROMIUM, timeout=120) as browser:
            browser.open(url)
            assert browser.wait_for("!!document.querySelector('app-root model-graph-visualizer')")
            assert browser.wait_for("!!document.querySelector('webgl-renderer canvas')")
            # both overlays listed as node data providers, with the planned nodes' values in the table
            assert browser.wait_for("document.body.innerText.includes('lpcompile predicted loss')")
            assert "lpcompile format (bits/weight)" in browser.evaluate("document.body.innerText")
            shot = browser.screenshot(tmp_path / "viewer.png")
            external = [u for u in browser.requests if not u.startswith(("http://127.0.0.1:", "data:", "blob:"))]
            # Model Explorer's stylesheet names Google web fonts; host resolution is blocked, nothing else is asked
            assert all(u.startswith("https://fonts.gstatic.com/") for u in external), external
    assert shot.stat().st_size > 20_000
    assert not proc.running()
