"""Boolean flags of the fused ops, checked as eager's ops check theirs: a ``bool`` (or
``numpy.bool_``), never a value taken by truthiness ("False" is a true string). Callers test
``flag is True or flag is False`` first, so the check costs nothing on the hot path."""
from __future__ import annotations


def flag(value, fn: str, name: str) -> bool:
    """``value`` as a bool, or a TypeError naming ``fn``'s argument ``name``."""
    if value is True or value is False:
        return value
    if type(value).__name__ in ("bool", "bool_") and type(value).__module__ == "numpy":  # (NumPy 2 / 1 names)
        return bool(value)
    raise TypeError(f"{fn}: {name} must be a bool, not {type(value).__name__}"
                    + (f" ({value!r}: a string is true whatever it says)" if isinstance(value, str) else ""))
