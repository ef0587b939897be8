"""The small HTML toolkit every rich repr of the library is built with.

Rules it enforces, so each repr does not have to remember them:

* Safe: every value goes through `esc` (stream names and payloads are user
  data: a stream named `<script>` must show as text). Attribute values are
  escaped with quotes too.
* Bounded: `cell` cuts long values, `table` shows at most `max_rows` rows
  and says how many more there are; callers pass already bounded data.
* Theme-neutral: the style sheet is scoped to `.dnb`, sets no background and
  inherits the text colour; borders and muted text use JupyterLab's CSS
  variables with translucent fallbacks that read on light and dark
  backgrounds (VS Code, nbviewer, GitHub have no `--jp-*` variables).
* Self-contained: inline `<style>` only, no JavaScript, no external assets.
  Where the style is stripped (GitHub), the markup is still a plain table.
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from depeche_nb.core.display import Count

CELL_CHARS = 80  # visible characters of one table cell
TITLE_CHARS = 400  # characters of the hover text of a cut cell
MAX_ROWS = 20

STYLE = """<style>
.dnb{font-family:var(--jp-ui-font-family,inherit);font-size:var(--jp-ui-font-size1,13px);
color:inherit;background:transparent;line-height:1.45;max-width:100%;overflow-x:auto}
.dnb .dnb-title{margin:0 0 2px 0}
.dnb .dnb-kind{font-weight:600}
.dnb .dnb-name,.dnb code{font-family:var(--jp-code-font-family,monospace);font-size:inherit;
background:transparent;color:inherit;padding:0}
.dnb .dnb-facts{display:flex;flex-wrap:wrap;gap:0 16px;margin:0 0 6px 0}
.dnb .dnb-facts span{white-space:nowrap}
.dnb .dnb-facts .dnb-sep{display:none}
.dnb .dnb-muted,.dnb .dnb-facts .dnb-label{opacity:.7}
.dnb .dnb-section{font-weight:600;margin:8px 0 2px 0}
.dnb table.dnb-table{border-collapse:collapse;margin:0 0 2px 0;color:inherit;
background:transparent;font-size:inherit;table-layout:auto;width:auto}
.dnb .dnb-table th,.dnb .dnb-table td{padding:2px 10px 2px 0;text-align:left;vertical-align:top;
color:inherit;background:transparent;white-space:nowrap;border:0;
border-bottom:1px solid var(--jp-border-color2,rgba(128,128,128,.3))}
.dnb .dnb-table th{font-weight:600;border-bottom-color:var(--jp-border-color1,rgba(128,128,128,.6))}
.dnb .dnb-table .dnb-num{text-align:right;font-variant-numeric:tabular-nums}
.dnb .dnb-note{opacity:.7;font-style:italic;margin:2px 0 0 0}
.dnb .dnb-warn{color:var(--jp-warn-color1,#d08000)}
.dnb .dnb-ok{color:var(--jp-success-color1,#3a9a3a)}
.dnb .dnb-error{color:var(--jp-error-color1,#d04040)}
</style>"""


def esc(value: object) -> str:
    """HTML-escape `str(value)`, quotes included (safe in text and in attributes)."""
    return html.escape(str(value), quote=True)


def plain(value: object) -> str:
    """A value as short readable text (not escaped)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:g}"
    if isinstance(value, _dt.datetime):
        # Keep the offset: times are stored tz-aware; milliseconds are enough to read.
        return value.isoformat(sep=" ", timespec="milliseconds")
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
        except (TypeError, ValueError):
            return repr(value)
    return str(value)


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def count(n: int | Count | None, noun: str) -> str:
    """'1 message', '1,234 messages', 'about 1,000,000 messages', 'more than 1,000
    streams' (plain text)."""
    if n is None:
        return f"? {noun}s"
    if isinstance(n, Count):
        return f"{n} {noun}" + ("" if n == Count(1) else "s")
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def cell(value: object, limit: int = CELL_CHARS, tag: str = "td") -> str:
    """One table cell: escaped, cut to `limit` characters (full text, bounded, on hover),
    numbers right-aligned."""
    text = plain(value)
    shown = cut(text, limit)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    attrs = ' class="dnb-num"' if numeric else ""
    if shown != text:
        attrs += f' title="{esc(cut(text, TITLE_CHARS))}"'
    return f"<{tag}{attrs}>{esc(shown)}</{tag}>"


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    total: int | Count | None = None,
    max_rows: int = MAX_ROWS,
    keep: str = "last",
    noun: str = "row",
    hint: str = "",
) -> str:
    """A table of at most `max_rows` rows (the `keep`='last' or 'first' ones), with a note
    "… N more rows" when `total` (default: len(rows)) exceeds what is shown; a `Count`
    total keeps its "about" or "more than" in the note."""
    if not isinstance(total, Count):
        total = Count(len(rows) if total is None else total)
    if len(rows) > max_rows:
        rows = rows[-max_rows:] if keep == "last" else rows[:max_rows]
    head = "".join(f"<th>{esc(cut(str(c), CELL_CHARS))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    parts = [f'<table class="dnb-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>']
    hidden = Count(total.value - len(rows), total.qualifier)
    if hidden.value > 0:
        where = "earlier" if keep == "last" else "more"
        suffix = f"; {hint}" if hint else ""
        parts.append(note(f"… {count(hidden, f'{where} {noun}')} not shown{suffix}"))
    return "".join(parts)


def record_table(items: Iterable[tuple[str, object]], *, max_rows: int = 30) -> str:
    """A two-column name/value table (for one object's fields)."""
    pairs = list(items)
    return table(("field", "value"), pairs[:max_rows], total=len(pairs), keep="first", noun="field")


def note(text: str) -> str:
    return f'<div class="dnb-note">{esc(text)}</div>'


def warning(text: str) -> str:
    """A line that must not be overlooked (unlike the muted `note`)."""
    return f'<div class="dnb-warn">{esc(text)}</div>'


def section(title: str) -> str:
    return f'<div class="dnb-section">{esc(title)}</div>'


def title(kind: str, name: object = None) -> str:
    """'Kind name' headline, e.g. 'MessageStore orders'."""
    name_html = "" if name is None else f' <span class="dnb-name">{esc(cut(str(name), 120))}</span>'
    return f'<div class="dnb-title"><span class="dnb-kind">{esc(kind)}</span>{name_html}</div>'


_FACT_SEPARATOR = '<span class="dnb-sep"> · </span>'


def facts(items: Iterable[tuple[str, object] | str], css: dict[str, str] | None = None) -> str:
    """A line of 'label value' facts; a plain str item is shown as is. `css` maps a label
    to an extra class (e.g. 'dnb-warn') for its value."""
    spans = []
    for item in items:
        if isinstance(item, str):
            spans.append(f"<span>{esc(item)}</span>")
            continue
        label, value = item
        klass = (css or {}).get(label)
        value_html = esc(cut(plain(value), CELL_CHARS))
        if klass:
            value_html = f'<span class="{esc(klass)}">{value_html}</span>'
        spans.append(f'<span><span class="dnb-label">{esc(label)}</span> {value_html}</span>')
    # A text separator, hidden by the stylesheet (which spaces the facts itself): where the
    # style is stripped (an untrusted notebook, a sanitising viewer) the facts still read
    # "4 partitions · lag 19", not "4 partitionslag 19".
    return f'<div class="dnb-facts">{_FACT_SEPARATOR.join(spans)}</div>'


def box(*parts: str) -> str:
    """The outer container: scoped style plus the parts."""
    return f'<div class="dnb">{STYLE}{"".join(parts)}</div>'


def error_box(obj: object, error: BaseException) -> str:
    """What a repr shows when it cannot read its data (e.g. the database is down): the
    plain repr and the error, never a traceback in place of the output."""
    message = cut(f"{type(error).__name__}: {error}", 500)
    return box(
        f"<div><code>{esc(cut(repr(obj), 300))}</code></div>",
        f'<div class="dnb-error">{esc("could not read its state: " + message)}</div>',
    )


def payload_items(message: object) -> list[tuple[str, object]]:
    """The fields of a message object (pydantic model, dataclass, dict or other) as pairs."""
    dump = getattr(message, "model_dump", None)
    data: Any
    if callable(dump):
        try:
            data = dump(mode="json")
        except Exception:
            data = dump()
    elif _dc.is_dataclass(message) and not isinstance(message, type):
        data = _dc.asdict(message)
    elif isinstance(message, dict):
        data = message
    elif hasattr(message, "__dict__"):
        data = {k: v for k, v in vars(message).items() if not k.startswith("_")}
    else:
        return [("value", message)]
    if not isinstance(data, dict):
        return [("value", data)]
    return [(str(k), v) for k, v in data.items()]


__all__ = [
    "CELL_CHARS",
    "MAX_ROWS",
    "STYLE",
    "box",
    "cell",
    "count",
    "cut",
    "error_box",
    "esc",
    "facts",
    "note",
    "payload_items",
    "plain",
    "record_table",
    "section",
    "table",
    "title",
    "warning",
]
