"""train.py's config: plain data. Every key has a default and one line of meaning (CONFIG, printed by
`python train.py --help`), can be set in the YAML file or on the command line (--key=value), and is
checked for its type, its choices and impossible combinations before anything expensive is loaded,
failing with one line that names the key.
"""
import glob
import os

import numpy as np
import torch
import yaml

import model as M
from checkpoints import export_is_current, metrics_at, saved_run


# ------------------------------------------------------------------------------------------------
# Config: plain data. Every key can be set in the YAML file or on the command line (--key=value).
# Each key: (default, one line of meaning); `python train.py --help` prints these groups.

CONFIG = {
    "model": dict(
        target=("assets/SmolLM2-135M-Instruct", "HF folder, or an HF config .json (random weights)"),
        init_from=("", "a training checkpoint or serving folder to fine-tune from"),
        num_draft_layers=(5, "decoder layers in the drafter"),
        block_size=(16, "tokens per block: the anchor plus block_size - 1 drafted tokens"),
        num_features=(5, "target layers captured as context (given target_layer_ids: their count)"),
        target_layer_ids=([], "0-based target layers captured; empty: the published formula"),
        mask_token_id=(-1, "a target embedding row real text never uses (required)"),
        layer_types=([], "one per draft layer: full_attention | sliding_attention; empty: all full"),
        sliding_window=(0, "sliding layers see context positions >= p - W + 1 (W >= block_size); 0: none"),
    ),
    "data": dict(
        data=("assets/sharegpt_train.jsonl", "conversations (JSON/JSONL glob, HF dataset) or 'synthetic'"),
        max_length=(3072, "tokens per training row (longer rows are cut)"),
        min_loss_tokens=(16, "rows with fewer trained tokens are skipped (counted)"),
        max_rows=(0, "> 0: use only the first max_rows conversations (quick runs)"),
        enable_thinking=("auto", "auto | on | off: the chat template's thinking mode; match serving"),
        pad_multiple=(128, "pad batch lengths to a multiple of this (fewer compiled shapes)"),
        val_rows=(0, "conversations held out of training, scored every val_interval steps"),
    ),
    "optimisation": dict(
        num_anchors=(512, "blocks sampled per sequence (fixed slot count: static shapes)"),
        loss=("dflash", "dflash (decay-weighted CE) | dpace (acceptance-weighted CE, arXiv 2605.18810)"),
        gamma=(0.0, "loss decay exp(-(k-1)/gamma); 0: the paper's value for the block size"),
        dpace_alpha=(0.5, "dpace: s_i = (1 - alpha) p_i + alpha, in [0, 1]"),
        batch_size=(1, "sequences per rank per micro-batch"),
        grad_accum=(1, "micro-batches per optimizer step"),
        epochs=(6, "passes over the data (when max_steps is 0)"),
        max_steps=(0, "optimizer steps; 0: epochs decide"),
        lr=(6e-4, "peak learning rate (AdamW)"),
        min_lr=(0.0, "learning rate at the end of the schedule"),
        lr_schedule=("cosine", "cosine | wsd | constant"),
        warmup_ratio=(0.04, "fraction of steps warming up linearly"),
        decay_ratio=(0.2, "wsd: fraction of steps spent decaying to min_lr"),
        weight_decay=(0.0, "AdamW weight decay on matrices"),
        beta1=(0.9, "AdamW beta1"),
        beta2=(0.95, "AdamW beta2"),
        grad_clip=(1.0, "clip the global gradient norm to this; 0: no clipping"),
        seed=(0, "seed for data order, anchors and init"),
        max_bad_steps=(5, "consecutive non-finite steps before the run stops"),
    ),
    "checkpoints and evaluation": dict(
        out_dir=("runs/quickstart", "run folder: checkpoints, metrics.jsonl, the exported drafter"),
        save_interval=(500, "steps between checkpoints; 0: never save or export (speed runs)"),
        keep_checkpoints=(2, "newest checkpoints kept"),
        stop_at_step=(0, "end this invocation after step N with a checkpoint (job time limits); "
                         "rerun with a later stop_at_step, or none, to go on"),
        export_every_save=(False, "also write a serving folder beside every checkpoint"),
        log_interval=(10, "steps between log lines"),
        val_interval=(0, "steps between held-out scores (0: at the end only)"),
        eval_interval=(0, "steps between real speculative-decoding evaluations (0: end only)"),
        eval_prompts=("sharegpt", "data.load_prompts names or files, comma-separated; '' disables evaluation"),
        eval_num_prompts=(8, "prompts decoded per evaluation"),
        eval_max_new_tokens=(128, "tokens generated per evaluation prompt"),
        wandb=(False, "also log to Weights & Biases"),
    ),
    "speed": dict(
        device=("auto", "auto | cuda | cpu"),
        dtype=("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"),
        attention=("auto", "auto (flex on GPU, dense on CPU) | flex | dense"),
        compile=(False, "torch.compile each drafter layer"),
        compile_target=(False, "also torch.compile the target's decoder layers and the lm_head + CE chunks"),
        shard_target=(False, "shard the frozen target's layers with FSDP2 too (loaded on the host, each layer "
                      "moved to the GPU as it is sharded: a target larger than one GPU fits)"),
        ce_chunk_tokens=(4096, "block tokens per lm_head + CE chunk (memory)"),
        peak_tflops=(989.0, "dense bf16 peak of one GPU, for MFU (H100/H200 SXM)"),
        profile_steps=(0, "> 0: profile that many steps after 5 warm-up steps, print the top ops"),
        profile_trace=(False, "also write profile_trace.json (Chrome trace; minutes for an 8B step)"),
    ),
}
DEFAULTS = {key: default for group in CONFIG.values() for key, (default, _) in group.items()}
CHOICES = dict(enable_thinking={"auto", "on", "off"}, lr_schedule={"cosine", "wsd", "constant"},
               device={"auto", "cuda", "cpu"}, dtype={"auto", "bf16", "fp32"},
               attention={"auto", "flex", "dense"}, loss={"dflash", "dpace"})


