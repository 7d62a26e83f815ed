"""The one exception type for mistakes a user can fix.

Raised where the problem is found, with a message a user can act on. Entry points turn it into a
single ``maskdm: error: ...`` line on stderr, a non-zero exit and a FAILED run; anything else is a
bug and keeps its traceback.
"""


class MaskDMError(Exception):
    """A user-facing error: bad input, a missing upstream artifact, something that cannot be fetched."""
