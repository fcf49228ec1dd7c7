"""The built-in pass library. Importing this package registers every built-in pass
(namespace ``edgefc``) with the core registry; see ``edgefc passes`` for the list."""

from edgefc.passes import canonicalize  # noqa: F401
from edgefc.passes import mlt  # noqa: F401
from edgefc.passes import fusion  # noqa: F401
from edgefc.passes import quantize  # noqa: F401
