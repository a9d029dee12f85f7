"""Small helpers that keep a trace's arrays its own: copied, native byte order, read-only."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from .._errors import TraceError

#: Arrays handed over with `adopt`, by id (an entry goes when its array does).
_ADOPTED: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def adopt(array: np.ndarray) -> np.ndarray:
    """Hand ``array`` to attnflow: the caller vouches that nothing else holds or will write its memory (an array
    it has just made, or a view of a tensor whose storage nothing else references), so that a trace keeps it
    as it is instead of copying it (`frozen`). It is made read-only; returned for convenience."""
    array.setflags(write=False)
    _ADOPTED[id(array)] = array
    return array


def frozen(array: Any, dtype: Any = None) -> np.ndarray:
    """A read-only array the caller cannot change afterwards: ``array`` itself when it already owns its
    read-only data or was handed over with `adopt`, else a copy (in native byte order, ``dtype`` if given)."""
    if (
        isinstance(array, np.ndarray) and not array.flags.writeable
        and (array.flags.owndata or _ADOPTED.get(id(array)) is array)
        and array.flags.c_contiguous and array.dtype.isnative and (dtype is None or array.dtype == dtype)
    ):
        return array
    out = np.array(array, dtype=dtype, copy=True, order="C")
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    out.setflags(write=False)
    return out


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def bool_mask(value: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    """A ``(batch, length)`` 0/1 or boolean array as a read-only bool array, or a clear error."""
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise TraceError(f"{what} must be an array of shape {shape}; got {type(value).__name__}.") from exc
    if array.shape != shape:
        raise TraceError(f"{what} must have shape (batch, length) = {shape}; got {array.shape}.")
    if array.dtype == np.bool_:
        # a bool array viewed from other bytes may hold 2..255; numpy's operators then disagree on them (~ of a
        # byte 255 is 254, still True): every nonzero byte is True, stored as 1
        return frozen(array.view(np.uint8) != 0)
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not numeric or not np.isin(array, (0, 1)).all():
        raise TraceError(f"{what} must hold only 0/1 or booleans.")
    return frozen(array.astype(bool))
