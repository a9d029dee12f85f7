"""attach() under overlap and interruption leaves nothing behind.

Overlapping captures (two attaches left out of order, or in two threads) and Ctrl-C injected at many
points (a KeyboardInterrupt raised by any module's forward, a real SIGINT arriving right after any
hook is registered or while any hook is being removed) must each end with: no hook left on any module,
the attention implementation of every config and PyTorch's MHA fast-path flag as they were, and a
later plain forward pass giving exactly the original output.
"""

from __future__ import annotations

import functools
import signal
import threading

import pytest
import torch

import attnflow

pytestmark = pytest.mark.usefixtures("python_sigint")  # tests send this process real SIGINTs

MODELS = ["bert", "gpt2", "encoder"]


@pytest.fixture
def subject(request, tiny_hf, hf_inputs, tiny_encoder, hooks_of):
    """``(model, inputs, snapshot, plain_output)`` for a tiny HF model (SDPA) or an nn.TransformerEncoder."""
    if request.param == "encoder":
        model = tiny_encoder()
        torch.manual_seed(3)
        inputs = {"src": torch.randn(2, 7, 24), "src_key_padding_mask": torch.tensor([[False] * 7, [False] * 5 + [True] * 2])}
    else:
        model = tiny_hf(request.param)
        inputs = hf_inputs("right")

    def snapshot():
        configs = {}
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None:
                configs[id(config)] = config._attn_implementation
        return {"hooks": hooks_of(model), "configs": configs, "fastpath": torch.backends.mha.get_fastpath_enabled()}

    def plain_output():
        with torch.no_grad():
            out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state

    # Each test starts from the default (on) and is judged on its own: one that leaves the flag off must not
    # make the next ones fail too.
    torch.backends.mha.set_fastpath_enabled(True)
    yield model, inputs, snapshot, plain_output
    torch.backends.mha.set_fastpath_enabled(True)


def assert_untouched(subject, before, original):
    _, _, snapshot, plain_output = subject
    assert snapshot() == before
    assert torch.equal(plain_output(), original)


# -- overlapping attaches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", MODELS, indirect=True)
def test_attaches_left_out_of_order_restore_the_model(subject):
    model, inputs, snapshot, plain_output = subject
    before, original = snapshot(), plain_output()
    first, second = attnflow.attach(model), attnflow.attach(model)
    recorder_a = first.__enter__()
    recorder_b = second.__enter__()
    with torch.no_grad():
        model(**inputs)
    first.__exit__(None, None, None)  # a.enter, b.enter, a.exit, b.exit
    with torch.no_grad():
        model(**inputs)  # b is still attached: it must still see the weights
    second.__exit__(None, None, None)
    assert len(recorder_a.traces) == 1 and len(recorder_b.traces) == 2
    for trace in (recorder_a.trace, *recorder_b.traces):
        assert [layer.name for layer in trace.layers] == [layer.name for layer in recorder_a.trace.layers]
        for layer, reference in zip(trace.layers, recorder_a.trace.layers):
            assert (layer.weights == reference.weights).all()
    assert_untouched(subject, before, original)


@pytest.mark.parametrize("subject", MODELS, indirect=True)
def test_attaches_in_two_threads_restore_the_model(subject):
    """Two threads attach and detach at once, first with no forward pass (the switches change hands as fast as
    they can), then with overlapping attaches whose forward passes, attaching and detaching take turns (a
    hook added or removed while another thread's pass runs would split that pass between recorders)."""
    model, inputs, snapshot, plain_output = subject
    before, original = snapshot(), plain_output()
    barrier = threading.Barrier(2)
    turn = threading.Lock()
    errors, passes = [], []

    def worker():
        try:
            barrier.wait()
            for _ in range(100):
                with attnflow.attach(model):
                    pass
            barrier.wait()
            for _ in range(25):
                with turn:
                    attached = attnflow.attach(model)
                    recorder = attached.__enter__()
                try:
                    with turn, torch.no_grad():
                        model(**inputs)
                finally:
                    with turn:
                        attached.__exit__(None, None, None)
                passes.append(recorder.traces[0].num_layers)
        except BaseException as exc:  # reported below, with the thread's own error
            errors.append(exc)
            barrier.abort()  # the other thread must not wait for this one forever

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e for e in errors if not isinstance(e, threading.BrokenBarrierError)] == []
    assert len(passes) == 50 and len(set(passes)) == 1
    assert_untouched(subject, before, original)


