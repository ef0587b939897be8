"""Ready-made implementations of the library's protocols (Depeche DB's `tools` module)."""

from depeche_nb.store.serializers import PydanticMessageSerializer

__all__ = ["PydanticMessageSerializer"]
