"""Self-contained HTML pages: the run report and the dataset report.

One file that opens anywhere, offline, years later: figures inline as data URIs, styles inline,
no scripts and nothing fetched from elsewhere.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from embedcache.atomic import write_text

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; } h3 { font-size: 1.05em; }
.subtitle { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; } td:not(.text) { white-space: nowrap; }
table.pairs th { text-align: left; font-weight: normal; background: #f8f8f8; }
table.pairs td { text-align: left; white-space: normal; overflow-wrap: anywhere; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.95em; }
figure { margin: 1em 0 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; }
.notes li { margin: 0.2em 0; } code, pre { background: #f6f6f6; font-size: 0.88em; }
pre { padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
"""


def escape(text: object) -> str:
    return html.escape(str(text))


def image(path: Path | str, alt: str, caption: str | None = None) -> str:
    """A PNG inline as a data URI, with its caption."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    body = f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
    if caption:
        body += f"<figcaption>{escape(caption)}</figcaption>"
    return f"<figure>{body}</figure>"


def _looks_numeric(value: object) -> bool:
    if isinstance(value, (int, float, np.number)):
        return True
    return isinstance(value, str) and NUMBER.match(value) is not None


# Text that reads as a number ("0.763 [0.748, 0.777]", "+0.012", "< 0.001") aligns right like one.
NUMBER = re.compile(r"^\s*[-+\u2212<>]?\s*\d")


def table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """An HTML table; columns of numbers align right, columns of text (names, paths, hashes) left."""
    text = [not all(_looks_numeric(v) for v in frame[c] if not (isinstance(v, float) and v != v))
            for c in frame.columns]

    def cell(value: object, left: bool) -> str:
        if isinstance(value, float):
            body = "" if value != value else float_format.format(value)  # NaN: an empty cell
        else:
            body = escape(value)
        return f'<td class="text">{body}</td>' if left else f"<td>{body}</td>"

    head = "".join(f'<th class="text">{escape(c)}</th>' if left else f"<th>{escape(c)}</th>"
                   for c, left in zip(frame.columns, text))
    rows = "".join("<tr>" + "".join(cell(v, left) for v, left in zip(row, text)) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def pairs(items: Iterable[tuple[str, object]]) -> str:
    """A two-column table of names and values (None shows as "none")."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape('none' if v is None else v)}</td></tr>" for k, v in items)
    return f'<table class="pairs"><tbody>{rows}</tbody></table>'


def bullets(items: Iterable[str]) -> str:
    return '<ul class="notes">' + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>"


def section(title: str, *parts: str) -> str:
    return f"<h2>{escape(title)}</h2>" + "".join(parts)


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1><p class=\"subtitle\">{escape(subtitle)}</p>"
            + "".join(sections) + "</body></html>\n")


def write_page(path: Path | str, title: str, subtitle: str, sections: Iterable[str]) -> Path:
    path = Path(path)
    write_text(path, page(title, subtitle, sections))
    return path