def usage():
    lines = ["usage: torchrun [--nproc_per_node=N] train.py --config FILE.yaml [--key=value ...]   (--help: this list)",
             "       (or python train.py ...: one process). Config keys, YAML or command line:"]
    for group, keys in CONFIG.items():
        lines.append(f"\n{group}:")
        for key, (default, meaning) in keys.items():
            lines.append(f"  --{key:<20s} {type(default).__name__:5s} {default!r:<30} {meaning}")
    return "\n".join(lines)


def parse_config(argv):
    """--config FILE and --key=value overrides -> a checked dict. Fails naming the key."""
    if "--help" in argv or "-h" in argv:
        print(usage())
        raise SystemExit(0)
    cfg, overrides, i = dict(DEFAULTS), {}, 0
    file_values = {}
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"config error: unexpected argument {arg!r}; use --key=value (--help lists the keys)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise SystemExit(f"config error: --{key} needs a value")
            value, i = argv[i + 1], i + 1
        key = key.replace("-", "_")
        if key == "config":
            file_values = read_yaml(value)
        else:
            overrides[key] = parse_value(value, f"--{key}")
        i += 1
    for source, values in (("config file", file_values), ("command line", overrides)):
        for key, value in values.items():
            if key not in DEFAULTS:
                close = [k for k in DEFAULTS if key.split("_")[0] in k]
                raise SystemExit(f"config error: unknown key {key!r} in the {source}"
                                 + (f"; did you mean one of {close}?" if close else " (--help lists the keys)"))
            cfg[key] = coerce(key, value)
    check_config(cfg)
    return cfg


def parse_value(text, where):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SystemExit(f"config error: {where}: not valid YAML ({str(e).splitlines()[0]})")


