"""The target model and what differs between target families, so that one drafter and one decoding loop
serve them all: loading an unmodified HF causal LM (from a folder, or from a config with random weights)
and finding its decoder layers wherever the family keeps them; the RoPE variants the drafter inherits
(default, linear, dynamic, YaRN, llama3, longrope, proportional: the same frequencies as transformers,
written to config.json in both schemas by convert.py); the kinds of its layers, and how a rejected
verify is taken back in each (attention caches are cut by length; linear-attention and conv states are
restored). The DFlash rules do not live here; a reader needs this file for targets other than plain
Llama/Qwen3 ones.
"""
import dataclasses
import inspect
import json
import math
import os

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# The target: an unmodified HF causal LM, frozen

def _is_folder(path_or_config):
    return isinstance(path_or_config, (str, os.PathLike)) and os.path.isdir(path_or_config)


def load_target_config(path_or_config):
    """The target's HF config from an HF folder, a config .json path, a dict or a PretrainedConfig:
    cheap, so a drafter can be checked against it before any weights load."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    cfg = path_or_config
    if not isinstance(cfg, dict) and not hasattr(cfg, "to_dict"):
        if not os.path.exists(cfg):  # a mistyped --target: one line naming it, not open()'s traceback
            raise ValueError(f"target {cfg} does not exist: give an HF folder or an HF config .json")
        with open(os.path.join(cfg, "config.json") if _is_folder(cfg) else cfg) as f:
            cfg = json.load(f)
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind is not None and kind not in CONFIG_MAPPING:  # transformers' own error lists every type it knows
        raise ValueError(f"target {path_or_config if isinstance(path_or_config, (str, os.PathLike)) else 'config'} has "
                         f"model_type {kind!r}, which transformers {transformers.__version__} does not know: install "
                         f"a transformers that has it (pip install -U transformers), or fix the config's model_type")
    if _is_folder(path_or_config):
        return AutoConfig.from_pretrained(path_or_config)
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return cfg


def load_target(path_or_config, dtype=torch.bfloat16, device="cpu"):
    """An HF folder (from_pretrained), or an HF config (dict, json path or PretrainedConfig) with
    random weights: step timing does not depend on the weights."""
    from transformers import AutoModelForCausalLM
    check_target(path_or_config)
    if _is_folder(path_or_config):
        model = AutoModelForCausalLM.from_pretrained(path_or_config, dtype=dtype)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(load_target_config(path_or_config), dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def decoder_layers(target):
    """The text decoder's layers wherever the model keeps them: get_decoder() finds the `language_model`
    of a multimodal wrapper (Gemma 3, Qwen3.5-VL style); the list is `layers` (Llama style) or `h` (GPT-2
    style). Layer k of it is output_hidden_states[k + 1]: target_layer_ids count as the authors' loader."""
    dec = target.get_decoder()
    layers = next((getattr(dec, n) for n in ("layers", "h") if isinstance(getattr(dec, n, None), nn.ModuleList)), None)
    L = target.config.get_text_config().num_hidden_layers
    if layers is None or len(layers) != L:
        raise ValueError(f"cannot find the {L} decoder layers of {type(target).__name__} (no .layers or .h list "
                         f"of that length in its decoder {type(dec).__name__}): capture hooks need them; use a "
                         "decoder-only causal LM, or teach targets.decoder_layers where this one keeps them")
    return layers


