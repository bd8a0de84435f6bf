"""Move a drafter between the training layout and the serving layout (SPEC section 5).

    python convert.py RUN_OR_CHECKPOINT_DIR OUT_DIR    training checkpoint -> serving folder
    python convert.py --import HF_DRAFTER_DIR OUT_DIR  serving folder -> training checkpoint

Training layout: RUN/checkpoints/step_XXXXXXXX/ holds a torch.distributed.checkpoint (DCP) of
{"model": fp32 drafter state dict, "optim": ..., "train": ...} written by any number of ranks, plus
dflash_config.json (asdict(DFlashConfig)) and target_config.json (the target's HF config dict).
Serving layout: model.safetensors (bf16, exactly the SPEC names) + config.json + README.md, the
folder SGLang and vLLM load. Both directions validate before anything is written and publish the
output folder with a rename, so a failed conversion leaves no folder behind. Both layouts carry
checksums.json (sha256 of every file), verified before they are read; a serving folder's config.json
or README.md edited after export is refused by name unless --accept-edited-config (bench.py too). OUT
is replaced only where it is a serving folder this tool wrote (or with --overwrite), never a
checkpoint or a run folder.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import uuid
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import latest_checkpoint, verify_checksums, write_checksums, write_json
from model import DFlashConfig, DFlashDrafter
from targets import input_embedding_scale, rope_config, rope_mismatch

DRAFTER_KEYS = {"architectures", "auto_map", "block_size", "num_target_layers", "dflash_config",
                "layer_types", "target_config_diff"}
# target keys that would misdescribe the drafter, kept in target_config_diff for --import: loader directives
# declaring the bf16 weights quantized (transformers would read them as FP8, MXFP4, ...), the activation of an
# MLP the drafter does not have (its own is SiLU, written as hidden_act), partial rotation (serving_config)
NOT_COPIED = {"partial_rotary_factor", "quantization_config", "compression_config", "hidden_activation"}
EDITABLE = ("config.json", "README.md")  # a serving folder's text, which people edit by hand (mask id, rope, window)


# ----------------------------------------------------------------------------------------------
# Validation: the checks SGLang and vLLM would otherwise fail on at load time (or not at all)

def _text_config(target_config):
    """The target's text config as a plain dict, without the trainer's private `_` keys."""
    if target_config is None:
        return None
    if hasattr(target_config, "to_dict"):
        target_config = target_config.to_dict()
    tc = target_config.get("text_config") or target_config  # multimodal targets nest it
    return {k: v for k, v in tc.items() if not k.startswith("_")}


def expected_shapes(cfg):
    with torch.device("meta"):  # shapes only, no memory
        return {k: tuple(v.shape) for k, v in DFlashDrafter(cfg).state_dict().items()}


def _some(names, n=8):
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def validate(state_dict, cfg, target_config=None):
    """Raise one ValueError naming every problem: key set, shapes, fc width, mask id and layer ids
    against the target. Meta tensors are accepted, so a checkpoint can be checked before loading."""
    problems = []
    rows, L = cfg.vocab_size, cfg.num_target_layers
    tc = _text_config(target_config)
    if tc is not None:
        hidden, heads = tc.get("hidden_size"), tc.get("num_attention_heads")
        L, rows = tc.get("num_hidden_layers"), tc.get("vocab_size")
        target = {"hidden_size": hidden, "num_attention_heads": heads,
                  "num_key_value_heads": tc.get("num_key_value_heads") or heads,
                  "head_dim": tc.get("head_dim") or (hidden // heads if hidden and heads else None),
                  "intermediate_size": tc.get("intermediate_size"), "vocab_size": rows,
                  "num_target_layers": L}
        for field, want in target.items():
            if getattr(cfg, field) != want:
                problems.append(f"drafter {field}={getattr(cfg, field)} but the target config has {want}")
        try:
            problems.append(rope_mismatch(cfg, tc))
        except ValueError as e:  # a target rope type the drafter cannot reproduce
            problems.append(f"target {e}")
        problems = [p for p in problems if p]
    if rows is None or not 0 <= cfg.mask_token_id < rows:
        problems.append(f"mask_token_id={cfg.mask_token_id} is outside the target's {rows} embedding rows")
    bad = [i for i in cfg.target_layer_ids if L is None or not 0 <= i < L]
    if bad:
        problems.append(f"target_layer_ids {bad} are outside the target's layers 0..{(L or 0) - 1}")

    sharded = [k for k, v in state_dict.items() if hasattr(v, "full_tensor")]
    if sharded:
        problems.append(f"sharded DTensors in {_some(sharded)}: pass the full state dict (torch's "
                        "get_model_state_dict with full_state_dict=True, cpu_offload=True)")
    want = expected_shapes(cfg)
    missing, unexpected = set(want) - set(state_dict), set(state_dict) - set(want)
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    for name in sorted(set(want) & set(state_dict)):
        shape = tuple(state_dict[name].shape)
        if shape == want[name]:
            continue
        if name == "fc.weight":
            problems.append(f"fc.weight has shape {shape}, expected {want[name]}: its input width must "
                            f"be {cfg.num_features} captured layers x hidden {cfg.hidden_size}")
        else:
            problems.append(f"{name} has shape {shape}, expected {want[name]}")
    # one summed pass: a NaN or inf anywhere makes the sum non-finite (weights never overflow it)
    nonfinite = [k for k, v in state_dict.items() if k not in sharded and v.device.type != "meta"
                 and v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float32))]
    if nonfinite:
        problems.append(f"non-finite values (NaN/inf) in {_some(nonfinite)}")
    if problems:
        raise ValueError("invalid drafter: " + "; ".join(problems))


def _make_config(d, source):
    """DFlashConfig from a dict, with the file it came from in every error."""
    try:  # TypeError: a field missing or unknown; ValueError: DFlashConfig's own checks
        return DFlashConfig(**{k: v for k, v in d.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------
# Training checkpoints (DCP)

def _checkpoint_dir(path):
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path}: neither a DCP checkpoint (no .metadata) nor a run folder with "
                         "complete checkpoints/step_* folders")
    return ckpt


def _quiet_dcp(fn, *args, **kwargs):
    # no_dist=True: conversion is single-process even when called inside a training job
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, no_dist=True, **kwargs)


def _dcp_model_tensors(ckpt):
    """The drafter entries of a DCP checkpoint as meta tensors (shape and dtype, no data)."""
    try:
        meta = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    except Exception as e:
        raise ValueError(f"{ckpt}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    out = {}
    for key, m in meta.items():
        if not key.startswith("model."):
            continue  # optimizer and trainer state are not needed to serve
        if not hasattr(m, "size"):
            raise ValueError(f"{ckpt}: {key} is not a tensor")
        out[key[len("model."):]] = torch.empty(m.size, dtype=m.properties.dtype, device="meta")
    if not out:
        raise ValueError(f"{ckpt}: the checkpoint holds no 'model' state dict")
    return out


def read_checkpoint(path):
    """A run folder (its newest complete checkpoint) or a checkpoint folder -> (fp32 state dict,
    DFlashConfig, target config dict). Works without a process group, from any number of ranks."""
    ckpt = _checkpoint_dir(path)
    verify_checksums(ckpt)
    cfg = _make_config(_read_json(os.path.join(ckpt, "dflash_config.json")),
                       os.path.join(ckpt, "dflash_config.json"))
    target_config = _read_json(os.path.join(ckpt, "target_config.json"))
    if not isinstance(target_config, dict):
        raise ValueError(f"{os.path.join(ckpt, 'target_config.json')} is not a JSON object: it holds the target's "
                         "config (its config.json), as train.py writes it")
    meta = _dcp_model_tensors(ckpt)
    validate(meta, cfg, target_config)  # before reading any data: DCP's own errors are obscure
    sd = {k: torch.empty(m.shape, dtype=m.dtype) for k, m in meta.items()}
    try:
        _quiet_dcp(dcp.load, {"model": sd}, checkpoint_id=ckpt)
    except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException, its text a traceback per rank
        e = next(iter(getattr(e, "failures", {}).values()), (e,))[0]
        gone = "; a running run's cleanup (keep_checkpoints) may have removed it: read the run again" \
            if isinstance(e, FileNotFoundError) else ""
        raise ValueError(f"{ckpt}: cannot read the DCP data ({type(e).__name__}: {e}){gone}") from None
    sd = {k: v.float() for k, v in sd.items()}
    validate(sd, cfg, target_config)
    return sd, cfg, target_config


def write_checkpoint(state_dict, cfg, target_config, out_dir, overwrite=False):
    """A checkpoint folder in the training layout ({"model": fp32 state dict} only)."""
    validate(state_dict, cfg, target_config)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    if hasattr(target_config, "to_dict"):
        target_config = target_config.to_dict()

    def write(tmp):
        _quiet_dcp(dcp.save, {"model": sd}, checkpoint_id=tmp)
        write_json(os.path.join(tmp, "dflash_config.json"), dataclasses.asdict(cfg))
        write_json(os.path.join(tmp, "target_config.json"), target_config)
        validate(_dcp_model_tensors(tmp), cfg, target_config)
        write_checksums(tmp)

    _publish(out_dir, write, overwrite)


# ----------------------------------------------------------------------------------------------
# Serving folders (safetensors + config.json)

def serving_config(cfg, target_config):
    """config.json: the target's text config, re-dimensioned as the drafter (less NOT_COPIED), plus the DFlash
    fields. The target values it overwrites or leaves out go to target_config_diff so --import can restore them."""
    tc = _text_config(target_config)
    # partial_rotary_factor: the drafter rotates all of head_dim (targets.rope_config says why)
    out = {k: v for k, v in tc.items() if k not in DRAFTER_KEYS and k not in NOT_COPIED}
    dflash = {"target_layer_ids": list(cfg.target_layer_ids), "mask_token_id": cfg.mask_token_id}
    scale = input_embedding_scale(tc)
    if scale != 1.0:  # training embedded with the target's scaled embedding; engines read this key
        dflash["input_embedding_scale"] = scale
    out.update(
        architectures=["DFlashDraftModel"], model_type="qwen3", hidden_act="silu",  # always Qwen3-style
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        # the drafter's RoPE in both schemas: transformers 5 reads rope_parameters; SGLang, vLLM and a
        # pre-5 transformers read rope_theta and rope_scaling (and without them lose the scaling silently)
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, num_hidden_layers=cfg.num_hidden_layers,
        layer_types=list(cfg.layer_types), attention_bias=False,
        tie_word_embeddings=False, dtype="bfloat16", block_size=cfg.block_size,
        num_target_layers=cfg.num_target_layers, dflash_config=dflash)
    # Qwen3Config (the authors' loader) keeps sliding_window only when use_sliding_window is true
    out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    out["target_config_diff"] = {"changed": {k: tc[k] for k in sorted(tc) if k not in out or out[k] != tc[k]},
                                 "added": sorted(k for k in out if k not in tc)}
    return out


def target_config_from_serving(config):
    """Undo serving_config. A released drafter without target_config_diff gets the target's layer
    count back; what it cannot say (the target's model_type, so its embedding scale; tied embeddings) is
    left to defaults."""
    diff = config.get("target_config_diff") or {}
    tc = {k: v for k, v in config.items()
          if k not in DRAFTER_KEYS and k not in diff.get("added", ()) and not k.startswith("_")}
    if diff:
        tc.update(diff.get("changed", {}))
    else:
        for k in ("tie_word_embeddings", "use_sliding_window", "sliding_window"):
            tc.pop(k, None)  # the drafter's own statements, not the target's
        tc["num_hidden_layers"] = config["num_target_layers"]
    return tc


def serving_layout(config):
    """layer_types and sliding_window as Qwen3Config reads them: the window counts only with
    use_sliding_window, and a config without layer_types slides from layer max_window_layers on."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    types = config.get("layer_types") or [
        "sliding_attention" if window is not None and i >= config.get("max_window_layers", 28) else "full_attention"
        for i in range(config["num_hidden_layers"])]
    return dict(layer_types=list(types), sliding_window=window if "sliding_attention" in types else None)


