"""The DFlash drafter (plain PyTorch), hook-based capture of the frozen HF target's layers, and the
training objective. Every DFlash rule lives in this file and in attention.py (the mask); loading the
target and what differs between target families (RoPE variants, layer kinds) is in targets.py.

A DFlash drafter is a few Qwen3-style decoder layers that fill a whole block of `block_size` tokens in
ONE forward pass. Its input is the block [anchor token, MASK, MASK, ...] embedded with the target's
own (frozen) embedding; its conditioning is the "context": hidden states of a few target layers at
every committed position, fused by `hidden_norm(fc(cat(features)))`. In every draft layer the
queries come from the block, and keys/values from [context; block] through the same projections
("KV injection"). Its logits come from the target's frozen lm_head. It owns no embedding and no
lm_head, so its state_dict is exactly the serving format (fc, hidden_norm, norm, layers.*).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from attention import attend, build_mask, dense_mask
from targets import decoder_layers, rope_config, rope_frequencies, rope_mismatch, rope_problem, text_field


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class DFlashConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    num_target_layers: int
    target_layer_ids: list
    mask_token_id: int
    num_hidden_layers: int = 5
    block_size: int = 16
    rope_scaling: dict = None  # {"rope_type": ..., its parameters}; None = plain RoPE (rope_config)
    layer_types: list = None      # per draft layer: full_attention | sliding_attention (None: all full)
    sliding_window: int = None    # W of the sliding layers (None when no layer slides)

    def __post_init__(self):
        # engines refuse a float or bool mask id; a float layer id fails only later, in capture (bool is an int)
        ids = self.target_layer_ids
        values = {"mask_token_id": [self.mask_token_id], "block_size": [self.block_size],
                  "num_hidden_layers": [self.num_hidden_layers],
                  "target_layer_ids": ids if isinstance(ids, (list, tuple)) else [None]}  # not a list: refused
        bad = [f"{k}={getattr(self, k)!r}" for k, vs in values.items() if any(type(v) is not int for v in vs)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be integers (target_layer_ids a list of them), written "
                             "without a decimal point, quotes or true/false")
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size}: a block needs the anchor plus at least "
                             "one token to draft; use block_size >= 2 (16 is the paper's)")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers}: the drafter needs >= 1 layer")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids is empty: capture at least one target layer")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise ValueError(f"target_layer_ids {bad} are outside the target's layers "
                             f"0..{self.num_target_layers - 1}; leave target_layer_ids empty for the published spacing, "
                             "or list 0-based layer ids below the target's layer count")
        if list(self.target_layer_ids) != sorted(set(self.target_layer_ids)):  # engines capture in layer order
            raise ValueError(f"target_layer_ids {self.target_layer_ids} must be distinct and ascending: engines feed "
                             "fc the captured layers in layer order")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the target's "
                             f"{self.vocab_size} embedding rows; set mask_token_id to a row below that which real "
                             "text never uses (README: choosing mask_token_id)")
        problem = rope_problem(self.rope_scaling, self.head_dim)
        if problem:
            raise ValueError(problem)
        self.layer_types = list(self.layer_types or ["full_attention"] * self.num_hidden_layers)
        problem = layout_problem(self.layer_types, self.sliding_window, self.num_hidden_layers, self.block_size)
        if problem:
            raise ValueError(problem)

    @property
    def num_features(self):
        return len(self.target_layer_ids)


# ----------------------------------------------------------------------------------------------
# The drafter

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, inv_freq, scaling=1.0):
    """Absolute RoPE: positions [B, T] -> cos, sin [B, 1, T, head_dim] in fp32."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)[:, None]
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@functools.lru_cache(maxsize=64)
def window_mask(context_len, block_len, window, device):
    """A sliding layer's mask for one block whose context ends just before its anchor (inference, or a
    reference run): the sliding rule for anchor = context length. Memoised: built per layer and step it
    was ~45 small ops per sliding layer, a third more launches per eager draft step with four of them;
    once the cache holds its W - 1 positions every step asks for the same one. Callers never write to it."""
    anchor = torch.tensor([[context_len]], device=device)
    return dense_mask(anchor, torch.ones(1, 1, dtype=torch.bool, device=device), context_len, block_len, window)


