"""The widgets' look: the palette for origin streams, the style sheet and the size limits."""

from __future__ import annotations

import hashlib

# Colours for origin streams: light enough for the dark cell text on light and dark
# themes, few enough to tell apart (ColorBrewer Set3 plus four). Two streams can share
# one; the legend key in each cell tells them apart.
PALETTE = (
    "#8dd3c7",
    "#ffffb3",
    "#bebada",
    "#fb8072",
    "#80b1d3",
    "#fdb462",
    "#b3de69",
    "#fccde5",
    "#d9d9d9",
    "#bc80bd",
    "#ccebc5",
    "#ffed6f",
    "#66c2a5",
    "#e78ac3",
    "#c49c94",
    "#9edae5",
)

WIDGET_STYLE = (
    "<style>"
    ".dnb .dnb-pm-layout{display:flex;flex-wrap:wrap;gap:8px 24px;align-items:flex-start}"
    ".dnb table.dnb-pm-grid{border-collapse:separate;border-spacing:2px;margin:0 0 4px 0}"
    ".dnb .dnb-pm-grid th{font-weight:600;padding:0 6px 0 0;text-align:right;white-space:nowrap;"
    "vertical-align:bottom;"
    "background:transparent;color:inherit;border:0}"
    ".dnb .dnb-pm-grid td{min-width:18px;height:18px;padding:0 3px;text-align:center;font-size:11px;"
    "border:0;white-space:nowrap}"
    ".dnb .dnb-pm-grid td.dnb-pm-cell{color:#111;border-radius:2px}"
    ".dnb .dnb-pm-grid td.dnb-pm-more,.dnb .dnb-pm-grid td.dnb-pm-range{opacity:.7;background:transparent;"
    "color:inherit;text-align:right}"
    ".dnb .dnb-pm-legend{display:flex;flex-wrap:wrap;gap:2px 12px;margin:4px 0 0 0}"
    ".dnb .dnb-pm-swatch{display:inline-block;min-width:16px;padding:0 3px;"
    "text-align:center;color:#111;border-radius:2px;font-size:11px}"
    + "".join(f".dnb .dnb-c{i}{{background:{colour}}}" for i, colour in enumerate(PALETTE))
    + ".dnb .dnb-bar{display:inline-block;width:160px;height:10px;vertical-align:middle;"
    "background:rgba(128,128,128,.25);border-radius:2px;overflow:hidden}"
    ".dnb .dnb-bar-fill{display:block;height:100%;background:var(--jp-brand-color1,#2f7ed8)}"
    ".dnb .dnb-bar-done .dnb-bar-fill{background:var(--jp-success-color1,#3a9a3a)}"
    ".dnb .dnb-alt{display:none}"
    ".dnb details.dnb-traceback summary{cursor:pointer;opacity:.8}"
    ".dnb pre.dnb-json,.dnb pre.dnb-pre{font-family:var(--jp-code-font-family,monospace);"
    "font-size:inherit;margin:2px 0;padding:0;white-space:pre-wrap;word-break:break-all;"
    "background:transparent;color:inherit;max-height:400px;overflow:auto}"
    "</style>"
)

# Only in the timeline's pages: the other widgets' committed tutorial outputs stay as they are.
TIMELINE_STYLE = (
    "<style>.dnb .dnb-table tr.dnb-changed td{background:rgba(255,196,0,.22)}"
    ".dnb .dnb-changed-mark{font-weight:600}</style>"
)

# Text shown only where the style sheet is stripped, between items the style spaces itself.
ALT_SEPARATOR = '<span class="dnb-alt"> · </span>'

# Characters of a payload shown by the browser (cut server-side beyond this).
PAYLOAD_CHARS = 20_000
TRACEBACK_CHARS = 20_000
PREVIEW_CHARS = 120
MAX_PAGE_SIZE = 200


def stream_colour_index(stream: str) -> int:
    """A stream's palette index: stable across processes and sessions (unlike `hash()`)."""
    digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % len(PALETTE)


def stream_colour(stream: str) -> str:
    return PALETTE[stream_colour_index(stream)]


def legend_key(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: short cell labels that still read where CSS is stripped."""
    key = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        key = chr(ord("A") + rest) + key
    return key
