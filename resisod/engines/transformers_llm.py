"""LLM engine on Hugging Face transformers: a local model directory (or a GGUF file in one).

Generation runs token by token in `model.generate` with a streamer; a stopping criterion
reads the job's cancel flag, so cancellation lands within one token.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Iterator

from .. import builtin
from ..protocol import Code
from .base import Cancelled, Engine, EngineUnavailable, JobControl, JobError
from .llm_common import (IdsText, StopText, chat_messages, finish_stats,
                         shared_answer)
from ..devices import place_torch


def text_decoder(tokenizer: Any) -> IdsText:
    """The generated ids' text as whole characters. Special tokens (the end of a turn) are
    not text; the clean-up of spaces before punctuation is off because it can change text
    already streamed once the next token arrives."""
    return IdsText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False))


class IdStreamer:
    """The new token ids of `model.generate`, handed from its thread to the engine's.

    `generate` calls `put` with the prompt first, then with each step's ids, and `end`
    once (also called when generate fails, so the reader never waits forever)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self._queue.get()) is not None:
            yield ids


class TransformersEngine(Engine):
    kind = "llm"

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
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        except Exception as exc:
            raise EngineUnavailable(f"cannot load the model in {path}: {exc}")
        self.model.to(self.device).eval()
        self.torch = torch

    def unload(self) -> None:
        del self.model
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def _prompt_ids(self, messages: list[dict[str, str]]) -> Any:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok(text, return_tensors="pt").input_ids

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        return shared_answer(self, params, job, lambda: self.generate(params, job))

    def generate(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        from transformers import StoppingCriteria, StoppingCriteriaList
        torch = self.torch
        ids = self._prompt_ids(chat_messages(params)).to(self.device)
        n_prompt = ids.shape[1]
        limit = min(self.domain["context_size"],
                    getattr(self.model.config, "max_position_embeddings", None) or 10**9)
        if n_prompt >= limit:
            raise JobError(Code.CONTEXT_OVERFLOW, f"the prompt is {n_prompt} tokens; the "
                           f"context holds {limit}")

        class CancelFlag(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return job.cancelled.is_set()

        streamer = IdStreamer()
        greedy = params["temperature"] == 0
        gen_kw: dict[str, Any] = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=min(params["max_tokens"], limit - n_prompt),
            do_sample=not greedy, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([CancelFlag()]),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if not greedy:
            gen_kw.update(temperature=params["temperature"], top_p=params["top_p"],
                          top_k=params["top_k"])
        if params["seed"] is not None:
            torch.manual_seed(params["seed"])
        out: dict[str, Any] = {}

        def generate() -> None:
            try:
                with torch.inference_mode():
                    out["ids"] = self.model.generate(**gen_kw)
            except Exception as exc:  # surfaced in the engine thread below
                out["error"] = exc
                streamer.end()

        t0 = time.perf_counter()
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        # ids are decoded here rather than by TextIteratorStreamer, which waits for a space
        # (or a CJK character) before it lets text go and cannot hold back text a stop
        # string will trim
        decoder = text_decoder(self.tokenizer)
        stops = StopText(params["stop"])
        ttft = None

        def emit(piece: str) -> None:
            nonlocal ttft
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                job.emit("token", text=piece)

        for new_ids in streamer:
            job.poll()  # a cancel read here stops generate() at its next token
            if job.cancelled.is_set():
                continue  # drain; generate stops at the next token
            emit(stops.feed(decoder.feed(new_ids)))
            if stops.stopped:
                job.cancelled.set()
        worker.join()
        if "error" in out:
            raise out["error"]
        if job.cancelled.is_set() and not stops.stopped:
            raise Cancelled()
        emit(stops.feed(decoder.finish()))
        emit(stops.flush())
        generated = out["ids"].shape[1] - n_prompt
        finish = "stop" if stops.stopped or generated < gen_kw["max_new_tokens"] \
            else "length"
        return finish_stats(stops.text, finish, n_prompt, int(generated), ttft, t0)
