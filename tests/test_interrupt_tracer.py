"""Signals sent at every line of attach's installation and removal leave nothing behind (issue 20, D1/D2).

A tracer (``sys.settrace``, line events) follows the switches and the interrupt guard
(``attnflow/_switches.py``), the adapters' ``hooks()`` context managers and their registration and
removal helpers. In run ``n`` it sends this process a real signal (``signal.raise_signal``) at the
``n``-th line event: SIGINT (Python's handler: KeyboardInterrupt) or SIGALRM (a handler that raises an
ordinary exception, as a timeout would). Every line index of one ``attach`` + forward pass (or
``generate()``) + exit is tried, with both signals for the generic torch adapter and the switches, with
the two taking turns for the others (to keep the module's time in bounds). After each run the model must be exactly as before
(no hook in any module's hook dicts, ``generate`` not patched, the attention implementation and the MHA
fast path as found), no switch may be held, the signal handlers and the signal mask must be the ones
from before, and at the end Ctrl-C must still raise KeyboardInterrupt.
"""

from __future__ import annotations

import gc
import inspect
import linecache
import signal
import sys
import types

import pytest

pytestmark = pytest.mark.usefixtures("python_sigint")

import torch  # noqa: E402  (make test installs both: a missing one fails the suite)
import transformers  # noqa: E402
from attnflow.adapters._torch import (  # noqa: E402
    _generation_torch,
    _torch_common,
    _values,
    hf_transformers,
    torch_hooks,
)

import attnflow  # noqa: E402
from attnflow import _switches  # noqa: E402

HAS_MASK = hasattr(signal, "pthread_sigmask")


class Alarm(Exception):
    """What the SIGALRM handler raises: an ordinary exception (a timeout), not a KeyboardInterrupt."""


def _alarm(signum, frame):
    raise Alarm


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one intra-op thread: on a busy machine, waiting threads make every op take ~40 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def alarm_handler():
    previous = signal.signal(signal.SIGALRM, _alarm)
    yield _alarm
    signal.signal(signal.SIGALRM, previous)


# -- the tracer -------------------------------------------------------------------------------------------------


NESTED = {"turn_on", "turn_off"}


def _codes(*objects) -> set:
    """The code objects of functions, methods, classes and modules' functions, and every code nested in them
    (closures, lambdas, comprehensions)."""
    found: set = set()

    def add(code):
        if code in found:
            return
        found.add(code)
        for const in code.co_consts:
            # lambdas, comprehensions and switches' turn_on/turn_off; not the hooks that run in forward passes
            if isinstance(const, types.CodeType) and (const.co_name.startswith("<") or const.co_name in NESTED):
                add(const)

    def visit(obj):
        obj = getattr(obj, "__func__", obj)
        while hasattr(obj, "__wrapped__"):  # @contextmanager
            obj = obj.__wrapped__
        if isinstance(obj, types.FunctionType):
            add(obj.__code__)
        elif isinstance(obj, type):
            for value in vars(obj).values():
                if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                    visit(value.fget if isinstance(value, property) else value)
        elif isinstance(obj, types.ModuleType):
            for value in vars(obj).values():
                if getattr(value, "__module__", None) == obj.__name__ and (
                    isinstance(value, (types.FunctionType, type))
                ):
                    visit(value)

    for obj in objects:
        if obj is not None:
            visit(obj)
    return found


class Injector:
    """Counts the line events of the traced code; at the ``at``-th (1-based) sends ``signum`` to this process."""

    def __init__(self, codes, signum=None, at=0):
        self.codes, self.signum, self.at, self.count, self.where = codes, signum, at, 0, None

    def _global(self, frame, event, arg):
        return self._local if frame.f_code in self.codes else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.at:
                self.where = (frame.f_code.co_name, frame.f_lineno, linecache.getline(frame.f_code.co_filename,
                                                                                       frame.f_lineno).strip())
                signal.raise_signal(self.signum)
        return self._local

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def _process_state():
    return {
        "held switches": dict(_switches._held),
        "generate listeners": dict(_generation_torch._listeners),
        "SIGINT": signal.getsignal(signal.SIGINT),
        "SIGALRM": signal.getsignal(signal.SIGALRM),
        "mask": signal.pthread_sigmask(signal.SIG_BLOCK, []) if HAS_MASK else None,
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
        "global hooks": (
            tuple(torch.nn.modules.module._global_forward_hooks),
            tuple(torch.nn.modules.module._global_forward_pre_hooks),
        ),
    }


