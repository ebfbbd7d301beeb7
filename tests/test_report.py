"""The HTML report: every section, self-contained (nothing to load from a network), inline SVG, sortable."""

from __future__ import annotations

import itertools
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _report_data import CHOSEN, digits_plan, digits_table

from lpcompile.cli import main
from lpcompile.report.html import SECTIONS, ReportContext, render_report, sweep_points, write_report

pytest.importorskip("matplotlib")


class _Collector(HTMLParser):
    """Tags, the attributes that load something, and the per-node table's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []
        self.ids: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.th: list[dict[str, str]] = []
        self._in_nodes = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        for k, v in a.items():
            if k in ("src", "href", "xlink:href", "srcset", "data", "action", "poster", "background"):
                self.refs.append((tag, k, v))
        if tag == "table" and a.get("id") == "node-table":
            self._in_nodes = True
        if self._in_nodes and tag == "tr" and "data-node" in a:
            self.rows.append(a)
        if self._in_nodes and tag == "th":
            self.th.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_nodes = False


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


@pytest.fixture(scope="module")
def full_report() -> str:
    table = digits_table(validated=True)
    return render_report(digits_plan(table), table)


def test_every_section_present_with_plots(full_report: str) -> None:
    c = _parse(full_report)
    for sid in SECTIONS:
        assert sid in c.ids, sid
    assert 'class="note missing"' not in full_report  # with a validated table nothing is missing
    plots = re.findall(r'<svg class="plot" data-plot="(\w+)"', full_report)
    assert plots == ["bits", "heatmap", "scatter", "pareto", "mix"]
    assert "Spearman ρ" in full_report and ">0.910<" in full_report  # the analyzer's validation figure
    assert "6bits" in full_report and "4.492 bits/weight" in full_report  # budget and achieved bits


def test_self_contained(full_report: str) -> None:
    c = _parse(full_report)
    for tag, attr, value in c.refs:
        assert value.startswith(("#", "data:")), (tag, attr, value[:80])  # only in-page refs / inline data
    assert "link" not in c.tags and "iframe" not in c.tags and "img" not in c.tags
    assert not re.search(r"<script[^>]+src=", full_report)
    assert "@import" not in full_report and not re.search(r"url\(\s*['\"]?(https?:)?//", full_report)
    # the only URLs at all are XML namespace names inside the SVGs
    for url in re.findall(r"https?://[^\s\"'<>)]+", full_report):
        assert url in ("http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"), url


def test_node_table_rows_and_sort_keys(full_report: str) -> None:
    c = _parse(full_report)
    assert [r["data-node"] for r in c.rows] == list(CHOSEN)
    keys = {th["data-key"]: th["data-type"] for th in c.th}
    for key in ("name", "params", "format", "bits", "loss", "runner_up", "trace", "measured"):
        assert key in keys, key
    assert keys["bits"] == "num" and keys["name"] == "str"
    # numeric cells carry machine-readable values for the sort
    values = re.findall(r'<td class="n" data-v="([^"]*)"', full_report)
    assert values and all(v == "" or float(v) == float(v) for v in values)
    assert "sortBy" in full_report and "location.hash" in full_report


def test_without_table_or_candidates_sections_say_why() -> None:
    text = render_report(digits_plan())
    c = _parse(text)
    for sid in SECTIONS:
        assert sid in c.ids
    assert text.count('class="note missing"') == 3  # heatmap, validation, pareto
    assert re.findall(r'data-plot="(\w+)"', text) == ["bits", "mix"]


def test_unvalidated_table_gives_heatmap_and_pareto() -> None:
    table = digits_table(validated=False)
    text = render_report(digits_plan(table), table)
    plots = re.findall(r'data-plot="(\w+)"', text)
    assert plots == ["bits", "heatmap", "pareto", "mix"]
    assert "not validated" in text and "solved from the sensitivity table" in text


def test_plot_labels_use_short_module_paths() -> None:
    from dataclasses import replace

    from lpcompile.report.html import plot_labels

    plan = digits_plan()
    assert plot_labels(plan) == list(CHOSEN)  # no module paths: node names
    paths = [
        "model.encoder.layer.0.query",
        "model.encoder.layer.0.key",
        "model.encoder.layer.1.query",
        "model.encoder.layer.1.key",
    ]
    plan = plan.with_nodes(replace(n, module_path=m) for n, m in zip(plan.nodes, paths, strict=True))
    assert plot_labels(plan) == ["layer.0.query", "layer.0.key", "layer.1.query", "layer.1.key"]


def test_sweep_points_form_a_front() -> None:
    table = digits_table()
    pts, note = sweep_points(ReportContext(digits_plan(table), table))
    assert len(pts) >= 5 and "sensitivity table" in note
    assert all(4.0 - 1e-9 <= p.achieved_bits <= p.budget_bits + 1e-6 for p in pts)
    front = sorted((p.achieved_bits, p.predicted_loss) for p in pts if p.on_front)
    assert all(b[1] < a[1] for a, b in itertools.pairwise(front))  # more bits, less loss


def test_write_report_atomic_and_cli(tmp_path: Path) -> None:
    table = digits_table()
    plan = digits_plan(table)  # the cheap report: two plots
    out = tmp_path / "r.html"
    out.write_text("old")
    assert write_report(out, plan) == out
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left
    plan.save(tmp_path / "m.plan.json")
    table.save(tmp_path / "m.sens.json")
    assert main(["report", str(tmp_path / "m.plan.json"), "--sensitivity", str(tmp_path / "m.sens.json"), "-q"]) == 0
    assert (tmp_path / "m.plan.html").is_file()
    assert main(["report", str(tmp_path / "missing.json"), "-q"]) == 1


def test_compile_report_hook(tmp_path: Path) -> None:
    """``compile --report`` goes through commands._tables.write_report."""
    from lpcompile.commands._tables import write_report as hook

    hook(str(tmp_path / "c.html"), digits_plan(), None)
    assert 'id="pareto"' in (tmp_path / "c.html").read_text()