def config_from_serving(config, source="config.json"):
    dflash = config.get("dflash_config")
    if not isinstance(dflash, dict):
        raise ValueError(f"{source} lacks 'dflash_config' (target_layer_ids, mask_token_id): "
                         "not a DFlash drafter config")
    missing = [k for k in ("target_layer_ids", "mask_token_id") if k not in dflash]
    if missing:
        raise ValueError(f"{source} lacks dflash_config.{missing[0]}")
    act = config.get("hidden_act", "silu")  # Qwen3Config's default
    if act != "silu":  # an engine would build the MLP with it: other maths than the drafter was trained with
        raise ValueError(f"{source} has hidden_act={act!r}, but a DFlash drafter's MLP is SiLU-gated (Qwen3), as "
                         "it was trained: set hidden_act to \"silu\" (target_config_diff keeps the target's own)")
    try:
        heads = config["num_attention_heads"]
        d = dict(hidden_size=config["hidden_size"], num_attention_heads=heads,
                 num_key_value_heads=config.get("num_key_value_heads") or heads,
                 head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                 intermediate_size=config["intermediate_size"], rms_norm_eps=config["rms_norm_eps"],
                 rope_theta=rope_config(config)[0], rope_scaling=rope_config(config)[1],
                 vocab_size=config["vocab_size"],
                 max_position_embeddings=config["max_position_embeddings"],
                 num_target_layers=config["num_target_layers"],
                 target_layer_ids=dflash["target_layer_ids"],
                 mask_token_id=dflash["mask_token_id"], num_hidden_layers=config["num_hidden_layers"],
                 block_size=config["block_size"], **serving_layout(config))
    except KeyError as e:
        raise ValueError(f"{source} lacks {e.args[0]!r}") from None
    return _make_config(d, source)


