"""Self-contained HTML pages: one file, figures inlined as base64 PNG, no external URL.

Every string from a run or a grid (names, configuration values, error messages) goes
through :func:`html.escape`; only the markup built here is written raw.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .figures import Plot

__all__ = ["Raw", "Section", "draw", "esc", "figure_html", "page", "table_html", "write_page"]


class Raw(str):
    """Markup that is already HTML (not escaped again by :func:`table_html`)."""


def esc(value: object) -> str:
    """``value`` as HTML text."""
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


@dataclass
class Section:
    """One section of a page: its anchor, its heading and its HTML body."""

    id: str
    title: str
    body: str


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    """A table in a box that scrolls sideways when the table is wider than the page; cells
    are escaped unless they are :class:`Raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    attr = f' class="{esc(cls)}"' if cls else ""
    # a wide table (many tasks) scrolls sideways in its box instead of overflowing the page
    return (
        f'<div class="table-scroll"><table{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


_NUMBER = re.compile(r"^[+\-]?(\d|\.\d)")


def _cell(value: object) -> str:
    """A table cell: numbers (and ``-`` for a missing one) right-aligned, text left-aligned."""
    text = str(value)
    numeric = not isinstance(value, Raw) and (text == "-" or bool(_NUMBER.match(text)))
    return f"<td>{esc(value)}</td>" if numeric else f'<td class="text">{esc(value)}</td>'


def figure_html(plot: Plot, caption: str, dpi: int = 100) -> str:
    """The figure as an inline PNG with its caption; the matplotlib figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        plot.figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(plot.figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def draw(build: Callable[[], Plot | None], caption: str, *, strict: bool) -> str | None:
    """:func:`figure_html` of what ``build`` returns (``None`` when it returns ``None``).

    A figure that cannot be drawn must not cost a finished run its report: the error takes
    the figure's place. With ``strict`` the error is raised instead (tests use it).
    """
    try:
        plot = build()
        return None if plot is None else figure_html(plot, caption)
    except Exception as exc:
        if strict:
            raise
        return (
            f'<div class="figure-error">This figure could not be drawn '
            f"({esc(type(exc).__name__)}: {esc(exc)}).</div>"
        )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222;
       background: #fafafa; }
header { background: #28324a; color: #fff; padding: 1em 2em; }
header h1 { margin: 0 0 0.3em 0; font-size: 1.5em; }
header p { margin: 0.2em 0; opacity: 0.9; }
header a { color: #cfe0ff; }
nav { padding: 0.5em 2em; background: #e8ebf2; position: sticky; top: 0; font-size: 0.9em; }
nav a { margin-right: 1em; color: #28324a; }
main { padding: 0 2em 2em 2em; max-width: 1400px; }
section { margin-top: 1.5em; }
h2 { border-bottom: 2px solid #28324a; padding-bottom: 0.2em; }
.table-scroll { overflow-x: auto; max-width: 100%; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.88em; background: #fff; }
th, td { border: 1px solid #ccd; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef0f6; }
td:first-child, th:first-child, td.text { text-align: left; }
figure { margin: 0.8em 0; background: #fff; padding: 0.5em; border: 1px solid #dde;
         display: inline-block; max-width: 100%; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; margin-top: 0.3em; max-width: 60em; }
pre { background: #fff; border: 1px solid #dde; padding: 0.8em; overflow-x: auto;
      font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.verdict { background: #fff; border-left: 4px solid #28324a; padding: 0.5em 0.8em;
           max-width: 60em; }
.figure-error { background: #fde8e8; border: 1px solid #d88; padding: 0.6em; margin: 0.6em 0; }
"""


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """A whole HTML document: header, section links, sections."""
    links = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{subtitle}</header>"
        f"<nav>{links}</nav><main>{body}</main></body></html>\n"
    )


def write_page(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file (never a half-written page)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
