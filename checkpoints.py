"""The run format: how a training run keeps its state on disk so that a kill, a crash or a damaged file
never costs more than the steps since the last checkpoint.

    RUN/checkpoints/step_N/   DCP shards (model + optimizer), train_state.json (step, data position, the
                              config and its stretches), dflash_config.json, target_config.json,
                              checksums.json (sha256 of every file, written last)
    RUN/metrics.jsonl         one record per log interval, validation and evaluation
    RUN/train_config.json     the resolved config, and "stretches": from which step which values held
                              (train_config.check_resume says which keys a resume may change)
    RUN/drafter/              the serving folder, exported at the end
    RUN/rows/                 the tokenised training rows, one part per rank that tokenised them, and key.json
                              (written last): what made them (data, tokenizer and data.py's bytes, settings)
    RUN/.lock                 locked by the train.py running the run (its pid inside): a second one stops
    RUN/wandb_run_id          with wandb=true: the W&B run every invocation of the run logs to

A checkpoint is written into step_N.tmp and renamed when complete; a folder whose files differ from its
checksums is named, set aside as step_N.damaged, and the run resumes from the one before. Serving
folders (convert.py) carry the same checksums.json.
"""
import collections
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal

import numpy as np
import torch.distributed as dist


STEP_DIR = re.compile(r"step_(\d+)")  # fullmatch: "step_00000100.tmp" is a save in progress


# ----------------------------------------------------------------------------------------------
# Checksums: sha256 of every file of a checkpoint or serving folder, recorded when it is written
# (checksums.json, last) and verified before it is read: a flipped byte or a truncated copy is a
# named error instead of a weight that silently became 7e36

CHECKSUMS = "checksums.json"


class ChecksumError(ValueError):
    pass


class EditedError(ChecksumError):
    """A file people edit by hand (a serving folder's config.json or README.md) changed after export."""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_digests(folder, rank=0, world=1):
    """{name: sha256} of this rank's share of the files directly in folder (ranks split the reading)."""
    names = sorted(n for n in os.listdir(folder) if n != CHECKSUMS and os.path.isfile(os.path.join(folder, n)))
    return {n: sha256(os.path.join(folder, n)) for n in names[rank::world]}


def write_checksums(folder, digests=None):
    write_json(os.path.join(folder, CHECKSUMS), digests or file_digests(folder))


