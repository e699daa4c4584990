"""A transformers model as the LLM engine uses it: how it is loaded (a GGUF file without
`accelerate`), whether its jobs can share one batched cache with attention per row, the
`compile` setting, and how each row's next token is picked."""
from __future__ import annotations

import os
from typing import Any

from .base import EngineUnavailable
from .llm_common import IdsText

_sdpa: Any = None  # transformers' sdpa attention, bound when the engine loads


def compile_setting(domain: dict[str, Any]) -> str:
    """The domain's `compile` ("auto" | "on" | "off"; the config checks it, a domain built
    without the config may leave it out)."""
    value = domain.get("compile") or "auto"
    if value not in ("auto", "on", "off"):
        raise EngineUnavailable(f"compile = {value!r}: expected auto, on or off")
    return value


def load_gguf(directory: str, name: str, dtype: Any) -> Any:
    """A GGUF file's model in transformers, its weights dequantized. `from_pretrained` reads
    GGUF only with `accelerate` installed; without it the model is built from the file's
    config and the file's tensors loaded into it, the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a worker's stderr is the daemon's log, not a terminal
    kw = {"gguf_file": name, "local_files_only": True}
    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kw)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory, **kw))
    tensors = load_gguf_checkpoint(os.path.join(directory, name), return_tensors=True,
                                   model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head: tied to the embeddings
        raise ValueError(f"the GGUF tensors do not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(dtype)


def text_decoder(tokenizer: Any) -> IdsText:
    """The generated ids' text as whole characters. Special tokens (the end of a turn) are
    not text; the clean-up of spaces before punctuation is off because it can change text
    already streamed once the next token arrives."""
    return IdsText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False))


def rows_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                   resiso_rows: list[tuple[int, int]] | None = None, **kw: Any) -> Any:
    """sdpa attention; in a batched decode step (`resiso_rows`: each running row with the
    first column of its own keys), one call per row on that row's keys alone, so no row's
    numbers depend on the other rows' lengths. Free rows attend to nothing (zeros)."""
    if resiso_rows is None:
        return _sdpa(module, query, key, value, attention_mask, **kw)
    out = None
    for row, first in resiso_rows:
        part, _ = _sdpa(module, query[row:row + 1], key[row:row + 1, :, first:],
                        value[row:row + 1, :, first:], None, **kw)
        if out is None:
            out = part.new_zeros((query.shape[0],) + tuple(part.shape[1:]))
        out[row] = part[0]
    return out, None


def batch_mode(model: Any) -> tuple[bool, bool]:
    """Whether the jobs' KV states can share one batched cache (full attention in every
    layer), and whether attention then runs row by row on each job's own keys (sdpa
    models): a padded row's attention sums over more terms, in another order, so its
    numbers drift from the job's alone."""
    global _sdpa
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    _sdpa = sdpa_attention_forward  # a global, not an import inside the traced step
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:
        return False, False
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False, False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return True, False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register("resiso_rows", rows_attention)
        # sdpa's masks: the batch ignores them (each row is sliced to its own keys), a
        # static cache needs one to hide the columns it has not filled yet
        AttentionMaskInterface.register("resiso_rows", sdpa_mask)
        model.set_attn_implementation("resiso_rows")
    except Exception:
        return True, False
    return True, True


def pick_tokens(torch: Any, seqs: list[Any], logits: Any) -> list[int]:
    """The next token of each row: argmax for greedy jobs, else a draw after
    temperature, top-k and top-p, from the job's own generator."""
    picked = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        if seq.greedy:
            continue
        p = seq.params
        scores = logits[i].float() / p["temperature"]
        k = p["top_k"]
        if 0 < k < scores.shape[-1]:
            scores, index = torch.topk(scores, k)
        else:
            scores, index = torch.sort(scores, descending=True)
        probs = torch.softmax(scores, dim=-1)
        if p["top_p"] < 1.0:
            above = torch.cumsum(probs, dim=-1) - probs  # the mass of the likelier tokens
            probs = probs.masked_fill(above >= p["top_p"], 0.0)
            probs[0] = probs[0].clamp_min(1e-30)
        choice = torch.multinomial(probs, 1, generator=seq.generator)
        picked[i] = int(index[choice].item())
    return picked
