"""The API reference builds from the docstrings with no warning (mkdocs --strict), as `make docs` does; it
renders its cross-references (no raw Sphinx roles), has no placeholder link, and documents every public member."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The packages whose ``__all__`` the API pages render (attnflow.plot and attnflow.html render theirs too).
DOCUMENTED = ("attnflow", "attnflow.recording", "attnflow.testing", "attnflow.batch", "attnflow.evaluate")
API_PAGES = ("attnflow", "recording", "testing", "batch", "evaluate", "plot", "html")
#: Pages whose docstrings still carry Sphinx roles, converted in a separate change (their modules are edited
#: elsewhere); the scan reports them without failing until then.
ROLES = (":class:", ":func:", ":meth:", ":data:", ":mod:", ":attr:", ":exc:", ":obj:")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_api_reference_builds_without_warnings(site):
    page = (site / "api" / "attnflow" / "index.html").read_text()
    for name in ("recording._capture.capture", "attach", "explain", "Explanation", "rollout", "flow", "Options"):
        assert f'id="attnflow.{name}"' in page, name


@pytest.mark.parametrize("page", API_PAGES)
def test_api_pages_have_no_sphinx_roles(site, page):
    html = (site / "api" / page / "index.html").read_text()
    left = [f"{role}{tick}" for role in ROLES for tick in ("`", "<code>") if f"{role}{tick}" in html]
    counts = {role: html.count(role) for role in left}
    assert not left, f"raw Sphinx roles on api/{page}: {counts}"


def test_cross_references_render_as_links(site):
    page = (site / "api" / "attnflow" / "index.html").read_text()
    assert 'href="#attnflow.AttentionTrace"' in page or 'href="./#attnflow.AttentionTrace"' in page


def test_no_placeholder_repository_link(site):
    assert "example.invalid" not in (ROOT / "mkdocs.yml").read_text()
    for page in site.rglob("*.html"):
        assert "example.invalid" not in page.read_text(), page


def _own_doc(member: object) -> str:
    if isinstance(member, property):
        member = member.fget
    if isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    return (getattr(member, "__doc__", None) or "").strip()


def undocumented() -> list[str]:
    """Public objects of the documented packages, and the public methods and properties of their classes,
    without a docstring of their own (mkdocstrings hides those: ``show_if_no_docstring`` is off)."""
    import griffe

    missing: list[str] = []
    seen: set[int] = set()
    package = griffe.load("attnflow", search_paths=[str(ROOT)])
    for module_name in DOCUMENTED:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj) or inspect.isfunction(obj):
                if not (obj.__doc__ or "").strip():
                    missing.append(f"{module_name}.{name}")
            else:  # data: its docstring is the string under the assignment
                path = f"{module_name}.{name}".removeprefix("attnflow").lstrip(".")
                if not package[path].docstring:
                    missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    if member_name.startswith("_"):
                        continue
                    if isinstance(member, (property, classmethod, staticmethod)) or inspect.isfunction(member):
                        if not _own_doc(member):
                            missing.append(f"{module_name}.{name}.{member_name}")
    return missing


def test_every_public_member_has_a_docstring():
    assert undocumented() == []


def _documented_keys() -> list[str]:
    """The keys docs/outputs.md lists for explanation.json: the first column of the table after its marker."""
    text = (ROOT / "docs" / "outputs.md").read_text()
    table = text.split("<!-- explanation.json keys", 1)[1].split("\n#", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [row.split("`")[1] for row in rows]


def test_outputs_page_lists_exactly_the_keys_of_explanation_json(tmp_path):
    import json

    import torch  # noqa: F401  (installed by make test: a missing one fails)
    import transformers

    from attnflow.cli import main

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=20, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=28, max_position_embeddings=40)
    model_dir = tmp_path / "tiny-bert"
    transformers.BertModel(config).eval().save_pretrained(model_dir)
    transformers.BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["explain", "a b c", "--model", str(model_dir), "--methods", "raw,rollout", "--out", str(out)]) == 0
    document = json.loads((out / "explanation.json").read_text())
    assert list(document) == _documented_keys()
