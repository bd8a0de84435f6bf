"""Train a DFlash drafter.

    python train.py --config configs/quickstart.yaml [--key=value ...]
    torchrun --nproc_per_node=8 train.py --config configs/qwen3-8b.yaml

One visible loop: batch -> frozen target forward (hooks capture the context features) -> drafter forward under
the DFlash block mask -> weighted CE through the target's lm_head (decay or D-PACE weights) -> AdamW. The
drafter is sharded with FSDP2 (fully_shard per layer, then the root); the frozen target sits whole in the
compute dtype on every rank, or is sharded too (shard_target). The same script runs on CPU with gloo.
Checkpoints (DCP) are atomic and the run resumes by itself when the same command is run again. The config keys
and their checks live in train_config.py, the checkpoint format in checkpoints.py.
"""
import contextlib
import datetime
import glob
import json
import math
import os
import pathlib
import signal
import sys
import time

import torch
import torch.distributed as dist

import bench
import data as D
import measure
import model as M
import targets
from checkpoints import (cached_rows, full_state_dict, lock_run, metrics_at, resume_checkpoint, rows_key, save_checkpoint,
                         saved_run, trim_metrics)
from convert import export_drafter, load_drafter
from train_config import check_resume, check_rows, evaluates, parse_config, resumed_stretches, stretch_record

# ------------------------------------------------------------------------------------------------
# Learning rate: a function of the step, so resuming needs nothing but the step

