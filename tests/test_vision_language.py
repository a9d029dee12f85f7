"""Vision-language links: image tokens fed by the vision patches their projector reads (issue 21, point 5).

Each family's link is checked against the projector's own mapping, found here by differentiation: which
vision tokens of the projected layer change which image feature. Rollout from a text token is checked
against numpy routing written from the definition through the link, and generate() inside attach against
a teacher-forced capture of the generated sequence. Tiny random models, a different size on every axis:
batch 2, PaliGemma 3x3 patches (no CLS) into 9 image tokens, Idefics3 4x4 patches shuffled 2x2 into 4 tokens,
LLaVA 3x3 patches plus CLS at vision_feature_layer=-2; vision layers 3, text layers 2, heads 2 and 4.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

import attnflow

VOCAB, IMAGE_TOKEN, NEW = 61, 60, 5


def paligemma():
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=20, intermediate_size=14,
                           num_hidden_layers=3, num_attention_heads=2, image_size=12, patch_size=4),
        text_config=dict(model_type="gemma", vocab_size=VOCAB, hidden_size=24, intermediate_size=18,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=6,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1),
        image_token_id=IMAGE_TOKEN, vocab_size=VOCAB, projection_dim=24, hidden_size=24,
    )).eval()


def idefics3():
    torch.manual_seed(0)
    return transformers.Idefics3ForConditionalGeneration(transformers.Idefics3Config(
        vision_config=dict(hidden_size=20, intermediate_size=14, num_hidden_layers=3, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=24, intermediate_size=18,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1),
        image_token_id=IMAGE_TOKEN, scale_factor=2,
    )).eval()


def llava():
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=20, intermediate_size=14, num_hidden_layers=3, num_attention_heads=2, image_size=12,
            patch_size=4, projection_dim=16,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=24, intermediate_size=18, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        ),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
    )).eval()


# family -> (builder, image tokens, start of the image tokens per item, pixel shape per item)
FAMILIES = {
    "paligemma": (paligemma, 9, (0, 0), (3, 12, 12)),
    "idefics3": (idefics3, 4, (2, 3), (1, 3, 16, 16)),
    "llava": (llava, 9, (1, 4), (3, 12, 12)),
}


def inputs(family, extra=5):
    _, tokens, starts, pixel_shape = FAMILIES[family]
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(2, IMAGE_TOKEN - 1, (2, tokens + extra), generator=generator)
    for b, start in enumerate(starts):
        ids[b, start:start + tokens] = IMAGE_TOKEN
    pixels = torch.randn(2, *pixel_shape, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def eager(model):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return reference


def projector_pattern(family, model, pixels):
    """``(batch, image features, vision tokens)``: which vision tokens of the projected layer each image
    feature depends on, from the Jacobian of the family's own feature code (vision tower output -> projector)."""
    inner = model.model
    with torch.no_grad():
        if family == "idefics3":
            hidden = inner.vision_model(pixel_values=pixels[:, 0]).last_hidden_state
        elif family == "paligemma":
            hidden = inner.vision_tower(pixels).last_hidden_state
        else:
            hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    hidden = hidden.detach().requires_grad_(True)
    if family == "idefics3":
        features = inner.connector(hidden)
    elif family == "paligemma":
        features = inner.multi_modal_projector(hidden)
    else:
        features = inner.multi_modal_projector(hidden[:, 1:])  # the default strategy drops CLS
    pattern = np.zeros((hidden.shape[0], features.shape[1], hidden.shape[1]), bool)
    for b in range(hidden.shape[0]):
        for k in range(features.shape[1]):
            (grad,) = torch.autograd.grad(features[b, k].square().sum(), hidden, retain_graph=True)
            pattern[b, k] = grad[b].abs().sum(-1).numpy() > 0
            assert not grad[1 - b].any()  # no image feeds another item's tokens
    return pattern


