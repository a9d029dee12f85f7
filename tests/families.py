"""The model-family matrix: tiny random models of each family, their inputs, and the model's own attention.

Each :class:`Family` builds a tiny randomly initialised model (as a user's would load: transformers'
default attention implementation), a padded batch, and the reference: the attention the model itself
returns with ``output_attentions=True`` under eager, in the order the layers run, with the streams they
belong to. ``tests/test_families.py`` captures every family with one ``attnflow.capture`` call and
compares; ``python tests/families.py --table`` writes the table of supported families in docs/families.md from
this list, and a test fails when that copy is out of date.

Sizes differ on every axis: batch 2, encoder/text 7 tokens, decoder 5, heads 4 (encoder) and 2 (decoder),
layers 2 (encoder) and 3 (decoder), hidden 24.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

BATCH, ENC, DEC, ENC_HEADS, DEC_HEADS, ENC_LAYERS, DEC_LAYERS, HIDDEN, VOCAB = 2, 7, 5, 4, 2, 2, 3, 24, 50
IMAGE, PATCH = 16, 4  # 4x4 patches, plus CLS: 17 vision tokens

Reference = list[tuple[str, str | None, Any]]  # (query stream, key stream or None for self, weights)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # README row
    classes: str  # model classes covered
    streams: tuple[str, ...]
    how: str  # how attnflow captures it
    build: Callable[[], Any]
    inputs: Callable[[Any], dict[str, Any]]
    reference: Callable[[Any, dict[str, Any]], Reference]
    note: str = ""
    plain: Callable[[Any], Any] = lambda model: model  # the module to call for outputs (not a compiled one)


# -- inputs ------------------------------------------------------------------------------------------------
def _ids(length: int, seed: int, low: int = 2):
    import torch

    return torch.randint(low, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(seed))


def _right_padded(length: int, real: int):
    import torch

    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1, real:] = 0
    return mask


def _pixels(seed: int):
    import torch

    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _eager(model):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return reference


def _seeded(build: Callable[[], Any]) -> Callable[[], Any]:
    def seeded():
        import torch

        torch.manual_seed(0)
        return build().eval()

    return seeded


# -- encoder-decoders -------------------------------------------------------------------------------------
def _seq2seq_inputs(model) -> dict[str, Any]:
    return {
        "input_ids": _ids(ENC, 1), "attention_mask": _right_padded(ENC, 5),
        "decoder_input_ids": _ids(DEC, 2), "decoder_attention_mask": _right_padded(DEC, 4),
    }


def _seq2seq_reference(model, inputs, encoder="encoder") -> Reference:
    import torch

    with torch.no_grad():
        out = _eager(model)(**inputs, output_attentions=True)
    layers: Reference = [(encoder, None, a) for a in out.encoder_attentions]
    for self_attention, cross in zip(out.decoder_attentions, out.cross_attentions):
        layers += [("decoder", None, self_attention), ("decoder", encoder, cross)]
    return layers


def _t5():
    import transformers

    return transformers.T5Model(transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=6, d_ff=20, num_layers=ENC_LAYERS, num_decoder_layers=DEC_LAYERS,
        num_heads=ENC_HEADS, decoder_start_token_id=0, pad_token_id=0,
    ))


def _bart_like(config_class, model_class, **extra):
    def build():
        import transformers

        config = getattr(transformers, config_class)(
            vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS,
            encoder_attention_heads=ENC_HEADS, decoder_attention_heads=DEC_HEADS, encoder_ffn_dim=20,
            decoder_ffn_dim=20, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1, **extra,
        )
        return getattr(transformers, model_class)(config)

    return build


def _whisper_inputs(model) -> dict[str, Any]:
    import torch

    features = torch.randn(BATCH, 8, 32, generator=torch.Generator().manual_seed(3))  # 16 audio positions
    return {"input_features": features, "decoder_input_ids": _ids(DEC, 4),
            "decoder_attention_mask": _right_padded(DEC, 4)}


def _torch_transformer():
    import torch

    return torch.nn.Transformer(
        d_model=HIDDEN, nhead=ENC_HEADS, num_encoder_layers=ENC_LAYERS, num_decoder_layers=DEC_LAYERS,
        dim_feedforward=20, dropout=0.0, batch_first=True,
    )


def _torch_transformer_inputs(model) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(5)
    src_padding = torch.zeros(BATCH, ENC, dtype=torch.bool)
    src_padding[1, 5:] = True
    tgt_padding = torch.zeros(BATCH, DEC, dtype=torch.bool)
    tgt_padding[1, 4:] = True
    return {
        "src": torch.randn(BATCH, ENC, HIDDEN, generator=generator),
        "tgt": torch.randn(BATCH, DEC, HIDDEN, generator=generator),
        "tgt_mask": torch.nn.Transformer.generate_square_subsequent_mask(DEC),
        "src_key_padding_mask": src_padding, "tgt_key_padding_mask": tgt_padding,
        "memory_key_padding_mask": src_padding,
    }


def _torch_transformer_reference(model, inputs) -> Reference:
    """Each MultiheadAttention called by hand on the inputs the layers give it, asking for per-head weights."""
    import torch

    layers: Reference = []
    handles = []

    def grab(stream, key):
        def hook(module, args, kwargs, output):
            q, k, v = args[:3]  # the layers call self_attn(x, x, x, ...) and multihead_attn(x, mem, mem, ...)
            with torch.no_grad():
                _, w = torch.nn.functional.multi_head_attention_forward(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), module.embed_dim, module.num_heads,
                    module.in_proj_weight, module.in_proj_bias, None, None, False, 0.0, module.out_proj.weight,
                    module.out_proj.bias, training=False, key_padding_mask=kwargs.get("key_padding_mask"),
                    need_weights=True, attn_mask=kwargs.get("attn_mask"), average_attn_weights=False,
                    is_causal=False,
                )
            layers.append((stream, key, w))

        return hook

    for layer in model.encoder.layers:
        handles.append(layer.self_attn.register_forward_hook(grab("encoder", None), with_kwargs=True))
    for layer in model.decoder.layers:
        handles.append(layer.self_attn.register_forward_hook(grab("decoder", None), with_kwargs=True))
        handles.append(layer.multihead_attn.register_forward_hook(grab("decoder", "encoder"), with_kwargs=True))
    previous = model.encoder.use_nested_tensor
    model.encoder.use_nested_tensor = False
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.encoder.use_nested_tensor = previous
        for handle in handles:
            handle.remove()
    return layers


# -- towers ----------------------------------------------------------------------------------------------
def _clip():
    import transformers

    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 20, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 20, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": IMAGE, "patch_size": PATCH},
        projection_dim=12,
    ))


def _text_image_inputs(model) -> dict[str, Any]:
    return {"input_ids": _ids(ENC, 6), "attention_mask": _right_padded(ENC, 5), "pixel_values": _pixels(7)}


def _clip_reference(model, inputs) -> Reference:
    import torch

    with torch.no_grad():
        out = _eager(model)(**inputs, output_attentions=True)
    return ([("vision", None, a) for a in out.vision_model_output.attentions]
            + [("text", None, a) for a in out.text_model_output.attentions])


def _blip():
    import transformers

    return transformers.BlipForConditionalGeneration(transformers.BlipConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 20, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 20, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": IMAGE, "patch_size": PATCH},
    ))


def _blip_reference(model, inputs) -> Reference:
    """BLIP returns only the vision attentions; the text decoder's come from calling it directly."""
    import torch

    with torch.no_grad():
        vision = model.vision_model(inputs["pixel_values"], output_attentions=True)
        text = model.text_decoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            encoder_hidden_states=vision.last_hidden_state, output_attentions=True,
        )
    layers: Reference = [("vision", None, a) for a in vision.attentions]
    for self_attention, cross in zip(text.attentions, text.cross_attentions):
        layers += [("text", None, self_attention), ("text", "vision", cross)]
    return layers


