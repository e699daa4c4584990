"""LLM engine on Hugging Face transformers: a local model directory (or a GGUF file in one).

Generation runs token by token in `model.generate` with a streamer; a stopping criterion
reads the job's cancel flag, so cancellation lands within one token.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from .. import builtin
from ..protocol import Code
from .base import Cancelled, Engine, EngineUnavailable, JobControl, JobError
from .llm_common import chat_messages, finish_stats
from ..devices import place_torch


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
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
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

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
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
        text, ttft, n, stopped_by = [], None, 0, None
        for piece in streamer:
            job.poll()  # a cancel read here stops generate() at its next token
            if not piece:
                continue
            if job.cancelled.is_set():
                continue  # drain; generate stops at the next token
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(piece)
            n += 1
            job.emit("token", text=piece)
            joined = "".join(text)
            hit = next((s for s in params["stop"] if s in joined), None)
            if hit:
                stopped_by = joined[:joined.index(hit)]
                job.cancelled.set()
        worker.join()
        if "error" in out:
            raise out["error"]
        if job.cancelled.is_set() and stopped_by is None:
            raise Cancelled()
        generated = out["ids"].shape[1] - n_prompt
        finish = "stop" if stopped_by is not None or generated < gen_kw["max_new_tokens"] \
            else "length"
        result = stopped_by if stopped_by is not None else "".join(text)
        return finish_stats(result, finish, n_prompt, int(generated), ttft, t0)
