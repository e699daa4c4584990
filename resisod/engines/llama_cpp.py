"""LLM engine on llama.cpp (llama-cpp-python's low-level API): GGUF models, the model's own
chat template, continuous batching.

Several chat jobs decode together: every step is one `llama_decode` holding one token of
each running sequence plus prompt chunks of the ones just admitted, so a new request joins
between two tokens of the others instead of waiting for them to finish.

Each sequence lives in a KV stream of its own (`kv_unified = false`). That is what keeps an
answer independent of its neighbours: with one shared cache the attention sums run over
cells of other sequences and the rounding (and, greedily, the answer) changes with the
batch. A stream also remembers the tokens it last held, which is the prompt cache: a new
sequence takes the free stream sharing the longest prefix with its prompt, or a copy of a
busy one's, and evaluates only the rest.
"""
from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from typing import Any

from .. import builtin
from ..protocol import PRIORITY_ORDER, Code
from .base import BatchEngine, Cancelled, EngineUnavailable, JobControl, JobError
from .batch_plan import Stream, pick_stream, worth_waiting
from .llm_common import (StopText, Utf8Text, cached_answer, chat_messages, finish_stats,
                         parallel_slots, replay, share)

# tokens evaluated per step: prompts longer than this are taken in chunks, so the running
# sequences keep getting a token every step while a long prompt is read
STEP_TOKENS = 512
# KV state kept in memory for paused sequences; past it a paused one is recomputed later
SAVED_LIMIT = 256 << 20
RANK = {p: i for i, p in enumerate(PRIORITY_ORDER)}  # lower is more urgent


class Sequence:
    """One job's generation: its token history, sampler, stream and text state."""

    def __init__(self, control: JobControl, params: dict[str, Any], prompt: list[int],
                 stops: list[str], max_tokens: int, sampler: Any, cache_key: str | None):
        self.control, self.params, self.sampler = control, params, sampler
        self.prompt_len = len(prompt)
        self.history = list(prompt)       # prompt + generated tokens
        self.n_past = 0                   # tokens of `history` in the stream's KV
        self.stream: Stream | None = None
        self.saved: Any = None            # KV state while paused (ctypes buffer)
        self.paused = False
        self.max_tokens = max_tokens
        self.generated = 0
        self.utf8, self.out = Utf8Text(), StopText(stops)
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.cache_key = cache_key
        self.logit_index = -1             # its row of logits in the step being decoded
        self.prefill = 0                  # prompt tokens evaluated (not from the cache)
        self.rank = RANK.get(control.priority, 1)