def check_target(path_or_config):
    """Build the target on the meta device (no memory, no weights) and find its decoder layers: a model
    whose layers capture cannot find fails here, before any weights load."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        decoder_layers(AutoModelForCausalLM.from_config(load_target_config(path_or_config)))


def text_field(tc, key, required=True):
    """tc.key of a target's text config, or a ValueError naming the field the drafter copies (train.py
    reports those in one line; a missing attribute would be a traceback). A per-layer field (Gemma 4's
    head_dim: its full-attention layers use global_head_dim) reads as the config's own value, the one
    config.json and to_dict() hold: the drafter's head shape is its own, and that is most layers' shape."""
    try:
        value = getattr(tc, key, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        value = tc.to_dict().get(key)
    if value is None and required:
        raise ValueError(f"the target config ({getattr(tc, 'model_type', '?')}) has no {key}, which the drafter "
                         f"copies: set {key} in the target's config.json, or train for another target")
    return value


def input_embedding_scale(target_config):
    """What the target's input embedding multiplies its rows by (Gemma: sqrt(hidden_size)), 1.0 where it
    does not: read from the module transformers builds for this config, on the meta device, where the
    scaled embeddings keep it as scalar_embed_scale. embed_tokens applies it, so the drafter trains on
    scaled rows, and the serving config must say so (engines embed with the raw matrix)."""
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            embedding = AutoModelForCausalLM.from_config(load_target_config(target_config)).get_input_embeddings()
    except Exception as e:  # whatever transformers raises for a config it cannot build
        raise ValueError(f"cannot build the target from its config to read its input embedding scale "
                         f"({type(e).__name__}: {e})") from None
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None and hasattr(embedding, "embed_scale"):  # scaled, but not where transformers 5 keeps it
        raise ValueError(f"{type(embedding).__name__} scales the embedding but has no scalar_embed_scale: teach "
                         "targets.input_embedding_scale where this transformers keeps the factor")
    return 1.0 if scale is None else float(scale)


def to_device_but_layers(target, device):
    """Every parameter and buffer of the target but its decoder layers' onto device, in place (a tied weight is
    one tensor: it moves once and stays tied). With shard_target the layers stay on the host until fully_shard
    moves each onto the GPU and keeps this rank's slice: the whole target is never on one GPU."""
    inside = {id(t) for layer in decoder_layers(target) for t in [*layer.parameters(), *layer.buffers()]}
    for t in [*target.parameters(), *target.buffers()]:
        if id(t) not in inside:
            t.data = t.data.to(device)


def compile_target_layers(target):
    """torch.compile each decoder layer's forward: HF eager runs RMSNorm, rotary and SwiGLU as
    separate elementwise kernels with fp32 casts, the non-matmul part of the target forward. The
    forward is compiled, not the module, so capture hooks (and FSDP's) stay outside the graph."""
    for layer in decoder_layers(target):
        layer.forward = torch.compile(layer.forward, dynamic=False)


# ----------------------------------------------------------------------------------------------
# RoPE. The drafter inherits its target's RoPE: theta and scaling, as the published drafters copy
# their target's rope config (Llama-3.1: llama3; gpt-oss: yarn). What it does not inherit, and why:
# - a per-layer-type RoPE (Gemma 3/4: {"sliding_attention": ..., "full_attention": ...}) gives the
#   drafter the full-attention one: draft layers attend over the whole context, as those layers do;
# - partial_rotary_factor (Qwen3-Next, Qwen3.5, GLM-4): draft layers rotate all of head_dim, as the
#   engines' DFlash drafters do (rotary_dim=head_dim); only "proportional" keeps it, since there it
#   defines which frequencies are zero and the head stays full-size (transformers and vLLM read it there;
#   SGLang's drafter does not, and turns them: README, serving);
# - mrope sections (Qwen3.5 and VL models): a text position is the same on every axis, so M-RoPE is
#   plain 1-D RoPE for the drafter, as the published Qwen3.5 drafters have it.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")
ROPE_NEEDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("original_max_position_embeddings",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def config_field(cfg, key):
    """A field of an HF config object or of its config.json dict; None where it has none."""
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def rope_config(cfg):
    """(rope_theta, rope_scaling) of an HF config object or dict, target's or drafter's, as the drafter
    uses them (the rules above). Reads transformers 5's rope_parameters and the legacy rope_theta /
    rope_scaling; rope_scaling is None for plain RoPE."""
    get = lambda k: config_field(cfg, k)
    params = get("rope_scaling") or get("rope_parameters") or {}  # transformers also prefers rope_scaling
    params = params.get("full_attention") or params
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or get("rope_theta") or 10000.0)
    if kind in ("default", "mrope"):
        return theta, None
    drop = {"rope_type", "type", "rope_theta", "mrope_section", "mrope_interleaved"}
    if kind != "proportional":
        drop.add("partial_rotary_factor")
    scaling = {"rope_type": kind, **{k: v for k, v in params.items() if k not in drop}}
    if kind in ("yarn", "llama3", "longrope"):  # as transformers fills it in (Phi-3 keeps it outside)
        scaling["original_max_position_embeddings"] = (get("original_max_position_embeddings")
                                                       or scaling.get("original_max_position_embeddings")
                                                       or get("max_position_embeddings"))
    return theta, scaling