def _model_state(model, hooks_of):
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            configs[id(config)] = getattr(config, "_attn_implementation", None)
    return {"hooks": hooks_of(model), "configs": configs, "patched": sorted(k for k in vars(model) if k == "generate")}


def inject_everywhere(run, codes, state, *, signals=(signal.SIGINT, signal.SIGALRM), each=True, repair=None):
    """Run ``run()`` once per line event and signal (``each=False``: per line event, the signals taking turns);
    ``state()`` must be equal after each run to before.

    Returns ``(points, failures)``: how many injections were made, and for each one that left something
    behind (or ended in an unexpected exception) a description."""
    before = state()
    with Injector(codes) as counting:
        run()
    assert state() == before
    total = counting.count
    assert total > 0
    failures = []
    points = [(signum, at) for at in range(1, total + 1) for signum in signals] if each else [
        (signals[at % len(signals)], at) for at in range(1, total + 1)]
    for signum, at in points:
        injector = Injector(codes, signum, at)
        raised = None
        try:
            with injector:
                run()
        except (KeyboardInterrupt, Alarm) as exc:
            raised = exc
        except Exception as exc:  # noqa: BLE001 - reported as a failure below
            failures.append(f"{signal.Signals(signum).name} at {injector.where}: unexpected {exc!r}")
            raised = exc
        after = state()
        if after != before:
            raised = None  # what a leak's frames still hold is let go before the repair, not during later runs
            gc.collect()
            diff = sorted(k for k in after if after[k] != before[k])
            failures.append(f"{signal.Signals(signum).name} at {injector.where}: changed {diff}")
            _repair(before, after)
            if repair is not None:
                repair()
        del raised
    return len(points), failures


def _repair(before, after):
    """Put the process back as it was, so that one failure does not fail every later run."""
    _switches._held.clear()
    _switches._held.update(before["held switches"])
    _generation_torch._listeners.clear()
    _generation_torch._listeners.update(before["generate listeners"])
    signal.signal(signal.SIGINT, before["SIGINT"])
    signal.signal(signal.SIGALRM, before["SIGALRM"])
    if HAS_MASK:
        signal.pthread_sigmask(signal.SIG_SETMASK, before["mask"])
    _switches._deferring = False
    torch.backends.mha.set_fastpath_enabled(before["fastpath"])


def _scrub(model, before_configs):
    for module in model.modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            getattr(module, kind).clear()
        config = getattr(module, "config", None)
        if config is not None and id(config) in before_configs:
            config._attn_implementation_internal = before_configs[id(config)]
    vars(model).pop("generate", None)


TORCH_CODES = [_switches, _torch_common.install_pass_hooks, _torch_common.removing,
               getattr(_torch_common, "Handles", None), getattr(_torch_common, "register", None)]


def _check(subject, hooks_of, codes, run, *, each=True):
    model = subject

    def state():
        return {**_process_state(), **_model_state(model, hooks_of)}

    original = state()
    try:
        points, failures = inject_everywhere(
            run, codes, state, each=each, repair=lambda: _scrub(model, original["configs"]))
    finally:
        _scrub(model, original["configs"])
    print(f"{points} injection points, {len(failures)} failures")
    assert failures == [], f"{len(failures)} of {points} injections left something behind:\n" + "\n".join(failures[:40])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still works
        signal.raise_signal(signal.SIGINT)
    return points


# -- the adapters ------------------------------------------------------------------------------------------------


