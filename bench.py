"""Lossless speculative decoding with a DFlash drafter, and the benchmark the paper reports.

    python bench.py --target DIR --draft DIR --dataset mt-bench,humaneval [--num-prompts 20]
    python bench.py --target configs/qwen3-8b.json --prompt-len 128 --device cuda --dtype bf16 --compile

One speculative step (spec_generate below is the whole algorithm):
  draft   the drafter fills [last committed token, MASK x (B-1)] in one forward; the proposals are
          its argmax at T = 0, samples of its softmax(logits / T) at T > 0
  verify  the target runs the whole block in one forward over its KV cache; forward hooks on the
          unmodified HF model capture the features of the same pass
  accept  the longest prefix of accepted proposals, plus one token of the target's after it
          (correction or bonus): acceptance length = accepted + 1 (accept() below has the two rules)
  commit  the target cache is cut back to the committed length; the features of the committed
          tokens become the drafter's next context (no extra target forward)
block_size = 1 is plain decoding through the same code (no drafter call): the baseline.
At temperature T > 0 (--sampling speculative, the default) the verify is speculative sampling: the
emitted tokens follow the target's softmax(logits / T) exactly. --sampling match is the older rule
(greedy proposals, accepted iff equal to the target's sample): also exact; it accepted less at T 1.0
and as much at T 0.6 on the SmolLM2 drafter (results/sampling-smollm2.md).
--replay ROWS.jsonl measures tau at temperature 0 without decoding, from the target's known greedy
answers (rows written by `data.py regenerate`): a target forward per row or turn, a drafter pass per step.
Exit status: 2 for bad input (one line, before decoding); 1 where the run finds the loop wrong: a lossless
mismatch at temperature 0 (near ties are not) or --compile's fp32 check; else 0.
Elsewhere: --compile's static caches and CUDA graphs in fast_decode.py; --replay, --profile and the
acceptance statistics in measure.py; the rollback of each kind of target layer in targets.py.
"""
import argparse
import contextlib
import glob
import json
import os
import sys
import time

import torch

import data
import fast_decode
import measure
import model as M
import targets
from convert import load_drafter


# ----------------------------------------------------------------------------------------------
# Sampling and acceptance

def draw(weights, generator=None):
    """[..., V] non-negative weights (not necessarily normalised) -> [...] an exact sample of each row
    by the exponential race (argmax w / E, E ~ Exp(1)): no host sync."""
    race = torch.empty_like(weights).exponential_(1.0, generator=generator)
    return (weights / race).argmax(-1)


