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


def qwen_vl(version="2"):
    """Qwen2-VL (or Qwen2.5-VL, whose blocks 0 and 2 attend within windows of 4x4 patches and block 1 over the
    whole image): vision tower of 3 blocks, 4 heads, width 16, 2x2 patches merged 2x2; language model of 2 layers, 3
    query heads over 1 key/value head, width 24 (its mrope sections add up to half of its head size 8)."""
    torch.manual_seed(0)
    vision = dict(depth=3, num_heads=4, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=18, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    special = dict(image_token_id=IMAGE_TOKEN, video_token_id=57, vision_start_token_id=58, vision_end_token_id=59)
    if version == "2.5":
        vision.update(hidden_size=16, out_hidden_size=24, intermediate_size=20, window_size=8, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **special)
        return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    vision.update(embed_dim=16, hidden_size=24, mlp_ratio=2)
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        vision_config=vision, text_config=text, **special)).eval()


def llava_next(pinpoints=((8, 16),)):
    """LLaVA-Next with one anyres grid of 1x2 tiles (8x16 pixels): each image runs 3 crops (the base image and 2
    tiles) of 2x2-pixel patches, 4x4 per crop plus CLS; images of 4x16 and 5x16 pixels unpad the tiles' 4x8
    patches to their middle 2 rows, each closed by a newline token: 16 + 2 x (8 + 1) = 34 image tokens."""
    torch.manual_seed(0)
    return transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=20, intermediate_size=14, num_hidden_layers=3,
                           num_attention_heads=2, image_size=8, patch_size=2),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=24, intermediate_size=18,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[list(p) for p in pinpoints], vision_feature_layer=-1,
    )).eval()


# family -> (builder, image tokens, start of the image tokens per item, pixel shape per item; for Qwen: the
# image's (frames, rows, columns) of patches, whose pixels the processor packs as one row of 3*2*2*2 per patch)
FAMILIES = {
    "paligemma": (paligemma, 9, (0, 0), (3, 12, 12)),
    "idefics3": (idefics3, 4, (2, 3), (1, 3, 16, 16)),
    "llava": (llava, 9, (1, 4), (3, 12, 12)),
    "llava_next": (llava_next, 34, (2, 0), (3, 3, 8, 8)),
    "qwen2_vl": (qwen_vl, 6, (1, 3), (1, 4, 6)),
    "qwen2_5_vl": (lambda: qwen_vl("2.5"), 8, (0, 4), (1, 4, 8)),
}


