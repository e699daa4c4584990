"""LLM engine on llama-cpp-python: GGUF models, chat template from the model, token streaming."""
from __future__ import annotations

import os
import time
from typing import Any

from .. import builtin
from ..protocol import Code
from .base import Engine, EngineUnavailable, JobControl, JobError
from .llm_common import (StopText, Utf8Text, chat_messages, finish_stats,
                         shared_answer)


class LlamaCppEngine(Engine):
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
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise EngineUnavailable(f"llama-cpp-python is not installed: {exc}")
        gpu_layers = 0
        if self.ctx.device != "cpu" and llama_cpp.llama_supports_gpu_offload():
            # the domain's GPU share bounds what we offload only through the layer count;
            # llama.cpp has no per-process memory fraction
            gpu_layers = self.domain["gpu_layers"]
        try:
            self.llm = llama_cpp.Llama(
                model_path=path, n_ctx=self.domain["context_size"],
                n_threads=self.ctx.threads, n_threads_batch=self.ctx.threads,
                n_gpu_layers=gpu_layers, verbose=False)
        except Exception as exc:  # llama.cpp reports unreadable files as ValueError
            raise EngineUnavailable(f"cannot load {path}: {exc}")
        self.path = path
        template = self.llm.metadata.get("tokenizer.chat_template")
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        eos_text = self.llm._model.token_get_text(eos) if eos != -1 else ""
        bos_text = self.llm._model.token_get_text(bos) if bos != -1 else ""
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text,
                                             bos_token=bos_text) if template else None
        self.eos_id = eos
        vocab = self.llm._model.vocab
        self.is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    def unload(self) -> None:
        self.llm.close()
        del self.llm

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        if self.formatter is not None:
            res = self.formatter(messages=messages)
            text, stop, special = res.prompt, res.stop or [], res.added_special
        else:  # a model without a template: plain role-prefixed turns
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            stop, special = ["\nuser:"], False
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=not special, special=True)
        return tokens, list(stop) if isinstance(stop, list) else [stop]

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        return shared_answer(self, params, job, lambda: self.generate(params, job))

    def generate(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        messages = chat_messages(params)
        tokens, template_stop = self._prompt_tokens(messages)
        n_ctx = self.llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise JobError(Code.CONTEXT_OVERFLOW, f"the prompt is {len(tokens)} tokens; the "
                           f"context holds {n_ctx} (domains.<name>.context_size)")
        max_tokens = min(params["max_tokens"], n_ctx - len(tokens))
        greedy = params["temperature"] == 0
        if greedy or params["seed"] is not None:
            # reusing the cached prompt prefix evaluates the prompt in different batches,
            # which moves logits by rounding error: a repeatable answer needs a clean context
            self.llm.reset()
        t0 = time.perf_counter()
        # the token loop is ours rather than create_completion's stream: that one decodes the
        # tokens it still holds back at the end one at a time with errors="ignore", which
        # loses a character split across them (say, the start of a Chinese stop string).
        # The sampler settings are the ones create_completion passes: answers stay the same.
        self.llm.set_seed(params["seed"] if params["seed"] is not None else -1)
        gen = self.llm.generate(
            tokens, temp=params["temperature"], top_p=1.0 if greedy else params["top_p"],
            top_k=1 if greedy else params["top_k"], min_p=0.05, typical_p=1.0,
            repeat_penalty=1.0)
        utf8, out = Utf8Text(), StopText(params["stop"] + template_stop)
        n, ttft, finish = 0, None, "length"
        try:
            for token in gen:
                job.checkpoint()
                if self.is_eog(token):
                    finish = "stop"
                    break
                n += 1
                piece = out.feed(utf8.feed(self.llm.detokenize([token])))
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    job.emit("token", text=piece)
                if out.stopped:
                    finish = "stop"
                    break
                if n >= max_tokens:
                    break
        finally:
            gen.close()
        # bytes of a character max_tokens cut short stay out of the answer (utf8 holds them)
        piece = out.flush()
        if piece:
            if ttft is None:
                ttft = time.perf_counter() - t0
            job.emit("token", text=piece)
        return finish_stats(out.text, finish, len(tokens), n, ttft, t0)
