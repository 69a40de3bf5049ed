"""Tasks; importing this package registers them."""

from . import librilight_stream, pairs, recall  # noqa: F401