def rope_problem(scaling, head_dim):
    """None if the drafter can rotate with this rope_scaling (its head_dim // 2 pairs all turn), else why not,
    in one line: checked when a drafter config is made, before any weights load."""
    r, kind = scaling or {}, (scaling or {}).get("rope_type", "default")
    if kind not in ROPE_TYPES:
        return (f"rope_type={kind!r}: the drafter cannot reproduce this RoPE (it implements {', '.join(ROPE_TYPES)}); "
                "add it to targets.rope_frequencies, checked against transformers' ROPE_INIT_FUNCTIONS")
    missing = [k for k in ROPE_NEEDS.get(kind, ()) if r.get(k) is None]
    if missing:
        return f"rope_scaling {scaling} lacks {missing[0]!r}, which rope_type {kind!r} needs; copy the target's rope_parameters"
    sizes = {len(r["short_factor"]), len(r["long_factor"])} if kind == "longrope" else {head_dim // 2}
    if sizes != {head_dim // 2}:  # Phi-4-mini: factors for the 3/4 of the head its partial_rotary_factor turns
        return (f"longrope's short_factor and long_factor hold {'/'.join(map(str, sorted(sizes)))} entries, one per rotated "
                f"pair, but the drafter rotates all of head_dim {head_dim} ({head_dim // 2} pairs; engines too): a target "
                "that rotates part of its head with longrope cannot be reproduced")
    return None


def rope_frequencies(cfg, seq_len=None, device=None):
    """The drafter's RoPE inverse frequencies [head_dim // 2] and attention scaling (cos and sin are
    multiplied by it), as transformers' ROPE_INIT_FUNCTIONS compute them for the same rope config
    (written out here, checked against them in test_all). seq_len, a tensor (longest position + 1 of
    this forward), matters only past the original context, to dynamic and longrope, which transformers
    also re-evaluate per forward; tensor maths, so a compiled step has no host sync."""
    r = cfg.rope_scaling or {}
    kind, d, base, factor = r.get("rope_type", "default"), cfg.head_dim, cfg.rope_theta, r.get("factor")
    orig, scaling = r.get("original_max_position_embeddings"), 1.0
    exponent = torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d
    inv_freq = 1.0 / base ** exponent
    if kind == "linear":  # positions divided by factor
        inv_freq = inv_freq / factor
    elif kind == "dynamic":  # NTK: a larger base once the sequence outgrows max_position_embeddings
        L = cfg.max_position_embeddings
        s = L if seq_len is None else torch.clamp(seq_len, min=L)
        inv_freq = 1.0 / (base * (factor * s / L - (factor - 1)) ** (d / (d - 2))) ** exponent
    elif kind == "yarn":
        # dimensions turning fewer than beta_slow times over the original context are interpolated
        # (divided by factor), more than beta_fast kept, a linear ramp between; cos/sin scaled by mscale
        factor = factor or cfg.max_position_embeddings / orig
        def mscale(m):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        scaling = r.get("attention_factor")
        if scaling is None:
            m, m_all = r.get("mscale"), r.get("mscale_all_dim")
            scaling = mscale(m) / mscale(m_all) if m and m_all else mscale(1)
        def dim_for(turns):
            return d * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))
        low, high = dim_for(r.get("beta_fast") or 32), dim_for(r.get("beta_slow") or 1)
        if r.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2, device=device).float() - low) / ((high - low) or 0.001)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    elif kind == "llama3":
        # wavelengths over orig / low_freq_factor interpolated by factor, under orig / high_freq_factor
        # kept, a smooth blend between
        lo, hi = r["low_freq_factor"], r["high_freq_factor"]
        smooth = ((orig * inv_freq / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind == "longrope":  # per-frequency factors, the long ones past the original context
        factor = factor or cfg.max_position_embeddings / orig
        scaling = r.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = torch.tensor(r["short_factor"], dtype=torch.float32, device=device)
        if seq_len is not None:
            ext = torch.where(seq_len > orig, torch.tensor(r["long_factor"], dtype=torch.float32, device=device), ext)
        inv_freq = 1.0 / (ext * base ** exponent)
    elif kind == "proportional":  # Gemma 4: only the first partial_rotary_factor of the angles turn
        n = int(r.get("partial_rotary_factor", 1.0) * d // 2)
        inv_freq = torch.where(torch.arange(d // 2, device=device) < n, inv_freq, 0.0) / (factor or 1.0)
    return inv_freq, scaling


def rope_mismatch(cfg, target_config):
    """None if the drafter rotates q and k as the target's config implies, else the problem in one
    line. Frequencies are compared, inside and past the original context, not dict spellings (a null
    rope_scaling and {"rope_type": "default"} agree). Raises ValueError for a target rope type the
    drafter cannot reproduce."""
    theta, scaling = rope_config(target_config)
    # dynamic RoPE, and yarn or longrope without a factor, read max_position_embeddings too
    want = dataclasses.replace(cfg, rope_theta=theta, rope_scaling=scaling, max_position_embeddings=config_field(
        target_config, "max_position_embeddings") or cfg.max_position_embeddings)
    for seq_len in (None, torch.tensor(4 * max(cfg.max_position_embeddings, want.max_position_embeddings))):
        (f, s), (g, t) = rope_frequencies(cfg, seq_len), rope_frequencies(want, seq_len)
        if s != t or not torch.allclose(f, g, rtol=1e-6, atol=0):
            ctx = lambda c: f", max_position_embeddings {c.max_position_embeddings}" if (
                cfg.max_position_embeddings != want.max_position_embeddings) else ""
            return (f"drafter RoPE (theta {cfg.rope_theta}, rope_scaling {cfg.rope_scaling}{ctx(cfg)}) differs from "
                    f"the target's (theta {theta}, rope_scaling {scaling}{ctx(want)}): it would see other positions "
                    "than the target; use a drafter built for this target's rope config")
    return None


# ----------------------------------------------------------------------------------------------
# Layer kinds

def layer_kinds(target_config):
    """The kinds of the target's decoder layers (full_attention, sliding_attention, linear_attention, ...)
    as transformers reads them from the config for its cache: the one reading every layer check uses."""
    from transformers import cache_utils
    return cache_utils.get_layer_types_and_kwargs(target_config.get_text_config(decoder=True))[0]


def cache_kwarg(target):
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (5.17 has the old name)."""
    return "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"


# ----------------------------------------------------------------------------------------------
# Rollback: what a verify pass wrote into the target cache for rejected tokens must be taken back

# cache layer type (as transformers' get_layer_types_and_kwargs names it) -> the runners that roll it back.
# Attention K/V are cut by length. A linear-attention or conv state (Gated DeltaNet in Qwen3-Next and
# Qwen3.5, Mamba-style conv) has no positions to cut: the eager runner restores the state it had before the
# verify and runs the committed tokens again (EagerRunner.rewind). The static runner's steps have fixed
# shapes and cannot run a variable number of tokens again, so it refuses such targets.
ROLLBACK = {"full_attention": "eager static", "sliding_attention": "eager static",
            "chunked_attention": "eager static", "dummy": "eager static",  # dummy: shares another layer's K/V
            "linear_attention": "eager", "conv": "eager"}


def check_rollback(target_config, static=False):
    """Every layer of the target must be one the chosen runner can roll back: checked on the config,
    before any weights load."""
    from transformers import cache_utils
    types = layer_kinds(target_config)
    path = "static" if static else "eager"
    bad = sorted({t for t in types if path not in ROLLBACK.get(t, "").split()})
    if not bad and {"linear_attention", "conv"} & set(types) and not hasattr(cache_utils, "LinearAttentionCacheLayerMixin"):
        raise ValueError("this transformers keeps linear-attention states in model-specific caches that bench.py "
                         "cannot restore: upgrade transformers (5.24 is tested)")
    if not bad:
        return
    name = target_config.get_text_config(decoder=True).model_type
    if static and all("eager" in ROLLBACK.get(t, "") for t in bad):
        raise ValueError(f"{name} has {'/'.join(bad)} layers, whose state the compiled (static) runner cannot roll "
                         "back after a rejected token: run bench.py without --compile (the eager runner restores "
                         "and recomputes it)")
    raise ValueError(f"{name} has {'/'.join(bad)} layers, which bench.py cannot roll back after a rejected token "
                     f"(it can: {', '.join(t for t in ROLLBACK if path in ROLLBACK[t])}): add their rollback "
                     "to bench.EagerRunner.rewind, or benchmark another target")


def is_recurrent(layer):
    from transformers.cache_utils import LinearAttentionCacheLayerMixin
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def snapshot_states(layers):
    """Copies of the conv and recurrent states of linear-attention cache layers."""
    return [[{i: s.clone() for i, s in states.items() if s is not None}
             for states in (layer.conv_states, layer.recurrent_states)] for layer in layers]


def restore_states(layers, saved):
    for layer, (conv, rec) in zip(layers, saved):  # in place: the states keep their addresses
        for i, s in conv.items():
            layer.conv_states[i].copy_(s)
        for i, s in rec.items():
            layer.recurrent_states[i].copy_(s)


def set_state_length(layers, length):
    """transformers 5.25 counts the tokens each linear-attention cache layer has taken in
    (cumulative_length_linear) and reads the cache's length there when layer 0 is one; the positions of
    the next forward come from it. After a rollback the count goes back with the states."""
    for layer in layers:
        if hasattr(layer, "cumulative_length_linear"):
            layer.cumulative_length_linear.fill_(length)