def read_yaml(path):
    if not os.path.isfile(path):
        raise SystemExit(f"config error: --config {path!r} does not exist (see configs/ for examples)")
    with open(path) as f:
        values = parse_value(f.read(), path) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"config error: {path} should hold `key: value` lines, not a {type(values).__name__}")
    return values


def coerce(key, value):
    default = DEFAULTS[key]
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and {"on", "off"} <= CHOICES.get(key, set()):
        value = "on" if value else "off"  # YAML reads an unquoted on/off as a boolean
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
        value = value if ok or value is not None else ""
        ok = ok or value == ""
    if not ok:
        raise SystemExit(f"config error: {key}={value!r} should be a {type(default).__name__} "
                         f"(default {default!r})")
    if key in CHOICES and value not in CHOICES[key]:
        raise SystemExit(f"config error: {key}={value!r}; choose one of {sorted(CHOICES[key])}")
    return value


def check_config(c):
    """Impossible combinations, before anything expensive is loaded."""
    def need(cond, msg):
        if not cond:
            raise SystemExit(f"config error: {msg}")
    need(c["block_size"] >= 2, f"block_size={c['block_size']}: a block is the anchor plus >= 1 drafted token")
    need(c["num_anchors"] >= 1, f"num_anchors={c['num_anchors']}: sample at least one anchor per sequence")
    need(c["num_draft_layers"] >= 1, "num_draft_layers must be >= 1")
    need(c["batch_size"] >= 1 and c["grad_accum"] >= 1, "batch_size and grad_accum must be >= 1")
    need(c["max_length"] > c["block_size"], "max_length must exceed block_size")
    need(c["pad_multiple"] >= 1, "pad_multiple must be >= 1")
    need(c["epochs"] >= 1 or c["max_steps"] >= 1, "set epochs >= 1 or max_steps >= 1")
    need(0 <= c["warmup_ratio"] < 1, f"warmup_ratio={c['warmup_ratio']} must be in [0, 1)")
    need(0 < c["decay_ratio"] <= 1, f"decay_ratio={c['decay_ratio']} must be in (0, 1]")
    need(c["lr_schedule"] != "wsd" or c["warmup_ratio"] + c["decay_ratio"] <= 1,
         f"warmup_ratio={c['warmup_ratio']} + decay_ratio={c['decay_ratio']} exceed 1: wsd would decay before warming up")
    need(c["max_steps"] >= 0 and c["epochs"] >= 0, "max_steps and epochs must be >= 0")
    need(c["lr"] > 0 and 0 <= c["min_lr"] <= c["lr"], f"lr={c['lr']} must be > 0, min_lr={c['min_lr']} in [0, lr]")
    need(0 <= c["beta1"] < 1 and 0 <= c["beta2"] < 1, f"beta1={c['beta1']}, beta2={c['beta2']} must be in [0, 1)")
    for key in ("weight_decay", "grad_clip", "gamma", "stop_at_step", "profile_steps"):
        need(c[key] >= 0, f"{key}={c[key]} must be >= 0")
    for key in ("max_bad_steps", "ce_chunk_tokens", "eval_num_prompts", "eval_max_new_tokens", "num_features"):
        need(c[key] >= 1, f"{key}={c[key]} must be >= 1")
    need(c["peak_tflops"] > 0, f"peak_tflops={c['peak_tflops']} must be > 0 (the GPU's dense bf16 peak, for MFU)")
    ids = c["target_layer_ids"]
    need(not ids or c["num_features"] in (len(ids), DEFAULTS["num_features"]),
         f"num_features={c['num_features']} but target_layer_ids lists {len(ids)} layers: drop num_features "
         "(the ids decide it)")
    c["num_features"] = len(ids) or c["num_features"]
    layout = M.layout_problem(c["layer_types"] or ["full_attention"] * c["num_draft_layers"],
                              c["sliding_window"] or None, c["num_draft_layers"], c["block_size"])
    need(layout is None, layout)
    need(0 <= c["dpace_alpha"] <= 1, f"dpace_alpha={c['dpace_alpha']} must be in [0, 1]")
    need(c["loss"] == "dpace" or c["dpace_alpha"] == DEFAULTS["dpace_alpha"],
         f"dpace_alpha={c['dpace_alpha']} applies to loss=dpace only: set loss=dpace or drop dpace_alpha")
    need(c["loss"] == "dflash" or c["gamma"] == 0, f"gamma={c['gamma']} applies to loss=dflash only; "
         "loss=dpace weights slots by acceptance (drop gamma)")
    need(c["mask_token_id"] >= 0, "mask_token_id is not set: add --mask_token_id=N (or mask_token_id: N in the "
         "config), N a target embedding row real text never uses, e.g. a reserved special token (Qwen3: 151669, "
         "Llama-3.1: 128002, SmolLM2: 16; README: choosing mask_token_id)")
    need(c["save_interval"] >= 0 and c["log_interval"] >= 1, "save_interval must be >= 0, log_interval >= 1")
    need(c["keep_checkpoints"] >= 1, "keep_checkpoints must be >= 1")
    need(c["val_rows"] >= 0 and c["val_interval"] >= 0, "val_rows and val_interval must be >= 0")
    need(os.path.exists(c["target"]), f"target={c['target']!r} does not exist (run `python recipes/fetch.py` "
         "for the default assets, or point target at an HF folder or config .json)")
    looks_local = c["data"].startswith(("/", ".")) or c["data"].endswith((".json", ".jsonl"))
    need(c["data"] == "synthetic" or glob.glob(c["data"]) or not looks_local,
         f"data={c['data']!r} does not exist (" + ("run `python recipes/fetch.py`" if "assets" in c["data"] else
         "write it with `python data.py regenerate ... --out` (README)") + ", or give a file, folder or HF dataset name)")
    need(c["init_from"] == "" or os.path.exists(c["init_from"]), f"init_from={c['init_from']!r} does not exist")
    gpu = torch.cuda.is_available()  # each found late otherwise: an NCCL error; flex at step 1, after the target loaded
    need(c["device"] != "cuda" or gpu, "device=cuda, but this torch sees no GPU (a CPU build, or no visible device): "
         "use device=auto or cpu")
    procs, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count() if gpu else 0
    need(c["device"] == "cpu" or not gpu or procs <= gpus, f"{procs} processes on this host, which sees {gpus} GPUs "
         f"(rank k takes GPU k): launch one per GPU (torchrun --nproc_per_node={gpus})")
    need(c["attention"] != "flex" or c["device"] == "cuda" or (gpu and c["device"] == "auto"),
         "attention=flex on CPU: FlexAttention has no backward there; use attention=auto or dense")