def get_lr(step, total, c):
    warmup = int(c["warmup_ratio"] * total)
    if step < warmup:
        return c["lr"] * (step + 1) / warmup
    if c["lr_schedule"] == "constant":
        return c["lr"]
    if c["lr_schedule"] == "wsd":  # warmup, stable, then cosine down over the last decay_ratio
        decay_start = total - int(c["decay_ratio"] * total)
        if step < decay_start:
            return c["lr"]
        progress = (step - decay_start) / max(1, total - decay_start)
    else:
        progress = (step - warmup) / max(1, total - warmup)
    return c["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (c["lr"] - c["min_lr"])


def adamw_settings(c):
    """AdamW's settings per parameter group (matrices, then the rest): set when the optimizer is built,
    and again after a resume, whose optimizer state brings back the values it was saved with."""
    betas = (c["beta1"], c["beta2"])
    return [dict(weight_decay=c["weight_decay"], betas=betas), dict(weight_decay=0.0, betas=betas)]


# ------------------------------------------------------------------------------------------------
# Throughput accounting (results/throughput-qwen3-8b.md explains the count)

def flops_per_token_counts(target, dcfg, num_anchors):
    """Model FLOPs of one sequence = a * S + b, S its (padded) length:
    2*N_t*S (target up to the last captured layer) + 6*N_fc*S (fc) + 6*N_d*Q (drafter layers)
    + 4*V*H*Q (lm_head forward and input gradient), Q = anchors x block; attention left out."""
    layers = targets.decoder_layers(target)
    n_t = sum(p.numel() for layer in layers[:max(dcfg.target_layer_ids) + 1] for p in layer.parameters())
    with torch.device("meta"):
        n_d = sum(p.numel() for p in M.DFlashDrafter(dcfg).layers.parameters())
    H, q = dcfg.hidden_size, num_anchors * dcfg.block_size
    return 2 * n_t + 6 * dcfg.num_features * H * H, 6 * n_d * q + 4 * dcfg.vocab_size * H * q


# ------------------------------------------------------------------------------------------------

def setup_distributed(device_kind):
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # plain `python train.py`: a group of one, so the FSDP2 code path is the same
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def setup(c):
    """Everything the loop needs, checked in order of cost: config against the target's config (no
    weights), data, then the models, FSDP2, the optimizer. Returns the run as a plain namespace."""
    from types import SimpleNamespace
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoTokenizer

    kind = ("cuda" if torch.cuda.is_available() else "cpu") if c["device"] == "auto" else c["device"]
    rank, world = setup_distributed(kind)
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(c["dtype"]) or \
        (torch.bfloat16 if kind == "cuda" else torch.float32)
    r = SimpleNamespace(c=c, rank=rank, world=world, device=device, dtype=dtype,
                        use_flex=c["attention"] == "flex" or (c["attention"] == "auto" and kind == "cuda"),
                        log=print if rank == 0 else (lambda *a, **k: None))
    os.makedirs(c["out_dir"], exist_ok=True)
    # ranks wait for the slowest one's share of the tokenising, and ranks 1.. while rank 0 decodes an evaluation: on
    # CPU (gloo), with a day's timeout, as an NCCL barrier's watchdog ends the job after 10 minutes (50 prompts of 512
    # tokens on an 8B target take longer). Several hosts: gloo may need GLOO_SOCKET_IFNAME, as NCCL NCCL_SOCKET_IFNAME
    r.wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24)) if world > 1 else None

    # --- the drafter's shape is fixed by the target's config: check it before loading weights
    try:
        target_config = targets.load_target_config(c["target"])
        text_config = getattr(target_config, "text_config", None) or target_config
        r.dcfg = M.config_from_target(text_config, c["num_draft_layers"], c["block_size"],
                                      c["target_layer_ids"] or None, c["num_features"], c["mask_token_id"],
                                      c["layer_types"] or None, c["sliding_window"] or None)
        targets.check_target(target_config)  # its decoder layers are where capture looks, on the meta device
    except (ValueError, OSError) as e:  # OSError: a folder without config.json
        raise SystemExit(f"config error: {e}")
    r.target_config = {**text_config.to_dict(), "_target_path": os.path.abspath(c["target"])}
    try:  # a small model: read now, to check its shape
        init = load_drafter(c["init_from"]) if c["init_from"] else None
    except (ValueError, OSError) as e:  # a target or data folder given by mistake
        raise SystemExit(f"config error: init_from={c['init_from']}: {e}")
    if init and init[1] != r.dcfg:
        differ = [f"{k} {v} there, {getattr(r.dcfg, k)} here" for k, v in vars(init[1]).items() if getattr(r.dcfg, k) != v]
        raise SystemExit(f"config error: init_from {c['init_from']} is a drafter of another shape ({'; '.join(differ)}): "
                         "set this run's keys to match it (num_draft_layers, block_size, target_layer_ids, mask_token_id, "
                         "layer_types, sliding_window), or start from another drafter")

    # --- data (tokenised with the target's own chat template)
    r.tokenizer = AutoTokenizer.from_pretrained(c["target"]) if os.path.isdir(c["target"]) else None
    if c["data"] == "synthetic":  # fixed-length random rows: throughput work on random targets
        ids = torch.randint(0, r.dcfg.vocab_size, (256, c["max_length"]), generator=torch.Generator().manual_seed(c["seed"]))
        dataset = [[(row.tolist(), [1] * c["max_length"])] for row in ids]  # one row a conversation
    else:
        if r.tokenizer is None:
            raise SystemExit("config error: data from conversations needs a target folder with a tokenizer")
        thinking = {"auto": None, "on": True, "off": False}[c["enable_thinking"]]
        files = [f for f in sorted(glob.glob(c["data"])) if os.path.isfile(f)]  # their first rows: cheap
        modes = D.recorded(files, ("enable_thinking",), limit=1)["enable_thinking"]
        other = {m: f for m, f in modes.items() if m != c["enable_thinking"]}
        if other and D.has_thinking_switch(r.tokenizer):
            mode, f = next(iter(other.items()))
            raise SystemExit(f"config error: enable_thinking={c['enable_thinking']}, but {f} was regenerated with "
                             f"--enable-thinking {mode}: train on rows rendered as the target answered them (set "
                             f"enable_thinking={mode}, and serve the target that way), or regenerate")
        workers = max(1, min(16, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))  # a host's ranks
        settings = {k: c[k] for k in ("max_length", "min_loss_tokens", "enable_thinking", "max_rows")}  # shape rows
        try:  # a chat template that cannot give the rows the target answered stops before the data is read
            dataset, counts = cached_rows(c["out_dir"], lambda: rows_key(c["data"], c["target"], D.__file__, settings),
                                          lambda k, n: D.tokenize_part(r.tokenizer, c["data"], c["max_length"], c["min_loss_tokens"],
                                                                       thinking, r.log, c["max_rows"], workers, (k, n)),
                                          rank, world, r.log, r.wait)
        except (ValueError, OSError) as e:
            raise SystemExit(f"config error: {e}")
        r.log(D.data_line(dataset, counts))
        check_rows(dataset, r.dcfg, r.tokenizer, c["data"])
    try:
        r.dataset, r.val_rows = D.split_heldout(dataset, c["val_rows"])
    except ValueError as e:
        raise SystemExit(f"config error: {e}")
    r.data_fingerprint = D.fingerprint(r.dataset)
    path, state = saved_run(c["out_dir"])  # a resume needs the same rows: its data position indexes them
    if state and state.get("data_fingerprint", r.data_fingerprint) != r.data_fingerprint:
        raise SystemExit(f"config error: resuming {c['out_dir']} on data={c['data']!r}, which now gives "
                         f"{r.data_fingerprint}; {path} trained on {state['data_fingerprint']}: the data changed under "
                         f"its name. To train on it, use a new out_dir (with init_from={path} to keep the weights)")
    r.eval_sets = {}  # loaded now: a missing or empty set stops the run before it trains, not after
    if evaluates(c):
        try:
            r.eval_sets = {name: D.load_prompts(name, log=r.log)[:c["eval_num_prompts"]]
                           for name in c["eval_prompts"].split(",")}
        except (OSError, ValueError) as e:
            raise SystemExit(f"config error: eval_prompts={c['eval_prompts']!r}: {e}")
    r.steps_per_epoch = D.steps_per_epoch(r.dataset, c["batch_size"] * c["grad_accum"], world)
    if r.steps_per_epoch < 1:
        raise SystemExit(f"data error: {len(r.dataset)} rows cannot fill one step of "
                         f"{c['batch_size']} x {c['grad_accum']} x {world} sequences")
    r.total_steps = c["max_steps"] or r.steps_per_epoch * c["epochs"]
    r.pad_id = r.tokenizer.pad_token_id if r.tokenizer is not None and r.tokenizer.pad_token_id is not None else 0
    r.pad_id = r.pad_id if r.pad_id < r.dcfg.vocab_size else 0  # a [PAD] added past the embedding; pads are masked

    # --- models
    mesh = init_device_mesh(kind, (world,))  # explicit: FSDP2 would pick cuda wherever one exists
    # shard_target: a rank reads the whole target into host memory, then fully_shard moves each decoder layer to the
    # GPU and keeps this rank's slice; a host's ranks take turns at it, so it holds about one target, not one a GPU
    turns = 1
    if c["shard_target"] and world > 1:  # the most ranks a host has: every rank takes part in as many barriers
        most = torch.tensor(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=r.wait)
        turns = int(most)
    for turn in range(turns):
        if turn == int(os.environ.get("LOCAL_RANK", 0)) % turns:
            torch.manual_seed(c["seed"])  # a target built from a config gets the same random weights on every rank
            r.target = targets.load_target(c["target"], dtype=dtype, device="cpu" if c["shard_target"] else device)
            if c["compile_target"]:
                targets.compile_target_layers(r.target)
            if c["shard_target"]:  # only the decoder layers: embed_tokens and lm_head serve the drafter every step
                targets.to_device_but_layers(r.target, device)
                for layer in targets.decoder_layers(r.target):
                    fully_shard(layer, mesh=mesh)
        if turns > 1:
            dist.barrier(group=r.wait)
    M.check_fits_target(r.dcfg, r.target)
    torch.manual_seed(c["seed"])  # same init on every rank: fully_shard keeps each rank's slice
    r.drafter = M.build_drafter(r.dcfg, device=device, dtype=torch.float32)
    if init:
        r.drafter.load_state_dict(init[0].state_dict())
        r.log(f"the drafter starts from the weights of init_from={c['init_from']}")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if c["compile"] and c["layer_types"]:
        # each (padded length, layer kind) takes its own graph: a sliding + full drafter needs 2 x (max_length /
        # pad_multiple) of them (twice that allowed here), past dynamo's default limit of 8, after which it
        # would run flex attention eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   4 * -(-c["max_length"] // c["pad_multiple"]))
    for layer in r.drafter.layers:
        if c["compile"]:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(r.drafter, mesh=mesh, mp_policy=mp)
    decay = [p for p in r.drafter.parameters() if p.dim() >= 2]
    no_decay = [p for p in r.drafter.parameters() if p.dim() < 2]
    matrices, rest = adamw_settings(c)
    r.optimizer = torch.optim.AdamW([{"params": decay, **matrices}, {"params": no_decay, **rest}],
                                    lr=c["lr"], eps=1e-8, fused=kind == "cuda")
    r.flops = flops_per_token_counts(r.target, r.dcfg, c["num_anchors"])
    return r


