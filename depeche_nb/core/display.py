"""Where rich displays plug in, so lower layers never import the notebook layer.

Objects that Jupyter should render inherit `RichRepr`; their `_repr_html_`
asks this registry for a renderer of their class, which the notebook layer
(`depeche_nb.notebook`) registers when it is imported. Without one, the
plain repr is shown, escaped.
"""

from __future__ import annotations

import dataclasses
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


# -- DataFrame views ---------------------------------------------------------------------------
# The same plug-in for views: `store.to_dataframe()`, `report.to_dataframe()` and the like
# are thin methods of the lower layers that call the view the notebook layer registered
# under their name (`depeche_nb.notebook.views`, imported by `import depeche_nb`).

# Rows a view returns unless the caller passes `limit=None`: enough to explore, small
# enough that `store.to_dataframe()` on a million-message store is quick.
DEFAULT_LIMIT = 10_000
# Streams `streams_dataframe()` returns unless the caller passes `limit=None`: reading a
# stream's summary costs two index lookups, so this keeps the view quick in any store.
STREAMS_LIMIT = 1000

View = Callable[..., Any]
_views: dict[str, View] = {}


def register_view(name: str, view: View) -> None:
    _views[name] = view


def run_view(name: str, *args: Any, **kwargs: Any) -> Any:
    """Build the DataFrame view registered as `name` from `args`."""
    view = _views.get(name)
    if view is None:
        raise RuntimeError(
            f"no DataFrame view {name!r} is registered: import depeche_nb (its notebook layer "
            "registers the views) before asking for one"
        )
    return view(*args, **kwargs)


# -- numbers as displays may claim them ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Count:
    """A number as a display may claim it: exact, an estimate ("about"), or a lower bound
    ("more than": a count that stopped at a cap)."""

    value: int
    qualifier: str = ""  # "", ABOUT or MORE_THAN

    @property
    def exact(self) -> bool:
        return not self.qualifier

    @classmethod
    def capped(cls, counted: int, cap: int) -> Count:
        """The result of counting at most `cap` + 1 rows."""
        return cls(cap, MORE_THAN) if counted > cap else cls(counted)

    def __str__(self) -> str:
        return f"{self.qualifier} {self.value:,}" if self.qualifier else f"{self.value:,}"


ABOUT = "about"
MORE_THAN = "more than"