def sample(logits, temperature, generator=None):
    """[..., V] logits -> [...] tokens: argmax at temperature 0, else a sample of softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return draw(torch.softmax(logits.float() / temperature, -1), generator)


def accept(block, logits, draft_logits, temperature, generator=None, sampling="speculative"):
    """One verify. block [B] = [anchor, d_1 .. d_{B-1}]; logits [B, V]: the target's, row k predicts the
    token after slot k; draft_logits [B-1, V]: the drafter's, row k-1 the one d_k was drawn from.
    Returns (n, tokens [B]), n a device scalar: the step emits tokens[:n + 1], the n accepted proposals
    and the target's token after them (correction or bonus). No host sync.
      match (and both rules at T = 0): d_k is accepted while d_1..d_k all equal the target's own tokens
        (its argmax, or samples of p = softmax(logits / T)), which are the emitted tokens.
      speculative: d_k ~ q_k = softmax(draft_logits / T) is accepted with probability min(1, p_k / q_k)
        (u q_k(d_k) < p_k(d_k), u ~ U[0, 1)); the first rejected slot emits a sample of
        norm(max(0, p_k - q_k)), a fully accepted block the bonus ~ p_B. Every emitted token follows p
        and a slot accepts with probability sum_x min(p_k(x), q_k(x)) (Leviathan et al. 2023)."""
    if temperature <= 0 or sampling == "match":
        target_tokens = sample(logits, temperature, generator)
        return (block[1:] == target_tokens[:-1]).cumprod(0).sum(), target_tokens
    p = torch.softmax(logits.float() / temperature, -1)
    q = torch.softmax(draft_logits.float() / temperature, -1)
    d = block[1:, None]
    u = torch.rand(d.shape, device=p.device, generator=generator)
    n = (u * q.gather(-1, d) < p[:-1].gather(-1, d)).cumprod(0).sum()
    fix = draw(torch.cat([(p[:-1] - q).clamp(min=0), p[-1:]]), generator)  # residual per slot; bonus last
    slot = torch.arange(len(block), device=block.device)
    return n, torch.where(slot < n, torch.cat([block[1:], block[:1]]), fix)


# ----------------------------------------------------------------------------------------------
# The eager runner: HF DynamicCache for the target, model.DraftCache for the drafter

class EagerRunner:
    """Dynamic caches: the target's DynamicCache is cropped to the committed length after every step;
    the DraftCache only ever receives K/V of committed context (block K/V is never stored)."""

    def __init__(self, target, drafter, block_size):
        from transformers import DynamicCache
        self.target, self.drafter, self.block_size = target, drafter, block_size
        self.layer_ids = list(drafter.config.target_layer_ids) if block_size > 1 else []
        self.kv, self.cache_kw = DynamicCache(config=target.config), targets.cache_kwarg(target)
        self.draft_kv, self.ctx = M.DraftCache(), None
        for layer in self.kv.layers:  # a sliding layer keeps what a verify evicts until rewind cuts it back
            if getattr(layer, "is_sliding", False):
                layer.activate_past_recording()
        self.states = [layer for layer in self.kv.layers if targets.is_recurrent(layer)]
        self.undo = None  # (block, states before its verify) while a verify of a recurrent target is pending

    def target_forward(self, ids, logits_to_keep=0):
        """(logits [T, V], features [T, n*H] or None) of ids [1, T] appended to the target cache."""
        kw = {self.cache_kw: self.kv, "use_cache": True, "logits_to_keep": logits_to_keep}
        if not self.layer_ids:
            return self.target(input_ids=ids, **kw).logits[0], None
        feats, out = M.capture_features(self.target, ids, self.layer_ids, stop_early=False, **kw)
        return out.logits[0], feats[0]

    def prefill(self, input_ids):
        return self.target_forward(input_ids, logits_to_keep=1)

    def draft(self, anchor, start):
        """[B-1, V]: the drafter's logits for positions start+1 .. start+B-1 (no rows at block size 1)."""
        if self.block_size == 1:
            return torch.empty(0, 1, device=anchor.device)
        feats, ctx_start = self.ctx
        ctx_pos = torch.arange(ctx_start, ctx_start + feats.shape[0], device=feats.device)[None]
        block = M.block_ids(anchor, self.block_size, self.drafter.config.mask_token_id)
        return M.draft_block(self.drafter, self.target, feats[None], ctx_pos, block, start, self.draft_kv)[0, 1:]

    def verify(self, block, start):
        if self.states and block.shape[0] > 1:
            self.undo = (block, targets.snapshot_states(self.states))
        return self.target_forward(block[None])

    def rewind(self, length):
        """Cut the target cache back to `length` committed positions. Attention K/V are cut by length (a
        sliding layer recorded what the verify evicted, so it gives the rejected positions back; cutting 0
        trims it to its window). Linear-attention / conv states have no positions: after a rejection they
        are restored to their value before the verify and the committed block tokens run again, one extra
        target forward over accepted + 1 tokens (its features equal the verify's: the verify's are kept)."""
        extra, redo = self.kv.get_seq_length() - length, None
        if self.undo is not None and extra > 0:
            block, saved = self.undo
            targets.restore_states(self.states, saved)
            redo, extra = block[: block.shape[0] - extra], block.shape[0]
            targets.set_state_length(self.states, length - redo.shape[0])
        for layer in self.kv.layers:
            if not targets.is_recurrent(layer):
                layer.crop(-extra)
        if redo is not None:
            self.target(input_ids=redo[None], use_cache=True, logits_to_keep=1, **{self.cache_kw: self.kv})
        self.undo = None

    def commit(self, length, feats, n_new):
        """Keep `length` positions in the target cache; the features of the last n_new of them
        (computed by the pass that just ran) are the drafter's next context."""
        self.rewind(length)
        self.ctx = None if feats is None else (feats[:n_new], length - n_new)


# ----------------------------------------------------------------------------------------------
# The loop