IMAGE_TOKEN = VOCAB - 1


def _llava():
    import transformers

    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=20, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE,
            patch_size=PATCH,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        ),
        image_token_index=IMAGE_TOKEN,
    ))


def _llava_inputs(model) -> dict[str, Any]:
    import torch

    patches = (IMAGE // PATCH) ** 2
    ids = _ids(patches + 7, 8)
    ids[ids == IMAGE_TOKEN] = 2
    ids[0, 2 : 2 + patches] = IMAGE_TOKEN
    ids[1, 4 : 4 + patches] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    mask[1, :1] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": _pixels(9)}


def _llava_reference(model, inputs) -> Reference:
    import torch

    with torch.no_grad():
        out = _eager(model)(**inputs, output_attentions=True)
    return ([("vision", None, a) for a in out.image_outputs.attentions]
            + [("text", None, a) for a in out.attentions])


# -- single-stream models whose classes declare no attention outputs --------------------------------------
def _single(config_class: str, model_class: str, **config):
    def build():
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


def _text_inputs(model) -> dict[str, Any]:
    return {"input_ids": _ids(ENC, 10), "attention_mask": _right_padded(ENC, 5)}


def _left_padded_text_inputs(model) -> dict[str, Any]:
    import torch

    mask = torch.ones(BATCH, ENC, dtype=torch.long)
    mask[1, :2] = 0
    return {"input_ids": _ids(ENC, 11), "attention_mask": mask}


def _output_reference(model, inputs) -> Reference:
    import torch

    reference = copy.deepcopy(model)
    reference.config._attn_implementation_internal = "eager"  # Falcon ignores set_attn_implementation
    with torch.no_grad():
        out = reference(**inputs, output_attentions=True)
    return [("tokens", None, a) for a in out.attentions]


# -- vision ---------------------------------------------------------------------------------------------
def _timm_vit():
    from timm_import import import_timm

    timm = import_timm()
    return timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=HIDDEN, depth=3, num_heads=4, num_classes=5, reg_tokens=2,
    )


def _pixel_inputs(model) -> dict[str, Any]:
    return {"x": _pixels(12)}


