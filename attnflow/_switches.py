"""Process-wide switches that overlapping captures share, and Ctrl-C held back while they are flipped.

Adapters change state that is not theirs alone: PyTorch's MHA fast path is one flag for the whole
process, and a transformers model's attention implementation is shared by every ``attach`` on that
model. :func:`switch` reference-counts such a change: the first holder turns it on and remembers the
state it found, later holders only join, and the last holder to leave puts the remembered state back,
whatever order the holders leave in and whichever thread they run in.

:func:`deferred_interrupts` holds back SIGINT (Ctrl-C) while hooks and switches are installed or
removed, so that an interrupt cannot land between "installed" and "remembered for removal", and
raises it as soon as the critical section is over.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["deferred_interrupts", "holders", "switch"]

_lock = threading.RLock()  # re-entrant: a turn_on may itself hold another switch
# key -> [holders, the state the first holder found, how to put it back]
_held: dict[Hashable, list[Any]] = {}
_deferring = False  # only the main thread defers, so one flag suffices


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back SIGINT for the block, then deliver it as it would have been delivered.

    In the main thread, SIGINT's handler is replaced for the duration of the block by one that only
    notes the signal. On exit the previous handler is put back and, if a signal arrived, called (the
    default one raises :class:`KeyboardInterrupt`), also when the block raised. In other threads
    (which never receive Python signal handlers), inside an enclosing deferral, or where SIGINT is not
    handled by Python, it does nothing.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: not ours to replace
        yield
        return
    received: list[Any] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except ValueError:  # not the main interpreter
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous, received[0])


def _deliver(handler: Any, frame: Any) -> None:
    if handler is signal.SIG_IGN:
        return
    if handler is signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
        return
    handler(signal.SIGINT, frame)


@contextmanager
def switch(key: Hashable, turn_on: Callable[[], Any], turn_off: Callable[[Any], None]) -> Iterator[Any]:
    """Hold the process-wide switch ``key`` for the block.

    The first holder calls ``turn_on()``, which changes the state and returns what is needed to undo
    it (if it raises, it must leave the state as it was, and nothing is held). Later holders of the same
    key only join. When the last holder leaves, ``turn_off(value)`` is called with what the first
    ``turn_on`` returned. Thread-safe; interrupts are deferred while the switch changes hands.

    Yields what the first holder's ``turn_on()`` returned (the state before any holder), to every holder.
    """
    acquired = False
    try:
        with deferred_interrupts():
            with _lock:
                entry = _held.get(key)
                if entry is None:
                    entry = _held[key] = [1, turn_on(), turn_off]
                else:
                    entry[0] += 1
                acquired = True
                found = entry[1]
        yield found
    finally:
        if acquired:
            with deferred_interrupts(), _lock:
                entry = _held[key]
                entry[0] -= 1
                if entry[0] == 0:
                    del _held[key]
                    entry[2](entry[1])


def holders(key: Hashable) -> int:
    """How many holders the switch ``key`` has now (0: off, the original state is in place)."""
    with _lock:
        entry = _held.get(key)
        return 0 if entry is None else entry[0]
