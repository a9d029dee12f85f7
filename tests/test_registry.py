"""The adapter registry: validation, entry-point plugins (real distributions on sys.path), selection."""

from __future__ import annotations

import contextlib
import textwrap

import numpy as np
import pytest

import attnflow
from attnflow import Adapter, AdapterError, AdapterRegistrationError
from attnflow.recording import _registry


@pytest.fixture
def fresh_registry():
    """Run with an empty registry that re-reads entry points, then put the real one back."""
    with _registry.ADAPTERS.fresh():
        yield


class ListModel:
    """A 'model' that is a list of numpy attention arrays; its forward pass reports each one."""

    def __init__(self, weights):
        self.weights = weights
        self.listeners = []

    def __call__(self, scale=1.0):
        for listener in self.listeners:
            listener("start", None)
        for i, w in enumerate(self.weights):
            for listener in self.listeners:
                listener(f"block.{i}", w)
        for listener in self.listeners:
            listener("end", None)
        return scale


class ListAdapter(Adapter):
    name = "listmodel"
    framework = ""  # plain Python: always consulted
    priority = 5

    def claims(self, model):
        return isinstance(model, ListModel)

    @contextlib.contextmanager
    def hooks(self, model, recorder, **options):
        def listener(name, w):
            if name == "start":
                recorder.start_call()
            elif name == "end":
                recorder.end_call()
            else:
                recorder.record(name, w)

        model.listeners.append(listener)
        try:
            yield
        finally:
            model.listeners.remove(listener)


def make_model(rng):
    return ListModel([rng.dirichlet(np.ones(4), size=(1, 2, 4)) for _ in range(3)])


def test_third_party_adapter_works_through_the_public_api(fresh_registry):
    attnflow.register_adapter(ListAdapter)
    model = make_model(np.random.default_rng(0))
    trace = attnflow.capture(model, 2.0, tokens=list("abcd"))
    assert trace.layer_names == ["block.0", "block.1", "block.2"]
    assert trace.tokens == [list("abcd")]
    np.testing.assert_array_equal(trace.layers[1].weights, model.weights[1])
    with attnflow.attach(model) as rec:
        model()
        model()
    assert len(rec.traces) == 2 and rec.trace.num_layers == 3
    assert model.listeners == []  # hooks removed on exit


def test_registration_is_validated_with_the_plugin_named(fresh_registry):
    class NoHooks(Adapter):
        name = "nohooks"

        def claims(self, model):
            return False

    with pytest.raises(AdapterRegistrationError, match=r"NoHooks.*hooks"):
        attnflow.register_adapter(NoHooks)

    class BadName(ListAdapter):
        name = "has space"

    with pytest.raises(AdapterRegistrationError, match=r"BadName.name"):
        attnflow.register_adapter(BadName)
    with pytest.raises(AdapterRegistrationError, match="not a subclass"):
        attnflow.register_adapter(dict)
    attnflow.register_adapter(ListAdapter)
    with pytest.raises(AdapterRegistrationError, match="already registered"):
        attnflow.register_adapter(ListAdapter)
    attnflow.register_adapter(ListAdapter, replace=True)


def test_unknown_model_lists_adapters_and_how_to_add_one(fresh_registry):
    attnflow.register_adapter(ListAdapter)
    with pytest.raises(AdapterError) as info:
        attnflow.capture(object())
    text = str(info.value)
    assert "listmodel" in text and "register_adapter" in text and "attnflow.adapters" in text
    with pytest.raises(AdapterError, match="No adapter named 'nope'"):
        attnflow.capture(object(), adapter="nope")


def write_plugin(root, dist, module, entries, body):
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[attnflow.adapters]\n{lines}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


PLUGIN = """
import contextlib
import attnflow

class Good(attnflow.Adapter):
    name = "good_plugin"
    def claims(self, model):
        return False
    @contextlib.contextmanager
    def hooks(self, model, recorder, **options):
        yield

class Shadow(Good):
    name = "torch"

class Broken(attnflow.Adapter):
    name = "broken"
"""


def test_entry_point_plugins_are_loaded_warned_and_skipped(fresh_registry, tmp_path, monkeypatch):
    write_plugin(
        tmp_path, "attnflow_fake_plugin", "attnflow_fake_plugin_mod",
        {
            "good_plugin": "attnflow_fake_plugin_mod:Good",
            "torch": "attnflow_fake_plugin_mod:Shadow",
            "broken": "attnflow_fake_plugin_mod:Broken",
            "missing": "attnflow_fake_plugin_no_such_module:Thing",
        },
        PLUGIN,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning) as caught:
        names = list(attnflow.list_adapters())
    messages = " | ".join(str(w.message) for w in caught)
    assert "good_plugin" in names
    assert "override the built-in adapter 'torch'" in messages
    assert "broken" not in names and "claims() and hooks()" in messages
    assert "missing" not in names and "attnflow_fake_plugin_no_such_module" in messages
    # the built-in torch adapter survived the shadowing attempt
    assert type(attnflow.get_adapter("torch")).__module__ == "attnflow.adapters._torch.torch_hooks"


