"""Regenerating the assistant turns of chat data with the target itself: the largest lever on
acceptance (SPEC 6). The target answers each user turn, in this process through a static-cache batch
decoder, or on an OpenAI-compatible serving engine; turn t+1 is prompted with its own answer to turn t.
The rows keep the target's token ids, so training supervises exactly what the target generated.

    python data.py regenerate --target DIR --data IN --out OUT [--max-new-tokens 512] ...
    python data.py regenerate --target DIR --server http://host:8000 --concurrency 256 ...  # vLLM, SGLang, llama.cpp...

Needed only to make training data; data.py reads the rows it writes like any other chat data.
"""
import argparse
import collections
import json
import os
import re
import sys
import threading
import time

import torch

import fast_decode
import targets
from data import BadRow, chat_template_problem, first_set, parse_messages, read_rows, render_chat, stop_ids

def shard_path(out, shard, num_shards):
    if num_shards == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}.{shard:02d}-of-{num_shards:02d}{ext or '.jsonl'}"


def other_shardings(out, num_shards):
    """Files of this --out written with another --num-shards: a row's shard is its index modulo the count, so
    their rows overlap this run's, and a glob over both would train on rows twice."""
    folder, name = os.path.split(out)
    stem, ext = os.path.splitext(name)
    pattern = re.compile(re.escape(stem) + r"\.\d+-of-(\d+)" + re.escape(ext or ".jsonl") + "$")
    names = os.listdir(folder or ".") if os.path.isdir(folder or ".") else []
    found = sorted(os.path.join(folder, f) for f in names if (m := pattern.match(f)) and int(m[1]) != num_shards)
    return found + ([out] if num_shards > 1 and os.path.isfile(out) else [])


def _written(path):
    """(indices already written, {setting: the value the first row that records it has}); a partial last line
    (a kill mid-write) is cut off first."""
    done, recorded, end = set(), {}, 0
    if not os.path.exists(path):
        return done, recorded
    with open(path, "rb") as f:
        for line in f:  # one at a time: a shard's rows hold GBs of token ids
            if not line.endswith(b"\n"):
                break
            end += len(line)
            if line.strip():
                row = json.loads(line)
                done.add(row["index"])
                recorded.update({k: row[k] for k in SETTINGS if k in row and k not in recorded})
    if end < os.path.getsize(path):
        os.truncate(path, end)
    return done, recorded


def _first_row(path):
    """The first whole row of a file that another process may be writing ({} where there is none yet)."""
    try:
        with open(path, "rb") as f:
            line = next((line for line in f if line.strip() or not line.endswith(b"\n")), b"")
    except FileNotFoundError:
        return {}
    try:
        row = json.loads(line) if line.endswith(b"\n") else {}
    except ValueError:
        row = None
    if not isinstance(row, dict):
        raise SystemExit(f"regenerate error: {path}, another shard of this --out, does not start with a row regenerate "
                         "writes: give another --out, or remove that file")
    return row


# what shapes a row's answers, recorded in each row (bench.py --replay reads "dtype", null through a server;
# train.py "enable_thinking"): a resume, and the other shards, must write their rows as the first ones were
SETTINGS = {"dtype": "--dtype", "enable_thinking": "--enable-thinking", "temperature": "--temperature",
            "max_new_tokens": "--max-new-tokens"}


def changed_settings(recorded, settings):
    """'--max-new-tokens 256 (this run: --max-new-tokens 512), ...' for each setting recorded otherwise."""
    say = lambda k, v: ("a server's dtype" if k == "dtype" and v is None else "no --enable-thinking" if v == "auto"
                        else f"{SETTINGS[k]} {v}")
    return ", ".join(f"{say(k, v)} (this run: {say(k, settings[k])})" for k, v in recorded.items() if v != settings[k])


def check_device(device):
    """--device as a one-line error: a type other than cpu or cuda, no GPU, or a GPU index past those visible."""
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise SystemExit(f"regenerate error: --device {device}: give cuda, cuda:N or cpu")
    n = torch.cuda.device_count() if d.type == "cuda" and torch.cuda.is_available() else 0
    if d.type == "cuda" and (d.index or 0) >= n:
        raise SystemExit(f"regenerate error: --device {device}: this machine sees {n} GPUs"
                         + (f" (cuda:0 to cuda:{n - 1})" if n else " (a CPU build of torch, or an empty CUDA_VISIBLE_DEVICES)"))