class StepClock:
    """Per-step draft / verify times without host syncs: CUDA events, read once at the end."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def step(self, t0, t1, t2):
        self.marks.append((t0, t1, t2))

    def totals(self):
        if self.cuda:
            torch.cuda.synchronize()
            span = lambda a, b: a.elapsed_time(b) / 1e3
        else:
            span = lambda a, b: b - a
        return (sum(span(a, b) for a, b, _ in self.marks), sum(span(b, c) for _, b, c in self.marks))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _top2_gap(logits):
    """[T, V] -> [T, 2]: (top-1 minus top-2 logit, top-1 logit) per row."""
    top = logits.float().topk(2, -1).values
    return torch.stack([top[:, 0] - top[:, 1], top[:, 0]], -1)


@torch.no_grad()
def spec_generate(target, drafter, input_ids, max_new_tokens, stop_ids, block_size=None,
                  temperature=0.0, generator=None, max_steps=None, runner=None, record_gaps=False,
                  sampling="speculative"):
    """Generate up to max_new_tokens after input_ids [1, P]; stop after the first stop token (which is
    emitted). Returns tokens (new ids), acceptance (tokens emitted per step: accepted + 1,
    less in a last step cut by a stop token or the limit; sum = len(tokens) - 1), draft_s, verify_s,
    prefill_s, decode_s (total_s - prefill_s) and total_s. block_size=1: plain decoding, no drafter.
    sampling (T > 0 only): "speculative" or "match", see accept()."""
    B = block_size or drafter.config.block_size
    device = input_ids.device
    if temperature > 0 and generator is None:
        generator = torch.Generator(device).manual_seed(0)
    run = runner or EagerRunner(target, drafter, B)
    stop, P, clock, gaps = set(stop_ids), input_ids.shape[1], StepClock(device), []
    _sync(device)
    t_start = time.perf_counter()

    logits, feats = run.prefill(input_ids)                  # target(prompt) + features of the prompt
    token = sample(logits[-1], temperature, generator)      # the first new token: the first anchor
    run.commit(P, feats, P)
    out, acceptance = [token.item()], []
    gaps += [_top2_gap(logits[-1:])] if record_gaps else []
    t_prefill = time.perf_counter()

    while out[-1] not in stop and len(out) < max_new_tokens and len(acceptance) < (max_steps or 1 << 62):
        start = P + len(out) - 1                            # position of the anchor (last committed token)
        t0 = clock.mark()
        draft_logits = run.draft(token, start)              # [B-1, V]
        proposals = sample(draft_logits, temperature if sampling == "speculative" else 0, generator)
        block = torch.cat([token.view(1), proposals])       # [B]: anchor + B-1 proposals
        t1 = clock.mark()
        logits, feats = run.verify(block, start)            # [B, V], [B, n*H]: one target pass
        clock.step(t0, t1, clock.mark())
        n, tokens = accept(block, logits, draft_logits, temperature, generator, sampling)
        n, *emitted = torch.cat([n.view(1), tokens]).tolist()   # the step's one host sync
        token = tokens[n]
        run.commit(start + n + 1, feats, n + 1)             # anchor + n accepted proposals are committed
        emitted = emitted[: min(n + 1, max_new_tokens - len(out))]
        cut = next((i + 1 for i, t in enumerate(emitted) if t in stop), len(emitted))
        out += emitted[:cut]
        acceptance.append(cut)
        gaps += [_top2_gap(logits[:cut])] if record_gaps else []

    t_end = time.perf_counter()
    draft_s, verify_s = clock.totals()
    res = dict(tokens=out, acceptance=acceptance, draft_s=draft_s, verify_s=verify_s,
               prefill_s=t_prefill - t_start, decode_s=t_end - t_prefill, total_s=t_end - t_start)
    if record_gaps:
        res["gaps"] = torch.cat(gaps).tolist()
    return res


# ----------------------------------------------------------------------------------------------
# Prompts, chat turns, stop tokens

def render(tokenizer, messages):
    """Chat template with add_generation_prompt=True; thinking off where the template has the switch."""
    thinking = False if data.has_thinking_switch(tokenizer) else None
    return data.render_chat(tokenizer, messages, thinking, add_generation_prompt=True)


def run_turns(target, drafter, tokenizer, turns, max_new_tokens, stop_ids, block_size, temperature=0.0,
              generator=None, runner=None, sampling="speculative"):
    """All turns of one prompt; turn k's chat history holds this run's own answers to turns < k."""
    device = target.get_input_embeddings().weight.device
    messages, results = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        ids = render(tokenizer, messages)
        r = spec_generate(target, drafter, torch.tensor([ids], device=device), max_new_tokens, stop_ids,
                          block_size, temperature, generator, runner=runner, sampling=sampling)
        answer = tokenizer.decode(r["tokens"], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        results.append(dict(r, prompt_ids=ids, answer=answer))
    return results


def measure_tau(target, drafter, tokenizer, prompts, max_new_tokens, log=None):
    """(tau, turns identical to greedy decoding): the mean acceptance length over all steps of the first
    turn of each prompt at temperature 0; each turn is also decoded plainly (block size 1) and compared."""
    stops = data.stop_ids(tokenizer, target)
    steps, same = [], 0
    tick = data.progress(log or (lambda line: None), "eval: decoded", len(prompts), "prompts")
    for i, p in enumerate(prompts):
        turn = [p["turns"][0] if isinstance(p, dict) else p]
        spec, plain = (run_turns(target, drafter, tokenizer, turn, max_new_tokens, stops, bs)[0] for bs in (None, 1))
        steps += spec["acceptance"]
        same += spec["tokens"] == plain["tokens"]
        tick(i + 1)
    return sum(steps) / max(len(steps), 1), same


# ----------------------------------------------------------------------------------------------
# Benchmark: per-turn records, the lossless check, the summary

def diagnose(target, drafter, prompt_ids, pos, block_size, stop_ids, runners):
    """Top-2 logit gap of the target at new-token position `pos` in both runs (baseline, DFlash)."""
    ids = torch.tensor([prompt_ids], device=target.get_input_embeddings().weight.device)
    out = {}
    for name, bs in (("baseline", 1), ("dflash", block_size)):
        r = spec_generate(target, drafter, ids, pos + 1, stop_ids, bs, runner=runners.get(bs), record_gaps=True)
        out[name] = r["gaps"][pos] if pos < len(r["gaps"]) else None
    known = [g for g in out.values() if g is not None]
    out["near_tie"] = bool(known) and all(measure.near_tie(g, target.dtype) for g in known)
    return out


def summarize(name, records, block_size, temperature=0.0, sampling="speculative"):
    """Print tau, TPOT of both runs, speedup, the per-step time breakdown and the acceptance histogram."""
    base_tpot, dfl_tpot = measure.tpot_ms(records, "baseline"), measure.tpot_ms(records, "dflash")
    per_step = lambda k, f: 1e3 * sum(r[k][f] for r in records) / max(sum(len(r[k]["acceptance"]) for r in records), 1)
    res = dict(dataset=name, **measure.acceptance_summary(records), baseline_tpot_ms=base_tpot, dflash_tpot_ms=dfl_tpot,
               speedup=base_tpot / dfl_tpot if dfl_tpot else float("nan"), temperature=temperature,
               sampling=sampling if temperature > 0 else "greedy")
    for k in ("baseline", "dflash"):
        d, v, t = per_step(k, "draft_s"), per_step(k, "verify_s"), per_step(k, "decode_s")
        res[k + "_step_ms"] = dict(draft=d, verify=v, other=t - d - v)
    res.update(measure.lossless_summary(records))
    mode = f"T {temperature}, {sampling} sampling" if temperature > 0 else "greedy"
    print(f"\n== {name}: {len(records)} turns, {res['steps']} DFlash steps, block {block_size}, {mode}")
    print(f"  tau {res['tau']:.2f} | TPOT baseline {res['baseline_tpot_ms']:.2f} ms, DFlash "
          f"{res['dflash_tpot_ms']:.2f} ms | speedup {res['speedup']:.2f}x")
    for k in ("baseline", "dflash"):
        s = res[k + "_step_ms"]
        print(f"  {k:8s} step: draft {s['draft']:.2f} ms, verify {s['verify']:.2f} ms, other {s['other']:.2f} ms")
    measure.print_acceptance(res)
    measure.print_lossless(res, len(records), temperature)
    return res


def bench_prompts(target, drafter, tokenizer, prompts, args, runners, name, out_file=None, run=None):
    stops, B, device = data.stop_ids(tokenizer, target), args.block_size, args.device
    records, t0 = [], time.perf_counter()
    for i, p in enumerate(prompts, 1):
        runs = {}
        for key, bs in (("baseline", 1), ("dflash", B)):
            gen = torch.Generator(device).manual_seed(args.seed)
            runs[key] = run_turns(target, drafter, tokenizer, p["turns"], args.max_new_tokens, stops, bs,
                                  args.temperature, gen, runners.get(bs), args.sampling)
        for k, (b, d) in enumerate(zip(runs["baseline"], runs["dflash"])):
            keep = ("tokens", "acceptance", "draft_s", "verify_s", "prefill_s", "decode_s")
            rec = dict(dataset=name, id=p.get("id"), turn=k, prompt_len=len(d["prompt_ids"]),
                       baseline={f: b[f] for f in keep}, dflash={f: d[f] for f in keep},
                       same_prompt=b["prompt_ids"] == d["prompt_ids"], match=None)
            rec["tau_by_position"] = measure.tau_by_position([rec])
            if args.temperature == 0 and rec["same_prompt"]:
                pos = measure.first_diff(b["tokens"], d["tokens"])
                rec.update(match=pos is None, first_diff=pos)
                if pos is not None:
                    rec["gaps"] = diagnose(target, drafter, d["prompt_ids"], pos, B, stops, runners)
            records.append(rec)
            if out_file:
                out_file.write(json.dumps(rec) + "\n")
                out_file.flush()
        print(measure.progress_line(name, i, len(prompts), records, time.perf_counter() - t0, run), flush=True)
    return summarize(name, records, B, args.temperature, args.sampling)


def warm_up(target, drafter, tokenizer, prompt, args, runners):
    """One prompt decoded in both modes before the timed ones, untimed and not counted: the first decode
    compiles (--compile: minutes) and fills the allocator's and the kernels' caches, which would inflate
    the first prompt's TPOT."""
    n = min(args.max_new_tokens, 64)
    print(f"warm-up: one prompt, {n} new tokens, both modes, once before timing (it compiles and warms caches; not counted)")
    for bs in (1, args.block_size):
        run_turns(target, drafter, tokenizer, prompt["turns"], n, data.stop_ids(tokenizer, target), bs, args.temperature,
                  torch.Generator(args.device).manual_seed(args.seed), runners.get(bs), args.sampling)