def open_logs(r, step):
    """metrics.jsonl (continued from `step`: records past a resumed checkpoint are dropped) and wandb."""
    c, r.metrics_file, r.wandb_run = r.c, None, None
    if r.rank != 0:
        return
    with open(os.path.join(c["out_dir"], "train_config.json"), "w") as f:  # not config.json: a serving folder's
        json.dump({**c, "stretches": stretch_record(r.stretches)}, f, indent=1)
    dropped = trim_metrics(os.path.join(c["out_dir"], "metrics.jsonl"), step)  # a killed invocation's, past `step`
    r.metrics_file = open(os.path.join(c["out_dir"], "metrics.jsonl"), "a")
    if c["wandb"]:
        try:
            import secrets
            import wandb
            # one W&B run while each invocation continues where the last one logged; W&B ignores steps below its
            # last, so where a kill logged past the checkpoint the resumed records go to a new W&B run
            run_id = pathlib.Path(c["out_dir"], "wandb_run_id")
            if dropped or not run_id.exists():
                run_id.write_text(secrets.token_hex(4))
                if dropped:
                    r.log(f"wandb: steps past {step} were logged before the kill; logging to a new W&B run {run_id.read_text()}")
            r.wandb_run = wandb.init(project="dflash", dir=c["out_dir"], id=run_id.read_text().strip(), resume="allow")
            r.wandb_run.config.update(c, allow_val_change=True)  # a resume may change how the rest trains
        except ImportError:
            r.log("wandb=true but wandb is not installed: logging to metrics.jsonl only")