def _timm_reference(model, inputs) -> Reference:
    """Each block's attention recomputed by hand from its input: softmax(q k^T * scale) with timm's qk norms."""
    import torch

    layers: Reference = []
    handles = []

    def grab(module, args):
        x = args[0]
        b, n, c = x.shape
        qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        layers.append(("tokens", None, torch.softmax((q * module.scale) @ k.transpose(-2, -1), dim=-1)))

    for block in model.blocks:
        handles.append(block.attn.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            model(inputs["x"])
    finally:
        for handle in handles:
            handle.remove()
    return layers


SWIN_IMAGE, SWIN_PATCH, SWIN_WINDOW = 32, 2, 4  # stage grids 16x16 and 8x8: multiples of the window


def _swin():
    import transformers

    return transformers.SwinModel(transformers.SwinConfig(
        image_size=SWIN_IMAGE, patch_size=SWIN_PATCH, embed_dim=8, depths=[2, 3], num_heads=[2, 4],
        window_size=SWIN_WINDOW, mlp_ratio=2.0, drop_path_rate=0.0,
    ))


def _swin_inputs(model) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.randn(BATCH, 3, SWIN_IMAGE, SWIN_IMAGE, generator=torch.Generator().manual_seed(13))}


def _swin_reference(model, inputs) -> Reference:
    """Dense attention over a stage's tokens, recomputed from each block's input: every window's own
    softmax (relative position bias and the shifted-window mask) placed at the tokens it covers."""
    import torch

    layers: Reference = []
    handles = []

    def grab(stream):
        def hook(block, args, kwargs):
            x, (height, width) = args[0], kwargs.get("input_dimensions", args[1] if len(args) > 1 else None)
            block.set_shift_and_window_size((height, width))
            window, shift = int(block.window_size), int(block.shift_size)
            attention = block.attention
            b, n, c = x.shape
            h = block.layernorm_before(x).view(b, height, width, c)
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2)) if shift else h
            heads = attention.num_attention_heads if hasattr(attention, "num_attention_heads") else attention.num_heads
            dense = torch.zeros(b, heads, n, n)
            bias = attention.relative_position_bias() if callable(getattr(attention, "relative_position_bias", None)) \
                else None
            mask = block.get_attn_mask(height, width, dtype=x.dtype, device=x.device)
            for wi in range(height // window):
                for wj in range(width // window):
                    rows = [((wi * window + i + shift) % height) * width + (wj * window + j + shift) % width
                            for i in range(window) for j in range(window)]
                    piece = h[:, wi * window:(wi + 1) * window, wj * window:(wj + 1) * window].reshape(b, -1, c)
                    q = attention.q_proj(piece).view(b, -1, heads, c // heads).transpose(1, 2)
                    k = attention.k_proj(piece).view(b, -1, heads, c // heads).transpose(1, 2)
                    scores = q @ k.transpose(-1, -2) / (c // heads) ** 0.5
                    if bias is not None:
                        scores = scores + bias
                    if mask is not None:
                        scores = scores + mask[wi * (width // window) + wj][None, None]
                    dense[:, :, torch.tensor(rows)[:, None], torch.tensor(rows)[None, :]] = torch.softmax(scores, -1)
            layers.append((stream, None, dense))

        return hook

    for s, stage in enumerate(model.encoder.layers):
        for block in stage.blocks:
            handles.append(block.register_forward_pre_hook(grab(f"stage{s}"), with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return layers


def _compiled_bert():
    import torch
    import transformers

    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, intermediate_size=20,
        max_position_embeddings=32,
    ))
    return torch.compile(model.eval())


def _bert_output_reference(model, inputs) -> Reference:
    import torch

    reference = copy.deepcopy(model._orig_mod)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        out = reference(**inputs, output_attentions=True)
    return [("tokens", None, a) for a in out.attentions]


# -- round two: families a new user tries (issue 21) ------------------------------------------------------
TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=ENC_LAYERS, num_attention_heads=ENC_HEADS,
            intermediate_size=20, max_position_embeddings=32)
DECODER = dict(TEXT, num_key_value_heads=DEC_HEADS, pad_token_id=0, bos_token_id=0, eos_token_id=1)


def _encoder_decoder_reference(model, inputs) -> Reference:
    return _seq2seq_reference(model, inputs)


def _vision_reference(model, inputs) -> Reference:
    import torch

    with torch.no_grad():
        out = _eager(model)(**inputs, output_attentions=True)
    return [("tokens", None, a) for a in out.attentions]


def _vision_inputs(model) -> dict[str, Any]:
    return {"pixel_values": _pixels(14)}


def _vit_like(config_class: str, model_class: str, **extra):
    return _single(config_class, model_class, hidden_size=HIDDEN, num_hidden_layers=ENC_LAYERS,
                   num_attention_heads=ENC_HEADS, intermediate_size=20, image_size=IMAGE, patch_size=PATCH, **extra)


def _vit_mae_inputs(model) -> dict[str, Any]:
    import torch

    # ViT-MAE keeps a random quarter of the patches: fixed noise makes the kept patches the same on every call
    return {"pixel_values": _pixels(15), "noise": torch.rand(BATCH, (IMAGE // PATCH) ** 2,
                                                             generator=torch.Generator().manual_seed(16))}


def _vit_gpt2():
    import transformers

    return transformers.VisionEncoderDecoderModel(transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=ENC_LAYERS, num_attention_heads=ENC_HEADS,
                               intermediate_size=20, image_size=IMAGE, patch_size=PATCH),
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEC_LAYERS, n_head=DEC_HEADS, n_inner=20,
                                n_positions=32, bos_token_id=0, eos_token_id=1, add_cross_attention=True,
                                is_decoder=True),
    ))


def _vit_gpt2_inputs(model) -> dict[str, Any]:
    return {"pixel_values": _pixels(17), "decoder_input_ids": _ids(DEC, 18),
            "decoder_attention_mask": _right_padded(DEC, 4)}


def _detr():
    import transformers

    return transformers.DetrModel(transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1],
                                                  out_features=["stage2"]),
        d_model=HIDDEN, encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS, encoder_attention_heads=ENC_HEADS,
        decoder_attention_heads=DEC_HEADS, encoder_ffn_dim=20, decoder_ffn_dim=20, num_queries=DEC,
    ))


def _detr_inputs(model) -> dict[str, Any]:
    import torch

    pixels = torch.randn(BATCH, 3, 48, 40, generator=torch.Generator().manual_seed(19))
    mask = torch.ones(BATCH, 48, 40, dtype=torch.long)
    return {"pixel_values": pixels, "pixel_mask": mask}


def _hybrid(config_class: str, model_class: str, **extra):
    return _single(config_class, model_class, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=ENC_HEADS,
                   num_key_value_heads=DEC_HEADS, intermediate_size=20, max_position_embeddings=32, pad_token_id=0,
                   bos_token_id=0, eos_token_id=1, mamba_d_state=4, mamba_d_conv=2,
                   mamba_expand=2, **extra)


AUDIO_SAMPLES, AUDIO_REAL = 200, 130  # 19 frames; the padded item has 12 real frames
AUDIO = dict(hidden_size=HIDDEN, num_hidden_layers=ENC_LAYERS, num_attention_heads=ENC_HEADS, intermediate_size=20,
             conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
             num_conv_pos_embedding_groups=2, feat_extract_norm="layer", vocab_size=10)


def _audio_inputs(model) -> dict[str, Any]:
    import torch

    audio = torch.randn(BATCH, AUDIO_SAMPLES, generator=torch.Generator().manual_seed(20))
    audio[1, AUDIO_REAL:] = 0.0
    mask = torch.ones(BATCH, AUDIO_SAMPLES, dtype=torch.long)
    mask[1, AUDIO_REAL:] = 0
    return {"input_values": audio, "attention_mask": mask}


WINDOW = 4  # Longformer's attention_window: 2 keys either side; 7 tokens are padded to 8 inside the model


def _global_mask():
    import torch

    mask = torch.zeros(BATCH, ENC, dtype=torch.long)
    mask[0, [0, 3]] = 1  # item 0: two global tokens, one inside the other's window
    mask[1, 0] = 1
    return mask


def _longformer():
    import transformers

    return transformers.LongformerModel(transformers.LongformerConfig(
        **TEXT, attention_window=WINDOW, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ))


def _longformer_inputs(model) -> dict[str, Any]:
    return {**_text_inputs(model), "global_attention_mask": _global_mask()}


def _led():
    import transformers

    return transformers.LEDModel(transformers.LEDConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS,
        encoder_attention_heads=ENC_HEADS, decoder_attention_heads=DEC_HEADS, encoder_ffn_dim=20, decoder_ffn_dim=20,
        max_encoder_position_embeddings=32, max_decoder_position_embeddings=32, attention_window=WINDOW,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    ))