def check_embedding_scale(config, target_config, source="config.json"):
    """dflash_config.input_embedding_scale (absent: 1.0) against the target's embedding, where the folder
    records its target (target_config_diff); a released drafter's is taken as it says."""
    scale = config["dflash_config"].get("input_embedding_scale", 1.0)
    if type(scale) not in (int, float) or not 0 < scale < math.inf:
        raise ValueError(f"{source} has dflash_config.input_embedding_scale={scale!r}: it must be a positive number")
    want = input_embedding_scale(target_config) if "target_config_diff" in config else scale
    if not math.isclose(scale, want, rel_tol=1e-6):
        raise ValueError(f"{source} has dflash_config.input_embedding_scale={scale}, but its target embeds with "
                         f"scale {want}: set it to {want}, or re-export the folder from its checkpoint")


def read_serving(path, accept_edited=False):
    """A serving folder -> (fp32 state dict, DFlashConfig, target config dict). A config.json or README.md
    edited after export is an EditedError, or with accept_edited read as edited."""
    verify_checksums(path, EDITABLE, accept_edited)
    config = _read_json(os.path.join(path, "config.json"))
    cfg = config_from_serving(config, os.path.join(path, "config.json"))
    target_config = target_config_from_serving(config)
    check_embedding_scale(config, target_config, os.path.join(path, "config.json"))
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(f"{weights} is missing")
    try:
        sd = load_file(weights)
    except Exception as e:  # SafetensorError is not a ValueError
        raise ValueError(f"{weights} is unreadable (truncated or not safetensors): {e}") from None
    sd = {k: v.float() for k, v in sd.items()}
    validate(sd, cfg, target_config)
    return sd, cfg, target_config


