"""Model adapters; importing this package registers them."""

from . import frozen  # noqa: F401
from . import ttt, legacy, dyneval  # noqa: F401,E401
