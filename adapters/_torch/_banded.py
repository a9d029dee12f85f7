"""Banded local attention (Longformer, LED's encoder) placed at its key positions.

Private to attnflow.adapters; torch is passed in, never imported here. A Longformer-style self-attention module
(one with ``_sliding_chunks_query_key_matmul``) returns, with ``output_attentions=True``,

- ``attn_probs`` ``(batch, seq, heads, x + 2w + 1)``: for each query, its weights on the ``x`` global tokens of
  its item (in position order; slots past the item's own count are masked to 0), then on the keys
  ``i - w .. i + w`` of its window (global and padded keys are 0 there: they are attended through the global
  slots or not at all); rows of global queries are 0;
- ``global_attn_probs`` ``(batch, heads, x, seq)`` when any token is global: the global tokens' own rows over
  every key.

attnflow scatters both into one dense ``(batch, heads, n, n)`` map over the model's input positions (the model
pads its inputs to a multiple of the window; those positions are cropped away). Which tokens are global is read
from the weights themselves: a key that no query attends to is padding, a query whose window row is zero and
that is not padding is global; ``global_attn_probs`` must then have exactly one row per global token.
"""

from __future__ import annotations

from typing import Any

import attnflow


def is_banded(module: Any) -> bool:
    """A Longformer-style sliding-window self-attention module (Longformer, LED's encoder)."""
    return callable(getattr(module, "_sliding_chunks_query_key_matmul", None)) and hasattr(
        module, "one_sided_attn_window_size"
    )


def dense(path: str, module: Any, output: Any, length: int | None, torch: Any) -> Any:
    """The module's band (and global rows) as ``(batch, heads, n, n)`` over the first ``length`` positions
    (``None``: the positions that are not the model's own padding to a window multiple, found in the weights)."""
    if not isinstance(output, (tuple, list)) or len(output) < 2 or not isinstance(output[1], torch.Tensor):
        raise attnflow.HiddenAttentionError(
            f"{path} ({type(module).__name__}) returned no banded attention weights; it returns them only when "
            "asked for output_attentions, which attnflow does while attached: load the model with "
            "attn_implementation='eager'."
        )
    band = output[1].detach().float()  # (batch, seq, heads, x + 2w + 1)
    glob = output[2].detach().float() if len(output) > 2 and isinstance(output[2], torch.Tensor) else None
    batch, seq, heads, width = band.shape
    w = int(module.one_sided_attn_window_size)
    slots = width - (2 * w + 1)
    if slots < 0 or (slots > 0) != (glob is not None) or (glob is not None and glob.shape[2] != slots):
        raise attnflow.AdapterError(
            f"{path} ({type(module).__name__}) returned banded weights of shape {tuple(band.shape)} that do not "
            f"fit its window of {w} keys either side"
            + ("" if glob is None else f" and {tuple(glob.shape[2:3])} global rows")
            + "; attnflow cannot place them at their key positions."
        )
    out = band.new_zeros(batch, heads, seq, seq)
    offsets = torch.arange(-w, w + 1)
    keys = torch.arange(seq)[:, None] + offsets[None, :]  # (seq, 2w + 1)
    inside = (keys >= 0) & (keys < seq)
    local = band[..., slots:].permute(0, 2, 1, 3)  # (batch, heads, seq, 2w + 1)
    rows = torch.arange(seq)[:, None].expand(seq, 2 * w + 1)[inside]
    out[:, :, rows, keys[inside]] = local[:, :, inside]
    if glob is not None:
        used = (band[..., :slots] != 0).any(dim=1).any(dim=1)  # (batch, slots): slots some query attends through
        empty = local.sum(dim=(1, 3)) == 0  # (batch, seq): rows attending to nothing through the window
        for b in range(batch):
            count = int(used[b].sum())
            if not bool(used[b, :count].all()):
                raise attnflow.AdapterError(
                    f"{path}: item {b}'s global slots {used[b].tolist()} are not a prefix; attnflow cannot place "
                    "them at their key positions."
                )
            received = out[b].sum(dim=(0, 1)) + glob[b, :, :count].sum(dim=(0, 1))  # padding receives nothing
            positions = torch.nonzero(empty[b] & (received != 0)).flatten()
            if positions.numel() != count:
                raise attnflow.AdapterError(
                    f"{path}: item {b} attends through {count} global slots, but {positions.numel()} of its tokens "
                    "attend through no window; attnflow cannot tell which tokens are global. Give every item at "
                    "least one token without global attention."
                )
            for k, position in enumerate(positions.tolist()):
                out[b, :, :, position] += band[b, :, :, k].transpose(0, 1)  # the other queries' global slot k
                out[b, :, position, :] = glob[b, :, k, :]
    if length is None:
        padded = out.sum(dim=(1, 2)) == 0
        trailing = torch.nonzero(~padded.all(dim=0)).flatten()
        length = int(trailing[-1]) + 1 if trailing.numel() else seq
    return out[:, :, :length, :length]