@pytest.mark.parametrize("family", list(FAMILIES))
def test_links_follow_the_projector(family):
    model = FAMILIES[family][0]()
    given = inputs(family)
    trace = attnflow.capture(model, **given)
    (link,) = trace.links
    assert (link.stream, link.source) == ("text", "vision")
    vision_layers = sum(layer.query_stream == "vision" for layer in trace.layers)
    assert link.depth == (vision_layers - 1 if family == "llava" else vision_layers)
    pattern = projector_pattern(family, model, given["pixel_values"])
    ids = given["input_ids"].numpy()
    for b in range(2):
        positions = np.flatnonzero(ids[b] == IMAGE_TOKEN)
        expected = np.zeros_like(link.weights[b])
        expected[positions] = pattern[b] / pattern[b].sum(-1, keepdims=True)
        np.testing.assert_array_equal(link.weights[b], expected)
    per_token = {"paligemma": 1, "idefics3": 4, "llava": 1}[family]
    assert (pattern.sum(-1) == per_token).all()
    described = trace.metadata["image_links"]
    assert described["linked"] and described["patches_per_token"] == per_token
    assert described["map"] == ("pixel_shuffle" if family == "idefics3" else "one_to_one")


def residual(a, r=0.5):
    m = (1 - r) * a + r * np.eye(a.shape[0])
    return m / m.sum(-1, keepdims=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_from_text_reaches_the_patches(family):
    model = FAMILIES[family][0]()
    trace = attnflow.capture(model, **inputs(family))
    (link,) = trace.links
    vision = [layer.weights.astype(float) for layer in trace.layers if layer.query_stream == "vision"]
    text = [layer.weights.astype(float) for layer in trace.layers if layer.query_stream == "text"]
    scores = attnflow.rollout(trace)
    for b in range(2):
        v = np.eye(vision[0].shape[-1])
        for w in vision[:link.depth]:
            v = residual(w[b].mean(0)) @ v
        fed = link.weights[b].sum(-1) > 0
        state = np.hstack([link.weights[b] @ v, np.diag((~fed).astype(float))])
        for w in text:
            state = residual(w[b].mean(0)) @ state
        np.testing.assert_allclose(scores["vision"][b], state[:, :v.shape[0]], atol=1e-9)
        np.testing.assert_allclose(scores["text"][b], state[:, v.shape[0]:], atol=1e-9)
        last = scores["vision"][b, -1]
        assert last.sum() > 0.05 and (last > 0).sum() >= fed.sum()  # the last text token reaches the image
    flows = attnflow.flow(trace)
    assert flows["vision"][:, -1].sum() > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_gives_one_stitched_trace_equal_to_teacher_forcing(family):
    model = FAMILIES[family][0]()
    given = inputs(family)
    settings = {"max_new_tokens": NEW, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN, 1]}
    expected = model.generate(**given, **settings)
    with attnflow.attach(model) as rec:
        out = model.generate(**given, **settings)
    assert torch.equal(out, expected)
    assert len(rec.traces) == 1
    trace = rec.trace
    prompt = given["input_ids"].shape[1]
    assert trace.metadata["generation"]["stream"] == "text" and trace.metadata["generation"]["first_generated"] == prompt
    assert trace.streams["text"].length == prompt + NEW - 1
    reference = attnflow.capture(
        model, input_ids=out[:, :-1], attention_mask=torch.ones_like(out[:, :-1]), pixel_values=given["pixel_values"]
    )
    assert [layer.name for layer in trace.layers] == [layer.name for layer in reference.layers]
    worst = max(float(np.abs(a.weights - r.weights).max()) for a, r in zip(trace.layers, reference.layers))
    assert worst < 1e-5
    (link,), (expected_link,) = trace.links, reference.links
    assert link.depth == expected_link.depth
    np.testing.assert_array_equal(link.weights, expected_link.weights)
    np.testing.assert_allclose(attnflow.rollout(trace)["vision"], attnflow.rollout(reference)["vision"], atol=1e-5)
    scores = attnflow.rollout(trace, sources="generated")
    assert scores["vision"].shape[:2] == (2, NEW) and (scores["vision"].sum(-1) > 0).all()


