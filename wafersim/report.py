"""A self-contained HTML report of a simulated layout (`wafersim simulate --report FILE`).

One file to keep or send: the summary keys in a table, the model and the target it ran on,
and the placement, utilisation and link-traffic maps as PNGs embedded in the page (base64),
so the report opens anywhere without the layout or wafersim.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json

import numpy as np
from matplotlib.figure import Figure

from compiler.program import MeshProgram
from compiler.targets import MeshTarget
from wafersim import viz
from wafersim.simulate import simulate


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def html_report(summary: dict, info: dict, figures: dict[str, Figure]) -> str:
    """The page: a title, the summary table, the model and target, one section per figure."""
    title = f"{summary.get('model')} {summary.get('phase')} on {summary.get('system')}"
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>"
                     for k, v in summary.items())
    figs = "\n".join(f'<h2>{html.escape(name)}</h2>\n<img alt="{html.escape(name)}" '
                     f'src="data:image/png;base64,{_png(fig)}">' for name, fig in figures.items())
    spec = html.escape(json.dumps({"model": info.get("model"), "target": info.get("target")},
                                  indent=1, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
img{{max-width:100%}}pre{{background:#f4f4f4;padding:8px;overflow:auto}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Summary</h2><table>
{rows}
</table>
{figs}
<h2>Model and target</h2><pre>{spec}</pre>
</body></html>
"""


def write_report(path: str, program: MeshProgram, target: MeshTarget, info: dict,
                 summary: dict, layers: str = "all") -> None:
    """Simulate once more for the per-core and per-link maps (each region's loop once with
    `layers="one"`) and write the report to `path`."""
    if layers == "one" and program.looped:
        program = dataclasses.replace(program, loop_count=np.minimum(program.loop_count, 1))
    result = simulate(program, target)
    figures = {"Placement": viz.placement_map(info, program.width, program.height),
               "Core utilisation": viz.util_map(result),
               "Link traffic": viz.traffic_map(result)}
    with open(path, "w", encoding="utf-8") as f:
        f.write(html_report(summary, info, figures))