def writer_generation_config(target):
    """The generation config a model loaded from `target` gets, without loading its weights."""
    from transformers import AutoConfig, GenerationConfig
    try:
        return GenerationConfig.from_pretrained(target)
    except OSError:  # no generation_config.json: transformers derives it from config.json
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(target))


def writer_device(shard=0, device=None):
    """Where this process's target runs: --device if given; else, on a GPU machine, the GPU of its local
    rank (LOCAL_RANK, as torchrun and most launchers set it) or of its shard, modulo the GPUs it sees
    (CUDA_VISIBLE_DEVICES narrows those: a launcher that gives each process one sees it as cuda:0), so
    one process per shard fills one GPU each."""
    if device:
        return device
    if not torch.cuda.is_available():
        return "cpu"
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{(int(local) if local is not None else shard) % torch.cuda.device_count()}"


def writer_dtype(dtype, device):
    return dtype or ("fp32" if torch.device(device).type == "cpu" else "bf16")


def load_writer(target, dtype=None, device=None):
    """(tokenizer, model, stop ids) of the target that writes text here, on `device` (default: cuda if
    there is one, else cpu): dtype "bf16" or "fp32" (default bf16 on GPU, fp32 on CPU), K/V read once
    per KV head in decode steps (fast_decode.sdpa_gqa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(dev).type == "cuda" and torch.device(dev).index is not None:
        torch.cuda.set_device(dev)  # compiled steps and CUDA graphs are captured on the current device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[writer_dtype(dtype, dev)]
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(dev).eval()
    fast_decode.use_gqa_attention(model)
    return tok, model, stop_ids(tok, model)


def check_batch_decodable(config):
    """BatchDecoder builds one full causal mask over a left-padded static cache: right for full-attention
    targets only (a sliding layer would see past its window, a linear-attention state would take in
    the padding). Others regenerate through a serving engine."""
    kinds = set(targets.layer_kinds(config)) - {"full_attention"}
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
        self.cache_kw = targets.cache_kwarg(model)
        self.stops = torch.tensor(stops, device=self.dev)
        self.slots = torch.arange(self.C, device=self.dev)
        compile = self.dev.type == "cuda" if compile is None else compile
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead" if self.dev.type == "cuda" else None) if compile else self._step

    def _step(self, tok, slot, pad):
        """One token per row at cache slot `slot` (the same for every row: they are left-padded)."""
        fast_decode.set_cache_length(self.cache, slot)
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
        fast_decode.set_cache_length(self.cache, 0)
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
    """The turns of one row, shared by the local and the server paths: yields each turn's prompt, its ids
    and its text as rendered by the training template, is sent the answer message, returns the row's
    messages. Turn t+1 is prompted with the answer to turn t; a prompt over max_prompt_tokens, or one the
    template refuses (the first turn's was checked before), ends the row with the turns answered so far."""
    hist = row["system"]
    for u in row["users"]:
        user = {"role": "user", "content": u}
        try:
            ids = render_chat(tokenizer, hist + [user], enable_thinking, True)
            text = render_chat(tokenizer, hist + [user], enable_thinking, True, tokenize=False)
        except Exception:  # e.g. a template that takes one user turn only: the row's earlier turns are kept
            break
        if len(ids) > max_prompt_tokens:
            break
        hist = hist + [user, (yield ids, text)]
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


class Refused(ServerError):
    """The server's answer that the request itself is wrong; `reason` is its own message."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def _http(url, body=None, timeout=60.0):
    """GET (body None) or POST a JSON body; the decoded JSON answer. $OPENAI_API_KEY is sent if set."""
    import urllib.request
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _reason(err):
    """The server's own words in an HTTP error, on one line: the message of an OpenAI-style error, else
    FastAPI's detail, else the body."""
    raw = err.read()[:1 << 20].decode("utf-8", "replace")
    try:
        said = json.loads(raw)
    except ValueError:
        said = raw
    for key in ("error", "message", "detail"):
        said = said.get(key, said) if isinstance(said, dict) else said
    return " ".join(str(said).split())


# llama.cpp's Python server answers a malformed request with HTTP 500 and a validation error: retrying that
# cannot help. Other 5xx, 408 and 429 are load or a restart: retried.
_REQUEST_FAULT = re.compile(r"validation|invalid|must be|should be|unsupported|not supported|unrecognized|exceed", re.I)


def _retrying(url, body, timeout, retries, backoff, log):
    """_http with retries on timeouts, dropped connections, bad JSON, 408, 429 and 5xx, waiting backoff,
    2 x backoff, ... (at most 60 s, jittered); Refused at once for any other HTTP error, and for a 5xx whose
    message says the request is wrong."""
    import http.client
    import random
    import urllib.error
    for attempt in range(retries + 1):
        try:
            return _http(url, body, timeout)
        except urllib.error.HTTPError as e:
            reason = _reason(e)
            if not (e.code in (408, 429) or (e.code >= 500 and not _REQUEST_FAULT.search(reason))):
                # pydantic names every prompt token a text-only server refuses: whole for _refused_fields, cut here
                raise Refused(f"{url} answered HTTP {e.code}: {reason[:1000]}", reason)
            why = f"HTTP {e.code}: {reason[:200]}"
        except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, refused/reset connections, bad JSON
            why = f"{type(e).__name__}: {e}"
            if isinstance(getattr(e, "reason", e), ConnectionRefusedError):  # it was up: server_model reached it
                why += ": the server no longer accepts connections (stopped or crashed? its log says why)"
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


# Sampling knobs are sent switched off, so that a server's own defaults (a generation_config; llama.cpp's
# top_k 40, min_p 0.05, repeat_penalty 1.1) never apply: the local path samples by temperature alone. Names
# are vLLM's and SGLang's, plus llama.cpp's repeat_penalty, whose penalties run before its greedy pick (left
# at 1.1, even temperature 0 is not greedy there). A refused value gives way to the next one: llama.cpp
# refuses top_k -1, and its top-k sampler skips k <= 0, so 0 is off there.
_SAMPLING_OFF = {"top_p": [1.0], "top_k": [-1, 0], "min_p": [0.0], "repetition_penalty": [1.0], "repeat_penalty": [1.0]}
_REQUIRED = ("model", "max_tokens", "temperature", "n", "stream")  # a server refusing one of these cannot be used


def _refused_fields(reason, fields):
    """The request fields a refusal names: pydantic's locations ('body', 'top_k'), else the fields it
    mentions by name (other servers word it their own way)."""
    locs = set(re.findall(r"""['"]body['"],\s*['"](\w+)['"]""", reason))
    return (locs or {f for f in fields if re.search(rf"\b{f}\b", reason)}) & set(fields)


def _choice(url, res):
    """(text, token ids or None, finished, prompt tokens the server counted or None) of a completion."""
    try:
        c = res["choices"][0]
        return (c.get("text") or "", c.get("token_ids"), c.get("finish_reason") == "stop",
                (res.get("usage") or {}).get("prompt_tokens"))
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ServerError(f"{url} answered without choices: {str(res)[:300]}")


def _without_refused(body, named):
    """The body with each refused sampling field at its next value, or left out; and what was refused."""
    sent, refused = dict(body), []
    for k in sorted(named - {"prompt"}):
        values = _SAMPLING_OFF.get(k, [])
        later = values[values.index(sent[k]) + 1:] if sent[k] in values else []
        refused.append(f"{k}={sent[k]}")
        if later:
            sent[k] = later[0]
        else:
            del sent[k]
    return sent, refused


def _check_prompt_tokens(n, ours):
    if n is not None and n != ours:
        raise ServerError(f"the server read {n} prompt tokens where the training template renders {ours}: it tokenises "
                          "our text otherwise (another tokenizer? a BOS of its own?), so its answers would not be to our "
                          "prompts: serve --target's own tokenizer, or a server that takes token-id prompts (vLLM, SGLang)")


def _probe(url, post, body, prompt, bos):
    """What the server takes, before any row: (body to send, send text?, strip our BOS?, the line saying so).
    One request for one token with every field and the prompt as ids; where the server refuses the prompt's
    form or some sampling field, one more with the text and those fields changed or left out must be answered
    (its refusal stops the run). That one also shows whether the server puts a BOS before a text prompt: then
    a rendering that starts with the BOS goes without it, so that the server reads our ids."""
    (ids, text), sent, as_text, refused = prompt, dict(body), False, []
    try:
        res = post({**body, "max_tokens": 1, "prompt": ids})
    except Refused as e:
        named = _refused_fields(e.reason, ["prompt", *body])
        if not named or named & set(_REQUIRED):
            raise
        (sent, refused), as_text = _without_refused(body, named), "prompt" in named
        res = post({**sent, "max_tokens": 1, "prompt": text if as_text else ids})
    _, got_ids, _, n = _choice(url, res)
    strip = as_text and n == len(ids) + 1 and bool(bos) and text.startswith(bos)
    _check_prompt_tokens(n, len(ids) + strip)
    if got_ids is not None:  # vLLM (return_token_ids): it logs a warning for every request with a field it ignores
        sent.pop("repeat_penalty", None)
    how = ("the server takes text prompts, not token ids: sending the training template's text"
           + (f" without its leading {bos} (the server adds one)" if strip else "")) if as_text else "the server takes token-id prompts"
    fields = [k if sent[k] == body[k] else f"{k}={sent[k]}" for k in sent if k not in _REQUIRED]
    line = (f"regenerate: {how}; request fields: temperature, {', '.join(fields)}"
            + (f"; refused: {', '.join(refused)}" if refused else "")
            + ("; answer ids: the server's" if got_ids is not None else "; answer ids: the text re-tokenised")
            + ("; the server reports no usage, so the prompt's token count goes unchecked" if n is None else ""))
    return sent, as_text, strip, line


def server_answerer(server, name, tokenizer, stops, max_new_tokens, temperature, first_prompt, timeout=600.0,
                    retries=10, backoff=1.0, log=print):
    """(ids, text) of a prompt -> the answer message, from the server's completions endpoint; what the server
    takes is probed first (_probe) on `first_prompt`. Sampling is the local path's: temperature only, the same
    stop ids. The prompt goes as token ids (the training template's rendering, so no server-side template or
    BOS), or where the server takes text only, as that rendering's text; a server that reads another number
    of prompt tokens than ours stops the run. The answer's ids are the server's where it returns them (vLLM:
    return_token_ids), else the text re-tokenised, kept only if it decodes back to the same text (else the
    turn is kept as text, re-tokenised by training)."""
    url = server.rstrip("/").removesuffix("/v1") + "/v1/completions"
    post = lambda b: _retrying(url, b, timeout, retries, backoff, log)
    body = {"model": name, "max_tokens": max_new_tokens, "temperature": temperature, "n": 1, "stream": False,
            **{k: v[0] for k, v in _SAMPLING_OFF.items()},
            "stop_token_ids": list(stops), "skip_special_tokens": False, "return_token_ids": True}
    bos = tokenizer.bos_token
    body, as_text, strip_bos, line = _probe(url, post, body, first_prompt, bos)
    log(line)

    def answer(prompt):
        ids, text = prompt
        res = post({**body, "prompt": (text[len(bos):] if strip_bos else text) if as_text else ids})
        text, got, finished, n = _choice(url, res)
        _check_prompt_tokens(n, len(ids))
        with _TOKENIZER_LOCK:
            if got is None:
                got = tokenizer.encode(text, add_special_tokens=False)
                if tokenizer.decode(got) != text:
                    return {"role": "assistant", "content": text, "finished": finished}
            return _answer(tokenizer, list(got), stops, finished)
    return answer


def regenerate(target, data, out, max_new_tokens=512, temperature=0.0, batch_size=64, num_shards=1,
               shard=0, limit=None, max_turns=1, enable_thinking=None, max_prompt_tokens=1024, compile=None, log=print,
               server=None, concurrency=64, served_model_name=None, timeout=600.0, retries=10, backoff=1.0, dtype=None,
               device=None):
    """Write {"id", "index", "messages"} rows whose assistant turns are the target's own answers
    (with their "token_ids"). Turn t+1 is prompted with the target's answer to turn t, as text
    rendered by the template. Rows already in OUT are skipped, so a killed run just restarts; rows
    the template refuses are skipped and counted.
    With `server` (an OpenAI-compatible URL) the target answers there, `concurrency` rows at a
    time, instead of in this process; the rows are the same."""
    for flag, n in (("--num-shards", num_shards), ("--batch-size", batch_size), ("--max-turns", max_turns),
                    ("--concurrency", concurrency), ("--max-new-tokens", max_new_tokens), ("--max-prompt-tokens", max_prompt_tokens)):
        if n < 1:
            raise SystemExit(f"regenerate error: {flag} {n}: give 1 or more")
    if not 0 <= shard < num_shards:
        raise SystemExit(f"regenerate error: --shard {shard}: give 0 to {num_shards - 1} (--num-shards {num_shards})")
    if device and not server:
        check_device(device)
    out_arg = out
    if other := other_shardings(out, num_shards):
        raise SystemExit(f"regenerate error: --out {out} already has rows written with another --num-shards ({other[0]}): "
                         "their rows overlap this run's; rerun with the --num-shards they were written with, or give another --out")
    out = shard_path(out, shard, num_shards)
    done, recorded = _written(out)
    settings = {"dtype": None if server else writer_dtype(dtype, writer_device(shard, device)),  # a server's is unknown
                "enable_thinking": {None: "auto", True: "on", False: "off"}[enable_thinking],
                "temperature": temperature, "max_new_tokens": max_new_tokens}
    if changed := changed_settings(recorded, settings):
        raise SystemExit(f"regenerate error: {out} holds rows written with {changed}: rerun with those to finish it, "
                         "or give another --out")
    for other in (shard_path(out_arg, k, num_shards) for k in range(num_shards) if k != shard):
        if changed := changed_settings({k: v for k, v in _first_row(other).items() if k in SETTINGS}, settings):
            raise SystemExit(f"regenerate error: {other}, another shard of this --out, holds rows written with {changed}: "
                             "give every shard the same settings, or another --out")
    if num_shards > 1:  # shards run side by side in one terminal: each line says whose it is
        log = lambda line, say=log: say(line.replace("regenerate:", f"regenerate shard {shard} of {num_shards}:", 1))
    if server:  # before any other work: a wrong URL or model fails at once
        name = server_model(server, target, served_model_name, max_prompt_tokens + max_new_tokens)
    else:
        try:  # a mistyped --target: one line, not a traceback
            check_batch_decodable(targets.load_target_config(target))
        except (OSError, ValueError) as e:
            raise SystemExit(f"regenerate error: --target {target}: {e}")
    todo, skipped = [], collections.Counter()
    try:
        source = read_rows(data)
    except (OSError, ValueError) as e:  # a glob that matches nothing, a missing file, a Parquet file...
        raise SystemExit(f"regenerate error: --data {e}")
    from transformers import AutoTokenizer
    try:  # its template is checked before a row is read or the model loads
        tok = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as e:  # with --server only the tokenizer reads --target
        raise SystemExit(f"regenerate error: --target {target}: no tokenizer there ({' '.join(str(e).split())})")
    problem = chat_template_problem(tok)
    if problem:
        raise SystemExit(f"regenerate error: --target {target}: {problem}")
    for i, row in source:
        if limit is not None and i >= limit:
            break
        if i % num_shards != shard or i in done:
            continue
        try:
            msgs = parse_messages(row, need_assistant=False)
        except BadRow as e:
            skipped[str(e)] += 1
            continue
        system = [{"role": "system", "content": m["content"]} for m in msgs[:1] if m["role"] == "system"]
        users = [m["content"] for m in msgs if m["role"] == "user"][:max_turns]
        try:  # the first prompt's length orders the rows below
            first = len(render_chat(tok, system + [{"role": "user", "content": users[0]}], enable_thinking, True))
        except Exception as e:  # a template that refuses this row (Mistral's: "roles must alternate" after a system turn)
            skipped[f"template error ({type(e).__name__})"] += 1
            continue
        if first > max_prompt_tokens:  # counted here, so that a finished shard says so before the target loads
            skipped[f"prompt over {max_prompt_tokens} tokens"] += 1
            continue
        rid = first_set(row, "id", "question_id", "task_id", default=i)
        todo.append({"index": i, "id": rid, "system": system, "users": users, "first": first})
    log(f"regenerate: {len(todo)} rows to do, {len(done)} already in {out}, skipped: {dict(skipped)}")
    if not todo:
        log(f"regenerate: nothing left to do, {out} is complete" if done else
            f"regenerate: no row to answer (all skipped): nothing written to {out}")
        return out
    if server:
        stops = stop_ids(tok, writer_generation_config(target))
    else:
        device = writer_device(shard, device)
        log(f"regenerate: the target writes on {device}")
        tok, model, stops = load_writer(target, dtype, device)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
        pad_id = pad_id if pad_id < model.get_input_embeddings().num_embeddings else stops[0]  # a [PAD] added past it
        batch_size = min(batch_size, len(todo))  # a static batch: no wider than the rows
        decode = BatchDecoder(model, batch_size, max_prompt_tokens, max_new_tokens, stops, pad_id, compile)
    # shortest prompts first: a run stopped by a time limit has answered the most rows
    rows = sorted(todo, key=lambda r: r["first"])
    conversation = lambda r: _conversation(tok, r, enable_thinking, max_prompt_tokens)
    if server:  # probed on the first row's prompt
        try:
            answer = server_answerer(server, name, tok, stops, max_new_tokens, temperature, next(conversation(rows[0])),
                                     timeout, retries, backoff, log)
        except Refused as e:  # the server refuses what we ask: bad input (exit 2)
            raise SystemExit(f"regenerate error: {e}")
        except ServerError as e:  # down or overloaded after the retries: a failure, not bad input (exit 1)
            raise SystemExit(f"regenerate error: {e} (nothing written yet: rerun to resume)")
    t0, ntok, written, cut, dropped = time.time(), 0, 0, 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        def write(r, msgs):
            nonlocal ntok, written, cut, dropped
            row = {"id": r["id"], "index": r["index"], **settings, "messages": msgs}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a kill leaves only whole lines (plus at most one partial, cut on resume)
            ntok += sum(len(m.get("token_ids", ())) for m in msgs if m["role"] == "assistant")
            written += 1
            cut += sum(m.get("finished") is False for m in msgs)
            dropped += len(r["users"]) - sum(m["role"] == "user" for m in msgs)
        if server:
            _serve_rows(rows, conversation, answer, concurrency, write, lambda: _progress(log, t0, written, len(rows), ntok))
        else:
            for b in range(0, len(rows), batch_size):
                convs = [conversation(r) for r in rows[b:b + batch_size]]
                state = [_advance(c) for c in convs]  # the turns of a batch are decoded in lockstep
                while any(p is not None for p, _ in state):
                    live = [j for j, (p, _) in enumerate(state) if p is not None]
                    gens = decode([state[j][0][0] for j in live], temperature)  # the prompt's ids
                    for j, g in zip(live, gens):
                        state[j] = _advance(convs[j], _answer(tok, g, stops))
                for r, (_, msgs) in zip(rows[b:b + batch_size], state):
                    write(r, msgs)
                _progress(log, t0, written, len(rows), ntok)
    log(f"regenerate: wrote {written} rows ({cut} answers cut at {max_new_tokens} new tokens, "
        f"{dropped} later turns dropped: prompt over {max_prompt_tokens} tokens or refused by the template)")
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
                   help="enable_thinking for the chat template (each row records it; train with the same enable_thinking)")
    r.add_argument("--no-compile", action="store_true", help="eager decode steps (default: compiled on GPU)")
    r.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="the target's dtype here (default: bf16 on "
                   "GPU, fp32 on CPU); each row records it (\"dtype\") and bench.py --replay decodes in it")
    r.add_argument("--device", default=None, help="cuda:N or cpu (default: the GPU of LOCAL_RANK, else GPU shard mod "
                   "the visible GPUs, else cpu)")
    r.add_argument("--server", default=None, help="an OpenAI-compatible server (vLLM, SGLang, llama.cpp, ...) serving "
                   "--target, e.g. http://host:8000; --target then only gives the tokenizer and chat template")
    r.add_argument("--concurrency", type=int, default=64, help="with --server: rows in flight at once")
    r.add_argument("--served-model-name", default=None, help="with --server: the server's name of the target "
                   "(default: the served model whose name ends with --target's folder name)")
    r.add_argument("--timeout", type=float, default=600.0, help="with --server: seconds one request may take before it is retried")
    a = ap.parse_args(argv)
    try:
        regenerate(a.target, a.data, a.out, a.max_new_tokens, a.temperature, a.batch_size, a.num_shards, a.shard,
                   a.limit, a.max_turns, None if a.enable_thinking is None else a.enable_thinking == "on",
                   a.max_prompt_tokens, False if a.no_compile else None, server=a.server, concurrency=a.concurrency,
                   served_model_name=a.served_model_name, timeout=a.timeout, dtype=a.dtype, device=a.device)
    except torch.OutOfMemoryError as e:  # the static KV cache holds --batch-size x (prompt + new tokens) slots
        e.add_note("regenerate: to fit, lower --batch-size: a rerun resumes after the rows written")
        raise
    except SystemExit as e:  # bad input, found before any row is written: one line, exit 2 (as argparse, train.py)
        if isinstance(e.code, str):
            line = e.code.replace("regenerate error:", f"regenerate shard {a.shard} of {a.num_shards} error:", 1) \
                if 0 <= a.shard < a.num_shards > 1 else e.code  # shards share a terminal: say whose
            print(line, file=sys.stderr, flush=True)
            e.code = 1 if e.code.endswith("rerun to resume)") else 2  # a server failing: 1; str(e) stays the line
        raise


if __name__ == "__main__":
    main()