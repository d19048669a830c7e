"""`wafersim simulate --report`: a self-contained HTML page with the summary and the maps.

(The issue asks for a check in headless Chromium; no browser can be installed on this
machine, so the page is checked by parsing it: its structure, its table and its images.)"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

from typer.testing import CliRunner

from wafersim.cli import app


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if data.strip():
            self.cells.append(data.strip())


def test_simulate_writes_a_self_contained_report(tmp_path):
    runner = CliRunner()
    layout, page = tmp_path / "tiny.wsl", tmp_path / "report.html"
    res = runner.invoke(app, ["compile", "tiny-llama", "--target", "test16x16", "--ctx", "32",
                              "-o", str(layout)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["simulate", str(layout), "--report", str(page), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["report"] == str(page)
    parsed = _Page()
    parsed.feed(page.read_text())
    assert parsed.tags[:2] == ["html", "head"] and "table" in parsed.tags
    assert [img["alt"] for img in parsed.images] == ["Placement", "Core utilisation",
                                                     "Link traffic"]
    for img in parsed.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png = base64.b64decode(img["src"][len(prefix):])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    i = parsed.cells.index("tokens_per_s")
    assert float(parsed.cells[i + 1].replace(",", "")) > 0
    assert "tiny-llama decode on wse2[16x16]" in parsed.cells


def test_a_report_path_that_cannot_be_written_is_one_line_exit_2(tmp_path):
    runner = CliRunner()
    layout = tmp_path / "tiny.wsl"
    assert runner.invoke(app, ["compile", "tiny-llama", "--target", "test16x16", "--ctx", "8",
                               "-o", str(layout)]).exit_code == 0
    bad = tmp_path / "missing" / "r.html"
    res = runner.invoke(app, ["simulate", str(layout), "--report", str(bad)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {bad}: No such file or directory"