def _target_name(target_config, target_name):
    tc = target_config.to_dict() if hasattr(target_config, "to_dict") else target_config
    return (target_name or tc.get("_target_path") or tc.get("_name_or_path")
            or "a " + tc.get("model_type", "unknown") + " target")


def model_card(cfg, target):
    B = cfg.block_size
    spec = json.dumps({"method": "dflash", "model": "DRAFTER_DIR", "num_speculative_tokens": B - 1})
    return f"""# DFlash drafter for {target}

A block-diffusion draft model for speculative decoding (DFlash, arXiv 2602.06036) trained for
**{target}**. It drafts {B - 1} tokens per step (block size {B}) from target layers
{list(cfg.target_layer_ids)} of {cfg.num_target_layers}, with {cfg.num_hidden_layers} Qwen3-style
layers and no embedding or lm_head of its own: it uses the target's. Mask token id:
{cfg.mask_token_id}. Use it only with that target. DRAFTER_DIR below is this folder.

## SGLang

```
python -m sglang.launch_server --model-path {target} \\
    --speculative-algorithm DFLASH --speculative-draft-model-path DRAFTER_DIR \\
    --speculative-num-draft-tokens {B}
```

## vLLM

```
vllm serve {target} --speculative-config '{spec}'
```
"""


def export_drafter(state_dict, cfg, target_config, out_dir, target_name=None, overwrite=False):
    """Write the serving folder: validated, then published with a rename (nothing half-written)."""
    validate(state_dict, cfg, target_config)
    want = expected_shapes(cfg)
    tensors = {k: state_dict[k].detach().to("cpu", torch.bfloat16).contiguous() for k in want}
    config = serving_config(cfg, target_config)
    card = model_card(cfg, _target_name(target_config, target_name))

    def write(tmp):
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), config)
        # safetensors >= 0.8 writes through a temp file created 0600 and renames it (safetensors#782):
        # the weights get config.json's mode (umask applied), so a server running as another user reads them
        shutil.copymode(os.path.join(tmp, "config.json"), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        # read back what a serving engine will read: the header and the config, not the data
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            written = {k: f.get_slice(k) for k in f.keys()}
            if any(s.get_dtype() != "BF16" for s in written.values()):
                raise ValueError("model.safetensors was written with a dtype other than bf16")
            validate({k: torch.empty(s.get_shape(), device="meta") for k, s in written.items()},
                     config_from_serving(_read_json(os.path.join(tmp, "config.json"))), target_config)
        write_checksums(tmp)

    _publish(out_dir, write, overwrite)


def _publish(out_dir, write, overwrite=False):
    """Run write(tmp) in a fresh folder next to out_dir, then rename it into place. An existing
    out_dir is replaced only after the new folder is complete, and only if it is one of ours
    (or overwrite)."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        ours = {"config.json", "model.safetensors", ".metadata", "dflash_config.json"}
        if not os.path.isdir(out_dir) or (os.listdir(out_dir) and not ours & set(os.listdir(out_dir))):
            raise ValueError(f"{out_dir} exists and is not a drafter or checkpoint folder; "
                             "refusing to replace it")
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, name)
    tmp = os.path.join(parent, f"{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        write(tmp)
        if os.path.exists(out_dir):
            old = os.path.join(parent, f"{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_leftovers(parent, name):
    """What an interrupted _publish left beside out_dir: NAME.tmp-* (a write that never finished)
    always, NAME.old-* (the replaced folder, not yet deleted) once out_dir exists again."""
    for leftover in sorted(os.listdir(parent)):
        kind = re.fullmatch(re.escape(name) + r"\.(tmp|old)-[0-9a-f]{8}", leftover)
        if kind and (kind.group(1) == "tmp" or os.path.isdir(os.path.join(parent, name))):
            shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
            print(f"removed {os.path.join(parent, leftover)}, left by an interrupted write")


def load_drafter(path, device="cpu", dtype=torch.float32, accept_edited=False):
    """A serving folder or a training run/checkpoint folder -> (DFlashDrafter in eval mode, config)."""
    # a serving folder has its weights beside config.json; a run folder holds checkpoints/ instead
    is_serving = os.path.isfile(os.path.join(path, "model.safetensors"))
    sd, cfg, _ = read_serving(path, accept_edited) if is_serving else read_checkpoint(path)
    with torch.device("meta"):  # no random init of a billion weights that are overwritten next
        drafter = DFlashDrafter(cfg)
    drafter.load_state_dict(sd, assign=True)
    return drafter.to(device=device, dtype=dtype).eval(), cfg


# ----------------------------------------------------------------------------------------------
# CLI

def out_problem(out, import_=False):
    """Why writing OUT could destroy something, or None. The CLI refuses OUT where it holds or lies
    inside a training checkpoint, and where it exists as anything but a serving folder this tool
    wrote (export) or an empty folder, unless --overwrite is given."""
    out = os.path.realpath(out)
    up = os.path.dirname(out)
    while up != os.path.dirname(up):
        if os.path.isfile(os.path.join(up, ".metadata")):
            return f"{out} lies inside the training checkpoint {up}"
        up = os.path.dirname(up)
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return None
    if os.path.isfile(os.path.join(out, ".metadata")) or latest_checkpoint(out):
        return f"{out} holds a training checkpoint; writing there would replace it"
    if import_:
        return f"{out} exists and is not empty"
    try:  # serving_config writes target_config_diff; a released drafter or other folder has none
        ours = "target_config_diff" in _read_json(os.path.join(out, "config.json"))
    except (ValueError, TypeError):
        ours = False
    return None if ours else f"{out} exists and is not a serving folder this tool wrote"


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert DFlash drafters between the training "
                                "checkpoint layout and the SGLang/vLLM serving layout.")
    p.add_argument("--import", dest="import_", action="store_true",
                   help="SRC is a serving folder (config.json + model.safetensors); write a checkpoint")
    p.add_argument("--target-name", help="target model name or path for the README (export only)")
    p.add_argument("--overwrite", action="store_true",
                   help="write OUT even where it holds or lies inside a training checkpoint, or is a "
                   "folder this tool did not write (its contents are replaced)")
    p.add_argument("--accept-edited-config", action="store_true",
                   help="with --import: read a serving folder whose config.json or README.md was edited after export "
                   "(refused otherwise, naming the file; the weights are still checked against checksums.json)")
    p.add_argument("src", help="run folder, checkpoint folder, or (with --import) serving folder")
    p.add_argument("out", help="output folder (a serving folder this tool wrote is replaced, only once "
                   "the new one is complete; anything else needs --overwrite)")
    args = p.parse_args(argv)
    try:  # bad input (SRC, OUT, an unreadable or mismatched drafter): exit 2, as argparse's errors
        if not os.path.isdir(args.src):
            raise ValueError(f"{args.src} is not a folder")
        src, out = os.path.realpath(args.src), os.path.realpath(args.out)
        if src == out or src.startswith(out + os.sep):
            raise ValueError(f"{args.out} would replace the input {args.src}; choose another output")
        problem = None if args.overwrite else out_problem(args.out, args.import_)
        if problem:
            raise ValueError(f"{problem}; choose another output, or pass --overwrite to replace it")
        sd, cfg, target_config = (read_serving(args.src, args.accept_edited_config) if args.import_
                                  else read_checkpoint(args.src))
        if not args.import_:  # a target config it cannot serve (a model type newer than transformers) is bad input too
            serving_config(cfg, target_config)
    except (ValueError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    try:  # a failure found by writing (disk, permissions, the read-back check): exit 1
        if args.import_:
            write_checkpoint(sd, cfg, target_config, args.out, args.overwrite)
        else:
            export_drafter(sd, cfg, target_config, args.out, args.target_name, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 1
    n = sum(v.numel() for v in sd.values())
    src = args.src if args.import_ else _checkpoint_dir(args.src)  # a run folder exports its newest checkpoint
    print(f"wrote {args.out} from {src}: {cfg.num_hidden_layers} layers, {n / 1e6:.1f}M parameters, block "
          f"{cfg.block_size}, target layers {cfg.target_layer_ids}, mask id {cfg.mask_token_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