def test_attaches_on_a_model_and_its_base_model_left_out_of_order(tiny_hf, hf_inputs, hooks_of):
    """A task model and its base model share a config: the switch is counted per config, not per model."""
    import transformers

    base = tiny_hf("bert")
    model = transformers.BertForSequenceClassification(base.config).eval()
    inputs = hf_inputs()
    with torch.no_grad():
        original = model(**inputs).logits
    before = hooks_of(model)
    outer, inner = attnflow.attach(model), attnflow.attach(model.bert)
    outer.__enter__()
    recorder = inner.__enter__()
    outer.__exit__(None, None, None)
    with torch.no_grad():
        model.bert(**inputs)  # still attached through the base model: still eager
    inner.__exit__(None, None, None)
    assert recorder.trace.num_layers == 4
    assert model.config._attn_implementation == model.bert.config._attn_implementation == "sdpa"
    assert hooks_of(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, original)


# -- interrupts ----------------------------------------------------------------------------------------------


def _interrupt(*_):
    raise KeyboardInterrupt


@pytest.mark.parametrize("subject", MODELS, indirect=True)
def test_keyboard_interrupt_from_any_module_of_the_forward(subject):
    """Ctrl-C raised as each module starts (and as each one ends) its forward pass, one module at a time."""
    model, inputs, snapshot, plain_output = subject
    before, original = snapshot(), plain_output()
    ran = []
    handles = [m.register_forward_pre_hook(lambda m, args: ran.append(m)) for m in model.modules()]
    plain_output()
    for handle in handles:
        handle.remove()
    points = 0
    for module in dict.fromkeys(ran):  # every module the forward runs (containers like ModuleList do not)
        for register in (module.register_forward_pre_hook, module.register_forward_hook):
            handle = register(_interrupt)
            try:
                with pytest.raises(KeyboardInterrupt), attnflow.attach(model), torch.no_grad():
                    model(**inputs)
            finally:
                handle.remove()
            assert_untouched(subject, before, original)
            points += 1
    assert points == 2 * len(set(ran)) >= 20