def test_builtin_adapters_come_from_entry_points():
    adapters = {name: attnflow.get_adapter(name) for name in attnflow.list_adapters()}
    assert {"torch", "transformers", "flax_linen", "flax_nnx"} <= set(adapters)
    assert adapters["transformers"].priority > adapters["torch"].priority
    for name in ("torch", "transformers", "flax_linen", "flax_nnx", "timm"):
        assert type(adapters[name]).__module__.startswith("attnflow.adapters.")
    # the worked plugin package (examples/plugin, installed by make install) registers like any third party
    assert type(adapters["handattn"]).__module__ == "attnflow_handattn"


BUILTIN = {"torch", "transformers", "flax_linen", "flax_nnx"}


def patch_entry_point_loading(monkeypatch, wrap):
    """Replace ``EntryPoint.load`` by ``wrap(original)`` on the class(es) of attnflow's entry points (once
    some package has imported the importlib_metadata backport, importlib.metadata hands out its class)."""
    from importlib.metadata import entry_points

    for cls in {type(ep) for ep in entry_points(group=_registry.ENTRY_POINT_GROUP)}:
        monkeypatch.setattr(cls, "load", wrap(cls.load))


def test_threads_loading_the_registry_at_once_all_see_every_adapter(fresh_registry, monkeypatch):
    """The first load is slow here (each entry point takes 20 ms): threads arriving meanwhile must wait for
    it, not see a half-filled registry."""
    import threading
    import time

    def slow_load(load):
        def patched(self):
            time.sleep(0.02)
            return load(self)

        return patched

    patch_entry_point_loading(monkeypatch, slow_load)
    barrier = threading.Barrier(8)
    seen = []

    def worker():
        barrier.wait()
        seen.append(set(attnflow.list_adapters()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8 and all(names >= BUILTIN for names in seen), [len(names) for names in seen]
    assert all(names == seen[0] for names in seen)


def test_interrupt_during_the_first_load_leaves_a_registry_that_loads_later(fresh_registry, monkeypatch):
    calls = []

    def interrupted_once(load):
        def patched(self):
            calls.append(self.name)
            if len(calls) == 2:  # Ctrl-C while the second entry point loads
                raise KeyboardInterrupt
            return load(self)

        return patched

    patch_entry_point_loading(monkeypatch, interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        attnflow.list_adapters()
    names = set(attnflow.list_adapters())
    assert names >= BUILTIN
    assert set(attnflow.list_adapters()) == names  # loaded once, complete
    assert type(attnflow.get_adapter("torch")).__module__ == "attnflow.adapters._torch.torch_hooks"


def test_declarations_are_validated_once_naming_the_adapter(fresh_registry):
    class Declared(ListAdapter):
        name = "declared"
        options = (attnflow.AdapterOption("scale", float, 1.0, "a factor"),)

        @contextlib.contextmanager
        def hooks(self, model, recorder, *, scale=1.0):
            with ListAdapter.hooks(self, model, recorder):
                yield

    attnflow.register_adapter(Declared)
    model = make_model(np.random.default_rng(1))
    with pytest.raises(attnflow.OptionError, match=r"unknown option\(s\) \['sclae'\]; it takes: scale \(a factor\)"):
        attnflow.capture(model, adapter="declared", adapter_options={"sclae": 2.0})
    with pytest.raises(attnflow.OptionError, match="must be float"):
        attnflow.capture(model, adapter="declared", adapter_options={"scale": "2"})
    assert attnflow.capture(model, adapter="declared", adapter_options={"scale": 2.0}).num_layers == 3

    class NotTaken(ListAdapter):
        name = "not_taken"
        options = (attnflow.AdapterOption("depth", int),)

        @contextlib.contextmanager
        def hooks(self, model, recorder):
            yield

    with pytest.raises(AdapterRegistrationError, match=r"NotTaken\.options declares 'depth', but .*NotTaken\.hooks takes no such keyword"):
        attnflow.register_adapter(NotTaken)

    class Twice(Declared):
        name = "twice"
        options = (attnflow.AdapterOption("scale"), attnflow.AdapterOption("scale"))

    with pytest.raises(AdapterRegistrationError, match="'scale' twice"):
        attnflow.register_adapter(Twice)

    class Capable(ListAdapter):
        name = "capable"
        captures = frozenset({"weights", "telepathy"})

    with pytest.raises(AdapterRegistrationError, match=r"Capable.captures.*telepathy"):
        attnflow.register_adapter(Capable)