def _led_inputs(model) -> dict[str, Any]:
    return {**_seq2seq_inputs(model), "global_attention_mask": _global_mask()}


def _banded_dense(module, hidden, real, glob, window):
    """One Longformer-style layer recomputed densely from its own projections: a token without global attention
    attends (softmax) to the real, non-global keys within ``window // 2`` of it and to every global token; a
    global token attends to every real key through the global projections. Padded rows are 0."""
    import torch

    b, n, _ = hidden.shape
    heads, size = module.num_heads, module.head_dim

    def split(x):
        return x.view(b, n, heads, size).transpose(1, 2)

    with torch.no_grad():
        local = split(module.query(hidden)) @ split(module.key(hidden)).transpose(-1, -2) / size ** 0.5
        glob_scores = split(module.query_global(hidden)) @ split(module.key_global(hidden)).transpose(-1, -2) / size ** 0.5
    near = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= window // 2
    keys_local = near[None] & (real & ~glob)[:, None, :] | glob[:, None, :]  # (b, query, key)
    dense = torch.softmax(local.masked_fill(~keys_local[:, None], float("-inf")), -1)
    dense_glob = torch.softmax(glob_scores.masked_fill(~real[:, None, None, :], float("-inf")), -1)
    dense = torch.where(glob[:, None, :, None], dense_glob, dense)
    return torch.where(real[:, None, :, None], dense, torch.zeros(()))


