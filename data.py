"""
Data for DFlash drafters: read chat data, tokenize it with the target's chat template and a loss
mask on the assistant tokens, batch it deterministically (seeded, resumable, sharded over ranks),
and regenerate the assistant turns with the target itself (the largest lever on acceptance), in
process or through a serving engine.

    python data.py regenerate --target DIR --data IN --out OUT [--max-new-tokens 512] ...
    python data.py regenerate --target DIR --server http://host:8000 --concurrency 256 ...  # vLLM / SGLang

Runs on the GPU machines too, which have no `datasets` and no network: `datasets` is imported only
where an HF dataset name is read. The offline default assets come from recipes/fetch.py.
"""
import argparse
import collections
import contextlib
import glob
import json
import multiprocessing as mp
import os
import threading
import time

import torch

import model as M

REPO = os.path.dirname(os.path.abspath(__file__))
PROMPT_SETS = ("mt-bench", "humaneval", "math500", "aime", "alpaca", "sharegpt")

# -----------------------------------------------------------------------------
# reading conversations

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRow(ValueError):
    """A row we skip; the message is the reason that gets counted."""


def _default_assets():
    return os.environ.get("DFLASH_ASSETS") or os.path.join(REPO, "assets")


def assets_dir():
    return _default_assets()


def _json_array_records(text):
    # decode record by record so a truncated array (ShareGPT's is) still yields every whole record
    dec, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            row, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            yield None  # the truncated tail counts as one malformed record
            return
        yield row


