"""The test suite: `python -m pytest -q test_all.py`. CPU, fp32, small random models built here."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from attention import build_mask, dense_mask, flex_attention


def tiny_target(family="qwen3", layers=6, vocab=64, hidden=32, tie=True, seed=0):
    from transformers import AutoConfig
    cfg = dict(model_type=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
               max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(seed)
    return M.load_target(cfg, dtype=torch.float32)


def tiny_drafter(target, layers=2, block_size=4, layer_ids=(1, 3), mask_token_id=None, seed=1):
    cfg = M.config_from_target(target.config, num_hidden_layers=layers, block_size=block_size,
                               target_layer_ids=list(layer_ids),
                               mask_token_id=target.config.vocab_size - 1 if mask_token_id is None else mask_token_id)
    torch.manual_seed(seed)
    return M.build_drafter(cfg)


# ------------------------------------------------------------------------------------------------
# attention.py: the block mask

def loop_mask(anchors, keep, S, bs):
    """The rule written out pair by pair, independently of the mask_mod."""
    B, N = anchors.shape
    out = torch.zeros(B, 1, N * bs, S + N * bs, dtype=torch.bool)
    for b in range(B):
        for j in range(N):
            if not keep[b, j]:
                continue
            for qi in range(j * bs, (j + 1) * bs):
                for t in range(int(anchors[b, j])):
                    out[b, 0, qi, t] = True
                out[b, 0, qi, S + j * bs: S + (j + 1) * bs] = True
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


def test_flex_block_mask_matches_dense_reference():
    """The BlockMask (Q_LEN = 24 padded to 128 inside flex) attends exactly like the loop mask."""
    anchors, keep, S, bs = mask_case()
    B, N = anchors.shape
    Q, KV = N * bs, S + N * bs
    torch.manual_seed(0)
    q, k, v = torch.randn(B, 2, Q, 8), torch.randn(B, 2, KV, 8), torch.randn(B, 2, KV, 8)
    out = flex_attention(q, k, v, block_mask=build_mask(anchors, keep, S, bs, use_flex=True))
    ref_mask = loop_mask(anchors, keep, S, bs)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.softmax(scores.masked_fill(~ref_mask, -math.inf), -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[0, :, 5 * bs:].abs().max() == 0  # a dropped slot sees nothing


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
    other = tiny_target(hidden=48)
    d = tiny_drafter(other)
    with pytest.raises(ValueError, match="hidden_size"):
        M.check_fits_target(d.config, t)
    with pytest.raises(ValueError, match="num_anchors"):
        M.sample_anchors(torch.ones(1, 8), 0)


# ------------------------------------------------------------------------------------------------
# model.py: target capture

@pytest.mark.parametrize("family,tie", [("qwen3", True), ("llama", False)])
def test_hook_capture_equals_output_hidden_states(family, tie):
    t = tiny_target(family, layers=6, tie=tie)
    ids = torch.randint(0, 64, (2, 11))
    layer_ids = [0, 2, 4]
    ref = t(ids, output_hidden_states=True).hidden_states
    want = torch.cat([ref[k + 1] for k in layer_ids], -1)
    hooks_before = [dict(layer._forward_hooks) for layer in M.decoder_layers(t)]
    for stop_early in (True, False):
        feats, _ = M.capture_features(t, ids, layer_ids, stop_early=stop_early)
        torch.testing.assert_close(feats, want)
    # transformers may keep its own output-recording hooks; ours must all be gone
    assert [dict(layer._forward_hooks) for layer in M.decoder_layers(t)] == hooks_before


# ------------------------------------------------------------------------------------------------
# model.py: the drafter against references

def reference_block_forward(sd, cfg, embeds, ctx_feats, start):
    """One block, no mask, written from the SPEC with raw tensors: fc -> hidden_norm context; per layer
    q = rope(q_norm(q_proj x)), k = rope(k_norm(k_proj [ctx; x])), v = v_proj [ctx; x]; softmax over all."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    D, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    ctx = rms(ctx_feats @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    S, T = ctx.shape[0], embeds.shape[0]
    pos = torch.cat([torch.arange(S), torch.arange(start, start + T)]).double()
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2).double() / D)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()

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


def test_drafter_matches_raw_tensor_reference():
    t = tiny_target()
    d = tiny_drafter(t, block_size=5)
    with torch.no_grad():
        for p in d.parameters():  # non-trivial norm weights, so a skipped norm shows
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    feats = torch.randn(1, 9, 2 * 32)
    embeds = torch.randn(1, 5, 32)
    out = d(embeds, feats, torch.arange(9, 14)[None], torch.arange(9)[None])
    ref = reference_block_forward(d.state_dict(), d.config, embeds[0], feats[0], 9)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


def test_batched_training_forward_equals_per_block_dense():
    """The one test that proves mask, positions and KV injection agree: every kept block of the
    packed training forward equals that block run alone over exactly the context it may see."""
    t = tiny_target()
    d = tiny_drafter(t, block_size=4)
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
    out = d(embeds, feats, pos, ctx_pos, build_mask(anchors, keep, S, bs, use_flex=False))
    for b in range(B):
        for j in range(N):
            if not keep[b, j]:
                continue
            a = int(anchors[b, j])
            sl = slice(j * bs, (j + 1) * bs)
            ref = d(embeds[b:b + 1, sl], feats[b:b + 1, :a], pos[b:b + 1, sl], ctx_pos[b:b + 1, :a])
            torch.testing.assert_close(out[b:b + 1, sl], ref, atol=1e-5, rtol=1e-5)


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


def test_loss_hand_worked_case():
    """Zero every drafter matrix: each block slot's hidden state is then norm(embedding of its input
    token), so the logits are known by hand and the weighted CE can be computed independently."""
    t = tiny_target(vocab=16, hidden=8)
    d = tiny_drafter(t, layers=1, block_size=4, layer_ids=(1,), mask_token_id=15)
    with torch.no_grad():
        for p in d.parameters():
            p.zero_() if p.dim() == 2 else p.fill_(1.0)
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


def test_loss_weights_and_gradients():
    t = tiny_target()
    d = tiny_drafter(t, block_size=4)
    ids = torch.randint(0, 63, (2, 32))
    loss_sum, w_sum, stats = M.dflash_loss(d, t, ids, torch.ones(2, 32), num_anchors=6,
                                           generator=torch.Generator().manual_seed(0), ce_chunk_tokens=7)
    # every label in range counts with weight exp(-(k-1)/gamma); chunking must not change the sum
    w = torch.exp(-torch.arange(3) / M.default_gamma(4))
    assert w_sum.item() == pytest.approx((stats["count_per_slot"] * w).sum().item())
    (loss_sum / w_sum).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())


def test_expected_acceptance_length():
    acc, tau = M.acceptance_metrics(torch.tensor([8.0, 4.0, 0.0]), torch.tensor([10.0, 8.0, 5.0]))
    assert acc.tolist() == pytest.approx([0.8, 0.5, 0.0])
    assert tau == pytest.approx(1 + 0.8 + 0.8 * 0.5)
