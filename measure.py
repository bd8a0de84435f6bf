"""bench.py's measurement tools beside the decoding benchmark: the statistics of acceptance lengths (tau,
the histogram, tau by context position, the mean over prompt sets), the report of the lossless check,
--replay (tau at temperature 0 read off the target's regenerated greedy answers, without decoding: one
target forward per row (per turn where the template rewrites past turns), one drafter pass per step, equal
step for step to the loop: results/replay-check.md), --profile (launches and ops per decode step), the memory
floor of a step (the weights it reads / the card's peak bandwidth), random drafters that time the loop at
any target's shapes, and train.py's profile_steps (where a training step's time goes).
"""
import json
import os
import time
from collections import Counter

import torch

import data
import model as M


# ----------------------------------------------------------------------------------------------
# Acceptance statistics

POSITION_BUCKETS = ((0, "0-512"), (512, "512-1K"), (1024, "1K-2K"), (2048, "2K-4K"), (4096, "4K+"))


def tau_by_position(records, buckets=POSITION_BUCKETS):
    """Tau per bucket of the context position at which a step starts (its anchor: the prompt length
    plus the tokens emitted before it), so a drafter's acceptance past its training length shows.
    {bucket: {"steps": n, "tau": mean acceptance}} for the buckets that have steps."""
    steps = {}
    for r in records:
        start = r["prompt_len"]
        for a in r["dflash"]["acceptance"]:
            label = [lbl for lo, lbl in buckets if start >= lo][-1]
            steps.setdefault(label, []).append(a)
            start += a
    return {lbl: dict(steps=len(steps[lbl]), tau=sum(steps[lbl]) / len(steps[lbl]))
            for _, lbl in buckets if lbl in steps}


def acceptance_summary(records):
    """Turns, DFlash steps, tau (tokens per step), the acceptance-length histogram and tau by position."""
    steps = [a for r in records for a in r["dflash"]["acceptance"]]
    return dict(turns=len(records), steps=len(steps), tau=sum(steps) / max(len(steps), 1),
                histogram=dict(sorted(Counter(steps).items())), tau_by_position=tau_by_position(records))


def tpot_ms(records, kind):
    """Time per output token of one run ("baseline" or "dflash"), prefill excluded, as the authors count:
    each turn's decode time over its tokens, averaged over the turns both runs decoded (a long turn weighs
    what a short one does; the total time over all tokens would weigh turns by their length)."""
    timed = [r for r in records if r["dflash"]["acceptance"] and r["baseline"]["acceptance"]]
    return 1e3 * sum(r[kind]["decode_s"] / len(r[kind]["tokens"]) for r in timed) / max(len(timed), 1)


def print_acceptance(res):
    """The summary's tau by step start position and acceptance-length histogram lines."""
    print("  tau by step start position: " + ", ".join(
        f"{k} {v['tau']:.2f} ({v['steps']} steps)" for k, v in res["tau_by_position"].items()))
    total = max(res["steps"], 1)
    print("  acceptance: " + " ".join(f"{k}:{100 * v / total:.1f}%" for k, v in res["histogram"].items()))


def progress_line(name, done, total, records, elapsed_s, run=None, unit="prompts"):
    """A progress line of a run that takes minutes: prompts (or rows) done, tau so far, the time left at this pace.
    run (prompts of the sets before this one, prompts of all sets, the run's start): with several sets, the
    whole run's progress and time left too (a set's own ETA ends at 0m00s with sets still to go)."""
    steps = [a for r in records for a in r["dflash"]["acceptance"]]
    eta = lambda s, n, left: data.fmt_time(s * left / max(n, 1))
    line = (f"  {name}: {done}/{total} {unit}, tau so far {sum(steps) / max(len(steps), 1):.2f}, "
            f"ETA {eta(elapsed_s, done, total - done)}")
    if run and run[1] > total:
        n = run[0] + done
        line += f"; the run: {n}/{run[1]} {unit}, ETA {eta(time.perf_counter() - run[2], n, run[1] - n)}"
    return line


