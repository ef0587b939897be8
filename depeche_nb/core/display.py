"""Where rich displays plug in, so lower layers never import the notebook layer.

Objects that Jupyter should render inherit `RichRepr`; their `_repr_html_`
asks this registry for a renderer of their class, which the notebook layer
(`depeche_nb.notebook`) registers when it is imported. Without one, the
plain repr is shown, escaped.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

HtmlRenderer = Callable[[Any], str]

_renderers: dict[type, HtmlRenderer] = {}


def register_html_renderer(cls: type, renderer: HtmlRenderer) -> None:
    _renderers[cls] = renderer


def find_html_renderer(cls: type) -> HtmlRenderer | None:
    for klass in cls.__mro__:
        renderer = _renderers.get(klass)
        if renderer is not None:
            return renderer
    return None


class RichRepr:
    """Mixin: an HTML repr from the registered renderer, else the escaped plain repr."""

    def _repr_html_(self) -> str:
        renderer = find_html_renderer(type(self))
        if renderer is None:
            return f"<pre>{html.escape(repr(self))}</pre>"
        return renderer(self)