def close_run(r):
    """Every way out of the loop: wandb finished, metrics.jsonl closed, then the process group."""
    if r.wandb_run:
        r.wandb_run.finish()
    if r.metrics_file:
        r.metrics_file.close()
    dist.destroy_process_group()


def record(r, rec):
    if r.metrics_file:
        r.metrics_file.write(json.dumps(rec) + "\n")
        r.metrics_file.flush()


def train_step(r, batches, step):
    """One optimizer step's forward and backward over grad_accum micro-batches, the loss normalised over
    the whole step (all micro-batches and ranks, SPEC 3.7). Returns (loss, grad norm, per-slot stats, data
    position after it, its rows' epoch, counts for the meters); the caller applies or skips the update."""
    c, device = r.c, r.device
    loss_sum, weight_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    stats, counts = None, dict(samples=0, tokens=0, flops=0)
    for micro in range(c["grad_accum"]):
        batch, position = next(batches)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        # anchors depend only on (seed, epoch, row): re-sampled every epoch, re-drawn exactly by a
        # resumed run, and the same whatever the batch size, accumulation or number of ranks
        gen = [torch.Generator().manual_seed((c["seed"] * 1_000_003 + batch["epoch"]) * 100_000_007 + int(row))
               for row in batch["row_ids"]]
        r.drafter.set_requires_gradient_sync(micro == c["grad_accum"] - 1)
        ls, ws, st = M.dflash_loss(r.drafter, r.target, input_ids, loss_mask, c["num_anchors"], c["gamma"] or None,
                                   r.use_flex, gen, ce_chunk_tokens=c["ce_chunk_tokens"], compile_ce=c["compile_target"],
                                   loss=c["loss"], dpace_alpha=c["dpace_alpha"])
        with torch.profiler.record_function("dflash: backward"):
            ls.backward()  # un-normalised: the gradient is scaled once the step's total weight is known
        loss_sum += ls.detach()
        weight_sum += ws
        stats = st if stats is None else {k: stats[k] + st[k] for k in st}
        counts["samples"] += input_ids.shape[0]
        counts["tokens"] += int(loss_mask.numel())
        counts["flops"] += input_ids.shape[0] * (r.flops[0] * input_ids.shape[1] + r.flops[1])
    totals = torch.stack([loss_sum, weight_sum, torch.full_like(loss_sum, len(r.sigterm))])
    dist.all_reduce(totals)  # and whether any rank got a SIGTERM: all stop after the same step
    # FSDP averages gradients over ranks; undo that and divide by the global weight instead
    scale = r.world / totals[1].clamp(min=1e-6)
    for p in r.drafter.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(r.drafter.parameters(), c["grad_clip"] or math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss, grad_norm, term = torch.stack([totals[0] / totals[1].clamp(min=1e-6), grad_norm, totals[2]]).tolist()
    slots = torch.stack([stats["correct_per_slot"], stats["count_per_slot"]])
    dist.all_reduce(slots)  # one collective for both per-slot sums
    return loss, grad_norm, slots, position, batch["epoch"], counts, term > 0


class Meter:
    """What the log line reports since the last one: loss, per-slot accuracy, rates, ETA. A checkpoint
    between log lines keeps the interval's loss and accuracy sums (`saved`), so a resumed run's next
    record averages the same steps as an uninterrupted run's; the rates restart with the process."""

    def __init__(self, r, step, saved=None):
        self.r, self.t_first, self.step_first = r, None, step  # the rate since the first log line
        self.reset()
        if saved and saved["n"]:
            self.loss, self.n, self.slots = saved["loss"], saved["n"], torch.tensor(saved["slots"], device=r.device)

    def saved(self):
        return dict(loss=self.loss, n=self.n, slots=self.slots.tolist() if self.n else 0)

    def reset(self):
        self.slots, self.loss, self.n, self.t = 0, 0.0, 0, time.time()
        self.counts = dict(samples=0, tokens=0, flops=0)

    def add(self, loss, slots, counts):
        self.slots, self.loss, self.n = self.slots + slots, self.loss + loss, self.n + 1
        for k in counts:
            self.counts[k] += counts[k]

    def log(self, step, lr, grad_norm, epoch, skipped):
        r, c = self.r, self.r.c
        dt = time.time() - self.t
        acc, exp_len = M.acceptance_metrics(*self.slots.cpu())
        sps, tflops = self.counts["samples"] * r.world / dt, self.counts["flops"] / dt / 1e12  # TFLOP/s: per GPU
        # the first interval carries the compile warm-up: the ETA uses the rate since the first log line
        since = (time.time() - self.t_first if self.t_first else dt) / max(1, step - self.step_first)
        if not self.t_first:
            self.t_first, self.step_first = time.time(), step
        cuda = r.device.type == "cuda"
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        rec = dict(step=step, epoch=epoch, loss=self.loss / self.n, acc=acc.tolist(), acc_1=acc[0].item(),
                   expected_accept_len=exp_len, lr=lr, grad_norm=grad_norm, samples_per_s=sps,
                   tokens_per_s=self.counts["tokens"] * r.world / dt, tflops_per_gpu=tflops,
                   mfu=tflops / c["peak_tflops"], peak_mem_gib=mem, skipped_steps=skipped, time=time.time())
        gpu = f" | {tflops:.0f} TFLOP/s/gpu (MFU {100 * rec['mfu']:.1f}%) | mem {mem:.1f} GiB" if cuda else ""
        r.log(f"step {step}/{r.total_steps} ({100 * step / r.total_steps:.0f}%) | loss {rec['loss']:.4f} | "
              f"acc@1 {rec['acc_1']:.3f} | exp accept {exp_len:.2f} | lr {lr:.2e} | gnorm {grad_norm:.2f} | "
              f"{sps:.1f} samples/s | {rec['tokens_per_s']:.0f} tok/s{gpu} | "
              f"ETA {D.fmt_time(since * (r.total_steps - step))}", flush=True)
        record(r, rec)
        if r.wandb_run:
            r.wandb_run.log(rec, step=step)
        self.reset()


def checkpoint(r, step, position, skipped, bad_steps, meter):
    state = dict(step=step, data_position=position, skipped_steps=skipped, bad_steps=bad_steps,
                 cpu_rng=torch.get_rng_state().tolist(), meter=meter.saved(), data_fingerprint=r.data_fingerprint,
                 config=r.c, stretches=r.stretches, total_steps=r.total_steps, steps_per_epoch=r.steps_per_epoch,
                 sequences_per_step=r.c["batch_size"] * r.c["grad_accum"] * r.world)  # what check_resume compares
    path = save_checkpoint(r.c["out_dir"], step, r.drafter, r.optimizer, state, r.dcfg, r.target_config,
                           r.c["keep_checkpoints"], r.rank)
    r.log(f"saved {path}")
    return path


def main(argv=None):
    c = parse_config(sys.argv[1:] if argv is None else argv)
    with lock_run(c["out_dir"]) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext():  # others follow
        before = signal.getsignal(signal.SIGTERM)
        try:
            return train(c)
        except torch.OutOfMemoryError as e:  # torch's message says how much; ours, which keys to turn
            e.add_note("dflash-train: to fit, halve batch_size and double grad_accum (the same sequences per step: "
                       "a rerun resumes), lower ce_chunk_tokens, or set shard_target: true; fewer num_anchors fit too "
                       "but train otherwise, a shorter max_length in a new out_dir")
            raise
        finally:
            signal.signal(signal.SIGTERM, before)  # the loop's handler ends with it


def train(c):
    finished = check_resume(c)  # before anything loads: a changed shape or data stops here, a finished run ends here
    if finished:
        if int(os.environ.get("RANK", 0)) == 0:
            print(finished)
        return 0
    r = setup(c)

    # --- resume: the same command after a crash continues from the newest intact checkpoint
    step, position, bad_steps, skipped = 0, None, 0, 0
    resume, state = resume_checkpoint(c["out_dir"], r.drafter, r.optimizer, r.rank, r.log)
    if resume:
        step, position, skipped = state["step"], state["data_position"], state["skipped_steps"]
        bad_steps = state.get("bad_steps", 0)  # in a row up to the checkpoint: max_bad_steps counts across a resume
        torch.set_rng_state(torch.tensor(state["cpu_rng"], dtype=torch.uint8))
        r.log(f"resumed from {resume} at step {step}")
        for group, settings in zip(r.optimizer.param_groups, adamw_settings(c)):
            group.update(settings)
    r.stretches = resumed_stretches(state, c, step, r.log)  # a changed lr, schedule, loss...: said and recorded
    open_logs(r, step)
    batches = D.iterate_batches(r.dataset, c["batch_size"], seed=c["seed"], rank=r.rank, world_size=r.world,
                                pad_multiple=c["pad_multiple"], pad_id=r.pad_id, start=position,
                                max_length=c["max_length"], grad_accum=c["grad_accum"])
    r.log(f"training {sum(p.numel() for p in r.drafter.parameters()) / 1e6:.1f}M drafter params for {r.total_steps} "
          f"steps ({r.steps_per_epoch}/epoch) on {r.world} x {r.device.type}, {r.dtype}, "
          f"{'flex' if r.use_flex else 'dense'} attention; layer ids {r.dcfg.target_layer_ids}")
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    meter, profiler = Meter(r, step, state and state.get("meter")), measure.start_train_profiler(c)
    # a kill during the resumed step's validation or evaluation: write the records metrics.jsonl lacks of them
    done = [metrics_at(os.path.join(c["out_dir"], "metrics.jsonl"), step) if resume and r.rank == 0 else []]
    dist.broadcast_object_list(done)  # rank 0's: they decide collectives
    if resume:
        validate_and_evaluate(r, step, done[0])

    # --- the loop (a SIGTERM, a scheduler preempting the job, ends the step under way, checkpoints and stops)
    r.sigterm = []
    signal.signal(signal.SIGTERM, lambda *a: r.sigterm.append(1))
    while step < r.total_steps:
        lr = get_lr(step, r.total_steps, c)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm, slots, position, epoch, counts, term = train_step(r, batches, step)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            bad_steps = 0
            with torch.profiler.record_function("dflash: optimizer"):
                r.optimizer.step()
            meter.add(loss, slots, counts)
        else:  # skip the update (the step still counts: its rows are used up); stop if it repeats
            bad_steps, skipped = bad_steps + 1, skipped + 1
            r.log(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
        r.optimizer.zero_grad(set_to_none=True)
        step += 1
        profiler = profiler and measure.report_train_profile(r, profiler)
        if meter.n and (step % c["log_interval"] == 0 or step == r.total_steps):
            meter.log(step, lr, grad_norm, epoch, skipped)
        too_bad = bad_steps >= c["max_bad_steps"]
        stopping_here = too_bad or ((term or step == c["stop_at_step"]) and step < r.total_steps)
        if stopping_here or (c["save_interval"] > 0 and (step % c["save_interval"] == 0 or step == r.total_steps)):
            path = checkpoint(r, step, position, skipped, bad_steps, meter)
            if c["export_every_save"] and step != r.total_steps and not too_bad:
                export(r, os.path.join(path, "export"))
        if too_bad:
            r.log(f"stopping: {bad_steps} non-finite steps in a row (lower lr, check data); "
                  f"the last good weights are in {path}")
            close_run(r)
            return 1
        if not term:  # a preempted run is given seconds: the rerun validates and evaluates this step at its start
            validate_and_evaluate(r, step)
        if stopping_here:
            r.log(f"stopped by SIGTERM after step {step}; to continue, run the same command" if term else
                  f"stop_at_step={step} reached; to continue, run the same command with a later stop_at_step or none")
            close_run(r)
            return 0

    # --- finish: the serving folder, then real speculative decoding
    if c["save_interval"] > 0:
        export(r, os.path.join(c["out_dir"], "drafter"))
        r.log(f"exported the drafter (serving format) to {os.path.join(c['out_dir'], 'drafter')}")
    results = evaluate(r, step, done[0])
    if results:
        r.log("acceptance length measured by real speculative decoding (temperature 0):")
    for name, kind, n, tau, same in results:
        r.log(f"  tau = {tau:.2f} on {n} {kind} prompts ({name}); {same}/{n} outputs identical to greedy decoding")
    dist.barrier()
    close_run(r)
    return 0


def validate_and_evaluate(r, step, done=()):
    """The validation and evaluation (but the last step's evaluation: the finish runs it) that step's schedules ask for,
    but those whose records are in `done` (what a run killed during them wrote at that step)."""
    c = r.c
    if r.val_rows and (step == r.total_steps or (c["val_interval"] and step % c["val_interval"] == 0)) and \
            not any(rec["step"] == step and "val_loss" in rec for rec in done):
        validate(r, step)
    if c["eval_interval"] and step % c["eval_interval"] == 0 and step != r.total_steps:
        evaluate(r, step, done)


@torch.no_grad()
def validate(r, step):
    """Loss and expected acceptance length on the held-out rows, each row with the same anchors every
    time. On conversations the drafter never trained on, this estimate tracks bench.py's tau (README);
    its gap to the training estimate is what the drafter memorised."""
    c, n_batch, rows = r.c, r.c["batch_size"], r.val_rows
    # every row once whatever the split: each rank scores `n` of them in as many forwards (FSDP), the last
    # rank's share filled up with a row whose loss mask is zero (it weighs nothing)
    n, pad = -(-len(rows) // r.world), (rows[0][0], [0] * len(rows[0][0]))
    totals = slots = 0  # [loss sum, weight sum], [correct per slot, count per slot]
    for lo in range(r.rank * n, (r.rank + 1) * n, n_batch):
        ids = range(lo, min(lo + n_batch, (r.rank + 1) * n))
        batch = D.collate([rows[i] if i < len(rows) else pad for i in ids], c["pad_multiple"], r.pad_id, c["max_length"])
        gen = [torch.Generator().manual_seed(c["seed"] * 1_000_003 + 999_999_937 + i) for i in ids]
        ls, ws, st = M.dflash_loss(r.drafter, r.target, batch["input_ids"].to(r.device), batch["loss_mask"].to(r.device),
                                   c["num_anchors"], c["gamma"] or None, r.use_flex, gen,
                                   ce_chunk_tokens=c["ce_chunk_tokens"], compile_ce=c["compile_target"],
                                   loss=c["loss"], dpace_alpha=c["dpace_alpha"])
        totals = totals + torch.stack([ls, ws])
        slots = slots + torch.stack([st["correct_per_slot"], st["count_per_slot"]])
    dist.all_reduce(totals)
    dist.all_reduce(slots)
    acc, exp_len = M.acceptance_metrics(*slots.cpu())
    loss = (totals[0] / totals[1].clamp(min=1e-6)).item()
    r.log(f"val step {step}: loss {loss:.4f} | acc@1 {acc[0].item():.3f} | exp accept {exp_len:.2f} "
          f"on {len(rows)} held-out rows")
    record(r, dict(step=step, val_loss=loss, val_acc=acc.tolist(), val_expected_accept_len=exp_len, val_rows=len(rows)))


def export(r, out):
    sd = full_state_dict(r.drafter)
    if r.rank == 0:
        export_drafter(sd, r.dcfg, r.target_config, out, target_name=r.c["target"])
    dist.barrier()


def evaluate(r, step, done=()):
    """Real speculative decoding (bench.py's loop, temperature 0) on each eval_prompts set, on rank 0
    with a plain copy of the drafter, each turn checked against plain greedy decoding. A set that is
    the training data says whether the pipeline learns; a held-out set, what generalises. A set with a
    record at this step in `done` (a run killed during this evaluation) is not decoded again.
    Returns [(set, kind, prompts, tau, turns identical to greedy)]."""
    c, target = r.c, r.target
    logged = {rec["eval_set"]: (rec["eval_set"], rec["eval_kind"], rec["eval_prompts"], rec["eval_tau"],
                                rec["eval_lossless"]) for rec in done if rec["step"] == step and "eval_set" in rec}
    if not set(r.eval_sets) - set(logged):
        return [logged[name] for name in r.eval_sets]  # none asked for, no tokenizer, a sharded target, or all done
    sd = full_state_dict(r.drafter)
    results = []
    if r.rank == 0:
        dtype, device = target.dtype, next(target.parameters()).device
        if device.type == "cpu":  # speculative == greedy holds exactly in fp32; in bf16 argmax near-ties
            target.float()        # can flip between a 16-token and a 1-token forward (SPEC 8)
        plain = M.DFlashDrafter(r.dcfg).to(device=device, dtype=target.dtype)
        plain.load_state_dict(sd)
        plain.eval()
        trained = {os.path.abspath(f) for f in glob.glob(c["data"])}
        for name, prompts in r.eval_sets.items():
            if name in logged:
                results.append(logged[name])
                continue
            kind = "training" if os.path.abspath(name) in trained else "held-out"
            r.log(f"eval step {step}: decoding {len(prompts)} {kind} prompts ({name}) speculatively and plainly, "
                  f"up to {c['eval_max_new_tokens']} tokens each")
            t0 = time.time()
            with torch.compiler.set_stance("force_eager"):  # compiled target layers: decode shapes vary every step
                tau, same = bench.measure_tau(target, plain, r.tokenizer, prompts, c["eval_max_new_tokens"], r.log)
            r.log(f"eval step {step}: tau {tau:.2f} on {len(prompts)} {kind} prompts ({name}); "
                  f"{same}/{len(prompts)} identical to greedy decoding ({time.time() - t0:.0f} s)")
            results.append((name, kind, len(prompts), tau, same))
            record(r, dict(step=step, eval_set=name, eval_kind=kind, eval_tau=tau, eval_prompts=len(prompts),
                           eval_lossless=same))
        target.to(dtype)  # bf16 -> fp32 -> bf16 is exact
    dist.barrier(group=r.wait)
    return results


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        # a config or data error: one line, once, exit 2, no traceback of ours
        if int(os.environ.get("RANK", 0)) == 0:
            print(e.code, file=sys.stderr, flush=True)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # under torchrun, whose summary names the first failed worker's error file as the root cause.
            # Every rank fails the same check: local rank 0 (global rank 0 on the first host) ends first,
            # after printing, and torchrun stops the others while they wait here (a rank alone in its
            # error ends after 30 s). torchrun itself then prints its own traceback and exits 1 whatever
            # the workers' code: it never passes one on
            if int(os.environ.get("LOCAL_RANK", 0)) != 0:
                time.sleep(30)
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": e.code, "extraInfo": {
                    "py_callstack": e.code, "timestamp": str(int(time.time()))}}}, f)
        code = 2
    # out without Python's shutdown: a device mesh keeps the gloo process group alive past destroy_process_group
    # (here even after main returns: something global still holds it), and its worker threads could release a
    # tensor while Python shut down: SIGABRT, "terminate called without an active exception" (2-rank CPU runs,
    # 5 of 190 under load before, 0 of 180 since)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