def inputs(family, extra=5):
    _, tokens, starts, pixel_shape = FAMILIES[family]
    generator = torch.Generator().manual_seed(4)
    high = IMAGE_TOKEN - (4 if family.startswith("qwen") else 1)  # Qwen's video and vision start/end tokens: 57-59
    ids = torch.randint(2, high, (2, tokens + extra), generator=generator)
    for b, start in enumerate(starts):
        ids[b, start:start + tokens] = IMAGE_TOKEN
    given = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family.startswith("qwen"):  # one image per item, packed: patches of both images, and each image's grid
        given["image_grid_thw"] = torch.tensor([pixel_shape] * 2)
        given["pixel_values"] = torch.randn(2 * int(np.prod(pixel_shape)), 24, generator=generator)
        given["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    else:
        given["pixel_values"] = torch.randn(2, *pixel_shape, generator=generator)
    if family == "llava_next":
        given["image_sizes"] = torch.tensor([[4, 16], [5, 16]])
    return given


def with_ids(given, ids):
    """The inputs of ``given`` for other token ids (a generated sequence): its mask and Qwen's token types too."""
    out = dict(given, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in given:
        out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    return out


def qwen_order(model, grid):
    """Block position -> row-major patch position over the packed images, from the model's own rotary position
    ids (each processor-ordered patch's row and column) and, for Qwen2.5-VL, its window index (the order of the
    merge units its blocks run in)."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    merge = visual.spatial_merge_size
    rows_cols = get_vision_position_ids(grid, merge).numpy()
    sizes = grid.prod(-1).numpy()
    image = np.repeat(np.arange(len(sizes)), sizes)
    row_major = np.concatenate([[0], np.cumsum(sizes)[:-1]])[image] + rows_cols[:, 0] * grid[image, 2].numpy() \
        + rows_cols[:, 1]
    if getattr(visual, "window_size", None) is None:
        return row_major
    units, _ = get_vision_window_index(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                       patch_size=visual.patch_size)
    unit = merge * merge
    return row_major[(units.numpy()[:, None] * unit + np.arange(unit)).reshape(-1)]


def eager(model):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return reference


def projector_pattern(family, model, pixels):
    """``(batch, image features, vision tokens)``: which vision tokens of the projected layer each image
    feature depends on, from the Jacobian of the family's own feature code (vision tower output -> projector)."""
    inner = model.model
    if family.startswith("qwen"):
        return qwen_projector_pattern(model, pixels)
    if family == "llava_next":
        return llava_next_projector_pattern(model, pixels)
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
    packed = family.startswith("qwen") or family == "llava_next"
    pattern = projector_pattern(family, model, given if packed else given["pixel_values"])
    ids = given["input_ids"].numpy()
    for b in range(2):
        positions = np.flatnonzero(ids[b] == IMAGE_TOKEN)
        expected = np.zeros_like(link.weights[b])
        expected[positions] = pattern[b] / np.maximum(pattern[b].sum(-1, keepdims=True), 1)
        np.testing.assert_array_equal(link.weights[b], expected)
    per_token = {"paligemma": 1, "idefics3": 4, "llava": 1, "llava_next": 1}.get(family, 4)
    if family == "llava_next":  # the newline closing each of the 2 rows of tiles is fed by nothing
        assert (pattern.sum(-1) == 0).sum(-1).tolist() == [2, 2]
        pattern = pattern[pattern.sum(-1) > 0]
        crops = given["pixel_values"].flatten(0, 1)  # each image's 3 crops, image by image
        with torch.no_grad():
            own = eager(model).model.vision_tower(crops, output_attentions=True).attentions
        vision = [layer for layer in trace.layers if layer.query_stream == "vision"]
        for layer, ref in zip(vision, own, strict=True):  # (6 crops, 2 heads, 17, 17) -> (2 images, 2, 51, 51)
            expected = np.zeros((2, 2, 51, 51), np.float32)
            for c in range(6):
                expected[c // 3, :, (c % 3) * 17:(c % 3 + 1) * 17, (c % 3) * 17:(c % 3 + 1) * 17] = ref[c].numpy()
            np.testing.assert_allclose(layer.weights, expected, atol=1e-6)
        assert trace.streams["vision"].special[0].nonzero()[0].tolist() == [0, 17, 34]  # each crop's CLS
    assert (pattern.sum(-1) == per_token).all()
    described = trace.metadata["image_links"]
    assert described["linked"] and described["patches_per_token"] == per_token
    maps = {"idefics3": "pixel_shuffle", "qwen2_vl": "merge_window", "qwen2_5_vl": "merge_window",
            "llava_next": "anyres_tiles"}
    assert described["map"] == maps.get(family, "one_to_one")


def llava_next_projector_pattern(model, given):
    """LLaVA-Next: the image features' dependence on the last vision layer's output (every crop's tokens), through
    the model's own get_image_features (projector, tile unpadding, newlines), as ``(batch, image tokens, crops x
    tokens per crop)``: crop c's token j is vision position c * tokens + j of its image."""
    encoder = model.model.vision_tower.encoder
    kept = []
    handle = encoder.layers[-1].register_forward_hook(lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out))
    try:
        features = model.model.get_image_features(given["pixel_values"], given["image_sizes"]).pooler_output
    finally:
        handle.remove()
    hidden = kept[0]
    crops, per_crop = hidden.shape[0] // 2, hidden.shape[1]
    pattern = np.zeros((2, features[0].shape[0], crops * per_crop), bool)
    for b in range(2):
        for k in range(features[b].shape[0]):
            (grad,) = torch.autograd.grad(features[b][k].square().sum(), hidden, retain_graph=True)
            depends = grad.abs().sum(-1).numpy() > 0
            pattern[b, k] = depends[b * crops:(b + 1) * crops].reshape(-1)
            assert not depends[(1 - b) * crops:(2 - b) * crops].any()  # no image feeds another item's tokens
    return pattern


def qwen_projector_pattern(model, given):
    """Qwen: the image features' dependence on the last block's output (block order), through the tower's own merger
    and its reordering, put in row-major patch order per image."""
    visual, grid = model.model.visual, given["image_grid_thw"]
    kept = []
    handle = visual.blocks[-1].register_forward_hook(lambda m, a, out: kept.append(out))
    try:
        features = visual(given["pixel_values"], grid_thw=grid).pooler_output
    finally:
        handle.remove()
    order, patches = qwen_order(model, grid), int(grid[0].prod())
    per_image = features.shape[0] // 2
    pattern = np.zeros((2, per_image, patches), bool)
    for k in range(features.shape[0]):
        (grad,) = torch.autograd.grad(features[k].square().sum(), kept[0], retain_graph=True)
        depends = np.zeros(2 * patches, bool)
        depends[order] = grad.abs().sum(-1).numpy() > 0
        b = k // per_image
        pattern[b, k % per_image] = depends[b * patches:(b + 1) * patches]
        assert not depends[(1 - b) * patches:(2 - b) * patches].any()  # no image feeds another item's tokens
    return pattern


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


@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "qwen2_5_vl"])  # its tower's as 2's
def test_generate_gives_one_stitched_trace_equal_to_teacher_forcing(family):
    model = FAMILIES[family][0]()
    given = inputs(family)
    settings = {"max_new_tokens": NEW, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN, 1, 57, 58, 59]}
    expected = model.generate(**given, **settings)
    with attnflow.attach(model) as rec:
        out = model.generate(**given, **settings)
    assert torch.equal(out, expected)
    assert len(rec.traces) == 1
    trace = rec.trace
    prompt = given["input_ids"].shape[1]
    assert trace.metadata["generation"]["stream"] == "text" and trace.metadata["generation"]["first_generated"] == prompt
    assert trace.streams["text"].length == prompt + NEW - 1
    reference = attnflow.capture(model, **with_ids(given, out[:, :-1]))
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