def checksum_mismatches(folder, rank=0, world=1, only=None):
    """(name, phrase) of each file of this rank's share (or the file `only`) that differs from
    checksums.json or is missing. A folder without checksums.json (older runs, released drafters) has
    none: unverified."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            want = json.load(f)
    except ValueError:
        want = None
    if not isinstance(want, dict):
        return [(CHECKSUMS, f"{CHECKSUMS} is unreadable")] if rank == 0 else []
    problems = []
    for name in [only] if only in want else [] if only else sorted(want)[rank::world]:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            problems.append((name, f"{name} is missing"))
        elif sha256(file) != want[name]:
            problems.append((name, f"{name} differs from the sha256 recorded when it was saved"))
    return problems


def checksum_problems(folder, rank=0, world=1):
    return [phrase for _, phrase in checksum_mismatches(folder, rank, world)]


def verify_checksums(folder, editable=(), accept_edited=False):
    """ChecksumError naming the files that differ from checksums.json or are missing. A file in `editable`
    that differs (a serving folder's config.json or README.md: people edit those by hand) is no damage:
    an EditedError saying how to go on, or with accept_edited read as edited; the rest is still verified."""
    bad = checksum_mismatches(folder)
    edited = [n for n, _ in bad if n in editable and os.path.isfile(os.path.join(folder, n))]
    problems = [phrase for n, phrase in bad if n not in edited]
    if problems:
        raise ChecksumError(f"checksum mismatch in {folder}: {'; '.join(problems)} (the files changed after "
                            "they were written: a disk, copy or transfer error; use another checkpoint or copy)")
    if edited and not accept_edited:
        raise EditedError(f"{' and '.join(edited)} in {folder} changed after export (its sha256 is not the one in "
                          f"{CHECKSUMS}): re-export the folder from its checkpoint (python convert.py RUN OUT) to undo "
                          f"the edit, or keep it: pass --accept-edited-config (bench.py, convert.py) or delete "
                          f"{CHECKSUMS} (which leaves the weights unverified)")


def step_dirs(run_dir):
    """The complete checkpoints under RUN/checkpoints (or RUN itself), newest first."""
    for d in (os.path.join(run_dir, "checkpoints"), run_dir):
        if os.path.isdir(d):
            steps = [(int(m.group(1)), name) for name in os.listdir(d)
                     if (m := STEP_DIR.fullmatch(name)) and os.path.isdir(os.path.join(d, name))]
            if steps:
                return [os.path.join(d, name) for _, name in sorted(steps, reverse=True)]
    return []


def latest_checkpoint(run_dir):
    """The complete checkpoint with the highest step, or None."""
    return next(iter(step_dirs(run_dir)), None)


# ------------------------------------------------------------------------------------------------
# Training checkpoints: DCP into step_N.tmp, then one rename; a kill mid-save leaves the last one intact

def checkpoint_dir(out_dir, step):
    return os.path.join(out_dir, "checkpoints", f"step_{step:08d}")


def save_checkpoint(out_dir, step, drafter, optimizer, train_state, dcfg, target_config, keep, rank):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = checkpoint_dir(out_dir, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(drafter, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if rank == 0:
        for name, obj in (("train_state.json", train_state), ("dflash_config.json", dcfg.__dict__),
                          ("target_config.json", target_config)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1)
    dist.barrier()
    record_checksums(tmp, rank)  # last: a folder with checksums.json is complete
    if rank == 0:
        if os.environ.get("DFLASH_TEST_KILL_DURING_SAVE") == str(step):  # the crash-safety test only
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, final)
        old = sorted(d for d in os.listdir(os.path.dirname(final)) if STEP_DIR.fullmatch(d))  # not .tmp nor .damaged
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(os.path.dirname(final), d), ignore_errors=True)
    dist.barrier()
    return final


def record_checksums(folder, rank):
    """sha256 of every file of the checkpoint, the ranks splitting the reading; rank 0 writes checksums.json."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, file_digests(folder, rank, len(parts)))
    if rank == 0:
        write_checksums(folder, dict(sorted(kv for part in parts for kv in part.items())))


def gathered_checksum_problems(folder, rank):
    """Every rank gets the whole list: the files that differ from checksums.json or are missing."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, checksum_problems(folder, rank, len(parts)))
    return [p for part in parts for p in part]


def saved_run(out_dir):
    """(the newest checkpoint whose train state is intact, that state) for the checks before anything
    loads, or (None, None). Its other files are verified when it loads; should they be damaged then, the
    one before it was trained with the same shape and data (a resume never changes them)."""
    for path in step_dirs(out_dir):
        try:
            if not checksum_mismatches(path, only="train_state.json"):
                return path, read_train_state(path, out_dir)
        except (OSError, ValueError):  # unreadable: the resume names the damage and falls back
            pass
    return None, None


def read_train_state(path, out_dir):
    """A checkpoint's train_state.json. Checkpoints from before it kept the config get the run's
    train_config.json as theirs: the values of the run's last invocation, the best record they have."""
    with open(os.path.join(path, "train_state.json")) as f:
        state = json.load(f)
    run_config = os.path.join(out_dir, "train_config.json")
    if "config" not in state and os.path.exists(run_config):
        with open(run_config) as f:
            state["config"] = json.load(f)
    return state


def export_is_current(folder, checkpoint):
    """The serving folder exists and was written after the checkpoint (a run's export follows its last
    save; one from before a later max_steps is stale)."""
    config, saved = os.path.join(folder, "config.json"), os.path.join(checkpoint, "train_state.json")
    return os.path.exists(config) and os.path.getmtime(config) >= os.path.getmtime(saved)


def resume_checkpoint(out_dir, drafter, optimizer, rank, log):
    """Load the newest intact checkpoint -> (its path, train state), or (None, None). A damaged one
    (a file that differs from its checksum or is missing, or a train state that cannot be read) is named,
    moved to step_N.damaged, and the one before it is tried: a flipped byte costs the steps since that
    checkpoint, not the run."""
    damaged = False
    while path := latest_checkpoint(out_dir):  # complete checkpoints only: *.tmp is an interrupted save
        problems = gathered_checksum_problems(path, rank)
        if not problems:
            try:  # read first: one without checksums.json (older runs) is unverified, its train state may be cut
                state = read_train_state(path, out_dir)
            except (OSError, ValueError) as e:  # damage as a mismatch is, as saved_run skipped it
                problems = [f"train_state.json is unreadable ({type(e).__name__}: {e})"]
        if not problems:
            load_checkpoint(path, drafter, optimizer)
            return path, state
        log(f"checkpoint {path} is damaged ({'; '.join(problems)}): moved to {path}.damaged; "
            "trying the one before it")
        damaged = True
        if rank == 0:
            shutil.rmtree(path + ".damaged", ignore_errors=True)
            os.rename(path, path + ".damaged")
        dist.barrier()
    if damaged:
        log("no intact checkpoint left: training from step 0")
    return None, None


def trim_metrics(path, step):
    """Keep metrics.jsonl's records up to `step`, where this run starts: a killed run's records past
    its last checkpoint are written again by the resumed run, so the file reads as if never stopped
    (a line cut by the kill goes too). Returns how many records past `step` it dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line.rstrip("\n") + "\n")
                else:
                    dropped += 1
            except (ValueError, KeyError, TypeError):
                continue
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return dropped


def metrics_at(path, step):
    """metrics.jsonl's records at `step` (none without the file; a line cut by a kill is skipped)."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("step") == step:
                    out.append(rec)
    return out


def load_checkpoint(path, drafter, optimizer):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(drafter, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(drafter, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ----------------------------------------------------------------------------------------------
# The tokenised rows: a start splits the tokenising between the ranks (each writes its part; every rank
# reads them all, memory-mapped: a host's ranks share one copy), and a resume reads them instead of
# tokenising again (at ~800 K conversations, minutes of every rank's cores)

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def rows_key(data, target, code, settings):
    """sha256 of what tokenising reads: the data's files (a glob's, a saved dataset's folder), the target folder's
    files but its weights (the tokenizer and its chat template), `code` (data.py), the libraries that render and
    tokenise, and the settings. None for a hub dataset (no file to hash: tokenised at every start)."""
    import jinja2
    import tokenizers
    import transformers
    files = []
    for path in sorted(glob.glob(data)):
        files += sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names) if os.path.isdir(path) else [path]
    if not files:
        return None
    files += sorted(os.path.join(target, n) for n in os.listdir(target) if not n.endswith(WEIGHTS)
                    and os.path.isfile(os.path.join(target, n))) + [code]
    versions = [m.__version__ for m in (transformers, tokenizers, jinja2)]
    h = hashlib.sha256(json.dumps([settings, versions], sort_keys=True).encode())
    for f in files:
        h.update(f"{os.path.abspath(f)} {sha256(f)}".encode())
    return h.hexdigest()


def cached_rows(out_dir, key, tokenize, rank, world, log, group=None):
    """(rows, counts): the run's tokenised rows and their data line's counts. Where RUN/rows holds rows of key()
    (rank 0 computes it), they are read; otherwise rank k runs tokenize(k, world) and writes part k, and every rank
    reads all the parts. `group`: the process group whose barriers wait out the slowest part (no timeout to fear)."""
    folder, barrier = os.path.join(out_dir, "rows"), lambda: dist.barrier(group) if world > 1 else None
    key = key() if rank == 0 else None  # rank 0 alone reads the data to hash it
    whole = _whole_parts(folder, key) if rank == 0 and key is not None else None
    found = [whole is not None, key is not None]  # a hub dataset: no key
    if world > 1:
        dist.broadcast_object_list(found, group=group)
    if found[0]:
        log(f"data: the rows tokenised by an earlier start, read from {folder} (the data, the tokenizer, data.py and the "
            "settings are as they were)")
    else:
        with _writing(folder):
            if rank == 0:
                if os.path.exists(folder):
                    shutil.rmtree(folder)
                os.makedirs(folder)
        barrier()
        rows, counts = tokenize(rank, world)
        with _writing(folder):
            for name, arrays, dtype in (("ids", [ids for c in rows for ids, _ in c], np.int32),
                                        ("mask", [mask for c in rows for _, mask in c], np.uint8)):
                with open(os.path.join(folder, f"{rank}.{name}.npy.tmp"), "wb") as f:
                    np.save(f, np.concatenate(arrays) if arrays else np.zeros(0, dtype))
                os.replace(f.name, f.name[:-4])
            write_json(os.path.join(folder, f"{rank}.json"), dict(counts=counts, rows=[[len(ids) for ids, _ in c] for c in rows]))
        barrier()
        if rank == 0 and found[1]:  # last: a kill before it leaves no rows that a rerun would read
            with _writing(folder):
                write_json(os.path.join(folder, "key.json"), dict(key=key, parts=world))
        barrier()
    try:
        rows, counts = [], collections.Counter()
        for ids, mask, part in whole or _row_parts(folder, None if found[1] else world):
            counts.update(part["counts"])
            o = 0
            for lengths in part["rows"]:  # views of the memory-mapped arrays
                rows.append([])
                for n in lengths:
                    rows[-1].append((ids[o:o + n], mask[o:o + n]))
                    o += n
        return rows, counts
    except (OSError, ValueError) as e:  # a rank on a host that does not see the folder
        raise SystemExit(f"run error: {e}: every rank reads the rows from {folder}, so out_dir must be on a "
                         "filesystem every host sees (as checkpoints must)")


@contextlib.contextmanager
def _writing(folder):
    try:
        yield
    except OSError as e:  # a full disk, a read-only out_dir
        raise SystemExit(f"run error: cannot write the tokenised rows to {folder} ({e.strerror or e}): out_dir needs room "
                         "for them (5 bytes a token) and must be writable") from None


def _row_parts(folder, parts=None):
    """(ids, mask, part's json) of each part (as many as key.json says), memory-mapped, checked whole: a ValueError
    names a cut part."""
    if parts is None:
        with open(os.path.join(folder, "key.json")) as f:
            parts = json.load(f)["parts"]
    for k in range(parts):
        # plain views of the mapped files: a view of np.memmap costs 4x the memory, per row
        ids, mask = (np.asarray(np.load(os.path.join(folder, f"{k}.{x}.npy"), mmap_mode="r")) for x in ("ids", "mask"))
        with open(os.path.join(folder, f"{k}.json")) as f:
            part = json.load(f)
        if not sum(map(sum, part["rows"])) == len(ids) == len(mask):
            raise ValueError(f"{folder}/{k}.json holds {sum(map(sum, part['rows']))} tokens, its arrays {len(ids)} and {len(mask)}")
        yield ids, mask, part


def _whole_parts(folder, key):
    """_row_parts' list where the folder holds whole rows of `key`, else None (a part cut or lost, by a kill or by
    hand, is tokenised again)."""
    try:
        with open(os.path.join(folder, "key.json")) as f:
            if json.load(f)["key"] != key:
                return None
        return list(_row_parts(folder))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def full_state_dict(drafter):
    """All ranks call; rank 0 gets the whole fp32 drafter on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(drafter, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_json(path, obj):
    """Written whole or not at all (tmp + rename): a kill mid-write leaves no cut file to read."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def lock_run(out_dir):
    """Rank 0 holds an exclusive lock on out_dir/.lock while it runs (the kernel drops it however the process
    ends): a second invocation on the run (a requeued job while the old one lives) stops before it touches it."""
    import fcntl
    os.makedirs(out_dir, exist_ok=True)
    f = None
    try:
        f = open(os.path.join(out_dir, ".lock"), "a+")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SystemExit(f"run error: {out_dir} is in use by another train.py (pid {f.read().strip()}): wait for it "
                         f"to end or stop it (a requeued job: cancel the old one), or train in another out_dir")
    except OSError as e:  # a read-only run folder (an archived, finished run), a filesystem without locks: unguarded
        print(f"cannot lock {os.path.join(out_dir, '.lock')} ({e}): a second invocation on this run would not be "
              "refused", flush=True)
        if f is None:
            return contextlib.nullcontext()
    f.truncate(0)
    f.write(f"{os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f
