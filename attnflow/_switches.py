"""Process-wide switches that overlapping captures share, and Ctrl-C held back while they are flipped.

Adapters change state that is not theirs alone: PyTorch's MHA fast path is one flag for the whole
process, and a transformers model's attention implementation is shared by every ``attach`` on that
model. [`switch`][attnflow.recording.switch] reference-counts such a change: the first holder turns it on and remembers the
state it found, later holders only join, and the last holder to leave puts the remembered state back,
whatever order the holders leave in and whichever thread they run in.

[`deferred_interrupts`][attnflow.recording.deferred_interrupts] holds back SIGINT (Ctrl-C) and every other signal that has a Python
handler while hooks and switches are installed or removed, so that an exception raised by a signal
handler cannot land between "installed" and "remembered for removal", and delivers them as soon as the
critical section is over.
"""

from __future__ import annotations

import itertools
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
_MASKABLE = hasattr(signal, "pthread_sigmask")


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back signals for the block, then deliver them as they would have been delivered.

    In the main thread (the only one that runs Python signal handlers), every signal that has a Python
    handler is blocked with ``signal.pthread_sigmask`` for the block (where the platform has it), and
    SIGINT's handler is replaced by one that only notes the signal (Ctrl-C sent to the process may be
    taken by another thread, which a mask does not hold back). On exit SIGINT's handler is put back, the
    signal mask is restored exactly as found (blocked signals are delivered then, and their handlers
    run), and a noted SIGINT is handed to its handler (the default one raises
    `KeyboardInterrupt`), also when the block raised. In other threads, inside an enclosing
    deferral, or where SIGINT is not handled by Python (no handler to swap), it does less or nothing.

    Nothing that arrives while the guard is being set up or taken down leaves its handler or mask
    behind: the handler is swapped inside the ``try`` that puts it back, and the mask is the first
    thing set and the last thing restored.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = _block()  # from here on, no handler runs in this thread until _unblock(mask)
    previous: Any = None
    received: list[Any] = []
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is not None:  # None: a handler installed outside Python, not ours to replace
            try:
                signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
            except ValueError:  # not the main interpreter
                previous = None
        _deferring = True
        yield
    finally:
        _deferring = False
        try:
            if previous is not None:
                _put_back(previous)
        finally:
            _unblock(mask)
        if received:
            _deliver(previous, received[0])


_OTHER_SIGNALS = sorted(int(signum) for signum in signal.valid_signals() if signum != signal.SIGINT)
_raw_getsignal = getattr(signal, "_signal", signal).getsignal  # without the enum conversion: ~10x faster


def _handled() -> list[int]:
    """The signals with a Python handler, and SIGINT (also when it has the default action or is ignored)."""
    handlers = map(_raw_getsignal, _OTHER_SIGNALS)
    return [signal.SIGINT, *itertools.compress(_OTHER_SIGNALS, map(callable, handlers))]


def _block() -> Any:
    """Block the signals that have Python handlers; the mask before (None where there are no masks).

    The mask is read before it is changed: a handler that runs inside the call that blocks (for a signal
    that was already pending) cannot lose it."""
    if not _MASKABLE:
        return None
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # changes nothing
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _handled())
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        raise
    return before


def _unblock(mask: Any) -> None:
    """Restore the signal mask ``mask``; signals blocked meanwhile are delivered now (and may raise here)."""
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _put_back(handler: Any) -> None:
    """SIGINT's handler back to ``handler``. ``signal.signal`` runs pending handlers before it changes the
    handler; one that raises stops the change, so it is retried until done, and the first error is raised."""
    error: BaseException | None = None
    while True:
        try:
            signal.signal(signal.SIGINT, handler)
            break
        except BaseException as exc:  # a pending signal's handler raised before the change
            error = error or exc
    if error is not None:
        raise error


def _deliver(handler: Any, frame: Any) -> None:
    if handler is signal.SIG_IGN:
        return
    if handler is signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
        return
    handler(signal.SIGINT, frame)


class _Claim:
    """One holder's claim on the switch ``key``: entering acquires it, `release` gives it back once."""

    def __init__(self, key: Hashable, turn_on: Callable[[], Any], turn_off: Callable[[Any], None]):
        self.key, self.turn_on, self.turn_off = key, turn_on, turn_off
        self.held = False

    def __enter__(self) -> Any:
        with deferred_interrupts(), _lock:
            entry = _held.get(self.key)
            if entry is None:
                entry = [0, self.turn_on(), self.turn_off]  # turn_on raising: nothing held
                _held[self.key] = entry
            entry[0] += 1
            self.held = True
            return entry[1]

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        with deferred_interrupts(), _lock:
            if not self.held:
                return
            self.held = False
            entry = _held[self.key]
            entry[0] -= 1
            if entry[0] == 0:
                del _held[self.key]
                entry[2](entry[1])


class _ReleaseAgain:
    """Releases ``claim`` (again) on exit: entered around the claim, it gives the release a second start
    when an exception arrives as the first begins (before it blocked signals); releasing twice is once."""

    def __init__(self, claim: _Claim):
        self.claim = claim

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.claim.release()


@contextmanager
def switch(key: Hashable, turn_on: Callable[[], Any], turn_off: Callable[[Any], None]) -> Iterator[Any]:
    """Hold the process-wide switch ``key`` for the block.

    The first holder calls ``turn_on()``, which changes the state and returns what is needed to undo
    it (if it raises, it must leave the state as it was, and nothing is held). Later holders of the same
    key only join. When the last holder leaves, ``turn_off(value)`` is called with what the first
    ``turn_on`` returned. Thread-safe; signals are held back while the switch changes hands, and an
    exception arriving at any point of the way in or out (a signal handler's) leaves the switch held
    only if the block was entered and has not been left.

    Yields what the first holder's ``turn_on()`` returned (the state before any holder), to every holder.
    """
    claim = _Claim(key, turn_on, turn_off)
    with _ReleaseAgain(claim), claim as found:
        yield found


def holders(key: Hashable = None) -> int:
    """How many holders the switch ``key`` has now (0: off, the original state is in place); without a key,
    how many holders all switches have together."""
    with _lock:
        if key is None:
            return sum(entry[0] for entry in _held.values())
        entry = _held.get(key)
        return 0 if entry is None else entry[0]