def test_anyres_refusals_name_the_cause():
    """LLaVA-Next: images whose sizes pick different tile grids, and attention gradients, are refused with the
    reason; LLaVA-OneVision (pooled anyres) is not linked, and its language model alone is captured, as the message
    says."""
    model = llava_next(pinpoints=((8, 8), (8, 16)))  # an 8x8 image runs 2 crops, a 4x16 one 3
    given = inputs("llava_next")
    given["image_sizes"] = torch.tensor([[8, 8], [4, 16]])
    with pytest.raises(attnflow.AdapterError, match=r"the images of this call run \[2, 3\] crops each"):
        attnflow.capture(model, **given)
    given = inputs("llava_next")
    with pytest.raises(attnflow.AdapterError, match=r"Attention gradients \(target=...\) are not available for "
                       r"LlavaNextForConditionalGeneration's vision tower"):
        attnflow.capture(llava_next(), **given, target=3)
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=20, intermediate_size=14, num_hidden_layers=2,
                           num_attention_heads=2, image_size=8, patch_size=2),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=24, intermediate_size=18,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1),
        image_token_index=IMAGE_TOKEN, video_token_index=59, image_grid_pinpoints=[[8, 16]], vision_feature_layer=-1,
    )).eval()
    pixels, sizes = given["pixel_values"], given["image_sizes"]
    tokens = model.model.get_image_features(pixels, sizes).pooler_output[0].shape[0]
    ids = torch.randint(2, IMAGE_TOKEN - 2, (2, tokens + 3))
    ids[:, 1:1 + tokens] = IMAGE_TOKEN
    with pytest.raises(attnflow.AdapterError, match="anyres: the vision tower runs on several crops .* not linked"):
        attnflow.capture(model, input_ids=ids, pixel_values=pixels, image_sizes=sizes)
    trace = attnflow.capture(model, input_ids=ids, pixel_values=pixels, image_sizes=sizes,
                             adapter_options={"modules": ["model.language_model.layers.*.self_attn"]})
    assert len(trace.layers) == 2 and not trace.links


QWEN = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def qwen_models():
    return {family: FAMILIES[family][0]() for family in QWEN}


