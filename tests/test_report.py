"""`wafersim simulate --report`: a self-contained HTML page with the summary and the maps.

The page is checked twice: parsed (its structure, its table and its images) and rendered in a
real headless Chromium, whose screenshot must show the table's text and the maps' colours.
CI installs Debian's chromium (.ci/run); elsewhere the browser test is skipped without one."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.image import imread
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


def _report(tmp_path):
    """Compile and simulate the tiny model with --report; (page path, JSON summary)."""
    runner = CliRunner()
    layout, page = tmp_path / "tiny.wsl", tmp_path / "report.html"
    res = runner.invoke(app, ["compile", "tiny-llama", "--target", "test16x16", "--ctx", "32",
                              "-o", str(layout)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["simulate", str(layout), "--report", str(page), "--json"])
    assert res.exit_code == 0, res.output
    return page, json.loads(res.stdout)


def test_simulate_writes_a_self_contained_report(tmp_path):
    page, summary = _report(tmp_path)
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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no Chromium here (CI installs Debian's chromium)")
def test_the_report_renders_in_headless_chromium(tmp_path):
    assert CHROMIUM, "CI must have Chromium (.ci/run installs it)"
    page, _ = _report(tmp_path)
    shot = tmp_path / "shot.png"
    # Flags as the machine's notes give them: no sandbox (root), no GPU, no network chatter.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
           "--window-size=1100,2600", f"--screenshot={shot}", page.as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    rgb = imread(str(shot))[..., :3]
    assert rgb.shape[:2] == (2600, 1100)
    ink = (rgb.min(axis=2) < 0.5).mean()  # text, table rules, map pixels
    colour = (rgb.max(axis=2) - rgb.min(axis=2) > 0.25).mean()  # only the maps are colourful
    assert ink > 0.02, f"the page rendered almost blank ({ink:.1%} dark pixels)"
    assert colour > 0.05, f"the embedded maps did not render ({colour:.1%} coloured pixels)"
    assert len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 100