def mean_over_sets(summaries):
    """The run's closing record (the last line of --out): each set's tau and their mean, each set weighing
    the same (the README table's mean), and the lossless counts summed where the sets were checked."""
    rec = dict(summary="mean over sets", sets={s["dataset"]: s["tau"] for s in summaries},
               mean_tau=sum(s["tau"] for s in summaries) / max(len(summaries), 1), turns=sum(s["turns"] for s in summaries))
    if summaries and all("checked" in s for s in summaries):
        rec.update(checked=sum(s["checked"] for s in summaries), identical=sum(s["identical"] for s in summaries),
                   near_ties=sum(len(s["near_ties"]) for s in summaries),
                   mismatches=sum(len(s["mismatches"]) for s in summaries))
    return rec


def closing(summaries, out_file=None):
    """The run's last line, and its last --out records: each set's summary (tau, TPOT, speedup, lossless counts),
    then the mean tau over the sets (and the lossless counts)."""
    rec = mean_over_sets(summaries)
    sets = " | ".join(f"{s['dataset']}: tau {s['tau']:.2f}" + (f", {s['speedup']:.2f}x" if "speedup" in s else "")
                      for s in summaries)
    checked = (f" | lossless: {rec['identical']}/{rec['checked']} turns identical, {rec['near_ties']} near-tie "
               f"divergences, {rec['mismatches']} mismatches" if rec.get("checked") else "")
    n = len(summaries)
    print(f"\n== mean tau {rec['mean_tau']:.2f} over {n} set{'' if n == 1 else 's'} | {sets}{checked}")
    if out_file:
        out_file.writelines(json.dumps(dict(summary="set", **s)) + "\n" for s in summaries)
        out_file.write(json.dumps(rec) + "\n")
    return summaries


def read_records(path):
    """The per-turn records of a bench.py --out file, without its closing mean_over_sets record."""
    with open(path) as f:
        return [r for r in map(json.loads, f) if "summary" not in r]


# ----------------------------------------------------------------------------------------------
# The lossless check's report: greedy DFlash must emit the baseline's tokens, turn for turn

def first_diff(a, b):
    """The first position where token lists a and b differ (one ends first: its length), None if equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def near_tie(gap_top, dtype):
    """Is a top-2 gap [gap, top logit] within a few roundings of the logits' dtype (8 ulps of the top)?"""
    gap, top = gap_top
    bits = {torch.bfloat16: 8, torch.float16: 11}.get(dtype, 24)
    ulp = 2.0 ** (torch.tensor(abs(top) + 1e-30).log2().floor().item() - (bits - 1))
    return gap <= 8 * ulp


def lossless_summary(records):
    """Turns compared, turns identical, and the divergences: near ties (the target's top two logits within
    rounding of each other where the runs part: a flip between kernels, not a bug) and mismatches (a
    divergence anywhere else: a bug). Each with the target's (top-2 gap, top logit) in both runs."""
    checked = [r for r in records if r.get("match") is not None]
    diverged = [dict(id=r["id"], turn=r["turn"], pos=r["first_diff"], **(r.get("gaps") or {}))
                for r in checked if not r["match"]]
    return dict(checked=len(checked), identical=len(checked) - len(diverged),
                near_ties=[m for m in diverged if m.get("near_tie")],
                mismatches=[m for m in diverged if not m.get("near_tie")])


def print_lossless(res, turns, temperature):
    """The lossless line (turns identical, near ties, mismatches), what each kind means, and each divergence."""
    if not res["checked"]:
        if turns:
            print("  lossless: not checked token by token: " + (
                f"at temperature {temperature} the two runs sample different random draws, so their tokens differ "
                "by design; what holds instead is that every committed token is the target's own sample at its "
                "position (the acceptance rule; test_sampling_keeps_target_distribution checks the distribution)"
                if temperature > 0 else "no turn had the same prompt in both runs"))
        return
    ties, bad, later = res["near_ties"], res["mismatches"], turns - res["checked"]
    diverged = f", {len(ties)} diverged at a near tie, {len(bad)} mismatch{'' if len(bad) == 1 else 'es'}"
    print(f"  lossless: {res['identical']}/{res['checked']} turns identical to the baseline" + (diverged if ties or bad else "")
          + (f" ({later} later turns not compared: their histories differ)" if later else ""))
    if ties:
        print("    near ties: the target's top two logits within rounding of each other where the runs part; the "
              "verify (a block) and the decode (one token) round differently and the argmax flips: not a bug "
              "(--dtype fp32 is the exact check)")
    if bad:
        print("    MISMATCHES: the runs part where the target's top two logits are not within rounding: the loop "
              "changed the target's output, a bug")
    gap = lambda g: "?" if g is None else f"{g[0]:.3g} (top logit {g[1]:.4g})"
    for kind, ms in (("near tie", ties), ("MISMATCH", bad)):
        for m in ms[:10]:
            print(f"    {kind}: {m['id']} turn {m['turn']}, new token {m['pos']}: the target's top-2 logit gap "
                  f"{gap(m.get('baseline'))} in the baseline, {gap(m.get('dflash'))} in DFlash")


