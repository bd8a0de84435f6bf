"""bench.py --compile: the decode loop's fast path. Static caches (the target's HF StaticCache and a
StaticDraftCache), draft and verify steps compiled over fixed shapes and replayed as CUDA graphs on GPU,
the target attention that reads each K/V head once (--gqa), with --attention flex (the default for
full-attention targets) FlexAttention masks that read only the filled part of the target's and the
drafter's caches, and with --freeze steps compiled with their weights as constants. The eager runner
in bench.py is the reference: every test of this path checks it emits the same tokens. regenerate.py's
batch decoder uses the same cache helpers.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, flex_attention
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

import model as M
import targets
from attention import BlockMask, attend, flex_kernel_options


# ----------------------------------------------------------------------------------------------
# The target's attention over a static cache

def set_cache_length(cache, length):
    """Rewind (or advance) an HF StaticCache to `length` committed tokens: the next forward writes its
    K/V there and masks by it. A tensor, so a compiled step that calls this is not recompiled."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.copy_(length)


class SharedLengthLayer(StaticLayer):
    """StaticRunner's cache layer: HF's StaticLayer, except that its write position is one tensor shared by
    every layer, which the runner sets before each step. HF's layer advances a counter of its own in every
    forward, one more kernel per layer and step in the compiled graphs (30 of the 467 in a SmolLM2 1-token
    step, one H200), for a position the runner rewinds before every step anyway."""

    def __init__(self, max_len, length):
        super().__init__(max_len)
        self.cumulative_length = length

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        at = self.cumulative_length + torch.arange(key_states.shape[-2], device=self.device)
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values


