"""A Qwen2.5-0.5B-shaped Q4_0 GGUF with random weights and the real Qwen2 tokenizer, for benchmarks.

Speed on a CPU depends on the shape of a model (layers, widths, heads, vocabulary,
quantisation), not on what its weights say, so a file of the right shape with random
weights measures what a real Qwen2.5-0.5B-Instruct Q4_0 would, without a download:

- shape: arch ``qwen2``, 24 layers, hidden 896, FFN 4864, 14 query heads and 2 KV heads
  of 64, vocabulary 151,936, rope theta 1e6, tied embeddings, context 32,768;
- weights: normal, std 0.02 (norms 1, biases 0), Q4_0; the token embedding (which is also
  the output matrix, tied) Q8_0 by default (``--embed`` to change). The embedding rows of
  the special and padding tokens (ids from ``<|endoftext|>`` on) are zero, so greedy
  decoding never picks them: generation runs to ``max_tokens`` instead of stopping early;
- tokenizer: tokens, types, merges, pre-tokenizer and chat template copied from
  llama.cpp's ``models/ggml-vocab-qwen2.gguf`` (ChatML), eos ``<|im_end|>`` like
  Qwen2.5-Instruct.

The vocabulary file (and llama.cpp's source, for ``llama-server``) come from the
llama-cpp-python 0.3.36 source distribution, fetched once with ``pip download`` into
``bench/.cache/`` (ignored by git, never committed); the model is written there too.

    .venv/bin/python bench/qwen_shaped.py [--force] [--check]   # build (cached) and try it
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
LLAMA_CPP_PYTHON = "0.3.36"
SDIST = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SRC = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"          # vendor/llama.cpp from the sdist
VOCAB = SRC / "models" / "ggml-vocab-qwen2.gguf"
_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"

# Qwen2.5-0.5B(-Instruct)
SHAPE = dict(n_layer=24, n_embd=896, n_ff=4864, n_head=14, n_head_kv=2, head_dim=64, n_ctx_train=32768,
             rope_theta=1_000_000.0, rms_eps=1e-6)
FORMAT_VERSION = 1  # bump when the file's recipe changes: the cache name changes with it


def model_path(embed: str = "Q8_0") -> Path:
    return CACHE / f"qwen2.5-0.5b-shaped-q4_0-embd_{embed.lower()}-v{FORMAT_VERSION}.gguf"


def fetch_sdist() -> Path:
    """The llama-cpp-python source distribution, downloaded once with pip's configured index."""
    if SDIST.exists():
        return SDIST
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (~75 MB) into {CACHE} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)],
                   check=True, stdout=subprocess.DEVNULL)
    if not SDIST.exists():
        raise SystemExit(f"pip download did not leave {SDIST.name} in {CACHE}")
    return SDIST


def unpack(source_tree: bool = False) -> Path:
    """Unpack the Qwen2 vocabulary file (and, with ``source_tree``, llama.cpp's sources) into ``SRC``."""
    marker = SRC / ".unpacked-source"
    if VOCAB.exists() and (not source_tree or marker.exists()):
        return SRC
    sdist = fetch_sdist()
    skip_dirs = ("models/", "docs/", "media/", "tests/", "examples/", "gguf-py/", "app/", "benches/", "pocs/")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(_PREFIX):
                continue
            rel = m.name[len(_PREFIX):]
            if rel == "models/ggml-vocab-qwen2.gguf" or (source_tree and not rel.startswith(skip_dirs)):
                m.name = rel
                members.append(m)
        SRC.mkdir(parents=True, exist_ok=True)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(SRC, members=members, **kw)
    if source_tree:
        marker.write_text("ok\n")
    return SRC


def _gguf():
    try:
        import gguf
    except ImportError:  # the copy in the sdist
        sys.path.insert(0, str(unpack(source_tree=False).parent / "gguf-py"))
        import gguf
    return gguf


