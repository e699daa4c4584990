"""LLM engine on Hugging Face transformers: a local model directory (or a GGUF file in one).

A continuous-batching engine: every running job decodes its next token in one forward pass
of the model, and a job that arrives between two steps joins the next one.

How a step works. A new job's prompt is prefilled on its own (batch of one, no padding), which
gives its first token. A job decoding alone runs on its own cache, batch of one: the plain
forward `generate` runs, with nothing paid for places it does not use (on a CPU a batch of
four costs nearly twice a batch of one). On CUDA (or where the domain's `compile` says) that
lone job decodes on a static KV cache with a compiled step (`hf_static`). Jobs running
together decode in one forward: their KV caches live in one batched `DynamicCache`, each row
left-padded to the longest, with an attention mask that hides the padding and each row's own
positions, so the batch is rebuilt only when a job joins or leaves (not at every token). In
the batch every row's attention runs on its own keys and every forward has the same shape,
so jobs decoding together get the same tokens whichever of them run; a job that decoded
alone for a while computed some tokens in another shape, whose logits can differ in the last
bits, and greedy choices agree unless two tokens are that close to a tie. Models whose cache
is not plain full attention (sliding windows, linear attention) keep one cache per job and
decode one job per forward: correct, just not batched.

Sampling is per job (temperature, top_k, top_p in that order, from the job's own seeded
generator), as are stop strings, max_tokens, cancel and pause. A paused job leaves the batch
with its KV state and rejoins where it stopped.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .. import builtin
from ..protocol import Code
from .base import BatchEngine, Cancelled, EngineUnavailable, JobControl, JobError, Outcome
from .hf_model import batch_mode, compile_setting, load_gguf, pick_tokens, text_decoder
from .hf_static import StaticLane, compile_cache_dir, compile_wanted, use_cache_dir
from .llm_common import (StopText, cached_answer, chat_messages, finish_stats,
                         parallel_slots, replay, share)
from ..devices import place_torch

class Seq:
    """One job: its sampling settings, streamed text, and KV state while outside the batch."""

    def __init__(self, job: JobControl, params: dict[str, Any], prompt: list[int],
                 max_new: int, tokenizer: Any) -> None:
        self.job, self.params, self.prompt = job, params, prompt
        self.max_new = max_new
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.decoder = text_decoder(tokenizer)
        self.stops = StopText(params["stop"])
        self.greedy = params["temperature"] == 0
        self.generator: Any = None    # made at prefill, on the model's device
        self.generated = 0            # tokens sampled so far
        self.last = -1                # the last sampled token: the next step's input
        self.length = 0               # tokens in its KV state (prompt + generated - 1)
        self.kv: Any = None           # its own cache while not a row of the batch (or the
        #                               engine's StaticLane while it decodes there)
        self.prefilled = False
        self.paused = False           # `paused` emitted, not yet `resumed`
        self.share_key: str | None = None     # put the result in the shared cache at the end
        self.hit: dict[str, Any] | None = None  # the shared cache's answer: ends at step one

    def emit(self, piece: str) -> None:
        if piece:
            if self.ttft is None:
                # the first piece says how many prompt tokens were read for it (pacing)
                self.ttft = time.perf_counter() - self.t0
                self.job.emit("token", text=piece, prefill=len(self.prompt))
            else:
                self.job.emit("token", text=piece)


class TransformersEngine(BatchEngine):
    kind = "llm"

    def __init__(self, domain: dict[str, Any], ctx: Any):
        super().__init__(domain, ctx)
        self.capacity = parallel_slots(domain, ctx.device)
        self._lane: StaticLane | None = None
        self.decode_path = "dynamic"  # or "static+compiled" (reported by runs_on)
        self.compile_error: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._seqs: list[Seq] = []     # every job held, in arrival order
        self._batchable = getattr(self, "_batchable", False)
        # the running jobs: by slot (row of the batched cache), None for a free one; without
        # a batched cache, a plain list
        self._slots: list[Seq | None] = [None] * self.capacity if self._batchable else []
        self._pads: list[int] = []     # left padding of each row
        self._cache: Any = None        # the batched cache
        if getattr(self, "_lane", None) is not None:
            self._lane.release()

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        try:
            path = builtin.llm_path(self.domain["model"])
        except builtin.BuiltinMissing as exc:
            raise EngineUnavailable(str(exc))
        gguf_file = None
        if path.endswith(".gguf"):
            path, gguf_file = os.path.dirname(path), os.path.basename(path)
            if not os.path.isfile(os.path.join(path, gguf_file)):
                raise EngineUnavailable(f"model file {os.path.join(path, gguf_file)} "
                                        f"does not exist")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise EngineUnavailable(f"{path} is not a Hugging Face model directory "
                                    f"(no config.json)")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise EngineUnavailable(f"transformers/torch are not installed: {exc}")
        self.device, dtype = place_torch(
            torch, self.ctx.device, self.ctx.threads, self.ctx.gpu_share, self.domain["dtype"])
        kw: dict[str, Any] = {"local_files_only": True}
        if gguf_file:
            kw["gguf_file"] = gguf_file
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
            if gguf_file:
                self.model = load_gguf(path, gguf_file, dtype)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        except Exception as exc:
            raise EngineUnavailable(f"cannot load the model in {path}: {exc}")
        self.model.to(self.device).eval()
        self.torch = torch
        self.capacity = parallel_slots(self.domain, self.device)
        eos: set[int] = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None),
                      self.tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self.eos = eos
        self.limit = min(self.domain["context_size"],
                         getattr(self.model.config, "max_position_embeddings", None) or 10**9)
        self._batchable, self._rowwise = batch_mode(self.model)
        self._reset()
        if compile_wanted(compile_setting(self.domain), self.device):
            self._compile()

    def _compile(self) -> None:
        """The static-cache lane with its compiled step, compiled now (a few decode steps of
        a short prompt) rather than on the first job; any failure leaves the dynamic path,
        with the reason in the log and in `runs_on`."""
        import sys
        use_cache_dir(self.torch, compile_cache_dir(self.ctx.state_dir))
        try:
            if not self._batchable:
                raise RuntimeError("the model's cache is not plain full attention")
            lane = StaticLane(self.torch, self.model, self.device, self.limit)
            with self.torch.inference_mode():
                prompt = self._prompt_ids([{"role": "user", "content": "Hi"}])
                ids = self.torch.tensor([prompt], dtype=self.torch.long, device=self.device)
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                lane.load(None, out.past_key_values, len(prompt))
                token = int(out.logits[0, -1].argmax())
                for i in range(3):  # CUDA graphs are recorded on the second and third call
                    token = int(lane.decode(token, len(prompt) + i)[0].argmax())
                lane.release()
        except Exception as exc:
            self.compile_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"resiso: transformers engine: static cache + torch.compile unavailable, "
                  f"decoding on the dynamic cache: {self.compile_error}", file=sys.stderr)
            return
        self._lane, self.decode_path = lane, "static+compiled"

    def runs_on(self) -> dict[str, Any]:
        where = {"device": getattr(self, "device", "cpu"), "decode": self.decode_path}
        if self.compile_error:
            where["compile_error"] = self.compile_error
        return where

    def unload(self) -> None:
        self._reset()
        self._lane = None
        del self.model
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False).input_ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(tok(text).input_ids)

    # -- the BatchEngine interface ---------------------------------------------------------

    def add(self, params: dict[str, Any], job: JobControl) -> None:
        prompt = self._prompt_ids(chat_messages(params))
        if len(prompt) >= self.limit:
            raise JobError(Code.CONTEXT_OVERFLOW, f"the prompt is {len(prompt)} tokens; the "
                           f"context holds {self.limit}")
        seq = Seq(job, params, prompt, min(params["max_tokens"], self.limit - len(prompt)),
                  self.tokenizer)
        seq.share_key, seq.hit = cached_answer(self, params)
        self._seqs.append(seq)

    def pending(self) -> bool:
        for seq in self._seqs:
            job = seq.job
            if job.cancelled.is_set() or job.paused != seq.paused or not job.paused:
                return True
        return False

    def jobs(self) -> int:
        return len(self._seqs)

    def step(self) -> list[tuple[JobControl, Outcome]]:
        with self.torch.inference_mode():
            ended = self._step()
        for seq, _ in ended:
            if seq in self._seqs:
                self._seqs.remove(seq)
        return [(seq.job, outcome) for seq, outcome in ended]

    def _step(self) -> list[tuple[Seq, Outcome]]:
        ended: list[tuple[Seq, Outcome]] = []
        for seq in list(self._seqs):
            if seq.job.cancelled.is_set():
                ended.append((seq, Cancelled()))
                self._drop(seq)
        for seq in self._running():
            if seq.job.paused:
                self._leave(seq)
        for seq in self._seqs:
            if seq.job.paused != seq.paused:
                seq.paused = seq.job.paused
                seq.job.emit("paused" if seq.paused else "resumed")
        if self._running():
            ended += self._decode()
        # the jobs out of a slot that may run: resumed ones, then new ones, as places allow
        done = {id(seq) for seq, _ in ended}
        waiting = [s for s in self._seqs if not s.paused and id(s) not in done
                   and s not in self._slots]
        waiting.sort(key=lambda s: not s.prefilled)
        for seq in waiting:
            if seq.hit is not None:
                ended.append((seq, replay(seq.hit, seq.job, seq.t0)))
            elif not self._free():
                break
            elif seq.prefilled:
                self._join(seq)
            else:
                outcome = self._prefill(seq)
                if outcome is not None:
                    ended.append((seq, outcome))
                else:
                    self._join(seq)
        return ended

    # -- generation ------------------------------------------------------------------------

    def _prefill(self, seq: Seq) -> Outcome | None:
        torch = self.torch
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        seq.kv, seq.length, seq.prefilled = out.past_key_values, len(seq.prompt), True
        seq.generator = torch.Generator(device=out.logits.device)
        if seq.params["seed"] is not None:
            seq.generator.manual_seed(seq.params["seed"])
        else:
            seq.generator.seed()
        return self._take(seq, pick_tokens(self.torch, [seq], out.logits[:, -1, :])[0])

    def _running(self) -> list[Seq]:
        return [s for s in self._slots if s is not None]

    def _decode(self) -> list[tuple[Seq, Outcome]]:
        torch = self.torch
        self._arrange()
        rows = self._running()
        if self._cache is not None:
            # one forward over every slot, free ones included: the matrix products then have
            # the same shape whatever the number of jobs, which keeps each row's numbers
            # bit for bit the same whichever other jobs share the step
            slots = self._slots
            tokens = torch.tensor([[s.last if s else 0] for s in slots], dtype=torch.long,
                                  device=self.device)
            positions = torch.tensor([[s.length if s else 0] for s in slots],
                                     dtype=torch.long, device=self.device)
            width = self._width() + 1
            pads = torch.tensor(self._pads, device=self.device).unsqueeze(1)
            mask = (torch.arange(width, device=self.device).unsqueeze(0) >= pads).long()
            extra = {}
            if self._rowwise:
                extra["resiso_rows"] = [(i, self._pads[i]) for i, s in enumerate(slots) if s]
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             past_key_values=self._cache, use_cache=True, **extra)
            index = [i for i, s in enumerate(slots) if s]
            logits = out.logits[index, -1, :]
        else:  # one forward per job, each on its own cache: a lone job, or no batched cache
            parts = []
            for s in rows:
                if self._lane is not None and s.kv is self._lane:
                    parts.append(self._lane.decode(s.last, s.length))
                    continue
                out = self.model(
                    input_ids=torch.tensor([[s.last]], dtype=torch.long, device=self.device),
                    position_ids=torch.tensor([[s.length]], dtype=torch.long,
                                              device=self.device),
                    past_key_values=s.kv, use_cache=True)
                s.kv = out.past_key_values
                parts.append(out.logits[:, -1, :])
            logits = torch.cat(parts)
        picked = pick_tokens(self.torch, rows, logits)
        ended = []
        for seq, token in zip(rows, picked):
            seq.length += 1
            outcome = self._take(seq, token)
            if outcome is not None:
                ended.append((seq, outcome))
        for seq, _ in ended:
            self._leave(seq)
        return ended

    def _take(self, seq: Seq, token: int) -> Outcome | None:
        """Stream a sampled token; the job's result if it ended the job."""
        seq.generated += 1
        seq.last = token
        stops = seq.stops
        if token in self.eos:
            finish = "stop"
        else:
            seq.emit(stops.feed(seq.decoder.feed([token])))
            if stops.stopped:
                finish = "stop"
            elif seq.generated >= seq.max_new:
                finish = "length"
            else:
                return None
        seq.emit(stops.feed(seq.decoder.finish()))
        seq.emit(stops.flush())
        result = finish_stats(stops.text, finish, len(seq.prompt), seq.generated, seq.ttft,
                              seq.t0)
        if seq.share_key is not None:
            share(self, seq.share_key, result)
        return result

    # -- the batched cache -----------------------------------------------------------------
    # `capacity` slots, one row each of the batched cache; a row holds its job's KV state
    # right-aligned, `_pads[i]` columns of padding before it (a free slot: all padding)

    def _width(self) -> int:
        return self._cache.layers[0].keys.shape[-2] if self._cache is not None else 0

    def _free(self) -> int:
        if not self._batchable:
            return self.capacity - len(self._slots)
        return sum(s is None for s in self._slots)

    def _join(self, seq: Seq) -> None:
        """Give a job (with its own KV state) a free slot; `_arrange` moves the state."""
        if not self._batchable:
            self._slots.append(seq)
            return
        self._slots[self._slots.index(None)] = seq

    def _arrange(self) -> None:
        """Where the running jobs' KV states live for this step: a lone job's on its own
        cache (the static lane when there is one), two or more jobs' in the batched cache."""
        if not self._batchable:
            return
        rows = [(i, s) for i, s in enumerate(self._slots) if s is not None]
        if len(rows) == 1:
            slot, seq = rows[0]
            if seq.kv is None:  # the last row of the batch
                seq.kv = self._row_kv(slot)
                self._cache, self._pads = None, []
            lane = self._lane
            if lane is not None and lane.owner is None and seq.length < lane.max_len:
                lane.load(seq, seq.kv, seq.length)
                seq.kv = lane
            return
        for slot, seq in rows:
            if seq.kv is not None:
                self._insert(seq, slot)

    def _own_kv(self, seq: Seq) -> Any:
        """A job's KV state as a cache of its own (taken off the lane if it is there)."""
        if self._lane is not None and seq.kv is self._lane:
            seq.kv = self._lane.take()
        return seq.kv

    def _row_kv(self, slot: int) -> Any:
        from transformers import DynamicCache
        pad = self._pads[slot]
        return DynamicCache(ddp_cache_data=[
            (layer.keys[slot:slot + 1, :, pad:].clone(),
             layer.values[slot:slot + 1, :, pad:].clone())
            for layer in self._cache.layers])

    def _insert(self, seq: Seq, slot: int) -> None:
        """Move a job's own KV state into its row of the batched cache."""
        torch = self.torch
        own = self._own_kv(seq).layers
        length = own[0].keys.shape[-2]
        if self._cache is None:
            self._cache = seq.kv
            for layer in self._cache.layers:
                shape = (self.capacity,) + tuple(layer.keys.shape[1:])
                keys, values = layer.keys.new_zeros(shape), layer.values.new_zeros(shape)
                keys[slot], values[slot] = layer.keys[0], layer.values[0]
                layer.keys, layer.values = keys, values
            self._pads = [length] * self.capacity
        else:
            width = self._width()
            if length > width:  # widen every row by padding on the left
                grow = length - width
                F = torch.nn.functional
                for layer in self._cache.layers:
                    layer.keys = F.pad(layer.keys, (0, 0, grow, 0))
                    layer.values = F.pad(layer.values, (0, 0, grow, 0))
                self._pads = [p + grow for p in self._pads]
                width = length
            for layer, mine in zip(self._cache.layers, own):
                layer.keys[slot, :, width - length:] = mine.keys[0]
                layer.values[slot, :, width - length:] = mine.values[0]
        self._pads[slot] = self._width() - length
        seq.kv = None

    def _leave(self, seq: Seq) -> None:
        """Free a job's slot; a paused job keeps its KV state to go on from."""
        keep = seq.job.paused and not seq.job.cancelled.is_set()
        if not self._batchable:
            self._slots.remove(seq)
            if not seq.job.paused:
                seq.kv = None
            return
        slot = self._slots.index(seq)
        self._slots[slot] = None
        if seq.kv is not None:  # decoding alone, on its own cache or the lane
            if keep:
                self._own_kv(seq)
            else:
                if seq.kv is self._lane:
                    self._lane.release()
                seq.kv = None
            return
        if keep:
            seq.kv = self._row_kv(slot)
        width = self._width()
        self._pads[slot] = width
        held = [p for p, s in zip(self._pads, self._slots) if s is not None]
        if not held:
            self._cache, self._pads = None, []
            return
        trim = min(held)  # columns that are padding in every row
        if trim:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, trim:]
                layer.values = layer.values[:, :, trim:]
            self._pads = [p - trim for p in self._pads]

    def _drop(self, seq: Seq) -> None:
        if seq in self._slots:
            self._leave(seq)
        seq.kv = None
        self._seqs.remove(seq)
