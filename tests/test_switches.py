"""attnflow._switches: reference-counted process-wide switches and Ctrl-C deferral, without any framework."""

from __future__ import annotations

import contextlib
import signal
import threading

import pytest

from attnflow._switches import deferred_interrupts, holders, switch

pytestmark = pytest.mark.usefixtures("python_sigint")  # tests send this process real SIGINTs


class Flag:
    """A process-wide setting with a log of every change."""

    def __init__(self, value):
        self.value = value
        self.log = []

    def turn_on(self):
        before = self.value
        self.value = "on"
        self.log.append("on")
        return before

    def turn_off(self, before):
        self.value = before
        self.log.append("off")


def held(flag, key="flag"):
    return switch(key, flag.turn_on, flag.turn_off)


def test_holders_leaving_out_of_order_restore_the_original_state():
    flag = Flag("original")
    a, b = held(flag), held(flag)
    a.__enter__()
    b.__enter__()
    assert flag.value == "on" and holders("flag") == 2
    a.__exit__(None, None, None)  # the first holder leaves first: the second still needs the switch
    assert flag.value == "on" and holders("flag") == 1
    b.__exit__(None, None, None)
    assert flag.value == "original" and holders("flag") == 0
    assert flag.log == ["on", "off"]


def test_nested_holders_and_an_error_inside():
    flag = Flag(False)
    with pytest.raises(RuntimeError, match="inside"), held(flag), held(flag):
        raise RuntimeError("inside")
    assert flag.value is False and holders("flag") == 0


def test_threads_overlapping_many_times_leave_the_original_state():
    flag = Flag("original")
    barrier = threading.Barrier(8)
    seen = []

    def worker():
        barrier.wait()
        for _ in range(200):
            with held(flag):
                seen.append(flag.value)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(seen) == {"on"} and len(seen) == 1600
    assert flag.value == "original" and holders("flag") == 0
    assert flag.log.count("on") == flag.log.count("off") >= 1


def test_a_failing_turn_on_holds_nothing():
    def fail():
        raise ValueError("cannot switch")

    with pytest.raises(ValueError, match="cannot switch"), switch("broken", fail, lambda _: None):
        pass
    assert holders("broken") == 0
    flag = Flag("original")
    with held(flag, "broken"):  # the key is free again: this holder is the first
        assert flag.value == "on"
    assert flag.value == "original"


def test_deferred_interrupt_is_raised_after_the_block():
    before = signal.getsignal(signal.SIGINT)
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            steps.append("after the signal")
        steps.append("after the block")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is before


def test_nested_deferral_delivers_once_at_the_outermost_exit():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            with deferred_interrupts():
                signal.raise_signal(signal.SIGINT)
            steps.append("inner exit passed")
    assert steps == ["inner exit passed"]


def test_deferred_interrupt_goes_to_the_handler_that_was_installed():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_error_in_the_block_still_delivers_the_interrupt():
    with pytest.raises(KeyboardInterrupt) as caught:
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("the block failed")
    assert isinstance(caught.value.__context__, RuntimeError)


def test_deferral_is_a_no_op_in_other_threads():
    before = signal.getsignal(signal.SIGINT)
    result = []

    def worker():
        with deferred_interrupts():
            result.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == [before]


def test_interrupt_while_switching_on_is_delivered_after_the_switch_is_released():
    """Ctrl-C arriving inside turn_on: the switch finishes turning on, then the interrupt ends the block
    at once and the switch is put back; nothing stays switched."""
    flag = Flag("original")

    def turn_on():
        signal.raise_signal(signal.SIGINT)
        return flag.turn_on()

    body = []
    with pytest.raises(KeyboardInterrupt), switch("flag", turn_on, flag.turn_off):
        body.append("ran")
    assert body == [] and flag.value == "original" and holders("flag") == 0


def test_interrupt_while_switching_off_still_switches_off():
    flag = Flag("original")

    def turn_off(before):
        signal.raise_signal(signal.SIGINT)
        flag.turn_off(before)

    with pytest.raises(KeyboardInterrupt), contextlib.ExitStack() as stack:
        stack.enter_context(switch("flag", flag.turn_on, turn_off))
    assert flag.value == "original" and holders("flag") == 0


def test_every_holder_is_told_the_state_the_first_one_found():
    flag = Flag("original")
    with held(flag) as first, held(flag) as second:
        assert first == second == "original" and flag.value == "on"
    assert flag.value == "original"


def test_holders_without_a_key_counts_every_switch_and_with_a_key_its_own():
    """Killed mutants of holders(): the total over switches, and a key's own count (0 once released)."""
    from attnflow._switches import holders, switch

    state = {"a": 0, "b": 0}

    def on(name):
        return lambda: state.__setitem__(name, state[name] + 1)

    def off(name):
        return lambda _: state.__setitem__(name, state[name] - 1)

    before = holders()
    with switch("holders-test-a", on("a"), off("a")):
        with switch("holders-test-a", on("a"), off("a")), switch("holders-test-b", on("b"), off("b")):
            assert holders("holders-test-a") == 2 and holders("holders-test-b") == 1
            assert holders() == before + 3
        assert holders("holders-test-b") == 0 and holders() == before + 1
    assert holders() == before and holders("holders-test-a") == 0 and state == {"a": 0, "b": 0}