class Attention(nn.Module):
    def __init__(self, cfg, layer_type="full_attention"):
        super().__init__()
        self.window = cfg.sliding_window if layer_type == "sliding_attention" else None
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project_kv(self, x, cos, sin):
        """K/V of a token stream (context or block) with the SAME projections: k_norm, then RoPE."""
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, context, rope_block, rope_context, mask, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, *rope_block)
        k_ctx, v_ctx = self.project_kv(context, *rope_context)
        k_blk, v_blk = self.project_kv(x, *rope_block)
        if cache is not None:  # inference: earlier committed context is already projected
            k, v = cache.update(layer_idx, k_ctx, v_ctx, k_blk, v_blk, self.window)
        else:
            k, v = torch.cat([k_ctx, k_blk], 2), torch.cat([v_ctx, v_blk], 2)
        if mask is None and self.window:
            mask = window_mask(k.shape[2] - T, T, self.window, x.device)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_type="full_attention"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_type)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, context, rope_block, rope_context, mask, cache=None, layer_idx=0):
        # the context is already normalised by hidden_norm: it skips input_layernorm
        x = x + self.self_attn(self.input_layernorm(x), context, rope_block, rope_context, mask,
                               cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.config = cfg
        H = cfg.hidden_size
        self.fc = nn.Linear(cfg.num_features * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    def project_context(self, features):
        """The captured target layers [.., n*H] -> the context every draft layer projects its K/V from."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def forward(self, block_embeds, features, block_positions, context_positions, mask=None, cache=None):
        """block_embeds [B, T, H] (target-embedded block tokens), features [B, S, n*H] (captured
        target layers of the context), positions [B, T] and [B, S] (absolute). mask: None (one block
        per row after all of its context), one mask for every layer, or a dict {layer type: mask}.
        Returns the final normed hidden states [B, T, H]; the target lm_head turns them into logits."""
        cfg = self.config
        context = self.project_context(features)
        x = block_embeds.to(context.dtype)
        seq_len = None
        if (cfg.rope_scaling or {}).get("rope_type") in ("dynamic", "longrope"):
            seq_len = torch.cat([block_positions.flatten(), context_positions.flatten()]).max() + 1
        rope = rope_frequencies(cfg, seq_len, block_positions.device)
        rope_block = rope_cos_sin(block_positions, *rope)
        rope_context = rope_cos_sin(context_positions, *rope)
        for i, layer in enumerate(self.layers):
            layer_mask = mask[cfg.layer_types[i]] if isinstance(mask, dict) else mask
            x = layer(x, context, rope_block, rope_context, layer_mask, cache, i)
        return self.norm(x)


class DraftCache:
    """K/V of the committed context, per draft layer. Block K/V is never stored: the next block is
    drafted at new positions, so the cache only ever holds committed positions. A sliding layer keeps
    only the last W - 1 of them: the most its next block's first slot can see."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, i, k, v, k_blk, v_blk, window=None):
        """Append the newly committed context's K/V to layer i; return what the block attends to:
        [held context; block]."""
        if i in self.k:
            k, v = torch.cat([self.k[i], k], 2), torch.cat([self.v[i], v], 2)
        if window:
            k, v = k[:, :, -(window - 1):], v[:, :, -(window - 1):]
        self.k[i], self.v[i] = k, v
        return torch.cat([k, k_blk], 2), torch.cat([v, v_blk], 2)


# ----------------------------------------------------------------------------------------------
# Fitting a drafter to its target: layer layout, captured layers, dimensions

LAYER_TYPES = ("full_attention", "sliding_attention")


def layout_problem(layer_types, window, num_layers, block_size):
    """What is wrong with a layer layout (one line naming the fix), or None."""
    unknown = [t for t in layer_types if t not in LAYER_TYPES]
    if unknown:
        return f"layer_types has unknown type(s) {unknown}; use {' or '.join(LAYER_TYPES)}"
    if len(layer_types) != num_layers:
        return (f"layer_types has {len(layer_types)} entries for {num_layers} draft layers; "
                "give one type per layer")
    sliding = "sliding_attention" in layer_types
    if sliding and not window:
        return "layer_types has sliding_attention layers but no sliding_window: set sliding_window (e.g. 2048)"
    if not sliding and window:
        return (f"sliding_window={window} but no layer is sliding_attention: add one to layer_types "
                "or drop sliding_window")
    if sliding and window < block_size:
        return (f"sliding_window={window} is smaller than block_size={block_size}: a block must fit in "
                "the window; use sliding_window >= block_size")
    return None


def build_target_layer_ids(num_target_layers, num_features):
    """The published spacing: spread n captured layers from layer 1 to layer L-3."""
    L, n = num_target_layers, num_features
    if n < 1:
        raise ValueError(f"num_features={n}: capture at least one target layer")
    ids = [L // 2] if n == 1 else [int(round(1 + i * (L - 4) / (n - 1))) for i in range(n)]
    if any(not 0 <= i < L for i in ids) or len(set(ids)) != n:
        raise ValueError(f"cannot place {n} captured layers in a {L}-layer target (got {ids}); "
                         "use fewer features or list target_layer_ids explicitly")
    return ids


def config_from_target(target_config, num_hidden_layers=5, block_size=16, target_layer_ids=None,
                       num_features=5, mask_token_id=None, layer_types=None, sliding_window=None):
    """Drafter dimensions are the target's; only depth, block size, layer ids and mask id are ours."""
    tc = getattr(target_config, "text_config", None) or target_config
    f = functools.partial(text_field, tc)  # a missing field is a ValueError naming it
    L = f("num_hidden_layers")
    theta, scaling = rope_config(tc)
    if mask_token_id is None:
        raise ValueError("mask_token_id is not set: choose an embedding row that real text never uses, e.g. "
                         "a reserved special token of the target (README: choosing mask_token_id)")
    return DFlashConfig(
        hidden_size=f("hidden_size"), num_attention_heads=f("num_attention_heads"),
        num_key_value_heads=f("num_key_value_heads", False) or f("num_attention_heads"),
        head_dim=f("head_dim", False) or f("hidden_size") // f("num_attention_heads"),
        intermediate_size=f("intermediate_size"), rms_norm_eps=f("rms_norm_eps"),
        rope_theta=theta, rope_scaling=scaling, vocab_size=f("vocab_size"),
        max_position_embeddings=f("max_position_embeddings"), num_target_layers=L,
        target_layer_ids=list(target_layer_ids or build_target_layer_ids(L, num_features)),
        mask_token_id=int(mask_token_id), num_hidden_layers=num_hidden_layers, block_size=block_size,
        layer_types=layer_types, sliding_window=sliding_window)


def check_fits_target(cfg, target):
    """A drafter trained for one target is useless on another: fail before any forward."""
    tc = getattr(target.config, "text_config", None) or target.config
    rows = target.get_input_embeddings().weight.shape[0]
    if cfg.hidden_size != tc.hidden_size:
        raise ValueError(f"drafter hidden_size={cfg.hidden_size} != target hidden_size="
                         f"{tc.hidden_size}: this drafter was built for another target")
    if cfg.num_target_layers != tc.num_hidden_layers:
        raise ValueError(f"drafter num_target_layers={cfg.num_target_layers} != target's "
                         f"{tc.num_hidden_layers} layers: this drafter was built for another target")
    if cfg.vocab_size != tc.vocab_size:  # its predictions go through this target's lm_head
        raise ValueError(f"drafter vocab_size={cfg.vocab_size} != target vocab_size={tc.vocab_size}: "
                         "this drafter was built for another target (another tokenizer)")
    if not 0 <= cfg.mask_token_id < rows:
        raise ValueError(f"mask_token_id={cfg.mask_token_id} is outside the target's {rows} "
                         "embedding rows")
    problem = rope_mismatch(cfg, tc)
    if problem:
        raise ValueError(problem)


# The drafter's input and output go through the target's own embedding and head, with whatever the
# target's forward applies around them, as the serving engines do for the drafter:
# - embedding scale (Gemma 2/3/4: sqrt(hidden_size)): transformers applies it inside the embedding
#   module (Gemma3TextScaledWordEmbedding), so calling the module is the whole transform;
# - tied weights: get_output_embeddings() is the embedding matrix itself, unscaled, as the target uses it;
# - final logit soft-capping (Gemma 2/4, Gemma 3 where set): cap * tanh(logits / cap) after the head.
#   tanh is monotonic, so drafted tokens (argmax) are the same with or without it; it changes the
#   distribution, so the training CE and sampling at temperature > 0 use the capped logits.

def embed_tokens(target, ids):
    """Token ids embedded as the target embeds its own input (embedding scale included)."""
    return target.get_input_embeddings()(ids)


def logit_softcap(target):
    """The target's final_logit_softcapping, or None."""
    return getattr(target.config.get_text_config(), "final_logit_softcapping", None)


def softcap(logits, cap):
    return logits if cap is None else torch.tanh(logits / cap) * cap


def target_logits(target, hidden):
    """Logits of hidden states [..., H] as the target computes its own: its lm_head, then soft-capping."""
    return softcap(target.get_output_embeddings()(hidden.to(target.dtype)), logit_softcap(target))


def block_ids(anchor, block_size, mask_token_id):
    """[1, block_size] = [anchor, MASK x (block_size - 1)]: what the drafter fills at inference."""
    return torch.cat([anchor.view(1), anchor.new_full((block_size - 1,), mask_token_id)])[None]


@torch.no_grad()
def draft_block(drafter, target, new_features, context_positions, block_ids, start, cache, mask=None):
    """Inference step: append the newly committed context to the draft cache and fill one block.
    block_ids [B, T] = [last committed token, MASK...] at positions start..start+T-1 (start: an int or a
    device scalar). mask: None (the cache holds exactly the visible context) or what a static cache
    needs (see fast_decode.StaticRunner). Returns the drafter's logits [B, T, V] (slot 0, the anchor, unused)."""
    T = block_ids.shape[1]
    positions = (start + torch.arange(T, device=block_ids.device))[None].expand(block_ids.shape[0], -1)
    embeds = embed_tokens(target, block_ids)
    hidden = drafter(embeds, new_features, positions, context_positions, mask=mask, cache=cache)
    return target_logits(target, hidden)


# ----------------------------------------------------------------------------------------------
# The target's features: forward hooks on the captured layers of the unmodified HF model

class _StopForward(Exception):
    pass


def capture_features(target, input_ids, layer_ids, stop_early=True, **forward_kwargs):
    """One target forward with hooks on `layer_ids`: returns (cat of their outputs [B, S, n*H], the
    forward's output or None). A hook on layer k sees the residual stream after layer k, i.e. HF's
    output_hidden_states[k + 1]. With stop_early the forward is abandoned after the last captured
    layer (training never needs the layers above it, nor the logits)."""
    captured = {}
    layers = decoder_layers(target)
    last = max(layer_ids)

    def hook_for(k):
        def hook(module, args, output):
            captured[k] = output[0] if isinstance(output, tuple) else output
            if stop_early and k == last:
                raise _StopForward
        return hook

    handles = [layers[k].register_forward_hook(hook_for(k)) for k in layer_ids]
    out = None
    try:
        if stop_early:
            try:
                target.get_decoder()(input_ids=input_ids, use_cache=False, **forward_kwargs)
            except _StopForward:
                pass
        else:
            out = target(input_ids=input_ids, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    features = torch.cat([captured.pop(k) for k in layer_ids], -1)
    return features, out


# ----------------------------------------------------------------------------------------------
# Training objective

def default_gamma(block_size):
    """Loss decay over block slots from the paper: 7 for block 16, 5 for 10, 4 for 8."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, block_size * 7.0 / 16)


def sample_anchors(loss_mask, num_anchors, generator=None):
    # generator: None, one torch.Generator, or a list of CPU generators, one per row
    """Up to num_anchors anchor positions per row, without replacement, sorted; always exactly
    num_anchors slots (static shapes), with keep=False on unused slots.
    An anchor is a position p with loss_mask[p] and loss_mask[p + 1]: the anchor is a committed
    response token (as at inference, where it is the target's own token) and the block has at
    least one supervised label. Labels that run past the sequence are masked, not avoided."""
    if num_anchors < 1:
        raise ValueError(f"num_anchors={num_anchors}: sample at least one anchor per sequence")
    B, S = loss_mask.shape
    valid = torch.zeros_like(loss_mask, dtype=torch.bool)
    valid[:, :-1] = (loss_mask[:, :-1] > 0) & (loss_mask[:, 1:] > 0)
    if isinstance(generator, (list, tuple)):
        # one CPU generator per row: a row's anchors then do not depend on which batch it is in, or
        # on how far that batch was padded (a CPU stream's first S values do not depend on S)
        scores = torch.stack([torch.rand(S, generator=g) for g in generator]).to(loss_mask.device)
    else:
        scores = torch.rand(B, S, generator=generator, device=loss_mask.device)
    scores = torch.where(valid, scores, -1.0)
    k = min(num_anchors, S)
    top, idx = scores.topk(k, dim=1)
    kept = top >= 0
    order = torch.where(kept, idx, idx + S).argsort(1)  # kept slots first, by position
    anchors, keep = idx.gather(1, order), kept.gather(1, order)
    if k < num_anchors:
        pad = num_anchors - k
        anchors = torch.cat([anchors, anchors.new_zeros(B, pad)], 1)
        keep = torch.cat([keep, keep.new_zeros(B, pad)], 1)
    return torch.where(keep, anchors, 0), keep


def _ce_chunk(hidden, lm_weight, labels, cap=None):
    """One chunk of query tokens: per-token CE of the target's logits softcap(lm_head(hidden)) (fp32
    softmax), top-1 hits, and d CE / d hidden = ((softmax - onehot) * d capped / d logits) @ lm_head,
    the gradient going back through lm_head in lm_head's dtype as autograd would send it."""
    logits = F.linear(hidden, lm_weight).float()
    if cap is not None:  # the target's soft-capping, as softcap() writes it
        tanh = torch.tanh(logits / cap)
        logits = tanh * cap
    y = labels.clamp(min=0)  # ignored slots (-100) get weight 0: any label will do
    hit = logits.argmax(-1) == labels
    lse = logits.logsumexp(-1)
    ce = lse - logits.gather(-1, y[:, None]).squeeze(-1)
    g = logits.sub_(lse[:, None]).exp_()
    g[torch.arange(len(y), device=y.device), y] -= 1
    if cap is not None:  # d(cap * tanh(l / cap)) / dl
        g.mul_(1 - tanh.square_())
    return ce, hit, g.to(lm_weight.dtype) @ lm_weight


class LMHeadCE(torch.autograd.Function):
    """Per-token CE of the frozen lm_head over hidden [T, H], chunk by chunk. The gradient w.r.t.
    hidden is computed in the forward, while each chunk's [chunk, vocab] logits exist anyway: backward
    neither keeps nor recomputes logits (a checkpointed chunk would run the lm_head matmul a third
    time); it scales the saved [T, H] gradient by dLoss/dCE. lm_head gets no gradient (frozen)."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, labels, chunk_tokens, chunk_fn, cap=None):
        ces, hits, grads = [], [], []
        for h, y in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens)):
            with record_function("dflash: lm_head + CE"):
                ce, hit, g = chunk_fn(h.to(lm_weight.dtype), lm_weight, y, cap)
            ces.append(ce)
            hits.append(hit)
            grads.append(g)
        hit = torch.cat(hits)
        ctx.save_for_backward(torch.cat(grads))
        ctx.mark_non_differentiable(hit)
        ctx.hidden_dtype = hidden.dtype
        return torch.cat(ces), hit

    @staticmethod
    def backward(ctx, grad_ce, grad_hit):
        (g,) = ctx.saved_tensors
        return (grad_ce[:, None] * g).to(ctx.hidden_dtype), None, None, None, None, None


_ce_chunk_compiled = None


def dpace_weights(p, valid, alpha=0.5):
    """D-PACE (arXiv 2605.18810) slot weights over the last dim: with s_i = (1 - alpha) p_i + alpha,
    w_k = sum over valid j >= k of prod_{i <= j} s_i. Invalid slots are 1 in the products, absent from
    the sums (and get weight 0). p: the drafter's probability of each label, detached by the caller."""
    s = torch.where(valid, (1 - alpha) * p + alpha, torch.ones_like(p))
    reach = torch.cumprod(s, -1) * valid                      # prod_{i <= j} s_i at valid j, else 0
    return reach.flip(-1).cumsum(-1).flip(-1) * valid         # suffix sums over j >= k


def dflash_loss(drafter, target, input_ids, loss_mask, num_anchors, gamma=None, use_flex=False,
                generator=None, features=None, ce_chunk_tokens=4096, compile_ce=False,
                loss="dflash", dpace_alpha=0.5):
    """The training forward for a batch. Returns (weighted CE sum, weight sum, stats): the caller
    divides by the weight sum of the WHOLE optimizer step (all micro-batches, all ranks).
    loss="dflash": slot k weighted exp(-(k-1)/gamma); "dpace": weighted by dpace_weights."""
    cfg = drafter.config
    bs, B, S = cfg.block_size, *input_ids.shape
    gamma = gamma or default_gamma(bs)
    if features is None:
        with torch.no_grad(), record_function("dflash: target forward"):
            features, _ = capture_features(target, input_ids, cfg.target_layer_ids)
    anchors, keep = sample_anchors(loss_mask, num_anchors, generator)
    N = anchors.shape[1]
    offsets = torch.arange(bs, device=input_ids.device)
    positions = anchors[:, :, None] + offsets                                      # [B, N, bs]

    # block input: [token at the anchor, MASK, ..., MASK], embedded by the frozen target
    block_ids = torch.full((B, N, bs), cfg.mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    block_ids[:, :, 0] = input_ids.gather(1, anchors)
    with torch.no_grad():
        embeds = embed_tokens(target, block_ids.view(B, N * bs))

    with record_function("dflash: block mask"):
        # one mask per layer type in the drafter, built once per batch
        mask = {t: build_mask(anchors, keep, S, bs, use_flex, cfg.sliding_window if t == "sliding_attention" else None)
                for t in dict.fromkeys(cfg.layer_types)}
    context_positions = torch.arange(S, device=input_ids.device)[None].expand(B, -1)
    with record_function("dflash: drafter"):
        hidden = drafter(embeds, features, positions.view(B, N * bs), context_positions, mask)

    # SAME-position labels: slot k of the block anchored at a predicts token[a + k], k >= 1
    label_pos = positions[:, :, 1:]
    in_range = label_pos < S
    label_pos = label_pos.clamp(max=S - 1)
    labels = input_ids.gather(1, label_pos.view(B, -1)).view(B, N, bs - 1)
    valid = in_range & keep[:, :, None] & (loss_mask.gather(1, label_pos.view(B, -1)).view(B, N, bs - 1) > 0)
    labels = torch.where(valid, labels, -100)

    # lm_head (+ the target's soft-capping) + CE in chunks of query tokens, with the gradient formed in
    # the forward (LMHeadCE): fp32 logits for the whole vocab never exist for all N * (bs - 1) tokens
    h = hidden.view(B, N, bs, -1)[:, :, 1:].reshape(-1, cfg.hidden_size)
    lm_weight = target.get_output_embeddings().weight
    global _ce_chunk_compiled
    if compile_ce and _ce_chunk_compiled is None:  # one fused kernel chain instead of fp32 logits in memory
        _ce_chunk_compiled = torch.compile(_ce_chunk, dynamic=False)
    ce, hit = LMHeadCE.apply(h, lm_weight.detach(), labels.reshape(-1), ce_chunk_tokens,
                             _ce_chunk_compiled if compile_ce else _ce_chunk, logit_softcap(target))
    ce, hit = ce.view(B, N, bs - 1), hit.view(B, N, bs - 1)
    if loss == "dpace":
        # normalised like the decay weights, by the step's sum of these weights (the caller's weight
        # sum): the loss stays a weighted mean CE, so its gradient scale does not grow ~10x as the
        # drafter improves (w_1 goes from ~1 at p = 0 to bs - 1 at p = 1), which would act as a
        # hidden learning-rate schedule; the weights are detached, so this adds no gradient term
        weights = dpace_weights(torch.exp(-ce.detach()), valid, dpace_alpha)
    else:
        slot_weight = torch.exp(-(offsets[1:].float() - 1) / gamma)              # [bs - 1]
        weights = valid.float() * slot_weight

    loss_sum = (ce * weights).sum()
    stats = {  # sums, so the caller can add them over micro-batches and ranks
        "correct_per_slot": (hit & valid).sum((0, 1)).float().detach(),
        "count_per_slot": valid.sum((0, 1)).float(),
        "ce_sum": (ce * valid).sum().detach(),
        "anchors": keep.sum().float(),
    }
    return loss_sum, weights.sum(), stats


def acceptance_metrics(correct_per_slot, count_per_slot):
    """Per-slot accuracy and the expected acceptance length 1 + sum_k prod_{i<=k} acc_i (the +1 is
    the target's own bonus token). High accuracy with a low expected length = a wrong block tail."""
    acc = correct_per_slot / count_per_slot.clamp(min=1)
    return acc, 1.0 + torch.cumprod(acc, 0).sum().item()


def build_drafter(cfg, device="cpu", dtype=torch.float32):
    drafter = DFlashDrafter(cfg).to(device=device, dtype=dtype)
    init_weights(drafter)
    return drafter


def init_weights(drafter, std=0.02):
    for p in drafter.parameters():  # the only 1-D parameters are RMSNorm weights
        nn.init.ones_(p) if p.dim() == 1 else nn.init.normal_(p, std=std)
