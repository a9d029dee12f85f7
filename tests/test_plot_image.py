"""Image overlays on a real photograph (scikit-image's Chelsea the cat) through a tiny random ViT saved with its
ViTImageProcessor: the trace records the patch grid and CLS, the overlay is the CLS row's patch scores
upsampled bilinearly (checked against torch's own bilinear interpolation), and `attnflow explain --image`
writes it."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import attnflow  # noqa: E402
from attnflow import plot  # noqa: E402
from attnflow.cli import main  # noqa: E402

IMAGE, PATCH = 48, 12  # a 4 x 4 patch grid


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return data.chelsea()  # (300, 451, 3) uint8, a real photograph shipped inside scikit-image


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=24, num_hidden_layers=3,
                       num_attention_heads=3, intermediate_size=20, initializer_range=0.3)
    path = tmp_path_factory.mktemp("vit") / "tiny-vit"
    ViTModel(config).save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_explained(vit_dir, photo):
    adapter = attnflow.get_adapter("transformers")
    model, processor = adapter.load_model(str(vit_dir))
    inputs = adapter.encode_images(processor, [photo])
    trace = attnflow.capture(model, **inputs)
    return trace, attnflow.explain(trace, ["rollout", "flow"], sources=[0])


def torch_bilinear(grid, size):
    import torch

    tensor = torch.tensor(np.asarray(grid, dtype=np.float64))[None, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def test_upsampling_is_torchs_bilinear():
    rng = np.random.default_rng(0)
    for shape, size in (((4, 4), (300, 451)), ((3, 5), (7, 11)), ((14, 14), (224, 224)), ((2, 3), (2, 3))):
        grid = rng.random(shape)
        np.testing.assert_allclose(plot.upsample_bilinear(grid, size), torch_bilinear(grid, size), atol=1e-12)


def test_a_plain_vit_trace_records_its_grid_and_cls(vit_explained):
    trace, _ = vit_explained
    stream = trace.streams["tokens"]
    assert stream.grid == (4, 4)
    assert stream.special[0].tolist() == [True] + [False] * 16
    assert stream.tokens[0][:3] == ("[CLS]", "r0c0", "r0c1") and stream.tokens[0][-1] == "r3c3"


def test_overlay_is_the_cls_rows_patch_scores_upsampled(vit_explained, photo):
    trace, explanation = vit_explained
    figure = plot.image_overlay(photo, explanation, ["rollout", "flow"], alpha=0.4, cmap="magma")
    for ax, method in zip(figure.axes, ["rollout", "flow"]):
        base, heat = ax.images
        np.testing.assert_allclose(np.asarray(base.get_array()), photo / 255.0)
        row = explanation[method][0, 0]  # what [CLS] draws on, CLS included
        patches = row[1:] / row[1:].sum()  # CLS left out, the patches renormalised
        expected = torch_bilinear(patches.reshape(4, 4), photo.shape[:2])
        np.testing.assert_allclose(np.asarray(heat.get_array()), expected, atol=1e-12)
        assert heat.get_alpha() == 0.4 and heat.get_cmap().name == "magma"
    assert len({(ax.images[1].norm.vmin, ax.images[1].norm.vmax) for ax in figure.axes if ax.images}) == 1
    text = " ".join(figure._suptitle.get_text().split())
    assert "CLS/register tokens excluded, patches renormalised" in text and "bilinear" in text


def test_overlay_refuses_what_it_cannot_draw(vit_explained, photo):
    _, explanation = vit_explained
    with pytest.raises(attnflow.OptionError, match="alpha"):
        plot.image_overlay(photo, explanation, alpha=1.5)
    with pytest.raises(attnflow.OptionError, match="shape"):
        plot.image_overlay(np.zeros((3, 4, 5)), explanation)
    from plot_traces import encoder_trace

    with pytest.raises(attnflow.OptionError, match="no image patches"):
        plot.image_overlay(photo, attnflow.explain(encoder_trace(), "raw"))


def test_explain_image_writes_the_overlay(vit_dir, photo, tmp_path, capsys):
    from PIL import Image

    picture = tmp_path / "chelsea.png"
    Image.fromarray(photo).save(picture)
    out = tmp_path / "out"
    assert main(["explain", "--image", str(picture), "--model", str(vit_dir), "--out", str(out), "--methods",
                 "rollout", "--format", "png,svg"]) == 0
    assert "Top input tokens for '[CLS]'" in capsys.readouterr().out
    for name in ("overlay.png", "overlay.svg", "rollout.png", "heads.png", "flow-graph.png", "trace.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "text.png").exists()
    document = json.loads((out / "explanation.json").read_text())
    assert document["tokens"][0] == "[CLS]" and len(document["tokens"]) == 17
    trace = attnflow.load(out / "trace.safetensors")
    assert trace.streams["tokens"].grid == (4, 4)
    # a text model cannot take an image, an image model cannot take text: both said before any pass runs
    assert main(["explain", "--image", str(picture), "--out", str(tmp_path / "o2")]) == 1
    assert "--image needs an image model" in capsys.readouterr().err
    assert main(["explain", "hello", "--model", str(vit_dir), "--out", str(tmp_path / "o3")]) == 1
    assert "explain an image with --image" in capsys.readouterr().err