# ----------------------------------------------------------------------------------------------
# Replay: tau at temperature 0 from answers the target already gave greedily

@torch.no_grad()
def replay(target, drafter, ids, spans, block_size):
    """Acceptance lengths per DFlash step for each answer ids[s:e] (s, e in spans) of ids [S], a conversation
    whose answers are the target's greedy ones (a regenerated row). At temperature 0 a lossless loop emits
    exactly those answers, so each step's acceptance is the drafter's block checked against them: what
    spec_generate gives on the same answers, at one target forward over ids and one drafter pass per step.
    As in the loop, an answer's first token is the target's (prefill), a step drafts from its anchor with
    every position before the anchor as context, and the last step is cut where the answer ends."""
    feats, _ = M.capture_features(target, ids[None], list(drafter.config.target_layer_ids))
    pos = torch.arange(ids.shape[0], device=ids.device)[None]
    out = []
    for s, e in spans:
        cache, ctx, t, acceptance = M.DraftCache(), 0, s, []
        while t < e - 1:  # t: the anchor's position
            block = M.block_ids(ids[t], block_size, drafter.config.mask_token_id)
            logits = M.draft_block(drafter, target, feats[:, ctx:t], pos[:, ctx:t], block, t, cache)[0, 1:]
            ctx, ref = t, ids[t + 1: min(t + block_size, e)]
            n = int((logits[: len(ref)].argmax(-1) == ref).cumprod(0).sum())
            acceptance.append(min(n + 1, e - t - 1))
            t += acceptance[-1]
        out.append(acceptance)
    return out


def answer_spans(mask):
    """(start, end) of each run of 1s in a loss mask: the answers of a tokenised conversation."""
    edges = [i for i in range(len(mask) + 1) if (mask[i] if i < len(mask) else 0) != (mask[i - 1] if i else 0)]
    return list(zip(edges[::2], edges[1::2]))


def replay_dtype(paths, limit=None):
    """The dtype ("bf16", "fp32") the regenerated rows' greedy answers were decoded in, as data.py regenerate
    records it in each row; None where no row says (older rows, a server's). ValueError if the rows disagree,
    or were sampled (their tau would be no greedy tau)."""
    seen = data.recorded(paths, ("temperature", "dtype"), limit)
    for t, path in seen["temperature"].items():
        if t > 0:
            raise ValueError(f"--replay {path}: its rows were regenerated at --temperature {t}; replay reads greedy "
                             "answers: regenerate them with --temperature 0")
    dtypes = seen["dtype"]
    if len(dtypes) > 1:
        raise ValueError("--replay rows regenerated in different dtypes (" + ", ".join(f"{d}: {p}" for d, p in dtypes.items())
                         + "): replay each dtype's rows in a run of its own")
    return next(iter(dtypes), None)


def count_rows(path, limit=None):
    """The rows of a --replay file that replay reads: its first `limit` (--num-prompts)."""
    n = sum(1 for _ in data.read_rows(path))
    return min(n, limit) if limit else n