def evaluates(c):
    """Whether train.py evaluates eval_prompts by real decoding: they need the tokenizer of a target folder,
    and a whole target on rank 0 (a sharded one cannot decode there alone)."""
    return bool(c["eval_prompts"]) and os.path.isdir(c["target"]) and not c["shard_target"]


def check_rows(dataset, cfg, tokenizer, source):
    """The tokenised rows, before the target loads: some are left, every id is one of the target's embedding rows (a
    tokenizer grown past vocab_size, or token_ids regenerated by another model, failed inside the first step), and
    none is the mask id, which must be a row real text never uses. One pass at C speed (~10 ns a token)."""
    if not dataset:
        raise SystemExit(f"data error: data={source!r} gave no training rows (the data line above says why)")
    top, with_mask, rows = -1, 0, 0
    for conv in dataset:
        for ids, _ in conv:
            ids = np.asarray(ids)
            top, with_mask, rows = max(top, int(ids.max())), with_mask + bool((ids == cfg.mask_token_id).any()), rows + 1
    if top >= cfg.vocab_size:
        raise SystemExit(f"data error: data={source!r} holds token id {top} ({tokenizer.convert_ids_to_tokens(top)!r}), "
                         f"but the target has {cfg.vocab_size} embedding rows: the tokenizer or the rows' token_ids are not "
                         "this target's (regenerate with it, or resize its embedding)")
    if with_mask:
        raise SystemExit(f"config error: mask_token_id={cfg.mask_token_id} "
                         f"({tokenizer.convert_ids_to_tokens(cfg.mask_token_id)!r}) occurs in {with_mask} of {rows} training "
                         "rows: choose an embedding row real text never uses (README: mask_token_id)")