class LlamaCppEngine(BatchEngine):
    kind = "llm"

    def load(self) -> None:
        try:
            path = builtin.llm_path(self.domain["model"])
        except builtin.BuiltinMissing as exc:
            raise EngineUnavailable(str(exc))
        if not os.path.isfile(path):
            raise EngineUnavailable(f"model file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise EngineUnavailable(f"model file {path} is not readable")
        try:
            import llama_cpp
            from llama_cpp import _internals, _logger
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise EngineUnavailable(f"llama-cpp-python is not installed: {exc}")
        self.L = L = llama_cpp
        _logger.set_verbose(False)  # llama.cpp's own log: errors only, in the worker's log
        mparams = L.llama_model_default_params()
        # "auto" means the GPU when this llama.cpp build can use one
        on_gpu = self.ctx.device != "cpu" and bool(L.llama_supports_gpu_offload())
        self.capacity = parallel_slots(self.domain, "cuda" if on_gpu else "cpu")
        self.n_ctx = self.domain["context_size"]
        # llama.cpp has no per-process memory cap: its VRAM budget bounds the layers it
        # offloads (weights + KV for every stream + compute buffers)
        self.gpu_layers = self._gpu_layers(path) if on_gpu else 0
        mparams.n_gpu_layers = self.gpu_layers
        try:
            self.model = _internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        except Exception as exc:  # llama.cpp reports unreadable files as ValueError
            raise EngineUnavailable(f"cannot load {path}: {exc}")
        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx * self.capacity     # split evenly over the streams
        cp.n_seq_max = self.capacity
        cp.kv_unified = False
        cp.n_batch = cp.n_ubatch = STEP_TOKENS
        cp.n_threads = cp.n_threads_batch = self.ctx.threads
        self.lctx = L.llama_init_from_model(self.model.model, cp)
        if not self.lctx:
            self.model.close()
            raise EngineUnavailable(f"cannot create a context of {cp.n_ctx} tokens for "
                                    f"{self.capacity} sequences (context_size x parallel)")
        self.mem = L.llama_get_memory(self.lctx)
        self.batch = L.llama_batch_init(STEP_TOKENS, 0, 1)
        self.path = path
        meta = self.model.metadata()
        template = meta.get("tokenizer.chat_template")
        eos, bos = self.model.token_eos(), self.model.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template, eos_token=self.model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.model.token_get_text(bos) if bos != -1 else "") \
            if template else None
        vocab = self.model.vocab
        self.is_eog = lambda token: bool(L.llama_vocab_is_eog(vocab, token))
        self.streams = [Stream(i) for i in range(self.capacity)]
        self.waiting: deque[Sequence] = deque()   # admitted or resumed, without a stream
        self.running: list[Sequence] = []
        self.held: list[Sequence] = []            # paused: no stream
        self.ended: list[tuple[JobControl, Any]] = []
        self.saved_bytes = 0
        self._buf = ctypes.create_string_buffer(64)

    def runs_on(self) -> dict[str, Any]:
        build = "cuda" if self.L.llama_supports_gpu_offload() else "cpu"
        return {"device": "cuda" if self.gpu_layers != 0 else "cpu",
                "build": f"llama.cpp ({build})", "gpu_layers": self.gpu_layers}

    def _gpu_layers(self, path: str) -> int:
        """Layers to offload: all (-1) without a budget; else what fits it, and an explicit
        `gpu_layers` beyond that is refused with the numbers."""
        budget = self.ctx.gpu_budget_mb
        asked = self.domain["gpu_layers"]
        if budget is None:
            return asked
        from .gguf_fit import offload_layers
        fits = offload_layers(path, int(budget * 2**20), self.n_ctx, self.capacity,
                              n_ubatch=STEP_TOKENS)
        if asked == -1:
            return fits
        if fits == -1 or asked <= fits:
            return asked
        raise EngineUnavailable(
            f"gpu_layers = {asked} does not fit this worker's VRAM budget of {budget:.0f} MB "
            f"({fits} layers do, with KV for {self.n_ctx} tokens x {self.capacity} "
            f"sequences): lower gpu_layers, context_size or parallel, or raise the domain's "
            f"gpu_allocation")

    def unload(self) -> None:
        for seq in [*self.waiting, *self.running, *self.held]:
            self._free_sampler(seq)
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.lctx)
        self.model.close()
        del self.model, self.lctx

    # --- admission ---------------------------------------------------------------------------
    def _prompt_tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        if self.formatter is not None:
            res = self.formatter(messages=messages)
            text, stop, special = res.prompt, res.stop or [], res.added_special
        else:  # a model without a template: plain role-prefixed turns
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            stop, special = ["\nuser:"], False
        tokens = self.model.tokenize(text.encode("utf-8"), add_bos=not special, special=True)
        return tokens, list(stop) if isinstance(stop, list) else [stop]

    def add(self, params: dict[str, Any], job: JobControl) -> None:
        key, hit = cached_answer(self, params)
        if hit is not None:
            self.ended.append((job, replay(hit, job, time.perf_counter())))
            return
        tokens, template_stop = self._prompt_tokens(chat_messages(params))
        if len(tokens) >= self.n_ctx:
            raise JobError(Code.CONTEXT_OVERFLOW, f"the prompt is {len(tokens)} tokens; the "
                           f"context holds {self.n_ctx} (domains.<name>.context_size)")
        max_tokens = min(params["max_tokens"], self.n_ctx - len(tokens))
        seq = Sequence(job, params, tokens, params["stop"] + template_stop, max_tokens,
                       self._sampler(params), key)
        self.waiting.append(seq)

    def _sampler(self, params: dict[str, Any]) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if params["temperature"] == 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        # the settings llama-cpp-python's completion API uses, each sequence with its own
        # random state: a seeded answer does not depend on what it is batched with
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params["top_k"]))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params["top_p"], 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(0.05, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params["temperature"]))
        seed = params["seed"] if params["seed"] is not None else L.LLAMA_DEFAULT_SEED
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def _free_sampler(self, seq: Sequence) -> None:
        if seq.sampler is not None:
            self.L.llama_sampler_free(seq.sampler)
            seq.sampler = None

    # --- the loop ------------------------------------------------------------------------------
    def pending(self) -> bool:
        if self.ended or self.waiting or self.running:
            return True
        return any(s.control.cancelled.is_set() or not s.control.paused for s in self.held)

    def jobs(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.held)

    def step(self) -> list[tuple[JobControl, Any]]:
        self._apply_controls()
        self._place_waiting()
        if self.running:
            self._decode()
        ended, self.ended = self.ended, []
        return ended

    def _end(self, seq: Sequence, outcome: Any) -> None:
        for group in (self.running, self.held):
            if seq in group:
                group.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        if seq.saved is not None:
            self.saved_bytes -= len(seq.saved)
            seq.saved = None
        self._free_sampler(seq)
        self.ended.append((seq.control, outcome))

    def _release(self, seq: Sequence) -> None:
        """Free its stream, which keeps the tokens it holds for the next prompt."""
        if seq.stream is not None:
            seq.stream.release(seq.history[:seq.n_past])
            seq.stream = None

    def _apply_controls(self) -> None:
        for seq in [*self.waiting, *self.running, *self.held]:
            if seq.control.cancelled.is_set():
                self._end(seq, Cancelled())
        for seq in [s for s in self.running if s.control.paused]:
            self._pause(seq)
        for seq in [s for s in self.waiting if s.control.paused and s.stream is None]:
            self.waiting.remove(seq)  # paused before it ever ran
            self.held.append(seq)
            seq.paused = True
            seq.control.emit("paused")
        for seq in [s for s in self.held if not s.control.paused]:
            self.held.remove(seq)
            self.waiting.append(seq)

    def _pause(self, seq: Sequence) -> None:
        """Stop it and give its stream away; keep its KV state if memory allows, so it goes
        on later without evaluating its history again."""
        L = self.L
        self.running.remove(seq)
        sid = seq.stream.index
        size = L.llama_state_seq_get_size(self.lctx, sid)
        if self.saved_bytes + size <= SAVED_LIMIT:
            buf = (ctypes.c_uint8 * size)()
            if L.llama_state_seq_get_data(self.lctx, buf, size, sid) == size:
                seq.saved = buf
                self.saved_bytes += size
        self._release(seq)
        seq.paused = True
        self.held.append(seq)
        seq.control.emit("paused")

    def _place_waiting(self) -> None:
        for seq in list(self.waiting):
            free = [s for s in self.streams if s.seq is None]
            if not free:
                return
            prefilling = [o for o in self.running if o.n_past < len(o.history) - 1]
            if seq.saved is None and prefilling and \
                    worth_waiting(self.streams, prefilling, seq.history):
                continue  # its prefix is being evaluated: copy it next step
            self.waiting.remove(seq)
            self._place(seq, free)

    def _place(self, seq: Sequence, free: list[Stream]) -> None:
        """Give `seq` a stream holding as much of its history as can be had cheaply."""
        L, mem = self.L, self.mem
        dst, src, shared = pick_stream(self.streams, free, seq.history)
        if seq.saved is not None and shared < seq.n_past:
            # its saved state beats what the streams still hold
            L.llama_memory_seq_rm(mem, dst.index, -1, -1)
            size = len(seq.saved)
            if L.llama_state_seq_set_data(self.lctx, seq.saved, size, dst.index) != size:
                raise RuntimeError("restoring a paused sequence's KV state failed")
            shared, src = seq.n_past, None
        elif src is not None:
            # a whole-stream copy (the only kind llama.cpp makes between streams), then the
            # tail past the shared prefix is dropped
            L.llama_memory_seq_rm(mem, dst.index, -1, -1)
            L.llama_memory_seq_cp(mem, src.index, dst.index, -1, -1)
        # at least the last token is evaluated again: its logits give the next token
        shared = min(shared, len(seq.history) - 1)
        L.llama_memory_seq_rm(mem, dst.index, shared, -1)
        if seq.saved is not None:
            self.saved_bytes -= len(seq.saved)
            seq.saved = None
        seq.n_past = shared
        if seq.ttft is None:
            seq.prefill = len(seq.history) - shared
        seq.stream = dst
        dst.take(seq)
        self.running.append(seq)
        if seq.paused:
            seq.paused = False
            seq.control.emit("resumed")

    def _decode(self) -> None:
        """One llama_decode: the next token of every decoding sequence first, then prompt
        chunks in arrival order up to STEP_TOKENS. A step that reads the prompt of a
        sequence leaves out the sequences of lower priority: a realtime request's first
        token does not wait for the batch jobs' next ones."""
        L, batch = self.L, self.batch
        n, room = 0, STEP_TOKENS
        limit = min((s.rank for s in self.running if len(s.history) - s.n_past > 1),
                    default=len(RANK))
        token, pos, seq_id, n_seq_id, logits = (batch.token, batch.pos, batch.seq_id,
                                                batch.n_seq_id, batch.logits)
        fed: list[tuple[Sequence, int]] = []
        for seq in sorted(self.running, key=lambda s: len(s.history) - s.n_past > 1):
            left = len(seq.history) - seq.n_past
            take = min(left, room)
            if take <= 0 or seq.rank > limit:
                seq.logit_index = -1
                continue
            sid = seq.stream.index
            for i in range(seq.n_past, seq.n_past + take):
                token[n], pos[n], n_seq_id[n], logits[n] = seq.history[i], i, 1, 0
                seq_id[n][0] = sid
                n += 1
            room -= take
            done = take == left
            if done:
                logits[n - 1] = 1
            seq.logit_index = n - 1 if done else -1
            fed.append((seq, take))
        batch.n_tokens = n
        rc = L.llama_decode(self.lctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) with {n} tokens of "
                               f"{len(fed)} sequences")
        for seq, take in fed:
            seq.n_past += take
            if seq.logit_index >= 0:
                self._next_token(seq)

    def _next_token(self, seq: Sequence) -> None:
        L = self.L
        tok = L.llama_sampler_sample(seq.sampler, self.lctx, seq.logit_index)
        if self.is_eog(tok):
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.history.append(tok)
        piece = seq.out.feed(seq.utf8.feed(self._piece(tok)))
        if piece:
            self._emit(seq, piece)
        if seq.out.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.max_tokens:
            self._finish(seq, "length")

    def _piece(self, token: int) -> bytes:
        """A token's bytes (special tokens as nothing). llama-cpp-python's own
        `token_to_piece` returns its whole 32-byte buffer, NULs and all."""
        n = self.L.llama_token_to_piece(self.model.vocab, token, self._buf, len(self._buf), 0,
                                        False)
        if n < 0:  # a longer piece: llama.cpp says how long
            self._buf = ctypes.create_string_buffer(-n)
            return self._piece(token)
        return self._buf.raw[:n]

    def _emit(self, seq: Sequence, piece: str) -> None:
        if seq.ttft is None:
            # the first piece also says how many prompt tokens were read for it (the rest
            # came from the prompt cache): the daemon paces prompt reading per token
            seq.ttft = time.perf_counter() - seq.t0
            seq.control.emit("token", text=piece, prefill=seq.prefill)
        else:
            seq.control.emit("token", text=piece)

    def _finish(self, seq: Sequence, finish: str) -> None:
        # bytes of a character max_tokens cut short stay out of the answer (utf8 holds them)
        piece = seq.out.flush()
        if piece:
            self._emit(seq, piece)
        # the stream keeps the sampled token's history except the last (never evaluated)
        result = finish_stats(seq.out.text, finish, seq.prompt_len, seq.generated, seq.ttft,
                              seq.t0)
        if seq.cache_key is not None:
            share(self, seq.cache_key, result)
        self._end(seq, result)
