"""The built-in pass library. Importing this package registers every built-in pass
(namespace ``edgefc``) with the core registry; see ``edgefc passes`` for the list."""

from edgefc.passes import (
    canonicalize,  # noqa: F401
    fusion,  # noqa: F401
    mlt,  # noqa: F401
    quantize,  # noqa: F401
)