def _count_registrations(model, inputs):
    calls = []
    originals = {}
    for name in ("register_forward_hook", "register_forward_pre_hook"):
        originals[name] = getattr(torch.nn.Module, name)

    def counting(name):
        def register(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return register

    with pytest.MonkeyPatch.context() as patch:
        for name in originals:
            patch.setattr(torch.nn.Module, name, counting(name))
        with attnflow.attach(model), torch.no_grad():
            model(**inputs)
    return len(calls), originals


class SigintAt:
    """Calls ``function`` and counts the calls; the ``n``-th sends a real SIGINT to this process, after the
    call (``after=True``) or before it."""

    def __init__(self, function, n, *, after):
        self.function, self.n, self.after, self.calls = function, n, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n and not self.after:
            signal.raise_signal(signal.SIGINT)
        result = self.function(*args, **kwargs)
        if self.calls == self.n and self.after:
            signal.raise_signal(signal.SIGINT)
        return result

    def __get__(self, instance, owner):  # set on a class, it binds like a method
        return self if instance is None else functools.partial(self, instance)


def _method(shared, name):
    return lambda self, *args, **kwargs: shared(name, self, *args, **kwargs)


@pytest.mark.parametrize("subject", MODELS, indirect=True)
def test_sigint_right_after_each_hook_registration(subject, monkeypatch):
    """A real SIGINT arriving just after the N-th hook is registered, before attnflow holds its handle."""
    model, inputs, snapshot, plain_output = subject
    before, original = snapshot(), plain_output()
    total, originals = _count_registrations(model, inputs)
    assert total >= 4
    for n in range(1, total + 1):
        shared = SigintAt(lambda name, *args, **kwargs: originals[name](*args, **kwargs), n, after=True)
        with monkeypatch.context() as patch:
            for name in originals:
                patch.setattr(torch.nn.Module, name, _method(shared, name))
            with pytest.raises(KeyboardInterrupt), attnflow.attach(model), torch.no_grad():
                model(**inputs)
        assert shared.calls == total
        assert_untouched(subject, before, original)


@pytest.mark.parametrize("subject", MODELS, indirect=True)
def test_sigint_while_each_hook_is_removed(subject, monkeypatch):
    """A real SIGINT arriving as the N-th hook handle is about to be removed."""
    from torch.utils.hooks import RemovableHandle

    model, inputs, snapshot, plain_output = subject
    before, original = snapshot(), plain_output()
    remove = RemovableHandle.remove
    total, _ = _count_registrations(model, inputs)
    for n in range(1, total + 1):
        interrupting = SigintAt(remove, n, after=False)
        with pytest.raises(KeyboardInterrupt):
            with attnflow.attach(model), torch.no_grad():
                model(**inputs)
                monkeypatch.setattr(RemovableHandle, "remove", interrupting)
        monkeypatch.setattr(RemovableHandle, "remove", remove)
        assert interrupting.calls == total
        assert_untouched(subject, before, original)


def test_sigint_while_the_fast_path_is_switched(tiny_encoder, monkeypatch):
    encoder = tiny_encoder()
    src = torch.randn(2, 7, 24)
    switch = torch.backends.mha.set_fastpath_enabled
    interrupting = SigintAt(switch, 1, after=False)
    for phase in ("on", "off"):
        interrupting.calls = 0
        torch.backends.mha.set_fastpath_enabled(True)
        with pytest.raises(KeyboardInterrupt):
            if phase == "on":
                monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", interrupting)
            with attnflow.attach(encoder), torch.no_grad():
                encoder(src)
                monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", interrupting)
        monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", switch)
        assert torch.backends.mha.get_fastpath_enabled() is True


# -- Flax -----------------------------------------------------------------------------------------------------


class LinenModel:
    """A tiny linen model whose attention modules are defined in setup() (bound, they persist)."""

    @staticmethod
    def build():
        from flax import linen as nn

        class Model(nn.Module):
            def setup(self):
                self.first = nn.MultiHeadDotProductAttention(num_heads=2)
                self.second = nn.MultiHeadDotProductAttention(num_heads=2)

            def __call__(self, x):
                return self.second(self.first(x))

        return Model


def _linen_setup():
    import jax

    model = LinenModel.build()()
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def _linen_state():
    import jax
    from flax.linen import module as linen_module

    return len(linen_module._global_interceptor_stack), bool(jax.config.jax_disable_jit)


class SigintAround:
    """Wraps the context manager ``factory(*args)``: a real SIGINT right after entering it (``phase="enter"``)
    or right before leaving it (``"exit"``), i.e. when attnflow has not yet registered, or is undoing, it."""

    def __init__(self, factory, phase):
        self.factory, self.phase = factory, phase

    def __call__(self, *args):
        return _Around(self.factory(*args), self.phase)


class _Around:
    def __init__(self, inner, phase):
        self.inner, self.phase = inner, phase

    def __enter__(self):
        result = self.inner.__enter__()
        if self.phase == "enter":
            signal.raise_signal(signal.SIGINT)
        return result

    def __exit__(self, *exc):
        if self.phase == "exit":
            signal.raise_signal(signal.SIGINT)
        return self.inner.__exit__(*exc)


@pytest.mark.parametrize("phase", ["enter", "exit"])
def test_sigint_as_the_linen_interceptor_and_jit_switch_change(phase, monkeypatch):
    import jax
    from flax import linen as nn

    model, variables, x = _linen_setup()
    before, plain = _linen_state(), model.apply(variables, x)
    for module, name in ((nn, "intercept_methods"), (jax, "disable_jit")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, SigintAround(original, phase))
        with pytest.raises(KeyboardInterrupt) as caught, attnflow.attach(model):
            model.apply(variables, x)
        monkeypatch.setattr(module, name, original)
        # Judged while the interrupt is still referenced, as a REPL keeps it (sys.last_value): a context whose
        # exit was skipped would otherwise be closed by the garbage collector and hide the leak.
        assert caught.value.__traceback__ is not None
        assert _linen_state() == before, name
        assert (model.apply(variables, x) == plain).all()


def test_keyboard_interrupt_inside_a_bound_linen_module_leaves_no_sow_shadow():
    model, variables, x = _linen_setup()
    bound = model.bind(variables)
    modules = [bound, bound.first, bound.second]
    second = type(bound.second).__call__

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(bound.second), "__call__", interrupted)
        with pytest.raises(KeyboardInterrupt), attnflow.attach(bound):
            bound(x)
    assert type(bound.second).__call__ is second
    assert not any("sow" in vars(module) for module in modules)
    assert _linen_state() == (0, False)