def _banded_layers(model, inputs, tower, encoder_inputs) -> list[Any]:
    """Every banded layer of ``tower`` recomputed by :func:`_banded_dense` from the hidden states it is given,
    over the model's own padding to a multiple of the window (cropped back to the input's tokens)."""
    import torch

    ids, mask, glob = encoder_inputs
    n = ids.shape[1]
    padded = -(-n // WINDOW) * WINDOW
    real = torch.zeros(ids.shape[0], padded, dtype=torch.bool)
    real[:, :n] = mask.bool()
    global_ = torch.zeros_like(real)
    global_[:, :n] = glob.bool() & mask.bool()
    layers, handles = [], []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        layers.append(_banded_dense(module, hidden, real, global_, WINDOW)[:, :, :n, :n])

    for module in tower.modules():
        if type(module).__name__.endswith("SelfAttention") and hasattr(module, "query_global"):
            handles.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return layers, out


def _longformer_reference(model, inputs) -> Reference:
    layers, _ = _banded_layers(model, inputs, model, (inputs["input_ids"], inputs["attention_mask"],
                                                      inputs["global_attention_mask"]))
    return [("tokens", None, a) for a in layers]


def _led_reference(model, inputs) -> Reference:
    encoder, out = _banded_layers(model, inputs, model.encoder, (inputs["input_ids"], inputs["attention_mask"],
                                                                 inputs["global_attention_mask"]))
    layers: Reference = [("encoder", None, a) for a in encoder]
    for self_attention, cross in zip(out.decoder_attentions, out.cross_attentions):
        layers += [("decoder", None, self_attention), ("decoder", "encoder", cross)]
    return layers


def _prophetnet():
    import transformers

    return transformers.ProphetNetModel(transformers.ProphetNetConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, encoder_ffn_dim=20, decoder_ffn_dim=20, num_encoder_layers=ENC_LAYERS,
        num_decoder_layers=DEC_LAYERS, num_encoder_attention_heads=ENC_HEADS, num_decoder_attention_heads=DEC_HEADS,
        ngram=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
    ))


def _prophetnet_inputs(model) -> dict[str, Any]:
    return {**_seq2seq_inputs(model), "use_cache": False}  # ProphetNet's own cache fails without generate()


def _prophetnet_reference(model, inputs) -> Reference:
    """ProphetNet returns its encoder's and its cross-attention's *scores* (masked, before the softmax): their
    softmax is what multiplies the values. Its decoder's main stream returns probabilities; the cross-attention's
    queries are the main stream's positions then each predict stream's: the first DEC rows are the main stream."""
    import torch

    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    layers: Reference = [("encoder", None, torch.softmax(a, -1)) for a in out.encoder_attentions]
    for self_attention, cross in zip(out.decoder_attentions, out.cross_attentions):
        layers += [("decoder", None, self_attention), ("decoder", "encoder", torch.softmax(cross, -1)[:, :, :DEC])]
    return layers


