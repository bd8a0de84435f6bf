"""The SmolLM2-135M-Instruct recipe's prompt tooling: training prompts for the end-to-end run, kept apart
from the benchmark prompts (results/smollm2-e2e.md).

    python recipes/smollm2.py first-turns [--turns 2]   # ShareGPT openings, minus evaluation-prompt overlap
    python recipes/smollm2.py code-prompts --out F      # HumanEval-shaped prompts from the standard library
    python recipes/smollm2.py self-prompts --target DIR --out F --num N [--seeds "Solve|Find"] [--suffix math]
    python recipes/smollm2.py overlap --data "runs/regen/*.jsonl"   # benchmark prompts quoted in training rows (exit 1; bad input 2)
    python recipes/smollm2.py run [--budget-minutes 25] [--rows GLOB --steps N]   # every stage, one resumable command
    python recipes/smollm2.py ablate [--data "runs/smollm2-recipe/regen/*.jsonl"]   # same-budget arms on its rows
"""
import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo's files, and recipes/fetch.py
import checkpoints  # noqa: E402  (the newest checkpoint of an arm's run)
import data as D  # noqa: E402
import fetch as F  # noqa: E402  (the benchmark prompt formats)
import measure  # noqa: E402  (tau and its position buckets from bench records)
import regenerate  # noqa: E402

def _fold(text):
    return " ".join(text.lower().split())


def eval_prompts(assets_dir=None):
    """{set name: prompt rows} of every assets/prompts/*.jsonl; raises if there are none."""
    d = os.path.join(assets_dir or D.assets_dir(), "prompts")
    sets = {os.path.basename(p)[:-len(".jsonl")]: D.load_prompts(p) for p in sorted(glob.glob(os.path.join(d, "*.jsonl")))}
    if not sets:
        raise FileNotFoundError(f"no evaluation prompts in {d}: run `python recipes/fetch.py` "
                                "(they are needed to keep them out of training)")
    return sets


def eval_keys(assets_dir=None, key_chars=80):
    """The first key_chars characters (case and whitespace folded) of every evaluation prompt in
    assets/prompts/*.jsonl (of the problem, for HumanEval's): a training prompt that contains one of
    them is dropped."""
    keys, wrapper = set(), F.HUMANEVAL_FMT.split("{}")[0]  # every HumanEval prompt opens with it: key the problem
    for rows in eval_prompts(assets_dir).values():
        for row in rows:
            keys.update(k[:key_chars] for k in (_fold(t.removeprefix(wrapper)) for t in row["turns"]) if len(k) >= 20)
    if not keys:
        raise ValueError("every evaluation prompt is under 20 characters: nothing to keep out of training")
    return keys


def _word_ngrams(text, n):
    """Word n-grams (lower case, letters and digits only) of text, with the instructions every prompt of a
    set shares cut out first, so that no n-gram spans one: they are the set's format, not its problems."""
    for shared in (F.MATH_SUFFIX, *F.HUMANEVAL_FMT.split("{}")):
        text = text.replace(shared, "\0")
    grams = set()
    for part in text.split("\0"):
        w = re.findall(r"[a-z0-9]+", part.lower())
        grams.update(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))
    return grams


def overlap(data, assets_dir=None, n=13, num_prompts=None, sets=None):
    """The evaluation prompts (assets/prompts/*.jsonl or the named sets, the first num_prompts of each) that share a word
    n-gram with the training rows in data (a JSONL glob): {set: {"turns": t, "prompts": {id: row id},
    "responses": {id: row id}}}, split by whether the n-gram is in a training user turn or an answer.
    Stricter than first-turns' 80-character keys: it also finds a prompt quoted from its middle."""
    owner = collections.defaultdict(list)  # n-gram -> the (set, prompt id) it comes from
    found, available = {}, eval_prompts(assets_dir)
    for name in sets or available:
        if name not in available:
            raise ValueError(f"no prompt set {name!r}: the sets are {', '.join(available)}")
        rows = available[name][:num_prompts]
        found[name] = {"turns": sum(len(r["turns"]) for r in rows), "prompts": {}, "responses": {}}
        for r in rows:
            for g in set().union(*(_word_ngrams(t, n) for t in r["turns"])):
                owner[g].append((name, r["id"]))
    skipped = 0
    for i, row in D.read_rows(data):
        try:
            msgs = D.parse_messages(row, need_assistant=False)
        except D.BadRow:
            skipped += 1
            continue
        for m in msgs:
            where = "prompts" if m["role"] == "user" else "responses"
            for g in _word_ngrams(m["content"], n) & owner.keys():
                for name, pid in owner[g]:
                    found[name][where].setdefault(pid, str(row.get("id", i)))
    return found, skipped


def first_exchanges(src=None, out=None, assets_dir=None, key_chars=80, turns=1):
    """The opening exchanges (up to `turns` user turns and their answers) of each ShareGPT
    conversation in src (default: the fetched assets/sharegpt_train.jsonl), written to out (default:
    assets/sharegpt_first.jsonl), minus every row that overlaps an evaluation prompt: a row goes if
    the first key_chars characters (case and whitespace folded) of any prompt in
    assets/prompts/*.jsonl occur anywhere in one of its user turns. Returns the counts; this is how
    the end-to-end run keeps its benchmark prompts out of training."""
    assets_dir = assets_dir or D.assets_dir()
    src = src or os.path.join(assets_dir, "sharegpt_train.jsonl")
    out = out or os.path.join(assets_dir, "sharegpt_first.jsonl")
    keys = eval_keys(assets_dir, key_chars)
    said = lambda m, who: m.get("from") == who and str(m.get("value", "")).strip()
    counts, kept = collections.Counter(), []
    with open(src) as f:
        for line in f:
            row = json.loads(line)
            conv = row.get("conversations") or []
            # ShareGPT split long conversations into parts; a later part opens with the answer to a
            # question it does not hold: start at its first user turn
            while conv and conv[0].get("from") != "human":
                conv = conv[1:]
            n = 0  # human -> gpt pairs from the start, at most `turns`
            while n < turns and 2 * n + 1 < len(conv) and said(conv[2 * n], "human") and said(conv[2 * n + 1], "gpt"):
                n += 1
            if n == 0:
                counts["no human -> gpt opening"] += 1
                continue
            conv = conv[:2 * n]
            users = [_fold(m["value"]) for m in conv[::2]]
            if any(k in u for u in users for k in keys):
                counts["overlaps an evaluation prompt"] += 1
                continue
            kept.append({"id": row.get("id"), "conversations": conv})
    F._write_jsonl(out, kept)
    counts["kept"] = len(kept)
    print(f"first exchanges: {len(kept)} written to {out} ({sum(len(r['conversations']) // 2 for r in kept)} "
          f"user turns); " + ", ".join(f"{n} {r}" for r, n in counts.items() if r != "kept")
          + f" ({len(keys)} evaluation prompt keys)")
    return counts


