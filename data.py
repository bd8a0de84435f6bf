"""
Data for DFlash drafters: read chat data, tokenize it with the target's chat template and a loss
mask on the assistant tokens, and batch it deterministically (seeded, resumable, sharded over ranks).
Regenerating the assistant turns with the target itself (the largest lever on acceptance) lives in
regenerate.py; this file's command runs it:

    python data.py regenerate --target DIR --data IN --out OUT [--max-new-tokens 512] ...
    python data.py regenerate --target DIR --server http://host:8000 --concurrency 256 ...  # vLLM, SGLang, llama.cpp...

Runs on the GPU machines too, which have no `datasets` and no network: `datasets` is imported only
where an HF dataset name is read. The offline default assets come from recipes/fetch.py.
"""
import array
import collections
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
PROMPT_SETS = ("mt-bench", "humaneval", "math500", "aime", "alpaca", "sharegpt")

# -----------------------------------------------------------------------------
# reading conversations

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")  # OpenAI, Llama 3, ShareGPT (glaive)


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


# not JSON: read as text they fail deep in the decoder or skip every row as malformed, so they are named
_NOT_JSON = (".parquet", ".arrow", ".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar")
_SOURCES = "data is JSON/JSONL files (a glob), a save_to_disk folder or a hub dataset name"


def read_rows(source, split="train"):
    """(index, row) for every row of a JSONL/JSON file (a glob of them), a dataset saved with
    save_to_disk, or a hub dataset name; row is None where the line is not valid JSON. A glob that
    matches nothing, a local path that does not exist, a Parquet/CSV/compressed file or a saved
    dataset without `split` is an error here, at the call, before any row is read."""
    globbed = any(c in source for c in "*?[")
    files = sorted(glob.glob(source)) if globbed else [source]
    if not files:
        raise FileNotFoundError(f"{source} matches no file ({_SOURCES})")
    if globbed or os.path.isfile(source):
        for f in files:
            if not os.path.isfile(f) or f.lower().endswith(_NOT_JSON):
                raise ValueError(f"{f} is not a JSON/JSONL file ({_SOURCES})")
        return _file_rows(files)
    if not os.path.isdir(source) and (source.startswith(("/", ".")) or source.endswith((".json", ".jsonl"))):
        raise FileNotFoundError(f"{source} does not exist ({_SOURCES})")
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json")):
        raise ValueError(f"{source} is a folder but not a save_to_disk dataset: give its files as a glob "
                         f"('{os.path.join(source, '*.jsonl')}')")
    import datasets  # only here: the GPU machines do not have it
    ds = datasets.load_from_disk(source) if os.path.isdir(source) else datasets.load_dataset(source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source} has no {split!r} split, only {', '.join(ds) or 'none'}: give one split's folder "
                             f"(e.g. {os.path.join(source, next(iter(ds), split))})")
        ds = ds[split]
    return enumerate(ds)