FAMILIES: tuple[Family, ...] = (
    Family("T5", "T5Model, T5ForConditionalGeneration", ("encoder", "decoder"), "declared outputs (index -1)",
           _seeded(_t5), _seq2seq_inputs, _seq2seq_reference),
    Family("BART", "BartModel, BartForConditionalGeneration", ("encoder", "decoder"), "declared outputs",
           _seeded(_bart_like("BartConfig", "BartModel", max_position_embeddings=32)), _seq2seq_inputs,
           _seq2seq_reference),
    Family("Marian", "MarianMTModel", ("encoder", "decoder"), "declared outputs",
           _seeded(_bart_like("MarianConfig", "MarianMTModel", max_position_embeddings=32)), _seq2seq_inputs,
           _seq2seq_reference),
    Family("Whisper", "WhisperModel, WhisperForConditionalGeneration", ("audio", "decoder"), "declared outputs",
           _seeded(_bart_like("WhisperConfig", "WhisperModel", num_mel_bins=8, max_source_positions=16,
                              max_target_positions=32)),
           _whisper_inputs, lambda m, i: _seq2seq_reference(m, i, encoder="audio")),
    Family("torch.nn.Transformer", "torch.nn.Transformer", ("encoder", "decoder"),
           "nn.MultiheadAttention hooks (adapter 'torch')", _seeded(_torch_transformer), _torch_transformer_inputs,
           _torch_transformer_reference),
    Family("CLIP", "CLIPModel", ("vision", "text"), "declared outputs; text marked causal", _seeded(_clip),
           _text_image_inputs, _clip_reference, note="two towers: pass stream='text' or 'vision'"),
    Family("BLIP", "BlipForConditionalGeneration", ("vision", "text"), "declared outputs (text decoder hooked)",
           _seeded(_blip), _text_image_inputs, _blip_reference),
    Family("LLaVA", "LlavaForConditionalGeneration", ("vision", "text"),
           "declared outputs; image tokens linked to vision patches at vision_feature_layer", _seeded(_llava),
           _llava_inputs, _llava_reference),
    Family("DeBERTa-v2", "DebertaV2Model", ("tokens",), "generic fallback (no declared outputs)",
           _seeded(_single("DebertaV2Config", "DebertaV2Model", vocab_size=VOCAB, hidden_size=HIDDEN,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=20,
                           max_position_embeddings=32)),
           _text_inputs, _output_reference),
    Family("MPNet", "MPNetModel (e.g. all-mpnet-base-v2)", ("tokens",), "generic fallback (no declared outputs)",
           _seeded(_single("MPNetConfig", "MPNetModel", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=20, max_position_embeddings=32)),
           _text_inputs, _output_reference),
    Family("Falcon", "FalconModel", ("tokens",), "generic fallback; eager forced through the config",
           _seeded(_single("FalconConfig", "FalconModel", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                           num_attention_heads=4, alibi=False, bos_token_id=0, eos_token_id=1)),
           _left_padded_text_inputs, _output_reference),
    Family("Bloom", "BloomModel", ("tokens",), "generic fallback (no declared outputs)",
           _seeded(_single("BloomConfig", "BloomModel", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4)),
           _left_padded_text_inputs, _output_reference),
    Family("timm ViT", "timm VisionTransformer (class and register tokens)", ("tokens",),
           "adapter 'timm': fused attention switched off while attached, probabilities taken at attn_drop",
           _seeded(_timm_vit), _pixel_inputs, _timm_reference),
    Family("Swin", "SwinModel", ("stage0", "stage1"),
           "windowed attention placed at global positions per stage; stages linked by patch merging (1/4 each)",
           _seeded(_swin), _swin_inputs, _swin_reference,
           note="every stage's patch grid must be a multiple of the window size"),
    Family("torch.compile", "torch.compile(BertModel)", ("tokens",),
           "the compiled module's original model is captured (run uncompiled, exact)", _seeded(_compiled_bert),
           _text_inputs, _bert_output_reference, plain=lambda model: model._orig_mod),
    # decoders (left-padded, grouped-query where the family has it)
    Family("Mistral", "MistralModel", ("tokens",), "declared outputs; grouped-query heads repeated",
           _seeded(_single("MistralConfig", "MistralModel", **DECODER, head_dim=6, sliding_window=4)),
           _left_padded_text_inputs, _output_reference, note="sliding window kept in the mask"),
    Family("Qwen3", "Qwen3Model", ("tokens",), "declared outputs",
           _seeded(_single("Qwen3Config", "Qwen3Model", **DECODER, head_dim=6)), _left_padded_text_inputs,
           _output_reference),
    Family("Phi3", "Phi3Model", ("tokens",), "declared outputs",
           _seeded(_single("Phi3Config", "Phi3Model", **DECODER)), _left_padded_text_inputs, _output_reference),
    Family("OPT", "OPTModel", ("tokens",), "declared outputs",
           _seeded(_single("OPTConfig", "OPTModel", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=ENC_LAYERS,
                           num_attention_heads=ENC_HEADS, ffn_dim=20, max_position_embeddings=32,
                           word_embed_proj_dim=HIDDEN, pad_token_id=0)),
           _left_padded_text_inputs, _output_reference),
    Family("GPT-J", "GPTJModel", ("tokens",), "declared outputs",
           _seeded(_single("GPTJConfig", "GPTJModel", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=ENC_LAYERS,
                           n_head=ENC_HEADS, n_inner=20, n_positions=32, rotary_dim=4, bos_token_id=0,
                           eos_token_id=1)),
           _left_padded_text_inputs, _output_reference),
    Family("GPT-Neo", "GPTNeoModel", ("tokens",), "declared outputs; local layers' window kept in the mask",
           _seeded(_single("GPTNeoConfig", "GPTNeoModel", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=ENC_LAYERS,
                           num_heads=ENC_HEADS, intermediate_size=20, max_position_embeddings=32,
                           attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=0,
                           eos_token_id=1)),
           _left_padded_text_inputs, _output_reference),
    Family("GPT-BigCode", "GPTBigCodeModel", ("tokens",), "declared outputs (multi-query)",
           _seeded(_single("GPTBigCodeConfig", "GPTBigCodeModel", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=ENC_LAYERS,
                           n_head=ENC_HEADS, n_inner=20, n_positions=32, multi_query=True, bos_token_id=0,
                           eos_token_id=1)),
           _left_padded_text_inputs, _output_reference),
    Family("Gemma3", "Gemma3TextModel", ("tokens",), "declared outputs; sliding and global layers",
           _seeded(_single("Gemma3TextConfig", "Gemma3TextModel", **DECODER, head_dim=6, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])),
           _left_padded_text_inputs, _output_reference),
    # encoders (right-padded)
    Family("ModernBERT", "ModernBertModel", ("tokens",), "declared outputs; local and global layers",
           _seeded(_single("ModernBertConfig", "ModernBertModel", vocab_size=VOCAB, hidden_size=HIDDEN,
                           num_hidden_layers=ENC_LAYERS, num_attention_heads=ENC_HEADS, intermediate_size=20,
                           max_position_embeddings=32, local_attention=4, global_attn_every_n_layers=2,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1, sep_token_id=1)),
           _text_inputs, _output_reference),
    Family("ELECTRA", "ElectraModel", ("tokens",), "declared outputs",
           _seeded(_single("ElectraConfig", "ElectraModel", **TEXT, embedding_size=12)), _text_inputs,
           _output_reference),
    Family("ALBERT", "AlbertModel", ("tokens",), "declared outputs (one shared layer, numbered per use)",
           _seeded(_single("AlbertConfig", "AlbertModel", **TEXT, embedding_size=12)), _text_inputs,
           _output_reference),
    Family("XLM-R", "XLMRobertaModel", ("tokens",), "declared outputs",
           _seeded(_single("XLMRobertaConfig", "XLMRobertaModel", **TEXT, pad_token_id=0)), _text_inputs,
           _output_reference),
    Family("DistilBERT", "DistilBertModel", ("tokens",), "declared outputs",
           _seeded(_single("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=HIDDEN, n_layers=ENC_LAYERS,
                           n_heads=ENC_HEADS, hidden_dim=20, max_position_embeddings=32)),
           _text_inputs, _output_reference),
    # encoder-decoders
    Family("Blenderbot", "BlenderbotModel", ("encoder", "decoder"), "declared outputs",
           _seeded(_bart_like("BlenderbotConfig", "BlenderbotModel", max_position_embeddings=32)), _seq2seq_inputs,
           _seq2seq_reference),
    Family("mT5", "MT5Model", ("encoder", "decoder"), "declared outputs (index -1)",
           _seeded(_single("MT5Config", "MT5Model", vocab_size=VOCAB, d_model=HIDDEN, d_kv=6, d_ff=20,
                           num_layers=ENC_LAYERS, num_decoder_layers=DEC_LAYERS, num_heads=ENC_HEADS,
                           decoder_start_token_id=0, pad_token_id=0)),
           _seq2seq_inputs, _seq2seq_reference),
    Family("BigBird-Pegasus", "BigBirdPegasusModel (attention_type='original_full')", ("encoder", "decoder"),
           "declared outputs", _seeded(_bart_like("BigBirdPegasusConfig", "BigBirdPegasusModel",
                                                  max_position_embeddings=32, attention_type="original_full")),
           _seq2seq_inputs, _seq2seq_reference, note="block_sparse is refused: load with attention_type='original_full'"),
    # vision
    Family("ViT-MAE", "ViTMAEModel", ("tokens",), "declared outputs (the kept patches, fixed by noise=)",
           _seeded(_vit_like("ViTMAEConfig", "ViTMAEModel")), _vit_mae_inputs, _vision_reference),
    Family("DINOv2", "Dinov2Model", ("tokens",), "declared outputs; CLS and patch grid",
           _seeded(_vit_like("Dinov2Config", "Dinov2Model")), _vision_inputs, _vision_reference),
    Family("BEiT", "BeitModel", ("tokens",), "declared outputs (relative position bias)",
           _seeded(_vit_like("BeitConfig", "BeitModel", use_relative_position_bias=True)), _vision_inputs,
           _vision_reference),
    Family("ViT+GPT-2", "VisionEncoderDecoderModel (ViT, GPT2LMHeadModel)", ("encoder", "decoder"),
           "declared outputs; cross-attention onto the image", _seeded(_vit_gpt2), _vit_gpt2_inputs,
           _seq2seq_reference),
    Family("DETR", "DetrModel (ResNet backbone)", ("encoder", "decoder"),
           "declared outputs; encoder over the feature map, decoder over the object queries",
           _seeded(_detr), _detr_inputs, _seq2seq_reference),
    # hybrids (state-space layers between attention layers)
    Family("Jamba", "JambaModel", ("tokens",), "declared outputs (attention layers only)",
           _seeded(_hybrid("JambaConfig", "JambaModel", num_hidden_layers=3, attn_layer_period=2, attn_layer_offset=1,
                           expert_layer_period=4, expert_layer_offset=3, num_experts=2)),
           _left_padded_text_inputs, _output_reference),
    Family("Zamba", "ZambaModel", ("tokens",), "declared outputs (the shared attention block, numbered per use)",
           _seeded(_hybrid("ZambaConfig", "ZambaModel", num_hidden_layers=5, attn_layer_period=2, attn_layer_offset=1,
                           attention_head_dim=12)),
           _left_padded_text_inputs, _output_reference),
    # audio: the padding mask is per sample, attention runs over frames
    Family("Wav2Vec2", "Wav2Vec2Model", ("tokens",),
           "declared outputs; the sample mask reduced to frames by the model's own conv lengths",
           _seeded(_single("Wav2Vec2Config", "Wav2Vec2Model", **AUDIO)), _audio_inputs, _output_reference),
    Family("HuBERT", "HubertModel", ("tokens",), "as Wav2Vec2",
           _seeded(_single("HubertConfig", "HubertModel", **AUDIO)), _audio_inputs, _output_reference),
    Family("WavLM", "WavLMModel", ("tokens",), "as Wav2Vec2 (gated relative position bias)",
           _seeded(_single("WavLMConfig", "WavLMModel", **AUDIO, num_buckets=8, max_bucket_distance=16)),
           _audio_inputs, _output_reference),
    Family("Data2VecAudio", "Data2VecAudioModel", ("tokens",), "as Wav2Vec2",
           _seeded(_single("Data2VecAudioConfig", "Data2VecAudioModel",
                           **{k: v for k, v in AUDIO.items() if k not in ("feat_extract_norm", "num_conv_pos_embeddings")},
                           num_conv_pos_embeddings=2, conv_pos_kernel_size=3)),
           _audio_inputs, _output_reference),
    # banded local attention
    Family("Longformer", "LongformerModel", ("tokens",),
           "sliding-window band and global tokens placed at their key positions (the model's padding to a window "
           "multiple cropped)", _seeded(_longformer), _longformer_inputs, _longformer_reference,
           note="compared with a dense recomputation from the layer's own projections"),
    Family("LED", "LEDModel", ("encoder", "decoder"),
           "encoder: Longformer's band and global tokens at their key positions; decoder: declared outputs",
           _seeded(_led), _led_inputs, _led_reference),
    Family("ProphetNet", "ProphetNetModel", ("encoder", "decoder"),
           "the decoder's main stream (n-gram predict streams left out: they never feed it); scores softmaxed",
           _seeded(_prophetnet), _prophetnet_inputs, _prophetnet_reference,
           note="call with use_cache=False outside generate() (ProphetNet's own cache fails otherwise)"),
)