def code_prompts(out, assets_dir=None, min_doc=40, max_doc=1500, root=None):
    """HumanEval-shaped prompts from the running Python's standard library: every public function or
    method with a docstring of min_doc..max_doc characters, as its signature and docstring in
    HumanEval's instruction (F.HUMANEVAL_FMT). Code the target writes in answer is training data in the
    HumanEval domain that no registry here carries; prompts overlapping an evaluation prompt go."""
    import ast
    import sysconfig
    root, keys = root or sysconfig.get_paths()["stdlib"], eval_keys(assets_dir)
    rows, seen, counts = [], set(), collections.Counter()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] in ("test", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"):
            continue
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["unparsable file"] += 1
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            if not min_doc <= len(doc) <= max_doc:
                counts["docstring length"] += 1
                continue
            stub = ast.unparse(ast.fix_missing_locations(type(node)(
                name=node.name, args=node.args, body=[node.body[0]], decorator_list=[], returns=node.returns,
                type_params=[])))
            text = F.HUMANEVAL_FMT.format(stub)
            if stub in seen or any(k in _fold(stub) for k in keys):
                counts["duplicate or overlaps an evaluation prompt"] += 1
                continue
            seen.add(stub)
            rows.append({"id": f"stdlib-{rel}:{node.lineno}", "turns": [text]})
    F._write_jsonl(out, rows)
    print(f"code prompts: {len(rows)} written to {out} from {root}; " + ", ".join(f"{n} {r}" for r, n in counts.items()))
    return rows


def self_prompts(target, out, num, seeds=("",), suffix="", temperature=1.0, max_new_tokens=160, batch_size=256,
                 seed=0, assets_dir=None, min_chars=20):
    """User prompts written by the target itself (Magpie: the chat template up to the start of a user
    turn, then sampling until the turn ends), each started with one of `seeds` in turn and followed by
    `suffix`. Answered by `regenerate`, they give training text in domains no registry here carries
    (seed "Solve" plus MATH-500's suffix: maths). Unfinished, short and repeated prompts and any that
    overlap an evaluation prompt are dropped and counted."""
    keys = eval_keys(assets_dir)
    tok, model, stops = regenerate.load_writer(target)
    mark = "\x00"
    text = D.render_chat(tok, [{"role": "user", "content": mark}], None, tokenize=False)
    prefix = text[:text.index(mark)]  # the template up to the user's first word (with its system prompt)
    starts = [tok(prefix + s, add_special_tokens=False)["input_ids"] for s in seeds]
    # a few short batches: compiling the step would cost more than it saves
    decode = regenerate.BatchDecoder(model, batch_size, max(map(len, starts)), max_new_tokens, stops, stops[0], compile=False)
    g = torch.Generator(device=model.device).manual_seed(seed)
    rows, seen, counts, t0, k = [], set(), collections.Counter(), time.time(), 0
    while len(rows) < num and k < 4 * num:
        idx = [(k + j) % len(seeds) for j in range(batch_size)]
        k += batch_size
        for j, new in zip(idx, decode([starts[j] for j in idx], temperature, g)):
            prompt = (seeds[j] + tok.decode(new[:-1] if new and new[-1] in stops else new)).strip()
            if not new or new[-1] not in stops:
                counts["unfinished"] += 1
            elif len(prompt) - len(seeds[j]) < min_chars:
                counts["too short"] += 1
            elif _fold(prompt) in seen:
                counts["repeated"] += 1
            elif any(key in _fold(prompt + suffix) for key in keys):
                counts["overlaps an evaluation prompt"] += 1
            elif len(rows) < num:
                seen.add(_fold(prompt))
                rows.append({"id": f"self-{seed}-{len(rows)}", "turns": [prompt + suffix]})
        print(f"self prompts: {len(rows)}/{num} kept after {k} sampled, {time.time() - t0:.0f} s", flush=True)
    F._write_jsonl(out, rows)
    print(f"self prompts: {len(rows)} written to {out}; " + ", ".join(f"{n} {r}" for r, n in counts.items()))
    return rows


# -----------------------------------------------------------------------------
# The whole recipe as one resumable command: prompts -> regeneration -> training -> export -> bench

MATHS_SEEDS = ("Solve for $x$:|Find the value of|Compute|What is the sum of|How many positive integers|Simplify|Let $|"
               "If $|Evaluate|Find all real|What is the probability that|Find the remainder when|Calculate|A rectangle|"
               "The sum of|Express")
CODE_SEEDS = ("Write a Python function|Write a function|Implement a Python class|Write a Python program|Complete the "
              "following Python function|Write a Python function that takes a list|Fix the bug in this Python code|"
              "Write a recursive Python function")
GENERAL_SEEDS = "|Write|Explain|Give|Describe|What|How|Compose|Rewrite|Imagine|Can you"
BENCH_SETS = ("mt-bench", "humaneval", "math500", "alpaca")
# Rates measured on one H200 with this recipe (results/smollm2-recipe.md): prompts ~40 s plus ~53
# self-written prompts/s (98 s for 3,240, 172 s for 7,200); training ~130 sequences/s after ~90 s of
# loading and compiling; the fp32 check (four sets at once, compiled) ~60 s of compiling, then ~25 ms per
# new token of the longest set (MT-Bench, two turns a prompt), baseline and DFlash together. The timed bf16
# bench, alone on its GPU: a 135M target's compiled step is ~1.7 ms (results/decode-qwen3-8b.md's issue
# table), so ~5 ms per token for both runs with the loop's own work is a bound. What those stages cost comes
# off the budget first; the rest is split 1:2 between regeneration and training: steps, not rows, limited
# every short run.
TRAIN_SEQ_PER_S, SELF_PROMPTS_PER_S, BENCH_S_PER_TOKEN, BF16_S_PER_TOKEN = 130, 53, 0.025, 0.005


def plan_run(budget_min, gpus, bench_prompts, max_new_tokens, max_rows=0, check_prompts=5, rows=None, steps=0):
    """Stage sizes for a time budget (minutes, all stages) on `gpus` GPUs: the bench and the prompts cost
    what they cost, regeneration and training share the rest (with rows regenerated earlier, training
    takes it all; steps > 0 overrides the budget's). Written once to plan.json, so a resumed run keeps
    the first run's choices."""
    s, g = budget_min * 60, max(gpus, 1)
    scale = s * g / 1500 * (not rows)  # 1.0 = 25 minutes on one GPU
    # the self-written prompts grow with the run (budget x GPUs) but are written on one GPU: at most a third
    # of the budget goes to them (on 9 GPUs or more no budget was enough; on 4, 45% went to them)
    scale = min(scale, max(0.0, s / 3 - 40) * SELF_PROMPTS_PER_S / 9000)
    n_self = [int(4000 * scale), int(2500 * scale), int(2500 * scale)]
    prompts_s = (40 + sum(n_self) / SELF_PROMPTS_PER_S) * (not rows)  # written on one GPU
    sets_per_gpu = -(-len(BENCH_SETS) // g)
    bench_s = (90 + 2 * bench_prompts * max_new_tokens * BF16_S_PER_TOKEN * sets_per_gpu  # timed: alone, one compile
               + (60 + 2 * check_prompts * max_new_tokens * BENCH_S_PER_TOKEN / min(g, len(BENCH_SETS))) * bool(check_prompts))
    left = s - prompts_s - bench_s
    if left < 180:
        uncut = 1 - 9000 * g / 1500 / SELF_PROMPTS_PER_S  # the share of the budget left beside uncut self-prompts
        least = (bench_s + 180) / 60 if rows else min((40 + bench_s + 180) / uncut if uncut > 0 else math.inf,
                                                       1.5 * (bench_s + 180)) / 60  # cut: a third to the prompts
        raise SystemExit(f"recipe: --budget-minutes {budget_min:g} leaves {left:.0f} s for regeneration and training "
                         f"after the prompts (~{prompts_s:.0f} s) and the bench (~{bench_s:.0f} s): give at least "
                         f"{math.ceil(least)} minutes, "
                         "or fewer --bench-prompts / --max-new-tokens")
    regen = 0 if rows else left / 3
    return dict(budget_minutes=budget_min, gpus=gpus, self_prompts=n_self, regen_seconds=int(regen),
                train_steps=steps or int((left - regen - 90) * TRAIN_SEQ_PER_S * g / 64), rows=rows,
                bench_prompts=bench_prompts, bench_max_new_tokens=max_new_tokens, check_prompts=check_prompts, max_rows=max_rows)


def interleave(paths, out, max_rows=0):
    """The JSONL files' rows interleaved one by one (then the first max_rows, if > 0), so a regeneration
    cut by its time budget has answered every kind of prompt (it takes each shard's shortest first)."""
    # split on "\n" only: JSON written with ensure_ascii=False may hold U+2028 inside a string
    sources = [open(f, encoding="utf-8").read().split("\n")[:-1] for f in paths if os.path.exists(f)]
    rows = [src[i] for i in range(max(map(len, sources))) for src in sources if i < len(src)]
    with open(out, "w", encoding="utf-8") as f:
        f.write("".join(r + "\n" for r in rows[:max_rows or None]))
    return len(rows[:max_rows or None])


def _spent(out, name):
    """Seconds a stage has run so far, over every invocation (a killed one's included)."""
    f = os.path.join(out, "stages", name + ".spent")
    return float(open(f).read()) if os.path.exists(f) else 0.0


def _planned(plan_file, cmd, given):
    """plan.json of the run being resumed, if the flags given (its keys: values) are those it was made with; a
    key it lacks (an older plan) is not compared. A rerun keeps the first run's plan, so a changed flag would be
    silently ignored: it stops here instead (train.py refuses a changed fixed key on resume, likewise)."""
    plan = json.load(open(plan_file))
    changed = [f"{k} {json.dumps(plan[k])} -> {json.dumps(v)}" for k, v in given.items() if k in plan and plan[k] != v]
    if changed:
        raise SystemExit(f"{cmd}: {plan_file} was made with other flags ({'; '.join(changed)}): give the flags it was made "
                         "with to resume that run, or a new --out to start another")
    return plan


def _stage(out, name, fn):
    """Run fn once: a stage is done when its marker exists, so a rerun after a kill skips it; a stage
    that was killed runs again (regeneration and training continue where they stopped)."""
    marker = os.path.join(out, "stages", name + ".done")
    if os.path.exists(marker):
        print(f"recipe: {name}: done earlier, skipped", flush=True)
        return
    spent, t0 = _spent(out, name), time.time()
    print(f"recipe: {name}: start", flush=True)
    try:
        fn()
    finally:  # killed or not, its time counts: the regeneration's budget and the results use it
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(os.path.join(out, "stages", name + ".spent"), "w") as f:
            f.write(f"{spent + time.time() - t0:.0f}")
    with open(marker, "w") as f:
        f.write(f"{spent + time.time() - t0:.0f}\n")
    print(f"recipe: {name}: done in {time.time() - t0:.0f} s", flush=True)


def _procs(cmds, gpus, deadline=None, labels=None):
    """Run the commands at once, spread over the GPUs; stop them at the deadline (their output so far
    stays: regenerate and bench write whole lines). Raises if one fails. labels: each process's lines are
    printed after its label (processes at once interleave their lines)."""
    import signal
    import subprocess
    import threading
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) if labels else {}
    ps = [subprocess.Popen(c, cwd=os.path.dirname(HERE), **pipe, env={**os.environ, **({"CUDA_VISIBLE_DEVICES": str(k % gpus)} if gpus else {})})
          for k, c in enumerate(cmds)]
    def echo(p, label):
        for line in p.stdout:
            print(f"[{label}] {line}", end="", flush=True)
    echoes = [threading.Thread(target=echo, args=pl, daemon=True) for pl in zip(ps, labels or [])]
    for t in echoes:
        t.start()

    def stop():
        for p in ps:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in ps:
            p.wait()
        for t in echoes:  # a process's last lines
            t.join()
    try:
        while any(p.poll() is None for p in ps):
            if deadline and time.time() > deadline:
                stop()
                print("recipe: time budget of the stage reached; stopped with what is written", flush=True)
                return False
            time.sleep(2)
    finally:  # killed or interrupted: no stage process outlives the recipe (a rerun starts them afresh)
        stop()
    if any(p.returncode for p in ps):
        raise SystemExit(f"recipe: a stage process failed: {[p.args for p in ps if p.returncode]}")
    return True


def _train_cmd(out_dir, data, target, steps, nproc, val_interval, extra=()):
    """train.py with configs/smollm2.yaml, 64 sequences a step over nproc ranks (one rank: no torchrun);
    a checkpoint every quarter of the steps, so a killed stage resumes."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launch, "train.py", "--config", "configs/smollm2.yaml", f"--data={data}",
            f"--out_dir={out_dir}", f"--target={target}", f"--max_steps={steps}", f"--batch_size={64 // nproc}",
            f"--val_interval={val_interval}", f"--save_interval={max(1, steps // 4)}", *extra]


def _train(out_dir, data, target, steps, gpus, val_interval, extra=()):
    """One training run on every GPU."""
    _procs([_train_cmd(out_dir, data, target, steps, max(gpus, 1), val_interval, extra)], 0)


def run(out, budget_minutes=25.0, extra_prompts=(), bench_prompts=20, max_new_tokens=256, procs_per_gpu=3, train_args=(),
        max_rows=0, check_prompts=5, rows=None, steps=0):
    """Every stage of the SmolLM2 recipe, resumable: rerunning the same command after a kill continues.
    rows: a glob of rows regenerated earlier (data.py regenerate): the prompt and regeneration stages are
    skipped and training trains on them."""
    import torch
    py, target = sys.executable, os.path.join(D.assets_dir(), "SmolLM2-135M-Instruct")
    if not os.path.isdir(target):
        raise SystemExit(f"recipe: {target} is missing: run `python recipes/fetch.py` first (or copy assets/ here)")
    if rows and not glob.glob(rows):
        raise SystemExit(f"recipe: --rows {rows}: no such file (give a glob of rows written by `data.py regenerate`)")
    gpus = torch.cuda.device_count()
    os.makedirs(out, exist_ok=True)
    plan_file = os.path.join(out, "plan.json")
    if os.path.exists(plan_file):  # --steps left out keeps the plan's steps
        plan = _planned(plan_file, "recipe", dict(budget_minutes=budget_minutes, rows=rows, bench_prompts=bench_prompts,
                                                  bench_max_new_tokens=max_new_tokens, check_prompts=check_prompts,
                                                  max_rows=max_rows, **({"train_steps": steps} if steps else {})))
    else:
        plan = plan_run(budget_minutes, gpus, bench_prompts, max_new_tokens, max_rows, check_prompts, rows, steps)
        json.dump(plan, open(plan_file, "w"), indent=1)
    print(f"recipe: plan {json.dumps(plan)}", flush=True)
    p = lambda *a: os.path.join(out, *a)

    def prompts():
        first_exchanges(out=p("prompts", "sharegpt_first.jsonl"), turns=2)
        code_prompts(p("prompts", "code.jsonl"))
        for (name, seeds, suffix), num, seed in zip((("maths", MATHS_SEEDS, F.MATH_SUFFIX), ("code", CODE_SEEDS, ""),
                                                      ("general", GENERAL_SEEDS, "")), plan["self_prompts"], (1, 2, 3)):
            if num:
                self_prompts(target, p("prompts", f"self_{name}.jsonl"), num, seeds.split("|"), suffix,
                             temperature=0.8, batch_size=min(512, max(16, num)), seed=seed)
        interleave([p("prompts", n + ".jsonl") for n in ("sharegpt_first", "code", "self_maths", "self_code", "self_general")],
                   p("prompts", "all.jsonl"), plan["max_rows"])

    def regenerate():
        n = procs_per_gpu * max(gpus, 1)
        cmds = [[py, "data.py", "regenerate", "--target", target, "--data", p("prompts", "all.jsonl"),
                 "--out", p("regen", "rows.jsonl"), "--num-shards", str(n), "--shard", str(k), "--max-new-tokens", "512",
                 "--batch-size", "256", "--max-turns", "2", "--max-prompt-tokens", "1024"] for k in range(n)]
        # the time left of this stage's budget: a resumed run spends only what the killed one did not
        _procs(cmds, gpus, deadline=time.time() + max(0.0, plan["regen_seconds"] - _spent(out, "regenerate")))
        if not any(os.path.getsize(f) for f in glob.glob(p("regen", "*.jsonl"))):
            raise SystemExit("recipe: the regeneration wrote no rows in its time: raise --budget-minutes "
                             "(or lower --max-rows)")

    def train():
        _train(p("train"), plan.get("rows") or p("regen", "*.jsonl"), target, plan["train_steps"], gpus,
               max(1, plan["train_steps"] // 4), train_args)

    def bench():
        # As users decode: bf16, compiled, one bench.py per GPU timing its sets one after another alone on it (one
        # compile each). Then the first check_prompts of each set again in fp32, the exact lossless check (bf16
        # turns may part at near ties): those run all at once, their times unused.
        sets = [*BENCH_SETS, *extra_prompts]
        g = max(gpus, 1)
        n_check = plan.get("check_prompts", 0)
        cmd = lambda srcs, dtype, n, dst: [py, "bench.py", "--target", target, "--draft", p("train", "drafter"), "--dataset",
                                           ",".join(srcs), "--num-prompts", str(n), "--max-new-tokens",
                                           str(plan["bench_max_new_tokens"]), "--dtype", dtype, "--out", dst + ".tmp"] + (
                                               ["--compile"] if gpus else [])
        os.makedirs(p("bench"), exist_ok=True)
        for dtype, groups, n in (("bf16", [sets[k::g] for k in range(g)], plan["bench_prompts"]),
                                 ("fp32", [[src] for src in sets] if n_check else [], n_check)):
            todo = [(p("bench", f"{dtype}.{k}.jsonl"), srcs) for k, srcs in enumerate(groups) if srcs]
            todo = [(dst, srcs) for dst, srcs in todo if not os.path.exists(dst)]
            _procs([cmd(srcs, dtype, n, dst) for dst, srcs in todo], gpus, labels=[os.path.basename(dst) for dst, _ in todo])
            for dst, _ in todo:
                os.replace(dst + ".tmp", dst)

    if plan.get("rows"):
        print(f"recipe: prompts and regenerate: skipped, training on {plan['rows']}", flush=True)
    else:
        _stage(out, "prompts", prompts)
        _stage(out, "regenerate", regenerate)
    _stage(out, "train", train)
    _stage(out, "bench", bench)
    return results_table(out, plan)


def results_table(out, plan):
    """results.md and results.json from the bench records, per prompt set: tau, the bf16 times, speedup and
    its share of tau, the bf16 lossless line (identical, near ties, mismatches) and the fp32 check's."""
    read = lambda dtype: [r for f in sorted(glob.glob(os.path.join(out, "bench", f"{dtype}.*.jsonl"))) for r in measure.read_records(f)]
    name = lambda src: os.path.splitext(os.path.basename(src))[0]
    timed, exact, rows = read("bf16"), read("fp32"), []
    for src in dict.fromkeys(r["dataset"] for r in timed):
        recs = [r for r in timed if r["dataset"] == src]
        acc, ok = measure.acceptance_summary(recs), measure.lossless_summary(recs)
        fp32 = measure.lossless_summary([r for r in exact if r["dataset"] == src])
        base, dfl = measure.tpot_ms(recs, "baseline"), measure.tpot_ms(recs, "dflash")  # as bench.py prints them
        rows.append(dict(set=name(src), turns=acc["turns"], steps=acc["steps"], tau=acc["tau"], tpot_baseline_ms=base,
                         tpot_dflash_ms=dfl, speedup=base / max(dfl, 1e-9),
                         identical=ok["identical"], checked=ok["checked"], near_ties=len(ok["near_ties"]),
                         max_tie_gap=max([g[0] for m in ok["near_ties"] for g in (m.get("baseline"), m.get("dflash")) if g], default=None),
                         mismatches=len(ok["mismatches"]), fp32_identical=fp32["identical"], fp32_checked=fp32["checked"]))
    named = [r for r in rows if r["set"] in BENCH_SETS]
    mean = lambda k: sum(r[k] for r in named) / max(len(named), 1)
    stage_s = {os.path.basename(m)[:-5]: int(open(m).read()) for m in glob.glob(os.path.join(out, "stages", "*.done"))}
    lines = ["| set | turns | DFlash steps | tau | TPOT baseline / DFlash (bf16) | speedup | speedup / tau | "
             "bf16: identical, near ties, mismatches | fp32: identical |", "|---" * 9 + "|"]
    for r in rows:
        tie = f" (top-2 gap <= {r['max_tie_gap']:.3g})" if r["max_tie_gap"] is not None else ""
        lines.append(f"| {r['set']} | {r['turns']} | {r['steps']} | {r['tau']:.2f} | {r['tpot_baseline_ms']:.2f} / "
                     f"{r['tpot_dflash_ms']:.2f} ms | {r['speedup']:.2f}x | {r['speedup'] / r['tau']:.2f} | "
                     f"{r['identical']}/{r['checked']}, {r['near_ties']}{tie}, {r['mismatches']} | {r['fp32_identical']}/{r['fp32_checked']} |")
    lines.append(f"| mean of the four sets | | | **{mean('tau'):.2f}** | | **{mean('speedup'):.2f}x** | | | |")
    gpus = plan["gpus"]
    where = f"compiled, each set alone on its GPU ({gpus} GPU{'s' * (gpus > 1)}" if gpus else "eager, on the CPU ("
    note = (f"\nTimes: bf16, {where}, sets one after another). "
            "The fp32 check decodes the first prompts of each set again, where DFlash must equal greedy decoding token for token.\n")
    text = f"plan: {json.dumps(plan)}\n\nstage seconds: {json.dumps(stage_s)}\n\n" + "\n".join(lines) + "\n" + note
    open(os.path.join(out, "results.md"), "w").write(text)
    json.dump(dict(plan=plan, stage_seconds=stage_s, sets=rows, mean_tau=mean("tau"), mean_speedup=mean("speedup")),
              open(os.path.join(out, "results.json"), "w"), indent=1)
    print(text, flush=True)
    return rows


# The same-budget ablation: the same regenerated rows, steps, batch and seed for every arm; one change each.
# Four sliding layers and one full one, as the engines serve them. The window must be shorter than the rows to
# cut context: the ablation's 4,107 rows have a median of ~370 tokens and a 99th percentile of ~1,330, so at
# speculators' 2048 no token lies past the window and only the sliding layers' in-block causality would differ
# from dflash; at 256, 51% of them do.
SLIDING = ["--layer_types=[sliding_attention,sliding_attention,sliding_attention,sliding_attention,full_attention]",
           "--sliding_window=256"]
ARMS = {
    "dflash": ["--loss=dflash"],  # the paper's recipe: decay-weighted CE, five full-attention layers, block 16
    "seed1": ["--loss=dflash", "--seed=1"],  # dflash again with another seed (data order, anchors, init): the noise floor
    "dpace": ["--loss=dpace"],
    "sliding": ["--loss=dflash", *SLIDING],
    "dpace_sliding": ["--loss=dpace", *SLIDING],
    "depth3": ["--loss=dflash", "--num_draft_layers=3"],
    "block8": ["--loss=dflash", "--block_size=8"],
}
# finer than measure's buckets where the sliding window (256) bites
ABLATION_BUCKETS = ((0, "0-256"), (256, "256-512"), (512, "512-1K"), (1024, "1K+"))


# Measured on one H200 (results/ablation-smollm2.md): six arms training at once shared it at ~100 sequences/s
# in all (one run alone: TRAIN_SEQ_PER_S), and replaying 4 x 30 answered prompts took ~50 s of it per arm.
AT_ONCE_SEQ_PER_S, REPLAY_S_PER_ARM = 100, 50


def ablate_steps(budget_minutes, n_arms, gpus, at_once):
    """Steps per arm (64 sequences each) that the budget leaves after the greedy answers (~60 s), the
    compiles (~90 s: once when the arms train at once, else once per arm) and the replays."""
    g = max(gpus, 1)
    fixed = 60 + 90 * (1 if at_once else n_arms) + REPLAY_S_PER_ARM * n_arms / g
    if budget_minutes * 60 < fixed + 120:
        raise SystemExit(f"ablate: --budget-minutes {budget_minutes:g} leaves {budget_minutes * 60 - fixed:.0f} s to train {n_arms} arms "
                         f"after the answers, compiles and replays (~{fixed:.0f} s): give at least {math.ceil((fixed + 120) / 60)} "
                         "minutes, or --at-once, fewer --arms, or --steps")
    return int((budget_minutes * 60 - fixed) * (AT_ONCE_SEQ_PER_S if at_once else TRAIN_SEQ_PER_S) * g / n_arms / 64)


def ablate(out, data, budget_minutes=25.0, arms=tuple(ARMS), eval_prompts=30, max_new_tokens=256, steps=0, train_args=(),
           at_once=False, check_prompts=10, stop_at=0, table_only=False):
    """Train each arm on the same rows, then measure tau on the same greedy answers of the four benchmark
    sets (bench.py --replay: regenerated once, read by every arm), resumable like run. Answers and replays
    are fp32, as the recipe's bench decodes, so the taus compare with its table (results/replay-check.md).
    at_once: every arm trains at the same time, one process each (spread over the GPUs): their compiles
    overlap and the GPU is never idle, but their samples/s are shares of one GPU. The first arm also decodes
    the first check_prompts MT-Bench prompts (bench.py, fp32), so the table says whether replay equals decoding.
    stop_at: every arm trains to that step of the same schedule (train.py --stop_at_step) and its checkpoint
    there is replayed (files tagged -at-STEP): a same-budget table when the GPU time ends before the steps do;
    the same command without it continues the runs. table_only: the table of what the arms have now."""
    import torch
    py, target = sys.executable, os.path.join(D.assets_dir(), "SmolLM2-135M-Instruct")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not (table_only or glob.glob(data)):
        raise SystemExit(f"ablate: unknown arm {unknown[0]} (arms: {', '.join(ARMS)})" if unknown else
                         f"ablate: --data {data} matches no file: give the rows of a `run` (runs/smollm2-recipe/regen/*.jsonl)")
    if not os.path.isdir(target) and not table_only:
        raise SystemExit(f"ablate: {target} is missing: run `python recipes/fetch.py` first")
    gpus = torch.cuda.device_count()
    plan_file, p = os.path.join(out, "plan.json"), lambda *a: os.path.join(out, *a)
    os.makedirs(out, exist_ok=True)
    if table_only and not os.path.exists(plan_file):
        raise SystemExit(f"ablate --table-only: {plan_file} is missing: no ablation ran in {out}")
    # what the flags asked for (the steps: --steps, else --budget-minutes); --steps left out keeps the plan's steps
    given = dict(arms=list(arms), data=data, eval_prompts=eval_prompts, max_new_tokens=max_new_tokens, at_once=at_once,
                 check_prompts=check_prompts, train_args=list(train_args),
                 **({"steps": steps} if steps else {"budget_minutes": budget_minutes}))
    if not os.path.exists(plan_file):
        json.dump(dict(given, steps=steps or ablate_steps(budget_minutes, len(arms), gpus, at_once), budget_minutes=budget_minutes,
                       gpus=gpus), open(plan_file, "w"), indent=1)
    plan = json.load(open(plan_file)) if table_only else _planned(plan_file, "ablate", given)
    print(f"ablate: plan {json.dumps(plan)}", flush=True)
    answers = [p("answers", s + ".jsonl") for s in BENCH_SETS]
    greedy_answers = lambda: _procs(answer_cmds(out, plan["eval_prompts"], plan["max_new_tokens"]), gpus)
    train = lambda arm, nproc: _train_cmd(p(arm), plan["data"], target, plan["steps"], nproc, max(1, plan["steps"] // 4),
                                          [*ARMS[arm], *plan.get("train_args", train_args)] + [f"--stop_at_step={stop_at}"] * bool(stop_at))
    tag = f"-at-{stop_at}" if stop_at else ""
    drafter = lambda arm: p(arm, "checkpoints", f"step_{stop_at:08d}") if stop_at else p(arm, "drafter")
    replayed, checked = "replay" + tag + ".jsonl", p(f"decode-check{tag}.jsonl")
    if table_only:
        return ablation_table(out, plan, tag)

    def replay():
        todo = [arm for arm in plan["arms"] if not os.path.exists(p(arm, replayed))]
        missing = [drafter(arm) for arm in todo if not os.path.isdir(drafter(arm))]
        if missing:  # a run trained past stop_at before keeps only its newest checkpoints
            raise SystemExit(f"ablate: {missing[0]} is missing: replay a step every arm has a checkpoint at, or drop --stop-at")
        cmds = [[py, "bench.py", "--target", target, "--draft", drafter(arm), "--replay", ",".join(answers),
                 "--dtype", "fp32", "--out", p(arm, replayed + ".tmp")] for arm in todo]
        if plan.get("check_prompts") and not os.path.exists(checked):
            cmds.append([py, "bench.py", "--target", target, "--draft", drafter(plan["arms"][0]), "--dataset", "mt-bench",
                         "--num-prompts", str(plan["check_prompts"]), "--max-new-tokens", str(plan["max_new_tokens"]),
                         "--dtype", "fp32", "--out", checked + ".tmp"] + (["--compile"] if gpus else []))
        _procs(cmds, gpus, labels=[*todo, "fp32 check"][: len(cmds)])
        for arm in todo:
            os.replace(p(arm, replayed + ".tmp"), p(arm, replayed))
        if os.path.exists(checked + ".tmp"):
            os.replace(checked + ".tmp", checked)

    def to_train():  # with stop_at, an arm already there is not started again: train.py would carry on past it
        if not stop_at:
            return plan["arms"]
        newest = lambda arm: int(os.path.basename(checkpoints.latest_checkpoint(p(arm)) or "step_0")[5:])
        past = [arm for arm in plan["arms"] if not os.path.isdir(drafter(arm)) and newest(arm) > stop_at]
        if past:
            raise SystemExit(f"ablate: {past[0]} is at step {newest(past[0])}, past --stop-at {stop_at}, and keeps no checkpoint "
                             f"at {stop_at}: give a step every arm has a checkpoint at (or has not reached yet)")
        return [arm for arm in plan["arms"] if not os.path.isdir(drafter(arm))]

    _stage(out, "answers", greedy_answers)
    if plan.get("at_once"):
        def train_at_once():
            arms = to_train()
            _procs([train(arm, 1) for arm in arms], gpus, labels=arms)
        _stage(out, "train" + tag, train_at_once)
    else:
        for arm in plan["arms"]:
            _stage(out, f"train-{arm}{tag}", lambda: _procs([train(arm, max(gpus, 1))] if arm in to_train() else [], 0))
    _stage(out, "replay" + tag, replay)
    return ablation_table(out, plan, tag)


def answer_cmds(out, eval_prompts, max_new_tokens):
    """The target's greedy fp32 answers to the first eval_prompts of each benchmark set, two turns, that every
    arm replays (out/answers/SET.jsonl)."""
    target = os.path.join(D.assets_dir(), "SmolLM2-135M-Instruct")
    return [[sys.executable, "data.py", "regenerate", "--target", target, "--data", os.path.join(D.assets_dir(), "prompts", s + ".jsonl"),
             "--out", os.path.join(out, "answers", s + ".jsonl"), "--limit", str(eval_prompts), "--max-new-tokens", str(max_new_tokens),
             "--max-turns", "2", "--max-prompt-tokens", "1536", "--batch-size", "64", "--dtype", "fp32"] for s in BENCH_SETS]


def decode_check(decoded, replayed):
    """Per turn that decoding and the greedy answers agree on (same tokens), whether the replay has the
    same acceptance length at every step. (turns decoded, turns with the same tokens, of those equal step for step)."""
    got = {(r["id"], r["turn"]): r["dflash"] for r in replayed}
    same = [(d["dflash"], got[k]) for d in decoded if (k := (d["id"], d["turn"])) in got and got[k]["tokens"] == d["dflash"]["tokens"]]
    return len(decoded), len(same), sum(a["acceptance"] == b["acceptance"] for a, b in same)


def _replay_records(out, arm, name):
    """An arm's replay records: the finished file, else what a replay cut short wrote (a half last line,
    which read_rows gives as None, is left out)."""
    path = os.path.join(out, arm, name)
    path = next((f for f in (path, path + ".tmp") if os.path.exists(f)), None)
    return [r for _, r in D.read_rows(path) if r is not None and "summary" not in r] if path else []


def ablation_table(out, plan, tag=""):
    """ablation.md and ablation.json: per arm, tau per set and their mean, the held-out estimate, tau by the
    position where a step starts (the sets pooled) and training samples/s; the spread between the two
    seeds of the default arm, and the decoding check. A set some arm has not replayed whole shows its turns
    beside its tau and stays out of the mean, the buckets and the spread, so those compare the same turns."""
    recs = {arm: _replay_records(out, arm, f"replay{tag}.jsonl") for arm in plan["arms"]}
    turns = {arm: {s: sum(r["dataset"] == s for r in rs) for s in BENCH_SETS} for arm, rs in recs.items()}
    whole = {s: max(t[s] for t in turns.values()) for s in BENCH_SETS}
    common = [s for s in BENCH_SETS if whole[s] and all(t[s] == whole[s] for t in turns.values())]
    last = int(tag[4:]) if tag else float("inf")
    rows = []
    for arm in plan["arms"]:
        sets = {s: measure.acceptance_summary([r for r in recs[arm] if r["dataset"] == s])["tau"] for s in BENCH_SETS if turns[arm][s]}
        metrics = [json.loads(line) for line in open(os.path.join(out, arm, "metrics.jsonl"))]
        val = [m for m in metrics if "val_expected_accept_len" in m and m["step"] <= last]
        sps = [m["samples_per_s"] for m in metrics if "samples_per_s" in m and m["step"] <= last][1:]  # the first interval compiles
        spent = os.path.join(out, "stages", f"train-{arm}{tag}.done")
        rows.append(dict(arm=arm, changes=" ".join(ARMS[arm]), sets=sets, turns=turns[arm],
                         mean=sum(sets[s] for s in common) / max(len(common), 1),
                         held_out=[(m["step"], m["val_expected_accept_len"]) for m in val],
                         by_position=measure.tau_by_position([r for r in recs[arm] if r["dataset"] in common], ABLATION_BUCKETS),
                         samples_per_s=sum(sps) / len(sps) if sps else None,
                         train_s=int(open(spent).read()) if os.path.exists(spent) else None))
    buckets = [b for _, b in ABLATION_BUCKETS if any(b in r["by_position"] for r in rows)]
    shared = " (arms at once: shares of one GPU)" if plan.get("at_once") else ""
    lines = ["| arm | " + " | ".join(BENCH_SETS) + " | mean | held-out estimate | " + " | ".join(f"tau at {b}" for b in buckets)
             + f" | samples/s{shared} |", "|---" * (len(BENCH_SETS) + len(buckets) + 4) + "|"]
    cell = lambda r, s: ("" if s not in r["sets"] else f"{r['sets'][s]:.2f}" if r["turns"][s] == whole[s]
                         else f"{r['sets'][s]:.2f} ({r['turns'][s]}/{whole[s]} turns)")
    for r in rows:
        pos = [f"{r['by_position'][b]['tau']:.2f} ({r['by_position'][b]['steps']})" if b in r["by_position"] else "" for b in buckets]
        lines.append(f"| {r['arm']} | " + " | ".join(cell(r, s) for s in BENCH_SETS) + f" | **{r['mean']:.2f}** | "
                     + " / ".join(f"{v:.2f}" for _, v in r["held_out"]) + " | " + " | ".join(pos)
                     + f" | {'' if r['samples_per_s'] is None else format(r['samples_per_s'], '.1f')} |")
    notes = [f"- {r['arm']}: {r['changes']}" for r in rows]
    if len(common) < len(BENCH_SETS):
        notes.append(f"- mean, tau by position and seed spread over {', '.join(common) or 'no set'}: the sets every arm replayed whole")
    held = [f"step {s}" for s, _ in rows[0]["held_out"]] if rows else []
    notes.append(f"- held-out estimate: expected acceptance on the held-out rows (val_rows) at {', '.join(held)}")
    by_arm = {r["arm"]: r for r in rows}
    if "dflash" in by_arm and "seed1" in by_arm and common:
        a, b = by_arm["dflash"], by_arm["seed1"]
        diffs = [abs(a["sets"][s] - b["sets"][s]) for s in common]
        noise = dict(mean=abs(a["mean"] - b["mean"]), max_set=max(diffs))
        notes.append(f"- seed noise (dflash against seed1): mean tau differs by {noise['mean']:.3f}, a set's tau by at most "
                     f"{noise['max_set']:.3f}")
    else:
        noise = None
    check = None
    if os.path.exists(os.path.join(out, f"decode-check{tag}.jsonl")):
        arm0 = plan["arms"][0]
        decoded = measure.read_records(os.path.join(out, f"decode-check{tag}.jsonl"))
        check = decode_check(decoded, [r for r in recs[arm0] if r["dataset"] == "mt-bench"])
        notes.append(f"- decoding check ({arm0}, bench.py on the first {plan['check_prompts']} MT-Bench prompts, fp32): "
                     f"{check[1]} of {check[0]} decoded turns have the greedy answers' tokens, and {check[2]} of those "
                     "the replay's acceptance length at every step")
    text = f"plan: {json.dumps(plan)}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    open(os.path.join(out, f"ablation{tag}.md"), "w").write(text)
    json.dump(dict(plan=plan, stop_at=last if tag else None, common_sets=common, arms=rows, seed_noise=noise, decode_check=check),
              open(os.path.join(out, f"ablation{tag}.json"), "w"), indent=1)
    print(text, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("first-turns", help="ShareGPT opening exchanges without evaluation-prompt overlap")
    t.add_argument("--dir", default=None, help="asset dir (default: $DFLASH_ASSETS or <repo>/assets)")
    t.add_argument("--out", default=None, help="default: <dir>/sharegpt_first.jsonl")
    t.add_argument("--turns", type=int, default=1, help="user turns (with their answers) kept per conversation")
    c = sub.add_parser("code-prompts", help="HumanEval-shaped prompts from the Python standard library")
    c.add_argument("--out", required=True)
    c.add_argument("--dir", default=None, help="asset dir with prompts/ (default: $DFLASH_ASSETS or <repo>/assets)")
    o = sub.add_parser("overlap", help="evaluation prompts that share a word n-gram with training rows")
    o.add_argument("--data", required=True, help="training rows: JSONL (a glob)")
    o.add_argument("--num-prompts", type=int, default=None, help="the first N of each set (default: all)")
    o.add_argument("--sets", default=None, help="comma-separated prompt sets (default: every file in prompts/)")
    o.add_argument("--n", type=int, default=13, help="words per n-gram")
    o.add_argument("--dir", default=None, help="asset dir with prompts/ (default: $DFLASH_ASSETS or <repo>/assets)")
    s = sub.add_parser("self-prompts", help="user prompts written by the target itself (Magpie)")
    s.add_argument("--target", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=int, required=True)
    s.add_argument("--seeds", default="", help="|-separated openings, used in turn (default: none)")
    s.add_argument("--suffix", choices=["none", "math"], default="none", help="math: MATH-500's answer instruction")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=int, default=160)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dir", default=None, help="asset dir with prompts/ (default: $DFLASH_ASSETS or <repo>/assets)")
    u = sub.add_parser("run", help="every stage: prompts, regeneration, training, export, bench; resumable")
    u.add_argument("--out", default="runs/smollm2-recipe")
    u.add_argument("--budget-minutes", type=float, default=25.0, help="all stages together; sizes the data and steps")
    u.add_argument("--extra-prompts", action="append", default=[], help="JSONL of {\"turns\": [...]} rows, benched as its own row")
    u.add_argument("--bench-prompts", type=int, default=20, help="prompts per benchmark set")
    u.add_argument("--max-new-tokens", type=int, default=256, help="per benchmark turn")
    u.add_argument("--check-prompts", type=int, default=5, help="prompts per set decoded again in fp32, the exact lossless check")
    u.add_argument("--train", action="append", default=[], help="extra train.py override, e.g. --train=--compile=false")
    u.add_argument("--max-rows", type=int, default=0, help="> 0: regenerate at most this many prompts (quick runs)")
    u.add_argument("--rows", default=None, help="a glob of rows regenerated earlier: skip the prompts and the regeneration")
    u.add_argument("--steps", type=int, default=0, help="> 0: training steps instead of the budget's")
    b = sub.add_parser("ablate", help="same-budget arms (loss, sliding layers, depth) on a run's rows; tau by --replay")
    b.add_argument("--data", default="runs/smollm2-recipe/regen/*.jsonl", help="regenerated training rows (a glob)")
    b.add_argument("--out", default="runs/smollm2-ablation")
    b.add_argument("--budget-minutes", type=float, default=25.0, help="all arms together; sizes the steps per arm")
    b.add_argument("--steps", type=int, default=0, help="> 0: steps per arm instead of the budget's")
    b.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    b.add_argument("--eval-prompts", type=int, default=30, help="prompts per benchmark set (greedy answers, 2 turns)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="per answer")
    b.add_argument("--train", action="append", default=[], help="extra train.py override for every arm")
    b.add_argument("--at-once", action="store_true", help="train every arm at the same time (one process each)")
    b.add_argument("--check-prompts", type=int, default=10, help="MT-Bench prompts the first arm decodes to check the replay")
    b.add_argument("--stop-at", type=int, default=0, help="> 0: train every arm to this step and replay its checkpoint there")
    b.add_argument("--table-only", action="store_true", help="write the table of what the arms have now (replays cut short too)")
    a = ap.parse_args(argv)
    # a scheduler or `timeout` stops a job with SIGTERM, which would end this process before its finally blocks
    # run: raised as SystemExit instead, _procs stops the stage processes and _stage counts the stage's time
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if a.cmd == "ablate":
        return ablate(a.out, a.data, a.budget_minutes, a.arms.split(","), a.eval_prompts, a.max_new_tokens, a.steps, a.train,
                      a.at_once, a.check_prompts, a.stop_at, a.table_only)
    if a.cmd == "run":
        return run(a.out, a.budget_minutes, a.extra_prompts, a.bench_prompts, a.max_new_tokens, train_args=a.train,
                   max_rows=a.max_rows, check_prompts=a.check_prompts, rows=a.rows, steps=a.steps)
    if a.cmd == "first-turns":
        first_exchanges(out=a.out, assets_dir=a.dir, turns=a.turns)
    elif a.cmd == "code-prompts":
        code_prompts(a.out, a.dir)
    elif a.cmd == "overlap":
        try:
            found, skipped = overlap(a.data, a.dir, a.n, a.num_prompts, a.sets and a.sets.split(","))
        except (OSError, ValueError, ImportError) as e:  # no such data or set, a folder without `datasets`:
            print(f"overlap: {e}", file=sys.stderr)  # exit 2 (as argparse), not 1, so a CI gate tells a typo
            sys.exit(2)                              # from a quoted benchmark prompt
        for name, f in found.items():
            print(f"{name}: {f['turns']} turns; {len(f['prompts'])} prompts share a {a.n}-word sequence with a "
                  f"training prompt, {len(f['responses'])} with a training answer")
            for where in ("prompts", "responses"):
                for pid, rid in f[where].items():
                    print(f"  {name} {pid}: in training row {rid}'s {where[:-1]}")
        print(f"overlap: {skipped} malformed training rows skipped")
        sys.exit(1 if any(f["prompts"] for f in found.values()) else 0)  # a benchmark prompt was trained on
    elif a.cmd == "self-prompts":
        self_prompts(a.target, a.out, a.num, a.seeds.split("|"), F.MATH_SUFFIX if a.suffix == "math" else "",
                     a.temperature, a.max_new_tokens, a.batch_size, a.seed, a.dir)


if __name__ == "__main__":
    main()