def _vocab_fields(gguf, path: Path) -> dict:
    r = gguf.GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key: str) -> list[int]:
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    def scalar(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    return {"model": scalar("tokenizer.ggml.model"), "pre": scalar("tokenizer.ggml.pre"),
            "tokens": strings("tokenizer.ggml.tokens"), "types": ints("tokenizer.ggml.token_type"),
            "merges": strings("tokenizer.ggml.merges"), "chat_template": scalar("tokenizer.chat_template")}


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build(embed: str = "Q8_0", force: bool = False, seed: int = 0) -> Path:
    """Write the model (once; cached under ``bench/.cache``) and return its path."""
    out = model_path(embed)
    if out.exists() and not force:
        return out
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    embed_type = Q[embed.upper()]
    t0 = time.perf_counter()
    unpack(source_tree=False)
    voc = _vocab_fields(gguf, VOCAB)
    tokens = voc["tokens"]
    n_vocab = len(tokens)
    special = {t: i for i, t in enumerate(tokens) if t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    first_special = special["<|endoftext|>"]
    s = SHAPE
    n_embd, n_ff, hd = s["n_embd"], s["n_ff"], s["head_dim"]
    q_dim, kv_dim = s["n_head"] * hd, s["n_head_kv"] * hd
    print(f"writing a Qwen2.5-0.5B-shaped model ({embed} embedding) to {out} ...", flush=True)

    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen2")
    w.add_name("Qwen2.5-0.5B-shaped (random weights, benchmark only)")
    w.add_context_length(s["n_ctx_train"])
    w.add_embedding_length(n_embd)
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(n_ff)
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(s["rms_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(voc["model"] or "gpt2")
    w.add_tokenizer_pre(voc["pre"] or "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(voc["types"])
    w.add_token_merges(voc["merges"])
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])      # Qwen2.5-Instruct: the turn end
    w.add_pad_token_id(special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(voc["chat_template"] or CHATML)

    rng = np.random.default_rng(seed)
    std = 0.02

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def add_q(name: str, data: np.ndarray, qtype) -> None:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    emb = normal(n_vocab, n_embd)
    emb[first_special:] = 0.0  # special and padding tokens: never the argmax
    add_q("token_embd.weight", emb, embed_type)
    del emb
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_q(p + "attn_q.weight", normal(q_dim, n_embd), Q.Q4_0)
        w.add_tensor(p + "attn_q.bias", np.zeros(q_dim, dtype=np.float32))
        add_q(p + "attn_k.weight", normal(kv_dim, n_embd), Q.Q4_0)
        w.add_tensor(p + "attn_k.bias", np.zeros(kv_dim, dtype=np.float32))
        add_q(p + "attn_v.weight", normal(kv_dim, n_embd), Q.Q4_0)
        w.add_tensor(p + "attn_v.bias", np.zeros(kv_dim, dtype=np.float32))
        add_q(p + "attn_output.weight", normal(n_embd, q_dim), Q.Q4_0)
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_q(p + "ffn_gate.weight", normal(n_ff, n_embd), Q.Q4_0)
        add_q(p + "ffn_up.weight", normal(n_ff, n_embd), Q.Q4_0)
        add_q(p + "ffn_down.weight", normal(n_embd, n_ff), Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    print(f"  {out.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def check(path: Path, threads: int, n_tokens: int = 64) -> None:
    """Load with llama-cpp-python, decode greedily, print tokens/s and what came out."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(b"<|im_start|>user\nWrite a story about the sea.<|im_end|>\n<|im_start|>assistant\n",
                          special=True)
    t0 = time.perf_counter()
    out: list[int] = []
    first = None
    for tok in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        first = first or time.perf_counter()
        out.append(tok)
        if len(out) >= n_tokens:
            break
    t1 = time.perf_counter()
    print(f"prompt {len(prompt)} tokens in {first - t0:.2f} s; decode {(len(out) - 1) / (t1 - first):.1f} tokens/s "
          f"on {threads} threads; {len(set(out))} distinct of {len(out)}; eos seen: {llm.token_eos() in out}")
    print("text:", repr(llm.detokenize(out).decode("utf-8", "replace")[:200]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed", default="Q8_0", choices=["Q4_0", "Q8_0", "F16"],
                    help="type of the (tied) token embedding / output matrix")
    ap.add_argument("--force", action="store_true", help="write the file again")
    ap.add_argument("--check", action="store_true", help="load it and decode 64 tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    path = build(args.embed, force=args.force)
    print(path)
    if args.check:
        check(path, args.threads)


if __name__ == "__main__":
    main()
