"""The one exception type for mistakes a user can fix.

Raised where the problem is found, with a message a user can act on. Entry points turn it into a
single ``maskdm: error: ...`` line on stderr, a non-zero exit and a FAILED run; anything else is a
bug and keeps its traceback.
"""


class MaskDMError(Exception):
    """A user-facing error: bad input, a missing upstream artifact, something that cannot be fetched."""


def positive_or_auto(name: str, value: object, hint: str = "") -> int | None:
    """A count a user gives as ``auto`` (or empty: returns None) or an integer >= 1; anything else
    is one MaskDMError line naming ``name`` (``hint``: what the count is, for that line)."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("", "auto"):
        return None
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise MaskDMError(f"{name} must be an integer >= 1 or auto, not '{value}'" + (f"; {hint}" if hint else ""))
    return number