def test_torch_adapter_at_every_line(tiny_encoder, hooks_of, alarm_handler):
    model = tiny_encoder(layers=2)
    src = torch.randn(2, 7, 24)
    with torch.no_grad():
        plain = model(src)
    codes = _codes(*TORCH_CODES, torch_hooks.TorchAdapter.hooks, torch_hooks.TorchAdapter._hook_mha,
                   torch_hooks._fastpath_off)

    def run():
        with attnflow.attach(model, adapter="torch") as recorder, torch.no_grad():
            model(src)
        assert recorder.trace.num_layers == 2

    _check(model, hooks_of, codes, run)
    with torch.no_grad():
        assert torch.equal(model(src), plain)


def _hf_codes(*extra):
    return _codes(*TORCH_CODES, hf_transformers.TransformersAdapter.hooks, hf_transformers._eager,
                  hf_transformers._switch_to_eager, hf_transformers._restore, _generation_torch.wrap_generate,
                  *extra)


def test_transformers_adapter_at_every_line(tiny_hf, hf_inputs, hooks_of, alarm_handler):
    model = tiny_hf("bert")
    inputs = hf_inputs("right")
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state

    def run():
        with attnflow.attach(model) as recorder, torch.no_grad():
            model(**inputs)
        assert recorder.trace.num_layers == 4

    _check(model, hooks_of, _hf_codes(), run)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, plain)


def test_transformers_values_at_every_line(tiny_hf, hf_inputs, hooks_of, alarm_handler):
    model = tiny_hf("gpt2")
    inputs = hf_inputs()

    def run():
        with attnflow.attach(model, values=True) as recorder, torch.no_grad():
            model(**inputs)
        assert recorder.trace.num_layers == 5

    _check(model, hooks_of, _hf_codes(_values.install), run, each=False)


def _lm():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=29, n_embd=20, n_layer=2, n_head=4, n_inner=11, n_positions=40, eos_token_id=5,
        pad_token_id=0, bos_token_id=1,
    )).eval()


def test_transformers_target_at_every_line(hooks_of, alarm_handler):
    model = _lm()
    ids = torch.tensor([[3, 4, 6, 7, 8, 9], [9, 8, 7, 6, 4, 3]])

    def run():
        with attnflow.attach(model, target=2) as recorder:
            model(input_ids=ids)
        assert "attn_grad" in recorder.trace.layers[0].extras

    _check(model, hooks_of, _hf_codes(_torch_common.attention_gradients), run, each=False)


def test_generation_stitch_at_every_line(hooks_of, alarm_handler):
    model = _lm()
    ids = torch.tensor([[3, 4, 6, 7], [9, 8, 7, 6]])
    assert "generate" not in vars(model)

    def run():
        with attnflow.attach(model) as recorder:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        assert len(recorder.traces) == 1

    _check(model, hooks_of, _hf_codes(_generation_torch._wrapper), run, each=False)
    assert "generate" not in vars(model)


# -- the switches and the guard alone ------------------------------------------------------------------------


class Flag:
    def __init__(self):
        self.value = "original"

    def turn_on(self):
        before, self.value = self.value, "on"
        return before

    def turn_off(self, before):
        self.value = before


def test_switch_and_guard_at_every_line(alarm_handler):
    """Two nested holders, a deferral inside: no holder, handler or mask left."""
    flag = Flag()

    def run():
        with _switches.switch("tracer-flag", flag.turn_on, flag.turn_off):
            with _switches.switch("tracer-flag", flag.turn_on, flag.turn_off), _switches.deferred_interrupts():
                pass

    def state():
        return {**_process_state(), "flag": flag.value}

    before = state()
    points, failures = inject_everywhere(run, _codes(_switches), state)
    assert failures == [], f"{len(failures)} of {points} injections left something behind:\n" + "\n".join(failures)
    assert state() == before


