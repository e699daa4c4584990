"""How many layers of a GGUF model fit a worker's VRAM budget (llama.cpp's n_gpu_layers).

llama.cpp has no per-process memory cap: the only lever on its GPU memory is how many layers
it offloads, each bringing its weights and its share of the KV cache (context_size x parallel
tokens). The header is parsed here rather than with the `gguf` package: that package (and
numpy) is not a dependency of the llama_cpp extra, and the header is a small documented
format (github.com/ggml-org/ggml/blob/master/docs/gguf.md). Tensor sizes are taken from the
gaps between data offsets, so no table of quantisation block sizes is needed and a new
quant type does not break the reader.
"""
from __future__ import annotations

import mmap
import struct
from typing import Any

# value types: 0-7 scalars, 8 string, 9 array, 10-12 scalars
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
KV_BYTES = 2  # llama.cpp's default cache type: f16 K and V
DEFAULT_ALIGNMENT = 32


class GgufError(ValueError):
    """Not a GGUF file this reader understands."""


def layers_that_fit(layer_bytes: list[int], other_bytes: int, kv_bytes_per_layer: int,
                    budget_bytes: int) -> int:
    """The largest n such that offloading n layers stays within the budget.

    llama.cpp offloads the *last* n blocks, each with its KV cache (kv_bytes_per_layer =
    per-token size x tokens held). `other_bytes` is paid once as soon as anything is
    offloaded: what the caller expects on the GPU besides the blocks (the output layer at
    full offload, compute buffers). Conservative on purpose: over-estimating costs speed,
    under-estimating costs an out-of-memory crash."""
    used = other_bytes
    n = 0
    for size in reversed(layer_bytes):
        used += size + kv_bytes_per_layer
        if used > budget_bytes:
            break
        n += 1
    return n


def gguf_layer_sizes(path: str) -> tuple[list[int], int, int, int]:
    """(bytes of each block, bytes of all other tensors, n_layer, KV bytes per layer per
    token) from the file's header."""
    meta, sizes, _ = read_header(path)
    return _split(meta, sizes)


def _split(meta: dict[str, Any], sizes: dict[str, int]) -> tuple[list[int], int, int, int]:
    n_layer = int(_arch_key(meta, "block_count"))
    layers = [0] * n_layer
    other = 0
    for name, size in sizes.items():
        if name.startswith("blk."):
            layers[int(name.split(".")[1])] += size
        else:
            other += size
    return layers, other, n_layer, kv_bytes_per_token_layer(meta)


def kv_bytes_per_token_layer(meta: dict[str, Any]) -> int:
    """f16 K and V for one token in one layer: n_head_kv x (key + value head size) x 2."""
    n_embd = int(_arch_key(meta, "embedding_length"))
    n_head = _widest(_arch_key(meta, "attention.head_count"))
    n_head_kv = _widest(_arch_key(meta, "attention.head_count_kv", n_head))
    k = int(_arch_key(meta, "attention.key_length", n_embd // n_head))
    v = int(_arch_key(meta, "attention.value_length", n_embd // n_head))
    return n_head_kv * (k + v) * KV_BYTES


def compute_bytes(meta: dict[str, Any], n_vocab: int, n_ubatch: int, n_ctx_seq: int) -> int:
    """A rough upper bound of llama.cpp's GPU compute buffer: one micro-batch's logits, its
    attention scores over a sequence's context (f32, no flash attention) and a few
    activations. An estimate, not a measurement: it errs high."""
    n_embd = int(_arch_key(meta, "embedding_length"))
    n_head = _widest(_arch_key(meta, "attention.head_count"))
    return 4 * n_ubatch * (n_vocab + n_head * n_ctx_seq + 8 * n_embd)


def offload_layers(path: str, budget_bytes: int, context_size: int, sequences: int,
                   n_ubatch: int = 512) -> int:
    """n_gpu_layers for a worker: the blocks (with KV for context_size x sequences tokens)
    that fit its budget, with the non-block tensors and compute buffer counted against it.
    -1 (all, output layer included) when everything fits."""
    meta, sizes, dims = read_header(path)
    layers, other, n_layer, kv_token = _split(meta, sizes)
    embd = dims.get("token_embd.weight", [])
    n_vocab = int(_arch_key(meta, "vocab_size", 0)) or (int(embd[1]) if len(embd) > 1 else 0)
    fixed = other + compute_bytes(meta, n_vocab, n_ubatch, context_size)
    n = layers_that_fit(layers, fixed, kv_token * context_size * sequences, budget_bytes)
    return -1 if n == n_layer else n


def read_header(path: str) -> tuple[dict[str, Any], dict[str, int], dict[str, list[int]]]:
    """(metadata, tensor name -> bytes, tensor name -> dims). String arrays (the
    vocabulary) are skipped and stored as None: nothing here needs them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        r = _Reader(m)
        if m[:4] != b"GGUF":
            raise GgufError(f"{path}: not a GGUF file (magic {bytes(m[:4])!r})")
        r.pos = 4
        version = r.scalar("I")
        if version not in (2, 3):
            raise GgufError(f"{path}: GGUF version {version} (this reader knows 2 and 3; "
                            f"a big-endian file reads as a huge version)")
        n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.scalar("Q") for _ in range(r.scalar("I"))]
            r.scalar("I")  # ggml type: sizes come from the offsets instead
            infos.append((r.scalar("Q"), name, dims))
        align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
        data = -(-r.pos // align) * align
        end = len(m) - data
    infos.sort()
    sizes = {}
    for i, (offset, name, _) in enumerate(infos):
        nxt = infos[i + 1][0] if i + 1 < len(infos) else end
        sizes[name] = nxt - offset  # includes the alignment padding: at most 31 bytes
    return meta, sizes, {name: dims for _, name, dims in infos}


class _Reader:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.scalar("I"), self.scalar("Q")
            if itype == 8:
                for _ in range(n):
                    length = self.scalar("Q")  # read first: it moves pos
                    self.pos += length
                return None
            if itype in _SCALARS:
                fmt = "<%d%s" % (n, _SCALARS[itype])
                out = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += struct.calcsize(fmt)
                return out
            return [self.value(itype) for _ in range(n)]  # arrays of arrays
        raise GgufError(f"unknown GGUF value type {vtype} at byte {self.pos}")


def _arch_key(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    arch = meta.get("general.architecture", "llama")
    v = meta.get(f"{arch}.{key}", default)
    if v is None:
        raise GgufError(f"GGUF metadata lacks {arch}.{key}")
    return v


def _widest(v: Any) -> int:
    """Per-layer head counts (some architectures vary them) are counted at their widest."""
    return int(max(v)) if isinstance(v, list) else int(v)