def test_paligemma_prefix_generation_reruns_with_its_token_types():
    """token_type_ids mark the image and prompt as a prefix attended both ways; the re-run extends them with
    the suffix type for the generated tokens, so stitch and rerun agree."""
    model = paligemma()
    given = inputs("paligemma")
    given["token_type_ids"] = torch.zeros_like(given["input_ids"])
    settings = {"max_new_tokens": NEW, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN, 1]}
    with attnflow.attach(model) as stitched, attnflow.attach(model, generation="rerun") as rerun:
        model.generate(**given, **settings)
    a, b = stitched.trace, rerun.trace
    prompt = given["input_ids"].shape[1]
    first_text = next(layer for layer in a.layers if layer.query_stream == "text").weights
    assert first_text[:, :, 0, 1:prompt].sum() > 0  # the prefix attends both ways
    assert not first_text[:, :, prompt, prompt + 1:].any()  # generated tokens causally
    for x, y in zip(a.layers, b.layers, strict=True):
        np.testing.assert_allclose(x.weights, y.weights, atol=1e-5)
    np.testing.assert_array_equal(a.links[0].weights, b.links[0].weights)


def test_anyres_models_are_refused_with_the_reason():
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=20, intermediate_size=14, num_hidden_layers=3,
                           num_attention_heads=2, image_size=8, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=24, intermediate_size=18,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[8, 8]], vision_feature_layer=-1,
    )).eval()
    pixels, sizes = torch.randn(2, 2, 3, 8, 8), torch.tensor([[8, 8], [8, 8]])
    tokens = model.model.get_image_features(pixels, sizes).pooler_output[0].shape[0]
    ids = torch.randint(2, IMAGE_TOKEN - 1, (2, tokens + 5))
    ids[:, 2:2 + tokens] = IMAGE_TOKEN
    with pytest.raises(attnflow.AdapterError, match="anyres: the vision tower runs on several crops"):
        attnflow.capture(model, input_ids=ids, pixel_values=pixels, image_sizes=sizes)
    # the language model alone is captured, as the message says
    trace = attnflow.capture(model, input_ids=ids, pixel_values=pixels, image_sizes=sizes,
                             adapter_options={"modules": ["model.language_model.layers.*.self_attn"]})
    assert len(trace.layers) == 2 and not trace.links


def test_qwen2_vl_merge_windows_follow_the_patch_merger():
    """Qwen2-VL's vision tower hides its weights (issue 21, point 4), so its trace is built elsewhere; the fixed
    map it would be linked through is checked here against the PatchMerger's own Jacobian."""
    from attnflow.adapters import _vision_language as vl
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    torch.manual_seed(0)
    merger = PatchMerger(dim=24, context_dim=10, spatial_merge_size=2).eval()
    x = torch.randn(24, 10, requires_grad=True)  # one image of 4x6 patches, window by window
    out = merger(x)
    found = vl.ImageMap(vl.MERGE_WINDOW, IMAGE_TOKEN, scale=2)
    sources = vl.token_sources(found, 24, (4, 6))
    for k in range(out.shape[0]):
        (grad,) = torch.autograd.grad(out[k].square().sum(), x, retain_graph=True)
        np.testing.assert_array_equal(np.flatnonzero(grad.abs().sum(-1).numpy()), sources[k])
    ids = np.full((1, 9), 3)
    ids[0, 2:8] = IMAGE_TOKEN
    weights = vl.link_weights(found, ids, 24, 1)
    assert weights.shape == (1, 9, 24) and np.allclose(weights[0, 2:8].sum(-1), 1) and not weights[0, :2].any()
    assert vl.describe(type("M", (), {"config": transformers.Qwen2VLConfig(image_token_id=IMAGE_TOKEN)})())[
        "image_links"]["map"] == "merge_window"