def random_prompt(target, drafter, n, args):
    """[1, n] token ids below the mask token and the target's vocab, seeded by --seed, on --device."""
    hi = min(target.config.get_text_config().vocab_size, drafter.config.mask_token_id)
    return torch.randint(0, hi, (1, n), generator=torch.Generator().manual_seed(args.seed)).to(args.device)


def check_fast_path(runners, target, drafter, args):
    """Each compiled runner against the target's own forward (fast_decode.forward_error) on a random prompt of
    --prompt-len tokens (else 32) and a block, before any timing: a mask bug may show only past the first tiles
    of keys (one H200: the split verify read wrong tiles from 130 keys on). fp32 is the exact check: over 1e-3
    of the largest logit is an error (SmolLM2: 1e-6 as it is, 4e-3 to 0.4 with a decode mask one key off). In
    bf16 rounding alone reaches 2e-2 there, so the error is printed, and warned about over 0.1."""
    ids = random_prompt(target, drafter, (args.prompt_len or 32) + args.block_size, args)
    errs = {bs: fast_decode.forward_error(run, ids) for bs, run in runners.items()}
    print("compiled steps against the target's forward: max |logit difference| / max |logit| = "
          + ", ".join(f"{e:.1e} (block {bs})" for bs, e in errs.items()))
    tol, worst = (1e-3 if args.dtype == "fp32" else 0.1), max(errs.values())
    if worst > tol:
        msg = (f"the compiled steps (--attention {args.attention}) part from the target's own forward by "
               f"{worst:.2g} of the largest logit, over {tol} in {args.dtype}: a fast-path bug, not "
               "rounding; --attention sdpa (or no --compile) is the exact path; --dtype fp32 checks it exactly")
        if args.dtype == "fp32":  # a failure found by running, not bad input: exit 1
            print(f"bench.py: error: {msg}", file=sys.stderr)
            raise SystemExit(1)
        print(f"WARNING: {msg}")