# ------------------------------------------------------------------------------------------------
# Resuming with a changed config. The same command continues a run from its newest checkpoint; what
# may differ from the values that checkpoint was trained with depends on what the key decides:
# - the drafter's shape and the rows it trains on, in their order (RESUME_FIXED): the checkpoint's
#   weights and data position mean nothing under other values. A change stops the run before anything
#   loads, naming the keys and the ways forward. So does a changed number of sequences per step
#   (batch_size x grad_accum x ranks): a step is that many rows of the data order, which the data
#   position and an epochs-based run length count in. How they split between the three is a memory
#   choice with the same maths (tested), so moving 8 GPUs to 4 with grad_accum doubled resumes;
# - the maths of the steps still to come (RESUME_STRETCH: run length, schedule, AdamW, loss): taken,
#   said in one line, and recorded as a new stretch of the run's history;
# - everything else changes freely and silently: logging, checkpoint cadence, evaluation, speed knobs,
#   max_bad_steps, pad_multiple (a row's anchors do not depend on its padding) and the batch split.

RESUME_FIXED = ("target", "init_from", "num_draft_layers", "block_size", "num_features", "target_layer_ids",
                "mask_token_id", "layer_types", "sliding_window", "data", "max_length", "min_loss_tokens",
                "max_rows", "enable_thinking", "val_rows", "seed")
SHAPE = RESUME_FIXED[2:9]  # the keys that init_from cannot change either: the weights have that shape
RESUME_STRETCH = ("max_steps", "epochs", "lr", "min_lr", "lr_schedule", "warmup_ratio", "decay_ratio",
                  "weight_decay", "beta1", "beta2", "grad_clip", "num_anchors", "loss", "gamma", "dpace_alpha")
PER_STEP = "batch_size x grad_accum x ranks"


def check_resume(c):
    """Before anything loads, against the newest checkpoint in out_dir. A changed RESUME_FIXED key (or
    sequences per step) is a one-line error; a run at its last step whose drafter is exported and final
    evaluation recorded returns the line that says so (there is nothing to do). None: train, from the
    start or resumed."""
    path, state = saved_run(c["out_dir"])
    if path is None:
        return None
    step = state["step"]
    changes = fixed_changes(state, c, int(os.environ.get("WORLD_SIZE", 1)))
    if changes:
        raise SystemExit(fixed_error(c, path, state, changes))
    total = c["max_steps"] or state.get("steps_per_epoch", 0) * c["epochs"]  # 0: not known before the data loads
    if total and total < step:
        raise SystemExit(f"config error: max_steps={c['max_steps']} (epochs={c['epochs']}) ends this run at step "
                         f"{total}, but {path} is at step {step} already: raise max_steps to train further")
    if 0 < c["stop_at_step"] <= step < (total or step + 1):
        return (f"{c['out_dir']} is at step {step}, at or past stop_at_step={c['stop_at_step']}: nothing to do "
                f"(raise stop_at_step, or drop it to train to the end)")
    drafter = os.path.join(c["out_dir"], "drafter")
    # a kill during the final evaluation leaves sets without a record: the run is not finished until the rerun
    # evaluates them
    evaluated = {rec.get("eval_set") for rec in metrics_at(os.path.join(c["out_dir"], "metrics.jsonl"), step)}
    owed = evaluates(c) and not set(c["eval_prompts"].split(",")) <= evaluated
    if total == step and export_is_current(drafter, path) and not owed:
        return (f"{c['out_dir']} is finished: step {step} of {total}, its drafter is in {drafter}; nothing to do "
                f"(to train further, raise max_steps above {step} and run again)")
    return None