def _nnx_setup():
    import jax
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.second = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)

        def __call__(self, x):
            return self.second(self.norm(self.first(x)))

    model = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))

    def snapshot():
        return (
            type(model), bool(jax.config.jax_disable_jit),
            [(path, dict(vars(module))) for path, module in nnx.iter_modules(model)],
        )

    return model, x, snapshot


def test_sigint_right_after_each_nnx_change(monkeypatch):
    """A real SIGINT just after attnflow changed an NNX module, before it registered how to undo it."""
    import contextlib

    model, x, snapshot = _nnx_setup()
    before, plain = snapshot(), model(x)
    callback = contextlib.ExitStack.callback
    counting = SigintAt(callback, 0, after=False)
    monkeypatch.setattr(contextlib.ExitStack, "callback", counting)
    with attnflow.attach(model):
        pass
    monkeypatch.setattr(contextlib.ExitStack, "callback", callback)
    total = counting.calls
    assert total >= 4
    for n in range(1, total + 1):
        interrupting = SigintAt(callback, n, after=False)
        monkeypatch.setattr(contextlib.ExitStack, "callback", interrupting)
        with pytest.raises(KeyboardInterrupt), attnflow.attach(model):
            model(x)
        monkeypatch.setattr(contextlib.ExitStack, "callback", callback)
        assert snapshot() == before, n
        assert (model(x) == plain).all()


@pytest.mark.parametrize("phase", ["enter", "exit"])
def test_sigint_as_nnx_switches_jit(phase, monkeypatch):
    import jax

    model, x, snapshot = _nnx_setup()
    before, plain = snapshot(), model(x)
    disable_jit = jax.disable_jit
    monkeypatch.setattr(jax, "disable_jit", SigintAround(disable_jit, phase))
    with pytest.raises(KeyboardInterrupt), attnflow.attach(model):
        model(x)
    monkeypatch.setattr(jax, "disable_jit", disable_jit)
    assert snapshot() == before
    assert (model(x) == plain).all()


def test_linen_attaches_left_out_of_order_restore_everything():
    """Flax's interceptor stack and jax.disable_jit are last-in, first-out; attaches need not be."""
    model, variables, x = _linen_setup()
    before, plain = _linen_state(), model.apply(variables, x)
    first, second = attnflow.attach(model), attnflow.attach(model)
    recorder_a = first.__enter__()
    recorder_b = second.__enter__()
    model.apply(variables, x)
    first.__exit__(None, None, None)
    model.apply(variables, x)  # the second attach still records
    second.__exit__(None, None, None)
    assert len(recorder_a.traces) == 1 and len(recorder_b.traces) == 2
    assert recorder_b.traces[1].layer_names == recorder_a.trace.layer_names == ["first", "second"]
    assert _linen_state() == before
    assert (model.apply(variables, x) == plain).all()


def test_nnx_attaches_left_out_of_order_restore_everything():
    model, x, snapshot = _nnx_setup()
    before, plain = snapshot(), model(x)
    first, second = attnflow.attach(model), attnflow.attach(model)
    recorder_a = first.__enter__()
    recorder_b = second.__enter__()
    model(x)
    first.__exit__(None, None, None)
    model(x)  # the second attach still records, pass by pass
    second.__exit__(None, None, None)
    assert len(recorder_a.traces) == 1 and len(recorder_b.traces) == 2
    assert recorder_b.traces[1].layer_names == recorder_a.trace.layer_names == ["first", "second"]
    assert snapshot() == before  # class, jit flag, every module's attributes
    assert (model(x) == plain).all()