GQA_MAX_QUERIES = 64


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The target's attention as transformers' SDPA path computes it, but with K/V read once per KV
    head for short queries (decode, verify): transformers repeats K/V to every query head whenever a
    mask is passed, and over a static cache a mask is always passed (4x the K/V reads at Qwen3-8B
    shapes). With a mask, SDPA runs enable_gqa in its math kernel, which holds every score: fine for a
    few queries, not for a prefill, which keeps the repeat and the memory-efficient kernel."""
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    gqa = query.shape[1] != key.shape[1]
    if gqa and attention_mask is not None and query.shape[2] > GQA_MAX_QUERIES:
        rep = query.shape[1] // key.shape[1]
        key, value, gqa = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                         scale=scaling, is_causal=is_causal, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def flex_static(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """sdpa_gqa, except where the caller passes a BlockMask (StaticRunner's compiled steps pass
    causal_decode_mask): then FlexAttention, which skips the static buffer's unfilled tiles and
    reads each K/V head once. The prefill gets transformers' dense mask and takes the SDPA path."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_gqa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    split = attention_mask.kv_num_blocks.shape[0] > query.shape[0]
    out = (split_attend if split else attend)(query, key, value, attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# at most this many keys per chunk of the verify's attention (split_attend; 0: off). One H200, Qwen3-8B shapes,
# bf16, prompt 1024: a DFlash step of 1.26 / 1.29 baseline steps against 1.42 / 1.42 unsplit (interleaved runs);
# exact against greedy and SDPA compiled on that GPU (results/decode-qwen3-8b.md, session 17)
SPLIT_KEYS = 256


def verify_splits(kv_len, tile=128):
    """The fewest chunks of whole tiles, each of at most SPLIT_KEYS keys, that a kv_len buffer divides into."""
    tiles = kv_len // tile
    if not SPLIT_KEYS or kv_len % tile:
        return 1
    return next(s for s in range(-(-tiles // max(1, SPLIT_KEYS // tile)), tiles + 1) if tiles % s == 0)


def split_attend(query, key, value, mask, scale=None):
    """The verify's attention split over the keys (flash-decoding). FlexAttention's main kernel runs one
    program per query head and 128-query tile, so 16 queries over 1K keys leave 32 programs each walking
    every tile in turn (one H200, Qwen3-8B shapes: 29 us a layer, against 5.4 us for one query, whose decode
    kernel splits the keys; that kernel is not exact for 2-127 queries: flex_kernel_options). Chunk s of the
    buffer (a view) is batch row s of one call (causal_decode_mask with splits), and the chunks' outputs are
    merged by their log-sum-exps: out = sum_s softmax_s(lse_s) out_s; a chunk that no query sees has lse
    -inf, weight 0. query [1, Hq, Q, D], key/value [1, Hkv, KV, D]."""
    S = mask.kv_num_blocks.shape[0]
    ks, vs = (x[0].unflatten(1, (S, -1)).transpose(0, 1) for x in (key, value))  # [S, Hkv, KV / S, D]
    out, aux = flex_attention(query.expand(S, -1, -1, -1), ks, vs, block_mask=mask, scale=scale,
                              enable_gqa=query.shape[1] != key.shape[1], kernel_options=flex_kernel_options(query.shape[2]),
                              return_aux=AuxRequest(lse=True))
    w = torch.softmax(aux.lse.float(), 0).unsqueeze(-1)
    return (out.float() * w).sum(0, keepdim=True).to(query.dtype)


def use_gqa_attention(target, flex=False):
    """The target's attention reads each K/V head once: sdpa_gqa, or with flex flex_static (full-attention
    targets: the decode mask has no window)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    name, fn = ("flex_static", flex_static) if flex else ("sdpa_gqa", sdpa_gqa)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    target.set_attn_implementation(name)


def causal_decode_mask(start, q_len, kv_len, tile=128, splits=1, heads=1):
    """The target's causal mask over a static KV buffer of kv_len slots, for q_len queries at positions
    start.. (start: a device scalar, so one compiled graph serves every step): query i sees slots
    <= start + i. Tiles past the last query's position are left out of the BlockMask, so FlexAttention
    reads only the filled part of the buffer; SDPA with a dense mask reads all of it on every step.
    splits > 1: the buffer as that many chunks of whole tiles, chunk s in batch row s (split_attend), each row
    repeated for the query's heads."""
    chunk = kv_len // splits
    assert splits == 1 or chunk % tile == 0, (kv_len, splits)
    n = -(-chunk // tile)
    idx = torch.arange(n, dtype=torch.int32, device=start.device)
    first = torch.arange(splits, dtype=torch.int32, device=start.device) * n  # each chunk's first tile
    full = ((start + 1) // tile - first).clamp(0, n)  # tiles that every query sees whole
    last = ((start + q_len - 1) // tile + 1 - first).clamp(0, n)  # one past the last tile that any query sees
    # compiled FlexAttention (Triton) finds batch row z's tiles at (z * heads + h) * the head dim's stride; a
    # size-1 head dim's stride is free to inductor (here not a row's size), so with one head row every chunk read
    # chunk 0's tiles (one H200: errors up to 0.6 once chunk 0 held a whole tile). Dense rows, one per query head
    rows = lambda x: x.to(torch.int32).view(splits, 1, 1, -1).repeat(1, heads, 1, 1)
    return BlockMask.from_kv_blocks(rows(last - full)[..., 0], rows((idx + full[:, None]).clamp(max=n - 1)),
                                    rows(full)[..., 0], rows(idx.repeat(splits, 1)), BLOCK_SIZE=(128, tile),
                                    mask_mod=lambda b, h, q, kv: b * chunk + kv <= start + q, seq_lengths=(q_len, chunk))


def draft_decode_mask(start, block_size, buffer_len, tile=128):
    """The drafter's mask over its static buffer of buffer_len slots followed by the block's own
    block_size keys (StaticDraftCache.update writes them there): every query sees slots < start (a device
    scalar, as above) and the whole block. A dense mask made SDPA read the whole buffer on every step
    (one H200, Qwen3-8B shapes: ~33 us per draft layer, growing with the buffer); the BlockMask lists
    only the tiles holding a visible key: the context's whole tiles, its cut tile, the block's tiles."""
    n = -(-(buffer_len + block_size) // tile)
    idx = torch.arange(n, dtype=torch.int32, device=start.device)
    full, first, last = start // tile, buffer_len // tile, (buffer_len + block_size - 1) // tile
    cut = ((start % tile != 0) & (full < first)).to(torch.int32)  # a cut tile that is not the block's own
    partial = torch.where((idx == 0) & (cut == 1), full, first + idx - cut).clamp(max=n - 1)
    return BlockMask.from_kv_blocks((last - first + 1 + cut).view(1, 1, 1), partial.to(torch.int32).view(1, 1, 1, n),
                                    full.to(torch.int32).view(1, 1, 1), idx.view(1, 1, 1, n), BLOCK_SIZE=(128, tile),
                                    mask_mod=lambda b, h, q, kv: (kv < start) | (kv >= buffer_len),
                                    seq_lengths=(block_size, buffer_len + block_size))


# ----------------------------------------------------------------------------------------------
# Static caches, compiled draft and verify steps, replayed as CUDA graphs on GPU

class StaticDraftCache:
    """DraftCache with preallocated buffers: context K/V are written at self.pos (absolute positions);
    positions >= the anchor are hidden by the attention mask, and overwritten by the next step.
    A sliding layer keeps a ring of W + block slots instead (position t in slot t mod ring): the W - 1
    positions its next block can see survive the step's uncommitted writes, and it attends over the
    ring, not the whole buffer. The block's own K/V go to block_size slots after the context's, so a
    step attends over the buffer as it is (a cat of [buffer; block] copied the whole buffer per layer)."""

    def __init__(self, cfg, size, device, dtype, block_size=None):
        block = block_size or cfg.block_size
        self.ring = min(size, cfg.sliding_window + block) if cfg.sliding_window else size
        sizes = [(self.ring if t == "sliding_attention" else size) + block for t in cfg.layer_types]
        shape = lambda n: (1, cfg.num_key_value_heads, n, cfg.head_dim)
        self.k = [torch.zeros(shape(n), device=device, dtype=dtype) for n in sizes]
        self.v = [torch.zeros(shape(n), device=device, dtype=dtype) for n in sizes]
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)
        self.size, self.block, self.pos = size, block, None
        self.tail = torch.arange(block, device=device)

    def _rows(self, k, v, window):
        if window:  # the ring: the newest rows only (a prompt may be longer than the ring)
            return k[:, :, -self.ring:], v[:, :, -self.ring:], self.pos[-self.ring:] % self.ring
        return k, v, self.pos

    def write(self, i, k, v, window=None):
        """Context K/V alone at self.pos (write_context: a prompt's, outside the compiled step)."""
        k, v, pos = self._rows(k, v, window)
        self.k[i].index_copy_(2, pos, k.to(self.k[i].dtype))
        self.v[i].index_copy_(2, pos, v.to(self.v[i].dtype))

    def update(self, i, k, v, k_blk, v_blk, window=None):
        k, v, pos = self._rows(k, v, window)
        # one index_copy_ per buffer: with a second write (the block's slice) inductor no longer updated the
        # buffer in place but copied all of it, per layer and step
        slots = torch.cat([pos, self.k[i].shape[2] - self.block + self.tail])
        for buf, new, blk in ((self.k[i], k, k_blk), (self.v[i], v, v_blk)):
            buf.index_copy_(2, slots, torch.cat([new, blk], 2).to(buf.dtype))
        return self.k[i], self.v[i]

    def sliding_mask(self, start, block_size, window):
        """[1, 1, T, ring + T]: ring slot r holds the newest position p < start with p = r mod ring; slot k
        of the block at `start` sees those in [start + k - W + 1, start) and block slots <= k."""
        r = torch.arange(self.ring, device=self.k[0].device)
        held = start - 1 - (start - 1 - r) % self.ring
        k = torch.arange(block_size, device=r.device)[:, None]
        ctx = (held >= 0) & (held > start + k - window)
        return torch.cat([ctx, k >= torch.arange(block_size, device=r.device)], -1)[None, None]


@torch.no_grad()
def write_context(drafter, cache, features, positions, seq_len):
    """The draft K/V of context rows (features [S, n*H] at positions [S]) written into a StaticDraftCache
    without a draft: what a draft step computes for its new context rows (fc, hidden_norm, then per layer
    the k/v projection, k_norm and RoPE), which never depend on the block. seq_len: the longest position +
    1 of the draft that would have taken these rows (dynamic and longrope RoPE read it, the others ignore it)."""
    context = drafter.project_context(features[None])
    rope = M.rope_cos_sin(positions[None], *targets.rope_frequencies(drafter.config, seq_len, positions.device))
    cache.pos = positions
    for i, layer in enumerate(drafter.layers):
        cache.write(i, *layer.self_attn.project_kv(context, *rope), layer.self_attn.window)


def frozen(step):
    """A compiled step that compiles (and recompiles) with inductor's freezing on."""
    def call(*args):
        with torch._inductor.config.patch({"freezing": True, "cpp.enable_concat_linear": True}):
            return step(*args)
    return call


class CUDAGraphStep:
    """A compiled step over fixed shapes, captured once as a CUDA graph and then replayed: a call
    copies its tensor arguments into the captured input buffers and launches the graph, with no
    Python, guard checks or allocator work per step (torch.compile's reduce-overhead mode does those on
    every call: one H200, Qwen3-8B shapes, the baseline step went from 7.83 to 7.00 ms).
    Sound here because a step is idempotent (it rewrites the same cache slots for the same inputs) and
    its shapes never change. Outputs live in the graph's memory: the caller clones them."""

    def __init__(self, fn):
        self.fn, self.graph = fn, None

    def __call__(self, *args):
        if self.graph is None:
            self.inputs = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and autotune outside the capture
                for _ in range(2):
                    self.fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn(*self.inputs)
        for buf, a in zip(self.inputs, args):
            buf.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.outputs


class StaticRunner:
    """EagerRunner's interface over static caches: the target's HF StaticCache (rewound by setting its
    write position, never cropped: positions past the query are causally masked and overwritten) and a
    StaticDraftCache. draft and verify have fixed shapes ([B] tokens; the new draft context is always
    the B verify rows, of which the uncommitted ones are masked), so torch.compile builds one graph of
    each, captured as a CUDA graph on GPU (CUDAGraphStep). The only host sync is the acceptance read.
    Prefill runs eagerly, then commit writes the prompt's draft K/V but its last B rows (write_context),
    so the first draft is the compiled step too (an eager draft is launch-bound on a GPU, and it was the
    first step of every generation). Reuse one runner per block size."""

    def __init__(self, target, drafter, block_size, max_len, compile=True, flex=False, freeze=False, splits=None,
                 tune=False):
        from transformers import StaticCache
        targets.check_rollback(target.config, static=True)
        kinds = set(targets.layer_kinds(target.config))
        if flex is None:  # auto (bench.py's default): flex wherever it applies
            flex = kinds == {"full_attention"}
        if flex and kinds - {"full_attention"}:  # the decode mask is plain causal: a window would be ignored
            raise ValueError(f"--attention flex runs full-attention targets only; this one has {'/'.join(sorted(kinds))} "
                             "layers: use --attention sdpa (or auto)")
        if flex:
            use_gqa_attention(target, flex=True)
        self.target, self.drafter, self.block_size, self.max_len, self.flex = target, drafter, block_size, max_len, flex
        self.device = target.get_input_embeddings().weight.device
        if splits is None:  # a block's verify splits its keys (split_attend) on a GPU: inductor has no LSE output on
            # CPU, and one query's FlexAttention decode kernel splits the keys itself
            splits = verify_splits(max_len) if flex and compile and self.device.type == "cuda" and block_size > 1 else 1
        self.splits, self.heads = splits, target.config.get_text_config().num_attention_heads if splits > 1 else 1
        self.kv, self.cache_kw = StaticCache(config=target.config, max_cache_len=max_len), targets.cache_kwarg(target)
        # every K/V layer full-length, sliding ones too: HF's sliding static layer is a ring buffer whose fill
        # level is a host int that cannot be rewound (silently wrong tokens once past the window); a full-length
        # layer rewinds like the others and the model's sliding mask still limits what each query sees. Costs a
        # full layer's K/V memory per sliding layer. Layers without K/V of their own (DummyLayer) stay.
        self.kv_length = torch.zeros((), dtype=torch.long, device=self.device)
        self.kv.layers = [SharedLengthLayer(max_len, self.kv_length) if type(layer) in (StaticLayer, StaticSlidingWindowLayer)
                          else layer for layer in self.kv.layers]
        self.layer_ids = list(drafter.config.target_layer_ids) if block_size > 1 else []
        self.captured, self.handles = {}, []
        for k in self.layer_ids:  # hooks live as long as the runner: a compiled graph traces them once
            self.handles.append(targets.decoder_layers(target)[k].register_forward_hook(self._hook(k)))
        if block_size > 1:
            self.draft_kv = StaticDraftCache(drafter.config, max_len + block_size, self.device,
                                             drafter.fc.weight.dtype, block_size)
        self.offsets = torch.arange(max(block_size, 1), device=self.device)
        self._verify, self._draft = self._verify_impl, self._draft_impl
        if compile:
            # freeze: the weights become constants of the compiled graph, so inductor concatenates the gate/up
            # and the q/k/v projections into one GEMM each (a folded copy of those weights per compiled step; torch
            # 2.11 concatenates equal shapes only, so not a GQA layer's q/k/v): at M = 1 cuBLAS reads a small k or v
            # projection at a third of the card's bandwidth (decode-qwen3-8b.md)
            # tune: inductor's coordinate-descent tuning, under which a GPU step's 1-row matmuls become tuned Triton
            # reductions (torch/_inductor/decomposition.py, mm) in place of cuBLAS GEMVs: Qwen3-8B shapes, the
            # 1-token step 7.51 -> 6.77 ms on an H100, 5.54 ms on an H200 (6.02 with freeze), compiling it ~3.5 min
            # longer; a 16-row step has none of them. With freeze too it was slower (H200: 8.53 ms)
            options = {"coordinate_descent_tuning": True} if tune else None
            self._verify = torch.compile(self._verify_impl, fullgraph=True, dynamic=False, options=options)
            self._draft = torch.compile(self._draft_impl, fullgraph=True, dynamic=False, options=options)
            if freeze:  # set while compiling (torch.compile's options= does not reach freezing)
                self._verify, self._draft = frozen(self._verify), frozen(self._draft)
            if self.device.type == "cuda":
                self._verify, self._draft = CUDAGraphStep(self._verify), CUDAGraphStep(self._draft)
        self.ctx = self.length = None
        self.pos_host = torch.zeros(2, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.pos = torch.zeros(2, dtype=torch.long, device=self.device)

    def _hook(self, k):
        def hook(module, args, output):
            self.captured[k] = output[0] if isinstance(output, tuple) else output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _features(self):
        if not self.layer_ids:
            return None
        return torch.cat([self.captured.pop(k) for k in self.layer_ids], -1)[0]

    def prefill(self, input_ids):
        P = input_ids.shape[1]
        if P + 1 + 2 * self.block_size > self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit the static cache of {self.max_len}: raise --max-len")
        self.kv_length.zero_()
        out = self.target(input_ids=input_ids, position_ids=torch.arange(P, device=self.device)[None],
                          use_cache=True, logits_to_keep=1, **{self.cache_kw: self.kv})
        return out.logits[0], self._features()

    def _verify_impl(self, block, start):
        self.kv_length.copy_(start)
        positions = (start + self.offsets[: block.shape[0]])[None]
        # flex: a BlockMask over the filled part of the buffer (flex_static); else transformers' dense mask
        mask = {"attention_mask": causal_decode_mask(start, block.shape[0], self.max_len, splits=self.splits,
                                                      heads=self.heads)} if self.flex else {}
        out = self.target(input_ids=block[None], position_ids=positions, use_cache=True, **{self.cache_kw: self.kv}, **mask)
        return out.logits[0], self._features()

    def verify(self, block, start):
        if start + self.block_size >= self.max_len:
            raise ValueError(f"generation reached the static cache length {self.max_len}: raise --max-len")
        assert start == self.length, (start, self.length)
        logits, feats = self._verify(block, self.pos[0])
        return logits.clone(), None if feats is None else feats.clone()

    def _draft_impl(self, anchor, start, feats, ctx_start):
        cfg, B = self.drafter.config, self.block_size
        ctx_pos = (ctx_start + torch.arange(feats.shape[0], device=feats.device))[None]
        self.draft_kv.pos = ctx_pos[0]
        # the buffer holds stale positions too: mask to the committed context (and the block itself);
        # flex: a BlockMask over the filled tiles only, as the verify's
        if self.flex:
            mask = draft_decode_mask(start, B, self.draft_kv.size)
        else:
            visible = torch.arange(self.draft_kv.size, device=anchor.device) < start
            mask = torch.cat([visible, visible.new_ones(B)])[None, None, None].expand(1, 1, B, -1)
        if cfg.sliding_window is not None:  # one mask per layer type
            mask = {"full_attention": mask,
                    "sliding_attention": self.draft_kv.sliding_mask(start, B, cfg.sliding_window)}
        block = M.block_ids(anchor, B, cfg.mask_token_id)
        return M.draft_block(self.drafter, self.target, feats[None], ctx_pos, block, start, self.draft_kv, mask)[0, 1:]

    def draft(self, anchor, start):
        if self.block_size == 1:
            return torch.empty(0, 1, device=anchor.device)
        assert start == self.length, (start, self.length)
        fn = self._draft if self.ctx.shape[0] == self.block_size else self._draft_impl  # a prompt under B: eager
        return fn(anchor, self.pos[0], self.ctx, self.pos[1]).clone()

    def commit(self, length, feats, n_new):
        """Nothing to cut: the next verify rewinds the target cache to `length`. Positions travel as one
        asynchronous copy from pinned memory. A prompt (more than B new rows): all but its last B rows go
        to the draft cache now, the last B are the first draft's new context, as in any later step."""
        if feats is not None and n_new > self.block_size:
            head = n_new - self.block_size
            write_context(self.drafter, self.draft_kv, feats[:head],
                          length - n_new + torch.arange(head, device=feats.device),
                          torch.tensor(length + self.block_size, device=feats.device))
            feats, n_new = feats[head:], self.block_size
        self.length, self.ctx = length, feats  # all B verify rows: fixed shape; the mask hides the rest
        self.pos_host[0], self.pos_host[1] = length, length - n_new
        self.pos.copy_(self.pos_host, non_blocking=True)  # the last copy finished before the step's sync


@torch.no_grad()
def forward_error(run, input_ids):
    """The runner's steps against the target's own forward on one prompt: prefill all but the last
    block_size tokens, verify those as one block, and compare the block's logits with one forward over
    the whole prompt. Returns max |difference| / max |logit|. bench.py's lossless line compares the
    runner's two block sizes with each other, so a fast path wrong the same way in both passes it."""
    B, P = run.block_size, input_ids.shape[1]
    _, feats = run.prefill(input_ids[:, :P - B])
    run.commit(P - B, feats, P - B)
    logits, _ = run.verify(input_ids[0, P - B:], P - B)
    ref = run.target(input_ids).logits[0, P - B:].float()
    return ((logits.float() - ref).abs().max() / ref.abs().max()).item()