def qwen_vision_reference(model, given):
    """Each vision block's ``(images, heads, patches, patches)``, recomputed from the inputs of its attention module:
    softmax(q kᵀ / √d) of its qkv projection with the rotary embedding (rotate-half), within each cu_seqlens span,
    put in row-major patch order by :func:`qwen_order`; 0 across spans and images."""
    visual = model.model.visual
    seen = []
    hook = lambda m, args, kwargs: seen.append((args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"]))  # noqa: E731
    handles = [block.attn.register_forward_pre_hook(hook, with_kwargs=True) for block in visual.blocks]
    try:
        with torch.no_grad():
            model(**given)
    finally:
        for handle in handles:
            handle.remove()
    grid = given["image_grid_thw"]
    order, patches, heads = qwen_order(model, grid), int(grid[0].prod()), visual.config.num_heads
    layers = []
    for x, cu_seqlens, (cos, sin) in seen:
        n = x.shape[0]
        q, k, _ = visual.blocks[len(layers)].attn.qkv(x).reshape(n, 3, heads, -1).unbind(1)

        def rotate(t, cos=cos, sin=sin):
            first, second = t.chunk(2, dim=-1)
            return t * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]

        q, k = rotate(q.double()), rotate(k.double())
        packed = np.zeros((heads, n, n))
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * q.shape[-1] ** -0.5
            packed[:, start:end, start:end] = scores.softmax(-1).detach().numpy()
        full = np.zeros_like(packed)
        full[:, order[:, None], order[None, :]] = packed
        split = full.reshape(heads, 2, patches, 2, patches)
        assert not split[:, 0, :, 1].any() and not split[:, 1, :, 0].any()
        layers.append(np.stack([split[:, b, :, b] for b in range(2)]))
    return layers


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vision_blocks_equal_their_recomputed_probabilities(family, qwen_models):
    """Qwen2-VL's vision attention returns no weights: attnflow records each window's softmax and assembles the
    images' layers; they equal the probabilities recomputed here, and the text layers equal eager's."""
    model = qwen_models[family]
    given = inputs(family)
    given["attention_mask"][1, -1:] = 0  # item 1 right-padded
    trace = attnflow.capture(model, **given)
    np.testing.assert_array_equal(trace.streams["text"].mask, given["attention_mask"].numpy().astype(bool))
    vision = [layer for layer in trace.layers if layer.query_stream == "vision"]
    text = [layer for layer in trace.layers if layer.query_stream == "text"]
    assert [layer.name for layer in vision] == [f"model.visual.blocks.{i}.attn" for i in range(3)]
    for layer, expected in zip(vision, qwen_vision_reference(model, given), strict=True):
        patches = int(np.prod(FAMILIES[family][3]))
        assert layer.weights.shape == expected.shape == (2, 4, patches, patches)
        np.testing.assert_allclose(layer.weights, expected, atol=2e-6)
    if family == "qwen2_5_vl":  # blocks 0 and 2 attend within each 4x4 window, block 1 over the image
        half = (np.arange(32) % 8) >= 4
        assert ((vision[0].weights > 0) == (half[:, None] == half[None, :])).all()
        assert (vision[1].weights > 0).all()
    rows, cols = FAMILIES[family][3][1:]
    assert trace.streams["vision"].grid == (rows, cols) and not trace.streams["vision"].special.any()
    with torch.no_grad():
        expected = eager(model)(**given, output_attentions=True).attentions
    assert len(text) == len(expected) == 2
    for layer, ref in zip(text, expected):
        assert layer.weights.shape == (2, 3, given["input_ids"].shape[1], given["input_ids"].shape[1])
        np.testing.assert_allclose(layer.weights, ref.numpy(), atol=1e-6)
    assert trace.metadata["image_links"]["map"] == "merge_window"


def test_qwen_refusals_name_the_cause(qwen_models):
    model = qwen_models["qwen2_vl"]
    given = inputs("qwen2_vl")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(attnflow.AdapterError, match=r"Attention gradients \(target=...\) are not available for "
                       r"model.visual.blocks.0.attn .* Capture the language model's gradients alone"):
        attnflow.capture(model, **given, target=3)
    sizes = dict(given, image_grid_thw=torch.tensor([[1, 4, 6], [1, 6, 4]]))
    with pytest.raises(attnflow.AdapterError, match=r"the images have different patch grids \(\[\[4, 6\], \[6, 4\]\]"):
        attnflow.capture(model, **sizes)
    two = {key: given[key][:1] for key in ("input_ids", "attention_mask")}  # one prompt with both images
    two["input_ids"] = torch.cat([two["input_ids"], torch.full((1, 6), IMAGE_TOKEN)], 1)
    two.update(attention_mask=torch.ones_like(two["input_ids"]), mm_token_type_ids=(two["input_ids"] == IMAGE_TOKEN).int(),
               pixel_values=given["pixel_values"], image_grid_thw=given["image_grid_thw"])
    with pytest.raises(attnflow.AdapterError, match="the batch has 1 text items but the vision tower ran 2 images"):
        attnflow.capture(model, **two)
    with pytest.raises(attnflow.HiddenAttentionError, match=r"returned no attention weights under "
                       r"attn_implementation='eager'; it splits packed images at cu_seqlens .* For Qwen2-VL and Qwen2.5-VL, leave out modules="):
        attnflow.capture(model, **given, adapter_options={"modules": ["model.visual.blocks.*.attn"]})
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before
    assert model.config._attn_implementation != "eager"  # put back as it was loaded