def _file_rows(files):
    """JSONL is read a line at a time (a training set of GBs is never held as text); a JSON array is
    read whole. A file is a JSON array when its first non-blank line opens a list that does not close
    on it, or is that one line (a line holding a whole list, followed by more, is a JSONL row)."""
    i = 0
    for f in files:
        with open(f, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not part of the first row
            # lines end at "\n" only (and \r, \r\n, as read() gave): str.splitlines would also break
            # at U+2028 and friends inside strings
            head = list(itertools.islice((line for line in fh if line.strip()), 2))
            if head and head[0].lstrip().startswith("[") and (len(head) == 1 or _loads(head[0]) is None):
                rows = _json_array_records("".join(head) + fh.read())
            else:
                rows = (_loads(line) for line in itertools.chain(head, fh) if line.strip())
            for row in rows:
                yield i, row
                i += 1


def _loads(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def first_set(d, *keys, default=None):
    """The value of the first key that d holds and is not None: a dataset saved by `datasets` gives
    every row every column, None where the row had none (a `messages` row gets `conversations: None`)."""
    return next((d[k] for k in keys if d.get(k) is not None), default)


def parse_messages(row, need_assistant=True):
    """Normalize one row to [{"role", "content"}]; raise BadRow(reason) if it cannot be used.
    Accepts `messages` (role/content), ShareGPT `conversations` (from/value), and prompt-only rows
    (`turns` or `prompt`) which become user messages; content given as a list of text parts is joined
    with newlines; tool calls and tool turns are not supported. Regenerated turns keep their
    `token_ids`, and `finished: False` where the token limit cut them."""
    if row is None:
        raise BadRow("malformed json")
    if not isinstance(row, dict):
        raise BadRow("row not an object")
    turns = first_set(row, "messages", "conversations")
    if turns is None and row.get("turns") is not None:
        turns = [{"role": "user", "content": t} for t in (row["turns"] if isinstance(row["turns"], list) else [None])]
    elif turns is None and row.get("prompt") is not None:
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
        role, content = first_set(t, "role", "from"), first_set(t, "content", "value")
        if (isinstance(role, str) and role.lower() in TOOL_ROLES) or t.get("tool_calls") or t.get("function_call"):
            raise BadRow("tool calls (not supported)")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise BadRow("unknown role")
        if isinstance(content, list):  # OpenAI-style parts: text parts joined as vLLM joins them for a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise BadRow("non-text content part")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRow("non-string content")
        m = {"role": ROLES[role.lower()], "content": content}
        if (ids := t.get("token_ids")) is not None:  # an array: 4 bytes an id, where a list of Python ints takes ~36
            try:
                m["token_ids"] = array.array("i", ids)
            except (TypeError, OverflowError):
                ids = None
            if not isinstance(ids, list) or (ids and min(m["token_ids"]) < 0):
                raise BadRow("token_ids not token ids (integers from 0)")
        if t.get("finished") is False:
            m["finished"] = False
        msgs.append(m)
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise BadRow("no assistant turn")
    if not need_assistant and not any(m["role"] == "user" for m in msgs):
        raise BadRow("no user turn")
    return msgs


def conversations(source, skipped, split="train"):
    """The messages of each row that loads, in order; the rows that do not are counted in `skipped` by reason."""
    for _, row in read_rows(source, split):
        try:
            yield parse_messages(row)
        except BadRow as e:
            skipped[str(e)] += 1


def load_conversations(source, split="train"):
    skipped = collections.Counter()
    return list(conversations(source, skipped, split)), skipped


# -----------------------------------------------------------------------------
# tokenization with a loss mask on the assistant tokens

def has_thinking_switch(tokenizer):
    """The chat template reads enable_thinking (Qwen3): its rendering depends on the thinking mode."""
    return "enable_thinking" in (tokenizer.chat_template or "")


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


def chat_template_problem(tokenizer):
    """Why the target's chat template cannot make rows, or None. Without a generation prompt (rendering a
    prompt with add_generation_prompt changes nothing) the target writes the assistant header itself and
    every row holds it twice; a template whose answer follows the prompt directly passes (Mistral's,
    after "[/INST]"). A template that refuses this probe passes: its rows say why (template error)."""
    if not tokenizer.chat_template:
        return "its tokenizer has no chat template: give a target folder whose tokenizer_config.json or chat_template.jinja has one"
    user = [{"role": "user", "content": "Hi"}]
    try:
        prompt = render_chat(tokenizer, user, None, True, tokenize=False)
        answered = render_chat(tokenizer, user + [{"role": "assistant", "content": "Hello"}], None, tokenize=False)
        if prompt != render_chat(tokenizer, user, None, tokenize=False) or answered[len(prompt):].lstrip().startswith("Hello"):
            return None
    except Exception:
        return None
    return ("its chat template has no generation prompt (add_generation_prompt adds nothing, and an answer does not "
            "follow the prompt): the target would write the assistant header itself, into every row; give the "
            "template an add_generation_prompt branch (the instruct model's template has one)")


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
    loss_mask is 1 on each assistant turn's content and its end-of-turn token, 0 elsewhere. A turn
    cut by the token limit (`finished: False`) keeps the end token the template adds, unsupervised:
    the target never generated it.

    Where the template put assistant turn i's content is found on the rendered TEXT: render it as
    is and with that content emptied; the characters between the common prefix and the common
    suffix are the content as the template emitted it. Tokens overlapping those characters are
    supervised. Unlike rendering growing prefixes this also works for templates that rewrite
    earlier turns (Qwen3 drops the <think> of past turns), and working on characters avoids
    tokens that merge differently at the edge of an empty content. Assistant messages carrying
    `token_ids` (written by `regenerate`) get those exact ids in place of the re-tokenized text, after
    the prompt the target answered as regenerate tokenised it (with any text of the generation prompt
    the template does not render before the turn: QwQ's "<think>\n"); where the template renders the
    turn as the generation prompt followed by that text, the span is all of it (with thinking on, the
    <think> the target wrote too). `supervise`: the indices of the messages to supervise (default:
    every assistant turn)."""
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
        before, span, gen = full[k:k0], full[k0:k1], m.get("token_ids")
        held = offsets[k - 1][1] if k else 0  # the characters the row holds so far
        # generated ids: the row goes on with the rest of the prompt the target answered, tokenised on
        # its own as it was (re-tokenised with the answer, "\n" + "\n\nHi" merges into "\n\n\n" + "Hi";
        # QwQ's template renders the answer without the "<think>\n" the target was prompted with),
        # then its ids; only where the row so far is that prompt's start and no token crosses the
        # answer's end (the template text after it stays as rendered)
        if gen is not None and prompt.startswith(text[:held]) and (k1 == k0 or offsets[k1 - 1][1] <= ce):
            before = tokenizer(prompt[held:], add_special_tokens=False)["input_ids"]
            span = list(gen[:-1] if gen and gen[-1] in ends else gen)
        if m.get("finished", True) and k1 < len(full) and full[k1] in ends:
            span = span + [full[k1]]
            k1 += 1
        pieces += [(before, 0), (span, 1)]
        k, pos = k1, ce
    if not pieces:
        raise BadRow("no assistant content")
    pieces.append((full[k:], 0))
    ids = [t for p, _ in pieces for t in p]
    mask = [s for p, s in pieces for _ in p]
    return ids[:max_length], mask[:max_length]


def _as_generated(tokenizer, messages, i, text, enable_thinking):
    """Whether `text` (the conversation up to assistant turn i) has turn i right after the prompt the
    target answered, up to whitespace at the content's edges (which templates may strip)."""
    prompt = render_chat(tokenizer, messages[:i], enable_thinking, True, tokenize=False)
    return text.startswith(prompt) and text[len(prompt):].lstrip().startswith(messages[i]["content"].strip())


def conversation_rows(tokenizer, messages, max_length, enable_thinking=None):
    """The (input_ids, loss_mask) rows of one conversation: one per assistant turn that the template
    renders differently once the conversation goes on (Qwen3 drops past reasoning, and with thinking
    off the empty think block the target answered after): that row is the conversation up to the
    turn as the template rendered it when the target wrote the turn, supervising the turn and the
    earlier ones not yet in a row. A template that renders every turn the same way later, and as the
    target wrote it (most), gives one row. A row whose turns are all past max_length ends the
    conversation's rows. A turn cut by the token limit that the template renders after text the target
    never saw (Qwen3 with thinking on: an empty think block before reasoning cut short of its </think>)
    is context only, never supervised: its row would teach a context the drafter never meets."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"]]
    if not turns:
        raise BadRow("no assistant content")
    texts = {i: render_chat(tokenizer, messages[:i + 1], enable_thinking, tokenize=False) for i in turns}
    turns = [i for i in turns if messages[i].get("finished", True) or _as_generated(tokenizer, messages, i, texts[i], enable_thinking)]
    if not turns:
        raise BadRow("cut answer after template text the target never saw")
    # a regenerated turn whose row (its prompt and ids) is not how the template renders it later (QwQ
    # drops the reasoning, and the "<think>\n" the target was prompted with) ends its row; asked only of
    # turns a later one follows (most conversations have one)
    written = lambda i: "token_ids" not in messages[i] or texts[i].startswith(
        render_chat(tokenizer, messages[:i], enable_thinking, True, tokenize=False) + messages[i]["content"])
    rows, group = [], []
    for k, i in enumerate(turns):
        group.append(i)
        if k + 1 < len(turns) and written(i) and all(texts[turns[k + 1]].startswith(texts[j]) for j in group):
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
    """Rows lo..hi of the conversations tokenize_part put in _TOKENIZE_STATE (inherited by forked workers):
    (each kept conversation's training rows, skipped conversations by reason, conversations kept)."""
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
        # kept as arrays: 5 bytes a token where lists of Python ints took ~40 (an 8-GPU host holds a copy per rank)
        rows = [(np.array(ids, np.int32), np.array(mask, np.uint8)) for ids, mask in rows if sum(mask) >= min_loss_tokens]
        if not rows:
            skipped["too few loss tokens"] += 1
            continue
        out.append(rows)
        kept += 1
    return out, skipped, kept


_TOKENIZE_STATE = None
PROGRESS_S = 5.0  # long work (tokenising, evaluation) logs a progress line at most this often


def reasons(counter):
    """Skip reasons as one summary phrase, the commonest first: '3 malformed json, 1 unknown role'."""
    return ", ".join(f"{n} {r}" for r, n in counter.most_common())


def fmt_time(s):
    """Seconds as the ETA of a progress line: 4m05s, or 2h07m past an hour."""
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress(log, what, total, unit):
    """tick(done) logs `what done/total unit (elapsed, rate, ETA)` when PROGRESS_S have passed since the last line."""
    t0 = last = time.time()

    def tick(done):
        nonlocal last
        now = time.time()
        if done < total and now - last >= PROGRESS_S:
            last, el = now, now - t0
            r = done / max(el, 1e-9)  # 3 digits below 100: an 8B evaluation decodes under one prompt a second
            log(f"{what} {done:,}/{total:,} {unit} ({el:.0f} s, {f'{r:,.0f}' if r >= 100 else f'{r:.3g}'} {unit}/s, "
                f"ETA {fmt_time((total - done) / max(r, 1e-9))})")
    return tick


def tokenize_part(tokenizer, source, max_length, min_loss_tokens=1, enable_thinking=None, log=print,
                  max_rows=0, workers=1, part=(0, 1)):
    """Part k of n of the conversations (the k-th contiguous share: the parts in order are the whole), tokenised:
    (each kept conversation's training rows, counts). Counts add over the parts (part 0 holds what reading found;
    data_line says them). max_rows > 0 keeps the first max_rows conversations that load. workers > 1 tokenises
    in forked processes (about 7 ms a row with a chat template: 17 K rows take 2 minutes in one process); the
    rows and their order are the same for any workers and any parts."""
    global _TOKENIZE_STATE
    problem = chat_template_problem(tokenizer)
    if problem:
        raise ValueError(f"{tokenizer.name_or_path}: {problem}")
    # two passes over the data: the first counts what loads, the second keeps this part's share alone, so a rank
    # never holds every conversation; parsing twice costs little beside tokenising
    read_skipped = collections.Counter()
    loaded = sum(1 for _ in conversations(source, read_skipped))
    total, (k, n) = min(loaded, max_rows or loaded), part
    lo, hi = total * k // n, total * (k + 1) // n
    convs = list(itertools.islice(conversations(source, collections.Counter()), lo, hi))
    _TOKENIZE_STATE = (tokenizer, convs, max_length, min_loss_tokens, enable_thinking)
    pool = workers > 1 and hi - lo >= 64 and "fork" in mp.get_all_start_methods()
    step = -(-(hi - lo) // (4 * workers)) if pool else 256
    chunks = [(a, min(a + step, hi - lo)) for a in range(0, hi - lo, step)]
    tick, parts = progress(log, "data: tokenised" if n == 1 else f"data: part {k + 1} of {n}, tokenised", hi - lo, "conversations"), []
    try:
        with mp.get_context("fork").Pool(workers) if pool else contextlib.nullcontext() as p:
            results = p.imap(_tokenize_range, chunks) if pool else map(_tokenize_range, chunks)  # in order
            for (_, b), part_rows in zip(chunks, results):
                parts.append(part_rows)
                tick(b)
    finally:
        _TOKENIZE_STATE = None
    out = [conv for rows, _, _ in parts for conv in rows]
    counts = collections.Counter(tokenised=hi - lo, kept=sum(kept for _, _, kept in parts),
                                 at_max_length=sum(len(ids) == max_length for conv in out for ids, _ in conv))
    for _, skipped, _ in parts:
        counts.update({"tokenising: " + r: v for r, v in skipped.items()})
    if k == 0:
        counts.update({"reading: " + r: v for r, v in read_skipped.items()})
        counts.update(conversations=loaded, unused=loaded - total, max_rows=max_rows, max_length=max_length)
    return out, counts


def data_line(rows, counts):
    """The arithmetic in view: rows read = skipped + conversations; tokenised = skipped + kept, as training rows;
    and how many of those reach max_length (the rest of a longer one is never trained on)."""
    def skips(stage):
        c = collections.Counter({r[len(stage):]: v for r, v in counts.items() if r.startswith(stage)})
        return f"{c.total()} skipped" + (f" ({reasons(c)})" if c else "")
    unused = f" (max_rows={counts['max_rows']}: {counts['unused']} more unused)" if counts["unused"] else ""
    read = counts["conversations"] + sum(v for r, v in counts.items() if r.startswith("reading: "))
    return (f"data: {read} rows read = {skips('reading: ')} + {counts['conversations']} conversations; "
            f"{counts['tokenised']} tokenised{unused} = {skips('tokenising: ')} + {counts['kept']} kept, as "
            f"{sum(map(len, rows))} training rows ({sum(len(ids) for c in rows for ids, _ in c):,} tokens, "
            f"{sum(ids.nbytes + mask.nbytes for c in rows for ids, mask in c) / 2**20:,.1f} MiB)"
            + (f"; {counts['at_max_length']} of them reach max_length={counts['max_length']}, cut there if longer: "
               "raise it to train on their ends" if counts["at_max_length"] else ""))


def build_dataset(tokenizer, source, max_length, min_loss_tokens=1, enable_thinking=None, log=print,
                  max_rows=0, workers=1):
    """Each kept conversation's tokenised (ids, loss_mask) rows (most conversations give one row; see
    conversation_rows), all in one process group of workers, with the data line logged."""
    rows, counts = tokenize_part(tokenizer, source, max_length, min_loss_tokens, enable_thinking, log, max_rows, workers)
    log(data_line(rows, counts))
    return rows


# -----------------------------------------------------------------------------
# batching

def recorded(paths, keys, limit=None):
    """{key: {value: path}} of what `regenerate` recorded under each key ("dtype", "temperature", ...) in the first
    `limit` rows of each path, in one pass; {} for a key no row records (other data, older rows, a server's dtype)."""
    seen = {k: {} for k in keys}
    for path in paths:
        for i, row in read_rows(path):
            if limit and i >= limit:
                break
            for k in keys if isinstance(row, dict) else ():
                if row.get(k) is not None:
                    seen[k].setdefault(row[k], path)
    return seen


def split_heldout(conversations, n):
    """(training rows, held-out rows) from each conversation's rows, holding out n whole conversations
    (a conversation's later rows repeat its earlier turns as context). They are spread evenly over the
    data (conversation floor(k * len / n) for k < n), so they sample every shard and prompt length, and
    the same data gives the same split in every run and after a resume."""
    if n > 0 and n >= len(conversations):  # val_rows=0 holds none out of any data (no rows: train.py says so)
        raise ValueError(f"val_rows={n} holds out all {len(conversations)} conversations: lower val_rows")
    held = {k * len(conversations) // n for k in range(n)} if n > 0 else set()  # distinct: len / n > 1
    pick = lambda out: [row for i, rows in enumerate(conversations) if (i in held) == out for row in rows]
    return pick(False), pick(True)


def fingerprint(dataset):
    """'N rows, sha256 ...' of each row's length and middle token: cheap for millions of rows, and it
    changes when a file is added, removed or regenerated under the same data path."""
    h = hashlib.sha256(json.dumps([(len(ids), int(ids[len(ids) // 2])) for ids, _ in dataset]).encode()).hexdigest()
    return f"{len(dataset)} rows, sha256 {h[:16]}"


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
                    start=None, max_length=None, grad_accum=1):
    """Infinite (batch, position) generator. Epoch e visits the rows in the permutation seeded by
    seed + e; the global batch is batch_size * world_size consecutive rows of it, rank r takes the
    r-th slice; the ragged tail, short of a whole optimizer step (grad_accum global batches), is
    dropped, so a step never spans two epochs however it is split. position is where to resume
    AFTER this batch."""
    g = batch_size * world_size
    usable = steps_per_epoch(dataset, batch_size * grad_accum, world_size) * g * grad_accum
    if usable == 0:
        raise ValueError(f"{len(dataset)} rows is less than one step of {g * grad_accum}")
    epoch, index = (start or {}).get("epoch", 0), (start or {}).get("index", 0)
    while True:
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        while index + g <= usable:
            row_ids = perm[index + rank * batch_size: index + (rank + 1) * batch_size]
            index += g
            pos = {"epoch": epoch, "index": index} if index + g <= usable else {"epoch": epoch + 1, "index": 0}
            batch = collate([dataset[j] for j in row_ids], pad_multiple, pad_id, max_length)
            # which rows and which epoch: train.py seeds each row's anchors from them
            batch.update(row_ids=torch.tensor(row_ids), epoch=epoch)
            yield batch, pos
        epoch, index = epoch + 1, 0


# -----------------------------------------------------------------------------
# prompts for benchmarking and regeneration

def load_prompts(name_or_path, assets_dir=None, log=print):
    """Rows {"id": str, "turns": [str, ...], ...} of a named prompt set or any JSONL/JSON file of
    `turns`, `prompt` or chat rows (the user turns are taken). Rows skipped are logged by reason in
    one line; a file with none left is a ValueError."""
    path = name_or_path
    if name_or_path in PROMPT_SETS:
        path = os.path.join(assets_dir or _default_assets(), "prompts", name_or_path + ".jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run `python recipes/fetch.py` first")
    out, skipped = [], collections.Counter()
    for i, row in read_rows(path):
        try:
            msgs = parse_messages(row, need_assistant=False)
        except BadRow as e:
            skipped[str(e)] += 1
            continue
        extra = {k: v for k, v in row.items() if k not in ("id", "turns", "prompt", "messages", "conversations")}
        out.append({"id": str(first_set(row, "id", default=i)), "turns": [m["content"] for m in msgs if m["role"] == "user"], **extra})
    why = reasons(skipped)
    if not out:
        raise ValueError(f"{path}: no usable prompt in its {skipped.total()} rows ({why or 'empty'}): rows need `turns`, "
                         "`prompt` or chat messages with a user turn of text")
    if skipped:
        log(f"prompts: {name_or_path}: {skipped.total()} of {skipped.total() + len(out)} rows skipped ({why})")
    return out


# -----------------------------------------------------------------------------
# the tokens that end a turn (decoding and regeneration stop there)

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


if __name__ == "__main__":  # `python data.py regenerate ...`: the command lives with the regeneration it runs
    import regenerate
    regenerate.main()