def time_synthetic(target, drafter, args, runners, tau=6.49):
    """Random prompt of --prompt-len tokens, --steps steps of each run, no stop token."""
    B, steps = args.block_size, args.steps
    ids = random_prompt(target, drafter, args.prompt_len, args)
    results = {}
    for key, bs in (("baseline", 1), ("dflash", B)):
        runs = [spec_generate(target, drafter, ids, steps * bs + 1, [], bs, max_steps=steps, runner=runners.get(bs))
                for _ in range(1 + args.repeats)][1:]  # the first is warm-up
        runs.sort(key=lambda r: r["decode_s"])
        r = runs[len(runs) // 2]  # median
        n = len(r["acceptance"])
        results[key] = dict(step_ms=1e3 * r["decode_s"] / n, draft_ms=1e3 * r["draft_s"] / n,
                            verify_ms=1e3 * r["verify_s"] / n, steps=n)
    if args.profile:
        n = min(steps, 16)
        for key, bs in (("baseline", 1), ("dflash", B)):
            run = lambda k: spec_generate(target, drafter, ids, k * bs + 1, [], bs, max_steps=k, runner=runners.get(bs))
            results[key].update(measure.profile_steps(run, n, ids.device.type == "cuda", key, args.profile))
    base, dfl = results["baseline"], results["dflash"]
    ratio = dfl["step_ms"] / base["step_ms"]
    print(f"prompt {args.prompt_len} tokens, {steps} steps, block {B}, {args.dtype}, {args.device}, "
          f"compile={args.compile}")
    counts = lambda res: "".join(f", {v:.1f} {k.replace('_per_step', '').replace('_', ' ')}/step" for k, v in res.items()
                                 if k.endswith("_per_step"))  # with --profile
    print(f"  baseline: {base['step_ms']:.2f} ms/token (verify {base['verify_ms']:.2f} ms{counts(base)})")
    print(f"  DFlash:   {dfl['step_ms']:.2f} ms/step (draft {dfl['draft_ms']:.2f} ms, verify {dfl['verify_ms']:.2f} ms, "
          f"other {dfl['step_ms'] - dfl['draft_ms'] - dfl['verify_ms']:.2f} ms{counts(dfl)})")
    print(f"  one DFlash step = {ratio:.2f} baseline steps; speedup implied at tau {tau}: {tau / ratio:.2f}x")
    bandwidth = measure.card_bandwidth(ids.device)
    if bandwidth:  # a step reads every weight once: no decoding step beats weights / bandwidth
        weights = measure.weight_bytes_per_token(target)
        results["floor_ms"] = floor_ms = 1e3 * weights / bandwidth
        print(f"  memory floor: {weights / 1e9:.3g} GB of weights a token / {bandwidth / 1e12:.2f} TB/s (the card's "
              f"peak) = {floor_ms:.3g} ms; baseline = {base['step_ms'] / floor_ms:.2f}x the floor")
    return dict(results, ratio=ratio, implied_speedup=tau / ratio)


def static_len(args, tokenizer, prompt_sets):
    """(the least --max-len, the default): the longest conversation this run can reach (all turns,
    max_new_tokens per answer, some slack for the template and a block), and that rounded up to 256.
    With --attention sdpa the compiled steps attend over the whole buffer (a dense mask), so its length
    is paid on every step (one H200, Qwen3-8B shapes, sdpa: a DFlash step cost 1.60 baseline steps with
    an 8,192 buffer at prompt 128); flex reads only the filled tiles, and the buffer costs memory."""
    if args.prompt_len is not None:
        need = args.prompt_len + (args.steps + 2) * args.block_size
    else:
        need = max(len(render(tokenizer, [{"role": "user", "content": "\n".join(p["turns"])}]))
                   + len(p["turns"]) * (args.max_new_tokens + 64) for ps in prompt_sets.values() for p in ps)
    need += 2 * args.block_size + 1
    return need, -(-need // 256) * 256


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HF folder, or an HF config json (random weights)")
    ap.add_argument("--draft", default="random", help="serving folder or training checkpoint, or 'random'")
    ap.add_argument("--accept-edited-config", action="store_true", help="use a --draft serving folder whose "
                    "config.json or README.md was edited after export (refused otherwise, naming the file; the "
                    "weights are still verified)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --target)")
    ap.add_argument("--dataset", action="append", default=[], help="name or JSONL; repeat or comma-separate")
    ap.add_argument("--replay", action="append", default=[], help="JSONL of regenerated rows (data.py regenerate at "
                    "temperature 0): tau from the target's recorded greedy answers, no decoding; repeat or comma-separate")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--sampling", choices=["speculative", "match"], default="speculative",
                    help="the verify at T > 0: speculative sampling with the drafter's probabilities, or "
                    "match (greedy proposals accepted iff equal to the target's sample); both exact")
    ap.add_argument("--block-size", type=int, default=None, help="default: the drafter's (16 for random)")
    ap.add_argument("--out", default=None, help="JSONL, one record per prompt and turn, then one per set "
                    "(tau, TPOT, speedup, lossless counts), then one with the mean tau over the sets")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16; with --replay, the dtype "
                    "the rows were regenerated in. fp32 is the exact lossless check (bf16 can flip near ties)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="static caches + torch.compile (CUDA graphs on GPU)")
    ap.add_argument("--gqa", action="store_true", help="the target's attention reads each K/V head once "
                    "(SDPA enable_gqa) instead of transformers' repeat to every query head")
    ap.add_argument("--attention", choices=["auto", "flex", "sdpa"], default="auto", help="with --compile, the "
                    "target's attention over the static cache: flex (FlexAttention over the filled part only, each K/V "
                    "head once; full-attention targets), sdpa (transformers' path over the whole buffer), auto: flex "
                    "where every target layer is full attention. One H200, bf16: a DFlash step cost 1.27 baseline steps "
                    "with flex against 1.79 with sdpa (SmolLM2); Qwen3-8B shapes, flex is faster in ms (prompt 1024: "
                    "6.11 / 9.17 against 6.89 / 9.88) at a higher ratio (1.50 against 1.43)")
    ap.add_argument("--freeze", action="store_true", help="with --compile: compile the steps with inductor's freezing, "
                    "which concatenates the q/k/v (from torch 2.12 where K/V heads are fewer) and the gate/up projections "
                    "into one GEMM each (a folded copy of those weights per step kind: ~9 GB each at Qwen3-8B shapes)")
    ap.add_argument("--tune-baseline", action="store_true", help="with --compile: the 1-token step's matmuls as tuned "
                    "Triton reductions (coordinate-descent tuning), not cuBLAS: Qwen3-8B shapes, one H100, 7.51 -> 6.77 ms "
                    "a token; ~3.5 min more compiling; slower with --freeze (one H200: 8.53 ms, 6.02 with --freeze alone)")
    ap.add_argument("--max-len", type=int, default=None, help="static cache length for --compile (at least the "
                    "longest conversation of the run; default: that rounded up to 256)")
    ap.add_argument("--prompt-len", type=int, default=None, help="time synthetic prompts of N tokens")
    ap.add_argument("--steps", type=int, default=64, help="steps per run with --prompt-len")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode with --prompt-len (median)")
    ap.add_argument("--profile", default=None, metavar="DIR", help="with --prompt-len: profile each step kind too "
                    "(launches per step, the ops that take the time; Chrome traces written to DIR)")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dataset = [x for d in args.dataset for x in d.split(",") if x]
    args.replay = list(dict.fromkeys(x for d in args.replay for x in d.split(",") if x))  # a file given twice: once
    if sum(map(bool, (args.dataset, args.replay, args.prompt_len is not None))) != 1:
        ap.error("give one of --dataset, --replay or --prompt-len")
    if missing := [f for f in args.replay if not os.path.isfile(f)]:
        ap.error(f"--replay {missing[0]}: no such file (rows written by `data.py regenerate`)")
    if args.profile and args.prompt_len is None:
        ap.error("--profile goes with --prompt-len (synthetic prompts, fixed step counts)")
    if args.prompt_len is not None and (args.out or args.temperature or args.sampling != "speculative"):
        ap.error("--prompt-len times greedy steps on a random prompt and prints them: drop --out, --temperature, --sampling")
    low = [(k, lo) for k, lo in dict(block_size=1, max_new_tokens=2, prompt_len=1, steps=1, repeats=1, max_len=1,
                                     num_prompts=1, temperature=0).items() if getattr(args, k) is not None and getattr(args, k) < lo]
    if low:  # --max-new-tokens: the first new token is the prefill's, a DFlash step needs one more
        ap.error(f"--{low[0][0].replace('_', '-')} {getattr(args, low[0][0])}: give {low[0][1]} or more")
    for flag, on in (("--attention flex", args.attention == "flex"), ("--freeze", args.freeze), ("--max-len", args.max_len),
                     ("--tune-baseline", args.tune_baseline)):
        if on and not args.compile:
            ap.error(f"{flag} changes the compiled (static cache) steps: add --compile")
    if args.replay and (args.temperature > 0 or args.compile):
        ap.error("--replay measures temperature 0 with the eager drafter: drop --temperature / --compile")
    for flag, path in (("--out", os.path.dirname(os.path.abspath(args.out or "."))), ("--tokenizer", args.tokenizer)):
        if path and not os.path.isdir(path):  # found after the model loaded and a warm-up decode otherwise
            ap.error(f"{flag}: no folder {path}")
    if unknown := [d for d in args.dataset if d not in data.PROMPT_SETS and not glob.glob(d)]:  # nothing downloads
        ap.error(f"--dataset {unknown[0]}: no such prompt set or file (nothing is downloaded); prompt sets: {', '.join(data.PROMPT_SETS)}")
    try:  # before any model loads: a set with no usable prompt is an error, not tau 0.00
        args.prompt_sets = {name: data.load_prompts(name)[: args.num_prompts] for name in args.dataset}
    except (OSError, ValueError) as e:
        ap.error(f"--dataset: {e}")
    try:  # greedy answers depend on the dtype: replay in the one the rows were decoded in
        args.rows_dtype = measure.replay_dtype(args.replay, args.num_prompts)
    except ValueError as e:
        ap.error(str(e))
    if args.rows_dtype and args.dtype not in (None, args.rows_dtype):
        ap.error(f"--dtype {args.dtype}: the --replay rows were regenerated in {args.rows_dtype}, so replay decodes in "
                 f"{args.rows_dtype}: drop --dtype, or regenerate the rows with --dtype {args.dtype}")
    args.dtype = args.dtype or args.rows_dtype or "bf16"
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:  # before any weights load: capture must find the decoder layers, and each layer must roll back
        targets.check_target(args.target)
        targets.check_rollback(targets.load_target_config(args.target), args.compile)
    except (ValueError, OSError) as e:  # OSError: a folder without config.json
        raise SystemExit(f"config error: {e}")
    try:  # before the target's weights load: a damaged or edited folder is named at once
        drafter = None if args.draft == "random" else load_drafter(args.draft, args.device, dtype,
                                                                   args.accept_edited_config)[0]
    except (ValueError, OSError) as e:
        raise SystemExit(f"bench.py: error: --draft {args.draft}: {e}")
    target = targets.load_target(args.target, dtype, args.device)
    if drafter is None:
        drafter = measure.random_drafter(target, args.block_size or 16)
    try:
        M.check_fits_target(drafter.config, target)
    except ValueError as e:
        raise SystemExit(f"bench.py: error: --draft {args.draft} does not fit --target {args.target}: {e}")
    if args.gqa:
        fast_decode.use_gqa_attention(target)  # flex switches the target's attention in StaticRunner
    args.block_size = args.block_size or drafter.config.block_size
    tokenizer, prompt_sets = None, args.prompt_sets  # {} with --prompt-len or --replay
    if args.prompt_len is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
    if args.replay:
        n, t0 = [measure.count_rows(f, args.num_prompts) for f in args.replay], time.perf_counter()
        with open(args.out, "w") if args.out else contextlib.nullcontext() as out_file:
            summaries = [measure.replay_rows(target, drafter, tokenizer, f, args, out_file, (sum(n[:k]), sum(n), t0), n[k])
                         for k, f in enumerate(args.replay)]
            return measure.closing(summaries, out_file)
    runners = {}
    if args.compile:
        need, max_len = static_len(args, tokenizer, prompt_sets)
        if (args.max_len or need) < need:  # before compiling, not a traceback mid-run that loses the summary
            raise SystemExit(f"bench.py: error: --max-len {args.max_len}: this run needs {need} (its longest prompt and "
                             f"answers, and a block's slack): raise it, or leave it out for {max_len}")
        max_len = args.max_len or max_len
        flex = {"auto": None, "flex": True, "sdpa": False}[args.attention]  # None: StaticRunner picks by layer kinds
        try:
            runners = {bs: fast_decode.StaticRunner(target, drafter, bs, max_len, flex=flex, freeze=args.freeze,
                                                    tune=args.tune_baseline and bs == 1) for bs in (1, args.block_size)}
        except ValueError as e:
            raise SystemExit(f"bench.py: error: {e}")
        check_fast_path(runners, target, drafter, args)
    if args.prompt_len is not None:
        return time_synthetic(target, drafter, args, runners)

    for p in [p for ps in prompt_sets.values() for p in ps][:1]:  # once per run: the sets share the caches
        warm_up(target, drafter, tokenizer, p, args, runners)
    n, t0 = [len(ps) for ps in prompt_sets.values()], time.perf_counter()  # every set's prompts: the run's ETA
    with open(args.out, "w") if args.out else contextlib.nullcontext() as out_file:
        summaries = [bench_prompts(target, drafter, tokenizer, prompts, args, runners, name, out_file, (sum(n[:k]), sum(n), t0))
                     for k, (name, prompts) in enumerate(prompt_sets.items())]
        measure.closing(summaries, out_file)
    if bad := sum(len(s["mismatches"]) for s in summaries):  # the loop changed the target's output: a failed run
        print(f"bench.py: the lossless check found {bad} mismatch(es) at temperature 0 (above): a bug", file=sys.stderr)
        raise SystemExit(1)
    return summaries


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # bad input, raised as one line before decoding: exit 2, as argparse's errors
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        sys.exit(2)
