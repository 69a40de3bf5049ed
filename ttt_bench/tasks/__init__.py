"""Tasks; importing this package registers them."""

from . import librilight_stream  # noqa: F401
