"""Page assembly: sections, escaping, tables and the single self-contained HTML file.

Every string that reaches the page goes through `escape` (or is a plotly figure, whose JSON
encodes `<` as `\\u003c`); plotly.js is inlined once at the top and every figure after it is
rendered without its own copy, so the file works offline and stays one bundle in size.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

FIGURE_CONFIG = {"responsive": True, "displaylogo": False, "toImageButtonOptions": {"format": "svg"}}
TEMPLATE = "plotly_white"


def escape(value: Any) -> str:
    """`value` as text safe to place in HTML content or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def format_value(value: Any) -> str:
    """A table cell as short readable text: 3 significant digits for floats, '' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return str(value)


def style_figure(fig: go.Figure, height_px: int) -> go.Figure:
    """The report's common look: white template, compact margins, a fixed height, full width."""
    fig.update_layout(template=TEMPLATE, height=height_px, autosize=True,
                      margin=dict(l=60, r=20, t=60, b=50), font=dict(size=12),
                      legend=dict(font=dict(size=11)), hoverlabel=dict(align="left"))
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


@dataclass
class Section:
    """A titled part of the report: safe HTML blocks, figures counted, nested subsections."""

    title: str  # plain text, escaped when rendered
    anchor: str
    blocks: list[str] = field(default_factory=list)
    subsections: list["Section"] = field(default_factory=list)
    figures: int = 0

    def add_text(self, text: str, css_class: str = "") -> None:
        """A paragraph of plain text (escaped)."""
        attribute = f' class="{escape(css_class)}"' if css_class else ""
        self.blocks.append(f"<p{attribute}>{escape(text)}</p>")

    def add_figure(self, fig: go.Figure, caption: str = "") -> None:
        """A plotly figure, rendered without plotly.js (the page carries it once)."""
        height = fig.layout.height or 450
        body = fig.to_html(full_html=False, include_plotlyjs=False, config=FIGURE_CONFIG,
                           default_width="100%", default_height=f"{height}px")
        caption_html = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
        self.blocks.append(f'<figure class="plot">{body}{caption_html}</figure>')
        self.figures += 1

    def add_table(self, frame: pd.DataFrame, caption: str = "") -> None:
        """A DataFrame as an escaped HTML table (numbers right-aligned)."""
        self.blocks.append(table_html(frame, caption))

    def add(self, subsection: "Section") -> None:
        self.subsections.append(subsection)

    @property
    def figure_count(self) -> int:
        """Figures in this section and all its subsections."""
        return self.figures + sum(child.figure_count for child in self.subsections)


def anchor_for(*parts: Any) -> str:
    """An HTML id made of `parts`, restricted to [a-z0-9-]."""
    text = "-".join(str(part) for part in parts).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "section"


def table_html(frame: pd.DataFrame, caption: str = "") -> str:
    """`frame` as a compact table; every header and cell is escaped."""
    header = "".join(f"<th>{escape(column)}</th>" for column in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for value in values:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f'<td{" class=num" if numeric else ""}>{escape(format_value(value))}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    caption_html = f"<caption>{escape(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table>{caption_html}<thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _toc(sections: Iterable[Section]) -> str:
    items = []
    for section in sections:
        children = _toc(section.subsections) if section.subsections else ""
        items.append(f'<li><a href="#{escape(section.anchor)}">{escape(section.title)}</a>{children}</li>')
    return f"<ul>{''.join(items)}</ul>"


def _section_html(section: Section, level: int) -> str:
    heading = f"h{min(level, 6)}"
    children = "".join(_section_html(child, level + 1) for child in section.subsections)
    return (f'<section id="{escape(section.anchor)}"><{heading}>{escape(section.title)}</{heading}>'
            f"{''.join(section.blocks)}{children}</section>")


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1f2328; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 0 1px #e3e6ea; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.35em; margin: 40px 0 8px; padding-top: 8px; border-top: 2px solid #e3e6ea; }
h3 { font-size: 1.15em; margin: 28px 0 6px; }
h4 { font-size: 1.02em; margin: 20px 0 6px; color: #444; }
.meta { color: #59636e; margin: 0 0 16px; }
.banner { padding: 10px 14px; border-radius: 6px; background: #fff4d6; border: 1px solid #f0d58a; }
.note { color: #59636e; font-size: 0.93em; }
nav.toc { background: #f6f8fa; border: 1px solid #e3e6ea; border-radius: 6px; padding: 8px 16px; }
nav.toc ul { margin: 4px 0; padding-left: 20px; }
nav.toc a { color: #0b5cad; text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
figure.plot { margin: 12px 0 20px; width: 100%; }
figcaption { color: #59636e; font-size: 0.9em; margin-top: 2px; }
.table-wrap { overflow-x: auto; margin: 8px 0 18px; }
table { border-collapse: collapse; font-size: 0.88em; }
caption { text-align: left; color: #59636e; padding-bottom: 4px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e6ea; text-align: left; vertical-align: top; }
th, td.num { white-space: nowrap; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
@media (max-width: 700px) { main { padding: 12px; } }
"""


def render_page(title: str, sections: list[Section], banner: str = "", source: str = "",
                generated_at: datetime | None = None) -> str:  # fmt: skip
    """The complete HTML document: plotly.js once, a table of contents, then the sections."""
    generated = (generated_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    if source:
        generated += f" from {source}"
    figure_count = sum(section.figure_count for section in sections)
    banner_html = f'<p class="banner">{escape(banner)}</p>' if banner else ""
    toc = f'<nav class="toc"><strong>Contents</strong>{_toc(sections)}</nav>' if sections else ""
    body = "".join(_section_html(section, 2) for section in sections)
    plotly_js = get_plotlyjs() if figure_count else ""
    scripts = (f"<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>"
               f'<script type="text/javascript">{plotly_js}</script>') if plotly_js else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style>{scripts}</head>"
        f'<body><main data-figures="{figure_count}"><h1>{escape(title)}</h1>'
        f'<p class="meta">Generated {escape(generated)}</p>{banner_html}{toc}{body}</main></body></html>\n'
    )
