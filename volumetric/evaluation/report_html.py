"""HTML building blocks of the evaluation report: one self-contained page, no template engine.

Everything the page needs is inside it: the CSS and the table-sorting script inline, the images as
``data:image/png;base64`` URIs. A Content-Security-Policy in the page forbids fetching anything
(``default-src 'none'``) and runs only the one script whose hash it names, so neither an image nor a
script can reach the network, and markup smuggled in through a file name could not run even if it
escaped escaping. Every text the page shows goes through `esc` (html.escape): paths and class
names are data, never markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2530;
  margin: 0 auto; max-width: 1280px; padding: 0 24px 48px; }
h1 { font-size: 22px; margin: 24px 0 4px; }
h2 { font-size: 17px; margin: 32px 0 8px; border-bottom: 1px solid #d5dbe3; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 20px 0 6px; word-break: break-all; }
p.note { color: #5a6573; margin: 6px 0; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #d5dbe3; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th::after { content: " \\21C5"; color: #9aa5b1; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; color: #1d2530; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; color: #1d2530; }
tr.wrong td { background: #fdecec; }
tr.best td { background: #e8f4ea; }
td.path { word-break: break-all; max-width: 560px; }
div.scroll { max-height: 520px; overflow: auto; border: 1px solid #d5dbe3; display: inline-block; }
div.scroll table { margin: 0; }
div.scroll th { position: sticky; top: 0; z-index: 1; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.figures figure { margin: 0; }
.figures img { max-width: 100%; border: 1px solid #d5dbe3; }
.figures img.plot { max-height: 460px; }
nav { margin: 4px 0 0; color: #5a6573; }
nav a { color: #1f5fa8; margin-right: 14px; text-decoration: none; }
.case .figures figure { flex: 1 1 560px; }
figcaption { color: #5a6573; font-size: 12px; }
"""

SCRIPT = """
"use strict";
function sortKey(cell, numeric) {
  return numeric ? Number(cell.dataset.sort) : cell.textContent.trim();
}
function sortTable(table, th, column) {
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  for (const head of table.tHead.rows[0].cells) head.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const numeric = th.dataset.type === "number";
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = sortKey(a.cells[column], numeric), y = sortKey(b.cells[column], numeric);
    const order = numeric ? (x > y) - (x < y) : x.localeCompare(y, undefined, {numeric: true});
    return ascending ? order : -order;
  });
  body.append(...rows);
}
for (const table of document.querySelectorAll("table.sortable")) {
  Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
    th.tabIndex = 0;
    th.addEventListener("click", () => sortTable(table, th, column));
    th.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        sortTable(table, th, column);
      }
    });
  });
}
"""


def esc(value: object) -> str:
    """Any value as text that HTML shows literally (quotes included: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def number(value: float | None, digits: int = 4) -> str:
    """A metric as text: fixed decimals, or an em dash where it is undefined (None or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def sort_key(value: float | None) -> str:
    """A number for data-sort: undefined values sort first."""
    if value is None or not math.isfinite(value):
        return "-Infinity"
    return repr(float(value))


@dataclass
class Cell:
    """One table cell: its text (escaped on output), a CSS class and data-* attributes."""

    text: str
    css: str = ""
    data: dict[str, str] = field(default_factory=dict)

    def html(self, tag: str = "td") -> str:
        attributes = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in self.data.items())
        css = f' class="{esc(self.css)}"' if self.css else ""
        return f"<{tag}{css}{attributes}>{esc(self.text)}</{tag}>"


def numeric(amount: float | None, digits: int = 4, /, **data: str) -> Cell:
    """A right-aligned number cell that sorts by its value; ``data``: more data-* attributes."""
    return Cell(number(amount, digits), "num", {"sort": sort_key(amount), **data})


def table(
    header: Sequence[str | Cell] | None,
    rows: Iterable[tuple[Sequence[str | Cell], str]],
    *,
    sortable: bool = False,
    ident: str = "",
) -> str:
    """header: the column names (a Cell to mark a column data-type=number), or None for a table of
    rows alone; rows: (cells, row CSS class). Plain strings are escaped like every Cell."""

    def cell(value: str | Cell, tag: str) -> str:
        return (value if isinstance(value, Cell) else Cell(value)).html(tag)

    def row(cells: Sequence[str | Cell], css: str) -> str:
        attribute = f' class="{esc(css)}"' if css else ""
        return f"<tr{attribute}>" + "".join(cell(c, "td") for c in cells) + "</tr>"

    head = (
        "<thead><tr>" + "".join(cell(h, "th") for h in header) + "</tr></thead>" if header else ""
    )
    body = "\n".join(row(cells, css) for cells, css in rows)
    attributes = (' class="sortable"' if sortable else "") + (
        f' id="{esc(ident)}"' if ident else ""
    )
    return f"<table{attributes}>{head}\n<tbody>\n{body}\n</tbody></table>"


def image(png: bytes, alt: str, css: str, caption: str = "") -> str:
    """A PNG embedded as a data URI, in a figure with an optional caption."""
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    below = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img class="{esc(css)}" alt="{esc(alt)}" src="{source}">{below}</figure>'


def figures(parts: Iterable[str]) -> str:
    return f'<div class="figures">{"".join(parts)}</div>'


def nav(links: Sequence[tuple[str, str]]) -> str:
    """Links to the sections: (section id, label)."""
    return (
        "<nav>" + "".join(f'<a href="#{esc(i)}">{esc(label)}</a>' for i, label in links) + "</nav>"
    )


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(ident: str, heading: str, *parts: str) -> str:
    body = "\n".join(parts)
    return f'<section id="{esc(ident)}">\n<h2>{esc(heading)}</h2>\n{body}\n</section>'


def json_attribute(value: object) -> str:
    """A JSON value for a data-* attribute (floats round-trip exactly)."""
    return json.dumps(value, allow_nan=False)


def page(title: str, parts: Sequence[str]) -> str:
    """The whole document: inline style and script, and a policy that lets it fetch nothing."""
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode("ascii")
    policy = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(policy)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{body}\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