def replay_rows(target, drafter, tokenizer, path, args, out_file=None, run=None, total=None):
    """Replay every answer of the regenerated rows in path (the first --num-prompts rows): records as
    bench_prompts writes them (no baseline), and the summary lines. Each answer follows the prompt the loop
    decodes it from (bench.render: thinking off where the template has the switch, as regenerate
    --enable-thinking off), not the whole conversation's tokens: a template that rewrites past turns (Qwen3
    drops their empty think block) renders those differently; rows answered with thinking on, or with an empty
    answer, are skipped and counted. An answer cut by the regeneration's token limit ("finished": false) is
    supervised without the end-of-turn token the template adds to it, so its span ends where it was cut. The
    set's name is the file's stem, or the path as given where two --replay files share a stem. A progress line
    (rows of `total`, count_rows' count, tau so far, ETA; run: as progress_line's) every data.PROGRESS_S: a shard
    of 100K rows takes hours."""
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    name = path if [stem(p) for p in getattr(args, "replay", [path])].count(stem(path)) > 1 else stem(path)
    thinking = False if data.has_thinking_switch(tokenizer) else None  # as bench.render
    total = count_rows(path, args.num_prompts) if total is None else total  # bench.py counted every file for the run
    records, skipped, t0, shown = [], Counter(), time.perf_counter(), 0
    for i, row in data.read_rows(path):
        if args.num_prompts and i >= args.num_prompts:
            break
        if i and time.perf_counter() - shown >= data.PROGRESS_S:  # rows 0 .. i-1 done
            shown = time.perf_counter()
            print(progress_line(name, i, total, records, shown - t0, run, "rows"), flush=True)
        answers = [m for m in (row or {}).get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
        if not answers or not all("token_ids" in m for m in answers):
            skipped["not regenerated (no assistant token_ids), so not the target's answers"] += 1
            continue
        if not all(m["token_ids"] for m in answers):  # the template renders no span for an empty answer
            skipped["an empty answer (the target ended a turn at once)"] += 1
            continue
        if thinking is False and any(str(m.get("content")).startswith("<think>") for m in answers):
            skipped["answered with thinking on; bench.py prompts with it off (regenerate --enable-thinking off)"] += 1
            continue
        try:
            msgs, turns = data.parse_messages(row), []  # turns: (the prompt + the answer, the answer's span) of each
        except data.BadRow as e:  # token_ids that are no token ids, a role or content data.py cannot read
            skipped[str(e)] += 1
            continue
        for j in [j for j, m in enumerate(msgs) if m["role"] == "assistant"]:
            prompt = data.render_chat(tokenizer, msgs[:j], thinking, add_generation_prompt=True)
            ids, mask = data.tokenize_conversation(tokenizer, msgs[: j + 1], 1 << 30, thinking)
            s, e = answer_spans(mask)[-1]  # the answer as its last turn: the target's ids (+ its end token if it stopped)
            ids = prompt + ids[s:e]
            turns.append((ids, (len(prompt), len(ids))))
        acc = {}
        for k in reversed(range(len(turns))):  # one target forward for the turns whose ids start a later turn's
            if k not in acc:
                ks = [j for j in range(k + 1) if j not in acc and turns[k][0][: len(turns[j][0])] == turns[j][0]]
                acc.update(zip(ks, replay(target, drafter, torch.tensor(turns[k][0], device=args.device),
                                          [turns[j][1] for j in ks], args.block_size)))
        for turn, (ids, (s, e)) in enumerate(turns):
            rec = dict(dataset=name, id=str(row.get("id", i)), turn=turn, prompt_len=s,
                       dflash=dict(acceptance=acc[turn], tokens=ids[s:e]))
            rec["tau_by_position"] = tau_by_position([rec])
            records.append(rec)
            if out_file:
                out_file.write(json.dumps(rec) + "\n")
    print(progress_line(name, total, total, records, time.perf_counter() - t0, run, "rows"), flush=True)
    for reason, n in skipped.items():
        print(f"replay: {path}: {n} rows skipped: {reason}")
    res = dict(dataset=name, **acceptance_summary(records))
    print(f"\n== {name}: replay of {len(records)} greedy answers, {res['steps']} DFlash steps, block {args.block_size}, "
          + (f"{args.dtype} as the rows were regenerated" if args.rows_dtype else f"{args.dtype}, the rows do not record "
             "the dtype they were regenerated in (older data.py regenerate, or a server): --dtype should be that one"))
    print(f"  tau {res['tau']:.2f}")
    print_acceptance(res)
    return res


# ----------------------------------------------------------------------------------------------
# train.py's profile_steps: where a training step's time goes

def start_train_profiler(c):
    """Where a step's time goes (target, mask, drafter, lm_head + CE, optimizer, comms): 5 warm-up steps,
    then profile_steps profiled ones; report_train_profile prints them."""
    if not c["profile_steps"]:
        return None
    profiler = torch.profiler.profile(schedule=torch.profiler.schedule(
        wait=0, warmup=5, active=c["profile_steps"], repeat=1), record_shapes=False)
    profiler.start()
    return profiler


def report_train_profile(r, profiler):
    """After each step of train.py's loop (r: its run): the profiler while it runs, None once it has printed."""
    profiler.step()
    if profiler.step_num < 5 + r.c["profile_steps"]:
        return profiler
    profiler.stop()
    events, n = profiler.key_averages(), r.c["profile_steps"]
    for e in sorted((e for e in events if e.key.startswith("dflash:")), key=lambda e: e.key):
        dev = getattr(e, "device_time_total", 0) / 1e3 / n
        r.log(f"profile {e.key:24s} {e.cpu_time_total / 1e3 / n:8.1f} ms/step on the host, {dev:8.1f} ms/step on the device")
    r.log(events.table(sort_by="self_cuda_time_total" if r.device.type == "cuda" else "self_cpu_time_total", row_limit=20))
    if r.rank == 0 and r.c["profile_trace"]:
        profiler.export_chrome_trace(os.path.join(r.c["out_dir"], "profile_trace.json"))
    return None


# ----------------------------------------------------------------------------------------------
# Timing: profiles of decode steps, random drafters

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _profiled(run, steps, cuda):
    """run(steps) under torch.profiler: (steps run, host launches, kernel or aten op counts, their us, the profile).
    On CPU the ops are the dispatched aten ops, not their nested calls."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        r = run(steps)
    counts, us, launches = Counter(), Counter(), 0
    for e in prof.events():
        launches += cuda and e.name in LAUNCH_CALLS
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            t = e.device_time
        elif not cuda and e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")):
            t = e.cpu_time
        else:
            continue
        counts[e.name] += 1
        us[e.name] += t
    return len(r["acceptance"]), launches, counts, us, prof


def profile_steps(run, steps, cuda, name, out_dir, top=15):
    """--profile: run(steps) (a decode of that many steps, returning spec_generate's result) under
    torch.profiler, and run(0) (the prefill and first token alone) subtracted, so what is printed is the
    steps' own work: launches and CUDA kernels per step (aten ops on CPU), then the kernels per step with
    their time, where a fix can be aimed. Writes the Chrome trace of the decode."""
    _, l0, c0, us0, _ = _profiled(run, 0, cuda)
    n, l1, c1, us1, prof = _profiled(run, steps, cuda)
    n = max(n, 1)
    per = {k: ((c1[k] - c0[k]) / n, (us1[k] - us0[k]) / n) for k in c1}
    total = sum(c for c, _ in per.values())
    counts = dict(launches_per_step=(l1 - l0) / n, kernels_per_step=total) if cuda else dict(aten_ops_per_step=total)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"{name}.json"))
    print(f"\n-- profile of {n} {name} steps, less the prefill: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}"
                                                                          for k, v in counts.items())
          + f" (trace: {os.path.join(out_dir, name + '.json')})")
    print(f"  {'per step':>8s} {'us/step':>9s}  {'kernel' if cuda else 'aten op'}")
    for k, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        if c > 0:
            print(f"  {c:8.1f} {us:9.1f}  {k[:100]}")
    return counts


def weight_bytes_per_token(target):
    """Bytes of weights a decoding step reads: every parameter once (parameters() yields a tied matrix once),
    less the input embedding, of which a step reads one row, unless the lm_head reads that same matrix."""
    emb, head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in target.parameters())
    return total if head is emb else total - emb.numel() * emb.element_size()


def card_bandwidth(device):
    """The card's peak memory bandwidth in bytes/s from its CUDA properties: the bus width (bits) times the
    memory clock (kHz), twice a cycle (double data rate). None off CUDA or where the properties do not say."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    width, clock = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    return 2 * width / 8 * clock * 1e3 or None


def random_drafter(target, block_size, layers=5, dtype=None):
    """Random weights for timing: mask id 151669 (Qwen3's unused row) where the vocabulary has it."""
    vocab = target.get_input_embeddings().weight.shape[0]
    L = target.config.get_text_config().num_hidden_layers
    for n in (5, 3, 2, 1):  # 5 captured layers; fewer where a tiny test target has no room
        try:
            layer_ids = M.build_target_layer_ids(L, n)
            break
        except ValueError:
            continue
    cfg = M.config_from_target(target.config, num_hidden_layers=layers, block_size=block_size,
                               target_layer_ids=layer_ids, mask_token_id=151669 if vocab > 151669 else vocab - 1)
    return M.build_drafter(cfg, device=target.device, dtype=dtype or target.dtype)
