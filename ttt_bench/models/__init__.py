"""Model adapters; importing this package registers them."""

from . import frozen  # noqa: F401
