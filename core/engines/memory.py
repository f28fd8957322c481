"""How much memory a GGUF model needs on the CPU, from its own metadata: the weights (the file,
plus a fifth for llama.cpp's buffers) and the KV cache (f16 K and V of every layer for
n_ctx x parallel cells). The engine refuses to load beyond it and `botd doctor` reports it."""

from __future__ import annotations

from collections.abc import Mapping


def kv_bytes(meta: Mapping[str, str], n_ctx: int, parallel: int) -> int:
    """The KV cache of ``n_ctx`` x ``parallel`` cells, from the GGUF metadata's shape."""
    arch = meta.get("general.architecture", "")

    def num(key: str, default: int = 0) -> int:
        try:
            return int(float(meta.get(f"{arch}.{key}", default)))
        except ValueError:
            return default

    n_embd, n_head = num("embedding_length"), max(1, num("attention.head_count", 1))
    n_head_kv = num("attention.head_count_kv", n_head)
    k_len = num("attention.key_length", n_embd // n_head)
    v_len = num("attention.value_length", n_embd // n_head)
    return num("block_count") * n_ctx * parallel * n_head_kv * (k_len + v_len) * 2


def needed_bytes(meta: Mapping[str, str], file_size: int, n_ctx: int, parallel: int, extra: int = 0) -> int:
    """Weights + KV cache + ``extra`` (e.g. the state cache), in bytes."""
    return int(file_size * 1.2) + kv_bytes(meta, n_ctx, parallel) + extra