def test_an_exception_right_after_the_recording_handler_is_installed():
    """D2: whatever ends deferred_interrupts() after it installed its recording SIGINT handler puts back the
    one it found."""
    original = signal.getsignal(signal.SIGINT)
    real = signal.signal
    calls = []

    def installing_then_failing(signum, handler):
        previous = real(signum, handler)
        calls.append(signum)
        if len(calls) == 1 and signum == signal.SIGINT:
            raise Alarm  # as if a signal's handler had raised right after the install returned
        return previous

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(signal, "signal", installing_then_failing)
        with pytest.raises(Alarm), _switches.deferred_interrupts():
            pass
    assert signal.getsignal(signal.SIGINT) is original
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_removal_goes_on_past_a_failing_remove(tiny_hf, hf_inputs, hooks_of):
    """A handle whose remove() raises does not stop the others' removal; the error is reported."""
    from torch.utils.hooks import RemovableHandle

    model = tiny_hf("bert")
    inputs = hf_inputs()
    before = hooks_of(model)
    remove = RemovableHandle.remove
    for n in (1, 3):
        calls = []

        def failing(self, n=n, calls=calls):
            calls.append(self)
            if len(calls) == n:
                raise RuntimeError("remove failed")
            return remove(self)

        with pytest.raises(RuntimeError, match="remove failed"):
            with attnflow.attach(model), torch.no_grad():
                model(**inputs)
                RemovableHandle.remove = failing
        RemovableHandle.remove = remove
        assert hooks_of(model) == before
        assert not _switches._held


def test_a_failing_registration_leaves_nothing(tiny_hf, hf_inputs, hooks_of):
    model = tiny_hf("bert")
    before = hooks_of(model)
    register = torch.nn.Module.register_forward_hook
    for n in (1, 3):
        calls = []

        def failing(self, *args, n=n, calls=calls, **kwargs):
            calls.append(self)
            handle = register(self, *args, **kwargs)
            if len(calls) == n:
                raise RuntimeError("registration failed")  # after registering: the worst case
            return handle

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.Module, "register_forward_hook", failing)
            with pytest.raises(RuntimeError, match="registration failed"), attnflow.attach(model):
                pass
        assert hooks_of(model) == before
        assert not _switches._held
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not HAS_MASK, reason="no pthread_sigmask on this platform")
def test_the_guard_masks_handled_signals_and_restores_the_mask_exactly(alarm_handler):
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # a mask of the caller's own, kept as it is
    try:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with _switches.deferred_interrupts():
            inside = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            assert {signal.SIGALRM, signal.SIGINT} <= inside and signal.SIGUSR1 in inside
            signal.raise_signal(signal.SIGALRM)  # held back until the mask is lifted
        pytest.fail("the alarm was not delivered on leaving")
    except Alarm:
        pass
    finally:
        after = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    assert after == before


def test_the_traced_functions_exist():
    """The tracer follows code that exists (a renamed helper would silently leave it untraced)."""
    assert inspect.isfunction(_torch_common.install_pass_hooks)
    assert hf_transformers.TransformersAdapter.hooks and torch_hooks.TorchAdapter.hooks


def test_flax_nnx_at_every_line(alarm_handler):
    import jax
    from attnflow.adapters._jax import _flax_common, flax_nnx
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.MultiHeadAttention(num_heads=2, in_features=6, decode=False, rngs=rngs)
            self.norm = nnx.LayerNorm(6, rngs=rngs)
            self.second = nnx.MultiHeadAttention(num_heads=3, in_features=6, decode=False, rngs=rngs)

        def __call__(self, x):
            return self.second(self.norm(self.first(x)))

    model = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 6))
    plain = model(x)

    def state():
        return {
            **_process_state(), "class": type(model), "jit off": bool(jax.config.jax_disable_jit),
            "modules": [(path, dict(vars(module))) for path, module in nnx.iter_modules(model)],
            "attached": dict(flax_nnx._ON_MODULE),
        }

    def run():  # attach and detach: each forward pass of an NNX model without jit takes long
        with attnflow.attach(model):
            pass

    codes = _codes(_switches, flax_nnx.NNXAdapter.hooks, flax_nnx._patched, flax_nnx._swap_class, flax_nnx._unswap,
                   flax_nnx._detach, _flax_common.undoing, _flax_common.jit_disabled, _flax_common.entered,
                   _flax_common.left)
    points, failures = inject_everywhere(run, codes, state, each=False)
    print(f"{points} injection points, {len(failures)} failures")
    assert failures == [], f"{len(failures)} of {points} injections left something behind:\n" + "\n".join(failures[:40])
    assert (model(x) == plain).all()