#: Families attnflow refuses, each with the message a test pins (tests/test_refusals.py): (name, classes, why).
REFUSED: tuple[tuple[str, str, str], ...] = (
    ("BigBird, BigBird-Pegasus (block-sparse)", "BigBirdModel, BigBirdPegasusModel with attention_type='block_sparse'",
     "the dense weights transformers returns leave the random blocks' share out (rows sum to 0.8-1.0); the error "
     "says to load with attention_type=\"original_full\" (tests/test_banded.py)"),
)
#: Families not captured yet: (name, classes, why).
LEFT: tuple[tuple[str, str, str], ...] = (
    ("SegFormer", "SegformerModel (spatial-reduction attention)",
     "captured exactly (0.0 against eager): each block's patches over a stream of its pooled keys 'stage{i}.keys{j}', "
     "linked to the sr x sr patches they pool (1/sr² each), stages linked by the overlapping patch embedding's "
     "receptive field (equal weights); rollout and flow route through the pooled keys once attnflow's network "
     "feeds a stream that is only attended to through its link (tests/test_reduced.py, strict xfail until then)"),
    ("Qwen2-VL, Qwen2.5-VL", "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration",
     "the vision blocks return no weights even under eager: each cu_seqlens window's softmax is recorded and assembled "
     "into (images, heads, patches, patches) in row-major patch order (to 2e-6 against a recomputation from each "
     "block's inputs; Qwen2.5-VL's windows included), image tokens linked to the patch merger's m x m blocks, "
     "generate() stitched; one image per item, one image size per batch (tests/test_vision_language.py)"),
    ("PaliGemma, Idefics3, LLaVA-Next", "PaliGemmaForConditionalGeneration, Idefics3ForConditionalGeneration, "
     "LlavaNextForConditionalGeneration",
     "image-token links (issue 21, point 5); LLaVA-Next's anyres crops grouped into one vision item per image (each "
     "crop's block on the diagonal, equal to eager) and each image token linked to the crop patch pack_image_features "
     "puts there (newline tokens unlinked); LLaVA-OneVision's pooled anyres is refused with the reason "
     "(tests/test_vision_language.py)"),
    ("GPT-Neo under a static cache", "GPTNeoForCausalLM.generate(cache_implementation='static')",
     "refused before generate() runs (issue 21, point 6): tests/test_generation_safety.py"),
    ("TransformerLens, nnsight", "HookedTransformer, NNsight/LanguageModel",
     "their own adapters (issue 21, point 8): tests/test_interop.py"),
)


def table() -> str:
    """docs/families.md's tables of supported, refused and pending families, from :data:`FAMILIES`,
    :data:`REFUSED` and :data:`LEFT`."""
    rows = ["| family | classes tested | streams | how attnflow captures it |", "|---|---|---|---|"]
    for family in FAMILIES:
        how = family.how + (f"; {family.note}" if family.note else "")
        rows.append(f"| {family.name} | {family.classes} | {', '.join(family.streams)} | {how} |")
    for title, entries in (("Refused, with a message naming the cause and the fix", REFUSED),
                            ("Covered elsewhere (not in this matrix)", LEFT)):
        if entries:
            rows += ["", f"**{title}**", "", "| family | classes | why |", "|---|---|---|"]
            rows += [f"| {name} | {classes} | {why} |" for name, classes, why in entries]
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(table())
    else:
        print("usage: python tests/families.py --table", file=sys.stderr)
        sys.exit(2)