def read_rows(source, split="train"):
    """Yield (index, row) for every row of a JSONL/JSON file (a glob of them), a dataset saved with
    save_to_disk, or a hub dataset name; row is None where the line is not valid JSON."""
    files = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if all(os.path.isfile(f) for f in files) and files:
        i = 0
        for f in files:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
            if text.lstrip().startswith("["):
                rows = _json_array_records(text)
            else:
                # split on "\n" only: str.splitlines also breaks at U+2028 and friends inside strings
                rows = (_loads(line) for line in text.split("\n") if line.strip())
            for row in rows:
                yield i, row
                i += 1
        return
    import datasets  # only here: the GPU machines do not have it
    ds = datasets.load_from_disk(source) if os.path.isdir(source) else datasets.load_dataset(source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i, row


def _loads(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def parse_messages(row, need_assistant=True):
    """Normalize one row to [{"role", "content"}]; raise BadRow(reason) if it cannot be used.
    Accepts `messages` (role/content), ShareGPT `conversations` (from/value), and prompt-only rows
    (`turns` or `prompt`) which become user messages."""
    if row is None:
        raise BadRow("malformed json")
    if not isinstance(row, dict):
        raise BadRow("row not an object")
    turns = row.get("messages", row.get("conversations"))
    if turns is None and "turns" in row:
        turns = [{"role": "user", "content": t} for t in (row["turns"] if isinstance(row["turns"], list) else [None])]
    elif turns is None and "prompt" in row:
        turns = [{"role": "user", "content": row["prompt"]}]
    if turns is None:
        raise BadRow("no messages key")
    if not isinstance(turns, list):
        raise BadRow("messages not a list")
    if not turns:
        raise BadRow("empty conversation")
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            raise BadRow("message not an object")
        role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise BadRow("unknown role")
        if not isinstance(content, str):
            raise BadRow("non-string content")
        m = {"role": ROLES[role.lower()], "content": content}
        if isinstance(t.get("token_ids"), list):
            m["token_ids"] = t["token_ids"]
        msgs.append(m)
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise BadRow("no assistant turn")
    if not need_assistant and not any(m["role"] == "user" for m in msgs):
        raise BadRow("no user turn")
    return msgs


def load_conversations(source, split="train"):
    convs, skipped = [], collections.Counter()
    for _, row in read_rows(source, split):
        try:
            convs.append(parse_messages(row))
        except BadRow as e:
            skipped[str(e)] += 1
    return convs, skipped


# -----------------------------------------------------------------------------
# tokenization with a loss mask on the assistant tokens

def render_chat(tokenizer, messages, enable_thinking, add_generation_prompt=False, tokenize=True):
    """The target's own chat template -> token ids (or text); enable_thinking only where given."""
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    out = tokenizer.apply_chat_template(msgs, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kw)
    if not tokenize:
        return out
    if hasattr(out, "keys"):  # some versions return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _end_ids(tokenizer):
    # the end-of-turn token closing an assistant turn is one of the special added tokens
    # (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>, ...), never plain text
    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _common_prefix(a, b):
    # bisect on slice equality: C-speed compares instead of a Python loop over 100K-char chats
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def tokenize_conversation(tokenizer, messages, max_length, enable_thinking=None, supervise=None):
    """(input_ids, loss_mask) of the whole conversation rendered by the target's chat template;
    loss_mask is 1 on each assistant turn's content and its end-of-turn token, 0 elsewhere.

    Where the template put assistant turn i's content is found on the rendered TEXT: render it as
    is and with that content emptied; the characters between the common prefix and the common
    suffix are the content as the template emitted it. Tokens overlapping those characters are
    supervised. Unlike rendering growing prefixes this also works for templates that rewrite
    earlier turns (Qwen3 drops the <think> of past turns), and working on characters avoids
    tokens that merge differently at the edge of an empty content. Assistant messages carrying
    `token_ids` (written by `regenerate`) get those exact ids in place of the re-tokenized text, and
    where the template renders the turn as the generation prompt followed by that text, the span is
    all of it (with thinking on, the <think> the target wrote too). `supervise`: the indices of the
    messages to supervise (default: every assistant turn)."""
    text = render_chat(tokenizer, messages, enable_thinking, tokenize=False)
    # long chats: tokenize only a head of the text that surely holds max_length tokens; the 64
    # spare tokens keep the cut (which can change the last word's tokens) past what we keep
    enc = None
    if len(text) > 8 * max_length:
        enc = tokenizer(text[:8 * max_length], add_special_tokens=False, return_offsets_mapping=True)
    if enc is None or len(enc["input_ids"]) < max_length + 64:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    full, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    ends = _end_ids(tokenizer)
    pieces, pos, k = [], 0, 0  # pieces: (ids, supervised)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["content"] or (supervise is not None and i not in supervise):
            continue
        if k >= max_length:
            break  # later turns are truncated away anyway
        prompt = render_chat(tokenizer, messages[:i], enable_thinking, True, tokenize=False) if "token_ids" in m else None
        if prompt is not None and text.startswith(prompt + m["content"]):  # exactly what the target generated
            cs, ce = len(prompt), len(prompt) + len(m["content"])
        else:
            other = render_chat(tokenizer, messages[:i] + [{"role": "assistant", "content": ""}] + messages[i + 1:], enable_thinking, tokenize=False)
            cs = _common_prefix(text, other)
            ce = cs + len(text) - len(other)  # the content emitted verbatim, the usual case
            if text[ce:] != other[cs:]:  # it was split up (Qwen3: <think> reasoning, template text, answer)
                ce = len(text) - _common_prefix(text[cs:][::-1], other[cs:][::-1])
        if ce <= cs:
            continue  # the template dropped this content (e.g. a past turn that was only <think>)
        if cs < pos:
            raise BadRow("template not diff-stable")
        k0 = k
        while k0 < len(full) and offsets[k0][1] <= cs:
            k0 += 1
        k1 = k0
        while k1 < len(full) and offsets[k1][0] < ce:
            k1 += 1
        span = full[k0:k1]
        gen = m.get("token_ids")
        # use the generated ids only where the tokens cover the content exactly, so no template
        # character is lost
        if gen is not None and k0 < k1 and offsets[k0][0] == cs and offsets[k1 - 1][1] == ce:
            span = list(gen[:-1] if gen and gen[-1] in ends else gen)
        if k1 < len(full) and full[k1] in ends:
            span = span + [full[k1]]
            k1 += 1
        pieces += [(full[k:k0], 0), (span, 1)]
        k, pos = k1, ce
    if not pieces:
        raise BadRow("no assistant content")
    pieces.append((full[k:], 0))
    ids = [t for p, _ in pieces for t in p]
    mask = [s for p, s in pieces for _ in p]
    return ids[:max_length], mask[:max_length]


def conversation_rows(tokenizer, messages, max_length, enable_thinking=None):
    """The (input_ids, loss_mask) rows of one conversation: one per assistant turn that the template
    renders differently once the conversation goes on (Qwen3 drops past reasoning, and with thinking
    off the empty think block the target answered after): that row is the conversation up to the
    turn as the template rendered it when the target wrote the turn, supervising the turn and the
    earlier ones not yet in a row. A template that renders every turn the same way later (most)
    gives one row. A row whose turns are all past max_length ends the conversation's rows."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"]]
    if not turns:
        raise BadRow("no assistant content")
    texts = {i: render_chat(tokenizer, messages[:i + 1], enable_thinking, tokenize=False) for i in turns}
    rows, group = [], []
    for k, i in enumerate(turns):
        group.append(i)
        if k + 1 < len(turns) and all(texts[turns[k + 1]].startswith(texts[j]) for j in group):
            continue  # every turn so far still reads as it was written: one row goes on
        try:
            rows.append(tokenize_conversation(tokenizer, messages[:i + 1], max_length, enable_thinking, set(group)))
        except BadRow:
            if not rows:
                raise
            break
        group = []
    return rows


def _tokenize_range(bounds):
    """Rows lo..hi of the conversations build_dataset put in _TOKENIZE_STATE (inherited by forked workers):
    (training rows, skipped conversations by reason, conversations kept)."""
    (lo, hi), (tokenizer, convs, max_length, min_loss_tokens, enable_thinking) = bounds, _TOKENIZE_STATE
    out, skipped, kept = [], collections.Counter(), 0
    for msgs in convs[lo:hi]:
        try:
            rows = conversation_rows(tokenizer, msgs, max_length, enable_thinking)
        except BadRow as e:
            skipped[str(e)] += 1
            continue
        except Exception as e:  # a template that raises on this row (e.g. "roles must alternate")
            skipped[f"template error ({type(e).__name__})"] += 1
            continue
        rows = [(ids, mask) for ids, mask in rows if sum(mask) >= min_loss_tokens]
        if not rows:
            skipped["too few loss tokens"] += 1
            continue
        out += rows
        kept += 1
    return out, skipped, kept


_TOKENIZE_STATE = None
PROGRESS_S = 5.0  # long work (tokenising, evaluation) logs a progress line at most this often


def progress(log, what, total, unit):
    """tick(done) logs `what done/total unit (elapsed)` when PROGRESS_S have passed since the last line."""
    t0 = last = time.time()

    def tick(done):
        nonlocal last
        if done < total and time.time() - last >= PROGRESS_S:
            last = time.time()
            log(f"{what} {done:,}/{total:,} {unit} ({time.time() - t0:.0f} s)")
    return tick


def build_dataset(tokenizer, source, max_length, min_loss_tokens=1, enable_thinking=None, log=print,
                  max_rows=0, workers=1):
    """Tokenised (ids, loss_mask) rows; max_rows > 0 keeps the first max_rows conversations that load.
    workers > 1 tokenises in forked processes (about 7 ms a row with a chat template: 17 K rows
    take 2 minutes in one process); the rows and their order are the same for any workers."""
    global _TOKENIZE_STATE
    all_convs, read_skipped = load_conversations(source)
    convs = all_convs[:max_rows] if max_rows else all_convs
    _TOKENIZE_STATE = (tokenizer, convs, max_length, min_loss_tokens, enable_thinking)
    pool = workers > 1 and len(convs) >= 64 and "fork" in mp.get_all_start_methods()
    step = -(-len(convs) // (4 * workers)) if pool else 256
    chunks = [(lo, min(lo + step, len(convs))) for lo in range(0, len(convs), step)]
    tick, parts = progress(log, "data: tokenised", len(convs), "conversations"), []
    try:
        with mp.get_context("fork").Pool(workers) if pool else contextlib.nullcontext() as p:
            results = p.imap(_tokenize_range, chunks) if pool else map(_tokenize_range, chunks)  # in order
            for (_, hi), part in zip(chunks, results):
                parts.append(part)
                tick(hi)
    finally:
        _TOKENIZE_STATE = None
    out = [row for rows, _, _ in parts for row in rows]
    token_skipped = sum((s for _, s, _ in parts), collections.Counter())
    kept = sum(k for _, _, k in parts)
    # the arithmetic in view: rows read = skipped + conversations; tokenised = skipped + kept
    skips = lambda c: f"{c.total()} skipped" + (f" ({', '.join(f'{n} {r}' for r, n in c.most_common())})" if c else "")
    unused = f" (max_rows={max_rows}: {len(all_convs) - len(convs)} more unused)" if len(convs) < len(all_convs) else ""
    log(f"data: {len(all_convs) + read_skipped.total()} rows read = {skips(read_skipped)} + {len(all_convs)} "
        f"conversations; {len(convs)} tokenised{unused} = {skips(token_skipped)} + {kept} kept, "
        f"as {len(out)} training rows")
    return out


# -----------------------------------------------------------------------------
# batching

def split_heldout(dataset, n):
    """(training rows, n held-out rows). The held-out rows are spread evenly over the data (row
    floor(k * len / n) for k < n), so they sample every shard and prompt length, and the same data
    gives the same split in every run and after a resume."""
    if n <= 0:
        return dataset, []
    if n >= len(dataset):
        raise ValueError(f"val_rows={n} holds out all {len(dataset)} rows: lower val_rows")
    held = [k * len(dataset) // n for k in range(n)]  # increasing and distinct: len / n > 1
    out = set(held)
    return [r for i, r in enumerate(dataset) if i not in out], [dataset[i] for i in held]


def steps_per_epoch(dataset, batch_size, world_size):
    return len(dataset) // (batch_size * world_size)


def _round_up(n, k):
    return -(-n // k) * k


def collate(rows, pad_multiple=64, pad_id=0, max_length=None):
    """Right-pad to a multiple of pad_multiple so compiled attention sees few distinct shapes."""
    S = _round_up(max(len(ids) for ids, _ in rows), pad_multiple)
    if max_length is not None:
        S = min(S, _round_up(max_length, pad_multiple))
    input_ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = min(len(ids), S)
        input_ids[b, :n] = torch.tensor(ids[:n], dtype=torch.long)
        loss_mask[b, :n] = torch.tensor(mask[:n], dtype=torch.long)
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def iterate_batches(dataset, batch_size, seed, rank=0, world_size=1, pad_multiple=64, pad_id=0,
                    start=None, max_length=None):
    """Infinite (batch, position) generator. Epoch e visits the rows in the permutation seeded by
    seed + e; the global batch is batch_size * world_size consecutive rows of it, rank r takes the
    r-th slice; the ragged tail is dropped. position is where to resume AFTER this batch."""
    g = batch_size * world_size
    if steps_per_epoch(dataset, batch_size, world_size) == 0:
        raise ValueError(f"{len(dataset)} rows is less than one global batch of {g}")
    epoch, index = (start or {}).get("epoch", 0), (start or {}).get("index", 0)
    while True:
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        while index + g <= len(dataset):
            row_ids = perm[index + rank * batch_size: index + (rank + 1) * batch_size]
            index += g
            pos = {"epoch": epoch, "index": index} if index + g <= len(dataset) else {"epoch": epoch + 1, "index": 0}
            batch = collate([dataset[j] for j in row_ids], pad_multiple, pad_id, max_length)
            # which rows and which epoch: train.py seeds each row's anchors from them
            batch.update(row_ids=torch.tensor(row_ids), epoch=epoch)
            yield batch, pos
        epoch, index = epoch + 1, 0


# -----------------------------------------------------------------------------
# prompts for benchmarking and regeneration

def load_prompts(name_or_path, assets_dir=None):
    """Rows {"id": str, "turns": [str, ...], ...} of a named prompt set or any JSONL/JSON file of
    `turns`, `prompt` or chat rows (the user turns are taken)."""
    path = name_or_path
    if name_or_path in PROMPT_SETS:
        path = os.path.join(assets_dir or _default_assets(), "prompts", name_or_path + ".jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run `python recipes/fetch.py` first")
    out = []
    for i, row in read_rows(path):
        try:
            msgs = parse_messages(row, need_assistant=False)
        except BadRow:
            continue
        extra = {k: v for k, v in row.items() if k not in ("id", "turns", "prompt", "messages", "conversations")}
        out.append({"id": str(row.get("id", i)), "turns": [m["content"] for m in msgs if m["role"] == "user"], **extra})
    return out


# -----------------------------------------------------------------------------
# regenerating the assistant turns with the target

def stop_ids(tokenizer, model=None):
    """The tokens that end a turn: the tokenizer's eos, the generation config's eos ids and the
    common end-of-turn tokens the vocabulary has. Never <|im_start|>: transformers names it the eos
    of GGUF-converted SmolLM2 folders (SPEC 8), and a turn never ends on it."""
    ids, gen = set(), getattr(model, "generation_config", model)  # a model or its generation config
    for v in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        ids |= set(v) if isinstance(v, (list, tuple)) else {v} if v is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>") if t in vocab}
    ids.discard(vocab.get("<|im_start|>"))
    return sorted(ids)


def shard_path(out, shard, num_shards):
    if num_shards == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}.{shard:02d}-of-{num_shards:02d}{ext or '.jsonl'}"


def _done_indices(path):
    """Indices already written; a partial last line (a kill mid-write) is cut off first."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        raw = f.read()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        with open(path, "wb") as f:
            f.write(keep)
    return {json.loads(line)["index"] for line in keep.decode("utf-8").split("\n") if line.strip()}


def writer_generation_config(target):
    """The generation config a model loaded from `target` gets, without loading its weights."""
    from transformers import AutoConfig, GenerationConfig
    try:
        return GenerationConfig.from_pretrained(target)
    except OSError:  # no generation_config.json: transformers derives it from config.json
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(target))


def load_writer(target, dtype=None):
    """(tokenizer, model, stop ids) of the target that writes text here: dtype "bf16" or "fp32" (default
    bf16 on GPU, fp32 on CPU), K/V read once per KV head in decode steps (model.sdpa_gqa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or ("bf16" if dev == "cuda" else "fp32")]
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(dev).eval()
    M.use_gqa_attention(model)
    return tok, model, stop_ids(tok, model)


def check_batch_decodable(config):
    """BatchDecoder builds one full causal mask over a left-padded static cache: right for full-attention
    targets only (a sliding layer would see past its window, a linear-attention state would take in
    the padding). Others regenerate through a serving engine."""
    kinds = set(M.layer_kinds(config)) - {"full_attention"}
    if kinds:
        raise SystemExit(f"regenerate error: the target has {', '.join(sorted(kinds))} layers, which the in-process "
                         "batch decoder does not handle: serve the target with vLLM or SGLang and pass --server URL")


class BatchDecoder:
    """Greedy (or sampled) continuations of up to `batch_size` token-id prompts at once, over a static
    KV cache of prompt_len + max_new_tokens slots. Prompts are left-padded to prompt_len, so every
    batch has the same shapes and the decode step is compiled once (CUDA graphs on GPU). Masks are
    built here, 4D, so transformers' mask code (which changes between versions) is never involved.
    Why not generate(): its DynamicCache is concatenated and its K/V repeated to every query head at
    each step: SmolLM2-135M at batch 256 on an H200, ~1.2 K tokens/s per process with generate(),
    9.5-12.7 K with this (3 processes per GPU, compiling included)."""

    def __init__(self, model, batch_size, prompt_len, max_new_tokens, stops, pad_id, compile=None):
        from transformers import StaticCache
        self.model, self.B, self.P, self.N = model, batch_size, prompt_len, max_new_tokens
        self.C, self.pad_id = prompt_len + max_new_tokens, pad_id
        self.dev = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=self.C)
        self.cache_kw = M.cache_kwarg(model)
        self.stops = torch.tensor(stops, device=self.dev)
        self.slots = torch.arange(self.C, device=self.dev)
        compile = self.dev.type == "cuda" if compile is None else compile
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead" if self.dev.type == "cuda" else None) if compile else self._step

    def _step(self, tok, slot, pad):
        """One token per row at cache slot `slot` (the same for every row: they are left-padded)."""
        M.set_cache_length(self.cache, slot)
        mask = ((self.slots >= pad[:, None]) & (self.slots <= slot))[:, None, None]
        out = self.model(input_ids=tok[:, None], position_ids=(slot - pad)[:, None], attention_mask=mask,
                         use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1].float()

    @torch.no_grad()
    def __call__(self, prompts, temperature=0.0, generator=None):
        """New ids of each prompt, cut after the first stop token (which is kept)."""
        n, P = len(prompts), self.P
        if not 0 < n <= self.B or max(map(len, prompts)) > P:
            raise ValueError(f"{n} prompts of up to {max(map(len, prompts))} tokens: the decoder takes "
                             f"1-{self.B} prompts of at most {P} tokens")
        prompts = prompts + [prompts[-1]] * (self.B - n)  # fixed shapes: filler rows, dropped below
        pad = torch.tensor([P - len(p) for p in prompts], device=self.dev)
        ids = torch.tensor([[self.pad_id] * (P - len(p)) + p for p in prompts], device=self.dev)
        q = self.slots[:P, None]
        # a padding query sees itself: some SDPA kernels return NaN for a row with nothing to attend
        # to, and its cached K/V would carry it into the real rows (masked weight 0 times NaN is NaN)
        mask = ((self.slots >= pad[:, None, None]) & (self.slots <= q)) | (self.slots == q)
        M.set_cache_length(self.cache, 0)
        logits = self.model(input_ids=ids, position_ids=(self.slots[:P] - pad[:, None]).clamp(min=0),
                            attention_mask=mask[:, None], use_cache=True, logits_to_keep=1,
                            **{self.cache_kw: self.cache}).logits[:, -1].float()
        slot, done, new = torch.tensor(P, device=self.dev), torch.zeros(self.B, dtype=torch.bool, device=self.dev), []
        for t in range(self.N):
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tok = logits.argmax(-1)
            tok = torch.where(done, self.pad_id, tok)
            new.append(tok)
            done = done | torch.isin(tok, self.stops)
            if t == self.N - 1 or (t % 16 == 15 and bool(done[:n].all())):  # a host sync every 16 steps
                break
            logits = self.step(tok, slot, pad)
            slot = slot + 1
        res, stops = [], set(self.stops.tolist())
        for row in torch.stack(new, 1)[:n].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            res.append(row[:cut])
        return res


def _answer(tokenizer, ids, stops, finished=False):
    """The assistant message of generated ids: cut at the first stop token, which is not kept."""
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        ids, finished = ids[:cut], True
    return {"role": "assistant", "content": tokenizer.decode(ids), "token_ids": ids, "finished": finished}


def _conversation(tokenizer, row, enable_thinking, max_prompt_tokens):
    """The turns of one row, shared by the local and the server paths: yields each turn's prompt ids
    (rendered by the training template), is sent the answer message, returns the row's messages.
    Turn t+1 is prompted with the answer to turn t; a prompt over max_prompt_tokens ends the row."""
    hist = row["system"]
    for u in row["users"]:
        user = {"role": "user", "content": u}
        prompt = render_chat(tokenizer, hist + [user], enable_thinking, True)
        if len(prompt) > max_prompt_tokens:
            break
        hist = hist + [user, (yield prompt)]
    return hist


def _advance(conv, answer=None):
    """(next prompt, None) or (None, the finished row's messages)."""
    try:
        return conv.send(answer), None
    except StopIteration as e:
        return None, e.value


def _progress(log, t0, done, total, ntok):
    el = time.time() - t0
    eta = (total - done) * el / max(done, 1)
    log(f"regenerate: {done}/{total} rows, {ntok} tokens, {ntok / max(el, 1e-9):.0f} tok/s, "
        f"ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s")


_TOKENIZER_LOCK = threading.Lock()  # one thread at a time in the tokenizer: HF's fast ones are not thread-safe


class ServerError(RuntimeError):
    """A server failure that retrying does not fix (or no longer fixed)."""


def _http(url, body=None, timeout=60.0):
    """GET (body None) or POST a JSON body; the decoded JSON answer. $OPENAI_API_KEY is sent if set."""
    import urllib.request
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _retrying(url, body, timeout, retries, backoff, log):
    """_http with retries on timeouts, dropped connections, bad JSON, 5xx and 429, waiting backoff,
    2 x backoff, ... (at most 60 s, jittered); any other HTTP error is the request's fault: raised."""
    import http.client
    import random
    import urllib.error
    for attempt in range(retries + 1):
        try:
            return _http(url, body, timeout)
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:
                raise ServerError(f"{url} answered HTTP {e.code}: {e.read()[:500].decode('utf-8', 'replace')}")
            why = f"HTTP {e.code}"
        except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, refused/reset connections, bad JSON
            why = f"{type(e).__name__}: {e}"
        if attempt == retries:
            raise ServerError(f"{url} failed {retries + 1} times, last with {why}")
        wait = min(60.0, backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        log(f"regenerate: request failed ({why}), retry {attempt + 1}/{retries} in {wait:.1f} s")
        time.sleep(wait)


def server_model(server, target, served_model_name=None, context=0, timeout=30.0):
    """The name under which an OpenAI-compatible server serves the target; SystemExit at once if it
    cannot be reached, serves another model (judged by the folder name of --target, or exactly
    --served-model-name) or has a shorter context than `context` tokens."""
    import http.client
    import urllib.error
    url = server.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        listing = _http(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"regenerate error: {url} answered HTTP {e.code}: --server must be an OpenAI-compatible "
                         f"server (vllm serve, python -m sglang.launch_server)")
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise SystemExit(f"regenerate error: no server answers at {server} ({getattr(e, 'reason', e)}): start it "
                         f"(vllm serve / python -m sglang.launch_server) or fix --server")
    cards = listing.get("data") or [] if isinstance(listing, dict) else []
    want = served_model_name or os.path.basename(os.path.normpath(target))
    if served_model_name:
        match = [c for c in cards if c.get("id") == want]
    else:  # vLLM: id is --served-model-name (default the path served), root the path
        match = [c for c in cards if want.lower() in {os.path.basename(os.path.normpath(str(c.get(k) or ""))).lower() for k in ("id", "root")}]
    if not match:
        raise SystemExit(f"regenerate error: {server} serves {[c.get('id') for c in cards]}, not the target {want!r}: serve "
                         f"--target there, or pass --served-model-name NAME if it is the same model under another name")
    n = match[0].get("max_model_len")
    if n and context > n:
        raise SystemExit(f"regenerate error: {server} serves {want} with a {n}-token context, less than "
                         f"--max-prompt-tokens + --max-new-tokens = {context}: lower them or raise the server's --max-model-len")
    return match[0]["id"]


def server_answerer(server, name, tokenizer, stops, max_new_tokens, temperature, timeout=600.0, retries=10,
                    backoff=1.0, log=print):
    """prompt ids -> the answer message, from the server's completions endpoint. Sampling is the local
    path's: temperature only (top-p, top-k, min-p and repetition penalty are sent off, so a server's
    generation_config defaults do not apply), the same stop ids. The prompt goes as token ids (the
    training template's rendering, so no server-side template or BOS); the answer's ids are the
    server's where it returns them (vLLM: return_token_ids), else the text re-tokenised, kept only
    if it decodes back to the same text (else the turn is kept as text, re-tokenised by training)."""
    url = server.rstrip("/").removesuffix("/v1") + "/v1/completions"
    body = {"model": name, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0, "top_k": -1,
            "min_p": 0.0, "repetition_penalty": 1.0, "stop_token_ids": list(stops), "skip_special_tokens": False,
            "return_token_ids": True, "n": 1, "stream": False}

    def answer(prompt):
        res = _retrying(url, {**body, "prompt": prompt}, timeout, retries, backoff, log)
        try:
            c = res["choices"][0]
            text, ids, finished = c.get("text") or "", c.get("token_ids"), c.get("finish_reason") == "stop"
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{url} answered without choices: {str(res)[:300]}")
        with _TOKENIZER_LOCK:
            if ids is None:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if tokenizer.decode(ids) != text:
                    return {"role": "assistant", "content": text, "finished": finished}
            return _answer(tokenizer, list(ids), stops, finished)
    return answer


def regenerate(target, data, out, max_new_tokens=512, temperature=0.0, batch_size=64, num_shards=1,
               shard=0, limit=None, max_turns=1, enable_thinking=None, max_prompt_tokens=1024, compile=None, log=print,
               server=None, concurrency=64, served_model_name=None, timeout=600.0, retries=10, backoff=1.0, dtype=None):
    """Write {"id", "index", "messages"} rows whose assistant turns are the target's own answers
    (with their "token_ids"). Turn t+1 is prompted with the target's answer to turn t, as text
    rendered by the template. Rows already in OUT are skipped, so a killed run just restarts.
    With `server` (an OpenAI-compatible URL) the target answers there, `concurrency` rows at a
    time, instead of in this process; the rows are the same."""
    if server:  # before any other work: a wrong URL or model fails at once
        name = server_model(server, target, served_model_name, max_prompt_tokens + max_new_tokens)
    else:
        check_batch_decodable(M.load_target_config(target))
    out = shard_path(out, shard, num_shards)
    done = _done_indices(out)
    todo, skipped = [], collections.Counter()
    for i, row in read_rows(data):
        if limit is not None and i >= limit:
            break
        if i % num_shards != shard or i in done:
            continue
        try:
            msgs = parse_messages(row, need_assistant=False)
        except BadRow as e:
            skipped[str(e)] += 1
            continue
        system = [m for m in msgs[:1] if m["role"] == "system"]
        users = [m["content"] for m in msgs if m["role"] == "user"][:max_turns]
        rid = row.get("id", row.get("question_id", row.get("task_id", i)))
        todo.append({"index": i, "id": rid, "system": system, "users": users})
    log(f"regenerate: {len(todo)} rows to do, {len(done)} already in {out}, skipped: {dict(skipped)}")
    if not todo:
        return out
    if server:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(target)
        stops = stop_ids(tok, writer_generation_config(target))
        answer = server_answerer(server, name, tok, stops, max_new_tokens, temperature, timeout, retries, backoff, log)
    else:
        tok, model, stops = load_writer(target, dtype)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
        batch_size = min(batch_size, len(todo))  # a static batch: no wider than the rows
        decode = BatchDecoder(model, batch_size, max_prompt_tokens, max_new_tokens, stops, pad_id, compile)
    # shortest prompts first: a run stopped by a time limit has answered the most rows
    first = [len(render_chat(tok, r["system"] + [{"role": "user", "content": r["users"][0]}], enable_thinking, True)) for r in todo]
    order = sorted((k for k in range(len(todo)) if first[k] <= max_prompt_tokens), key=lambda k: first[k])
    if len(order) < len(todo):
        log(f"regenerate: skipping {len(todo) - len(order)} rows whose prompt is over {max_prompt_tokens} tokens")
    rows = [todo[k] for k in order]
    conversation = lambda r: _conversation(tok, r, enable_thinking, max_prompt_tokens)
    t0, ntok, written = time.time(), 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        def write(r, msgs):
            nonlocal ntok, written
            f.write(json.dumps({"id": r["id"], "index": r["index"], "messages": msgs}, ensure_ascii=False) + "\n")
            f.flush()  # a kill leaves only whole lines (plus at most one partial, cut on resume)
            ntok += sum(len(m.get("token_ids", ())) for m in msgs if m["role"] == "assistant")
            written += 1
        if server:
            _serve_rows(rows, conversation, answer, concurrency, write, lambda: _progress(log, t0, written, len(rows), ntok))
        else:
            for b in range(0, len(rows), batch_size):
                convs = [conversation(r) for r in rows[b:b + batch_size]]
                state = [_advance(c) for c in convs]  # the turns of a batch are decoded in lockstep
                while any(p is not None for p, _ in state):
                    live = [j for j, (p, _) in enumerate(state) if p is not None]
                    gens = decode([state[j][0] for j in live], temperature)
                    for j, g in zip(live, gens):
                        state[j] = _advance(convs[j], _answer(tok, g, stops))
                for r, (_, msgs) in zip(rows[b:b + batch_size], state):
                    write(r, msgs)
                _progress(log, t0, written, len(rows), ntok)
    return out


def _serve_rows(rows, conversation, answer, concurrency, write, progress, every=10.0):
    """Each row's turns in one of `concurrency` threads, so that many requests are always in flight
    (no batch waits for its longest answer); rows are written here, in the order they finish. The
    threads are daemons: an error ends the run without waiting for requests still in flight."""
    import queue
    jobs, results, stop = queue.Queue(), queue.Queue(), threading.Event()
    for r in rows:
        jobs.put(r)

    def work():
        while not stop.is_set():
            try:
                r = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                conv = conversation(r)
                with _TOKENIZER_LOCK:
                    prompt, msgs = _advance(conv)
                while msgs is None:
                    msg = answer(prompt)
                    with _TOKENIZER_LOCK:
                        prompt, msgs = _advance(conv, msg)
                results.put((r, msgs))
            except BaseException as e:  # handed to the writer, which stops the run
                results.put((r, e))
                return
    for _ in range(min(concurrency, len(rows))):
        threading.Thread(target=work, daemon=True).start()
    last = time.time()
    for _ in range(len(rows)):
        r, msgs = results.get()
        if isinstance(msgs, BaseException):
            stop.set()
            if isinstance(msgs, ServerError):
                raise SystemExit(f"regenerate error: {msgs} (rows written so far are kept: rerun to resume)")
            raise msgs
        write(r, msgs)
        if time.time() - last >= every:
            progress()
            last = time.time()
    progress()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("regenerate", help="replace assistant turns with the target's own responses")
    r.add_argument("--target", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True, help="JSONL; with --num-shards N shard K writes OUT-stem.KK-of-NN.jsonl")
    r.add_argument("--max-new-tokens", type=int, default=512)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--num-shards", type=int, default=1)
    r.add_argument("--shard", type=int, default=0)
    r.add_argument("--limit", type=int, default=None, help="use only the first N input rows")
    r.add_argument("--max-turns", type=int, default=1, help="user turns answered per row, each seeing the earlier answers")
    r.add_argument("--max-prompt-tokens", type=int, default=1024,
                   help="longer prompts are skipped (counted); the static KV cache holds this + --max-new-tokens")
    r.add_argument("--enable-thinking", "--thinking", choices=["on", "off"], default=None,
                   help="enable_thinking for the chat template (train with the same enable_thinking)")
    r.add_argument("--no-compile", action="store_true", help="eager decode steps (default: compiled on GPU)")
    r.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="the target's dtype here (default: bf16 on "
                   "GPU, fp32 on CPU); fp32 answers are the ones bench.py --dtype fp32 decodes")
    r.add_argument("--server", default=None, help="an OpenAI-compatible server (vLLM, SGLang) serving --target, "
                   "e.g. http://host:8000; --target then only gives the tokenizer and chat template")
    r.add_argument("--concurrency", type=int, default=64, help="with --server: rows in flight at once")
    r.add_argument("--served-model-name", default=None, help="with --server: the server's name of the target "
                   "(default: the served model whose name ends with --target's folder name)")
    r.add_argument("--timeout", type=float, default=600.0, help="with --server: seconds one request may take before it is retried")
    a = ap.parse_args(argv)
    regenerate(a.target, a.data, a.out, a.max_new_tokens, a.temperature, a.batch_size, a.num_shards, a.shard,
               a.limit, a.max_turns, None if a.enable_thinking is None else a.enable_thinking == "on",
               a.max_prompt_tokens, False if a.no_compile else None, server=a.server, concurrency=a.concurrency,
               served_model_name=a.served_model_name, timeout=a.timeout, dtype=a.dtype)


if __name__ == "__main__":
    main()