def fixed_error(c, path, state, changes):
    """The one line for a resume with changed fixed keys: what changed, and the ways forward."""
    old = state["config"]
    kept = [f"{k}={show(old[k])}" for k in SHAPE if k in old and old[k] != c[k]]  # init_from needs the old shape
    per_step = any(change.startswith(PER_STEP) for change in changes)
    return (f"config error: resuming {c['out_dir']} (checkpoints up to step {state['step']}) with changed "
            f"{', '.join(changes)}: a run keeps its drafter's shape, starting weights and rows throughout. "
            f"To use the new values, train in a new out_dir, or start a new run from these weights with a new "
            f"out_dir and init_from={path}" + (f" (keeping {' '.join(kept)})" if kept else "")
            + (f"; or keep {PER_STEP} at {state['sequences_per_step']} to resume" if per_step else ""))


def fixed_changes(state, c, world):
    """'key old -> new' for each RESUME_FIXED key, and the sequences per step, that differ from a
    checkpoint's train state (checkpoints from before it kept them: the keys it has)."""
    old = dict(state.get("config") or {})
    if old.get("target_layer_ids"):  # older runs kept num_features as given, not as the ids decide it
        old["num_features"] = len(old["target_layer_ids"])
    changes = [f"{k} {show(old[k])} -> {show(c[k])}" for k in RESUME_FIXED if k in old and not same(k, old[k], c[k])]
    per_step = c["batch_size"] * c["grad_accum"] * world
    if state.get("sequences_per_step", per_step) != per_step:
        changes.append(f"{PER_STEP} {state['sequences_per_step']} -> {per_step}")
    return changes


def same(key, old, new):
    if key == "init_from" and not new:
        return True  # cleared: a resume starts from its checkpoint anyway (and the source may be gone)
    if key in ("target", "init_from", "data") and old and new:
        return os.path.realpath(old) == os.path.realpath(new)  # the same file, however the path is written
    return old == new


def show(value):
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def resumed_stretches(state, c, step, log):
    """The run's stretches, [{"from_step": s, key: value for RESUME_STRETCH}], continued from a resumed
    checkpoint's train state (None: a new run). Values that differ from the last stretch's start a new
    one at `step`, said in one line. The checkpoints keep the list: a resume from an earlier checkpoint
    forgets the stretches past it, as metrics.jsonl forgets their records."""
    now = {k: c[k] for k in RESUME_STRETCH}
    if state is None:
        return [dict(from_step=0, **now)]
    old = state.get("config") or now  # a checkpoint from before the config was kept: history starts here
    stretches = state.get("stretches") or [dict(from_step=0, **{k: old.get(k, now[k]) for k in now})]
    changed = [k for k in now if stretches[-1].get(k, now[k]) != now[k]]
    if not changed:
        return stretches
    was = {k: f"was {show(stretches[-1][k])} for steps {held_since(stretches, k)}-{step}" for k in changed}
    log(f"resuming at step {step} with " + ", ".join(f"{k} {show(now[k])} ({was[k]})" for k in changed))
    return stretches + [dict(from_step=step, **now)]


def held_since(stretches, key):
    """The step from which the last stretch's value of key has held."""
    start = stretches[-1]["from_step"]
    for s in reversed(stretches[:-1]):
        if s.get(key) != stretches[-1][key]:
            break
        start = s["from_step"]
    return start


def stretch_record(stretches):
    """The stretches as train_config.json shows them: each one's first step and the values of the keys
    that changed somewhere in the run (the others held their top-level value throughout)."""
    changed = [k for k in RESUME_STRETCH if len({repr(s.get(k)) for s in stretches}) > 1]
    return [dict(from_step=s["from_step"], **{k: s.get(k) for k in changed}) for s in stretches]
