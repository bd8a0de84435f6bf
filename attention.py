"""The DFlash attention mask, as one mask_mod, and the two ways to run it.

Training packs every block of a sequence into one query stream and one key/value stream:

    queries  Q = [block_0 | block_1 | ... | block_{N-1}]           (N * block_size tokens)
    keys/values  = [context (S tokens) | block_0 | ... | block_{N-1}]

A query in block j (anchored at position a_j) may see
  * context tokens at positions < a_j  (STRICTLY before the anchor: at inference the anchor is the
    newest committed token, and its target hidden state does not exist yet when the block is drafted)
  * every token of its own block, in both directions (the block is denoised in one pass)
and nothing else: never another block (anchors may overlap), and a dropped slot (keep=False) sees
nothing at all.

A sliding-window layer (window W) narrows both parts, as the serving engines run it: the query at
position p = a_j + k sees context positions in [p - W + 1, a_j) (the query itself counts in the window)
and, inside its own block, only slots <= k (causal). A drafter with both layer types gets one mask per
type, each built once per batch.

On GPU the mask becomes a FlexAttention BlockMask, built once per batch with H=None (one mask for
all heads; per-head masks run out of memory at long context). FlexAttention has no backward on the
CPU, so CPU training (tests, CI, the quickstart) materialises the same mask_mod as a dense boolean
mask for SDPA.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def dflash_mask_mod(anchors, keep, context_len, block_size, window=None):
    """mask_mod(b, h, q_idx, kv_idx) -> bool for anchors [B, N] and keep [B, N]; window: a sliding layer's W."""
    num_blocks = anchors.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        q_block = q_idx // block_size
        # Q_LEN is padded up to a multiple of 128 inside FlexAttention: rows past the last block
        # must not index anchors out of range, and see nothing.
        real_q = q_block < num_blocks
        q_block = torch.where(real_q, q_block, 0)
        anchor = anchors[b, q_block]
        is_context = kv_idx < context_len
        sees_context = is_context & (kv_idx < anchor)
        kv_block = (kv_idx - context_len) // block_size
        sees_own_block = ~is_context & (kv_block == q_block)
        if window is not None:  # sliding layer: positions > p - W only, causal inside the block
            slot = q_idx % block_size
            sees_context = sees_context & (kv_idx > anchor + slot - window)
            sees_own_block = sees_own_block & (kv_idx - context_len <= q_idx)
        return real_q & keep[b, q_block] & (sees_context | sees_own_block)

    return mask_mod


def dense_mask(anchors, keep, context_len, block_size, window=None):
    """The same mask_mod evaluated on every (q, kv) pair: bool [B, 1, Q, S + Q]."""
    B, N = anchors.shape
    q_len = N * block_size
    b = torch.arange(B, device=anchors.device)[:, None, None]
    q = torch.arange(q_len, device=anchors.device)[None, :, None]
    kv = torch.arange(context_len + q_len, device=anchors.device)[None, None, :]
    return dflash_mask_mod(anchors, keep, context_len, block_size, window)(b, None, q, kv)[:, None]


def block_tile_counts(anchors, keep, context_len, block_size, tile=128, window=None):
    """How many (query, key) pairs each [tile x tile] tile of the mask allows: int [B, Q/tile, KV/tile]
    (both lengths padded up to the tile; padding allows nothing). A query row allows two intervals,
    [0, anchor) of the context and its own block ([p - W + 1, anchor) and its block up to itself in a
    sliding layer), so a tile's count is a sum of interval overlaps:
    B x Q x KV/tile numbers instead of create_block_mask's B x Q x KV mask evaluations."""
    B, N = anchors.shape
    dev, Q = anchors.device, N * block_size
    QT, KT = -(-Q // tile), -(-(context_len + Q) // tile)
    kv0 = torch.arange(KT, device=dev) * tile                                  # tile starts [KT]
    overlap = lambda lo, hi: (torch.minimum(hi[..., None], kv0 + tile) - torch.maximum(lo[..., None], kv0)).clamp(min=0)
    row_anchor = anchors.repeat_interleave(block_size, 1)                      # [B, Q]
    own = context_len + torch.arange(Q, device=dev) // block_size * block_size  # [Q] own block start
    ctx_lo, own_hi = torch.zeros_like(row_anchor), own + block_size
    if window is not None:  # overlap() clamps an empty interval (lo > hi) to zero
        slot = torch.arange(Q, device=dev) % block_size
        ctx_lo, own_hi = row_anchor + slot - window + 1, own + slot + 1
    rows = overlap(ctx_lo, row_anchor) + overlap(own, own_hi)  # [B, Q, KT]
    rows = rows * keep.repeat_interleave(block_size, 1)[..., None]             # a dropped slot sees nothing
    rows = F.pad(rows, (0, 0, 0, QT * tile - Q))
    return rows.view(B, QT, tile, KT).sum(2)


def build_mask(anchors, keep, context_len, block_size, use_flex, window=None):
    """Once per batch: a BlockMask for flex_attention, or a dense bool mask for SDPA. The BlockMask's
    tile lists come from block_tile_counts (empty / partial / full tiles), not from evaluating the
    mask_mod everywhere: eager create_block_mask materialises B x Q x KV index tensors (GBs per
    batch at 3K context) and compiling it cost minutes of warm-up on the GPU."""
    if not use_flex:
        return dense_mask(anchors, keep, context_len, block_size, window)
    tile = 128
    counts = block_tile_counts(anchors, keep, context_len, block_size, tile, window)
    partial, full = (counts > 0) & (counts < tile * tile), counts == tile * tile
    lists = lambda m: (m.sum(-1, dtype=torch.int32)[:, None],                # [B, 1, QT]: one mask for all heads
                       torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None])  # listed first
    q_len = anchors.shape[1] * block_size
    return BlockMask.from_kv_blocks(*lists(partial), *lists(full), BLOCK_SIZE=tile,
                                    mask_mod=dflash_mask_mod(anchors, keep, context_len, block_size, window),
                                    seq_lengths=(q_len, context_len + q_len))


_compiled_flex = None


def flex_kernel_options(q_len):
    """1 < q_len < 128 (a verified or drafted block): FlexAttention's main kernel. Its decode kernel, which
    CUDA picks below 128 queries, gave wrong outputs for q_len > 1 inside a compiled decode step (torch 2.11,
    H200: results/decode-qwen3-8b.md); for one query it was exact."""
    return {"FORCE_USE_FLEX_ATTENTION": True} if 1 < q_len < 128 else None


def attend(q, k, v, mask, scale=None):
    """q [B, Hq, Q, D], k/v [B, Hkv, KV, D]; mask: BlockMask, dense bool [B, 1, Q, KV] or None; scale: the
    score scale (default 1 / sqrt(D))."""
    global _compiled_flex
    if isinstance(mask, BlockMask):
        if _compiled_flex is None:  # compile once; uncompiled flex_attention is a slow reference
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                              kernel_options=flex_kernel_options(q.shape[2]))
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    # SDPA gives NaN for a row with no visible key (dropped slots), and NaN would leak into the
    # gradients of k and v. Let such rows see everything, then zero their output: their upstream
    # gradient is then exactly zero, which is what flex_attention does for fully masked rows.
    visible = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~visible, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~visible, 0.0)
