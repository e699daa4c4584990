"""TTS engine on Piper (ONNX voices), with onnxruntime threads bounded by the domain."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from .. import builtin
from ..protocol import Code
from .base import EngineUnavailable, JobControl, JobError
from .speech import SpeechEngine


class PiperEngine(SpeechEngine):
    def load(self) -> None:
        try:
            model = builtin.voice_path(self.domain["model"])
        except builtin.BuiltinMissing as exc:
            raise EngineUnavailable(str(exc))
        config = self.domain["config_path"] or model + ".json"
        for path in (model, config):
            if not os.path.isfile(path):
                raise EngineUnavailable(f"voice file {path} does not exist")
        try:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig, SynthesisConfig
        except ImportError as exc:
            raise EngineUnavailable(f"piper-tts is not installed: {exc}")
        opts = onnxruntime.SessionOptions()
        # bound onnxruntime's pools to the domain's cores, or it takes every core it sees
        opts.intra_op_num_threads = self.ctx.threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if self.ctx.device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        with open(config, encoding="utf-8") as f:
            cfg = PiperConfig.from_dict(json.load(f))
        self.voice = PiperVoice(config=cfg, session=onnxruntime.InferenceSession(
            model, sess_options=opts, providers=providers))
        self.SynthesisConfig = SynthesisConfig
        self.sample_rate = cfg.sample_rate
        name = os.path.basename(model)[:-len(".onnx")] if model.endswith(".onnx") else model
        self.names = {"", name, self.domain["model"], self.domain["voice"]}
        self.speakers = dict(cfg.speaker_id_map or {})

    def voice_id(self, params: dict[str, Any]) -> str:
        voice = params["voice"]
        if voice in self.names or voice in self.speakers:
            return voice
        known = sorted(n for n in (self.names | set(self.speakers)) if n)
        raise JobError(Code.BAD_REQUEST, f"unknown voice {voice!r}; this domain has: "
                       f"{', '.join(known)}")

    def sentences(self, text: str, voice: str, speed: float,
                  job: JobControl) -> Iterator[bytes]:
        base = self.voice.config.length_scale or 1.0
        syn = self.SynthesisConfig(length_scale=base / speed,
                                   speaker_id=self.speakers.get(voice))
        for chunk in self.voice.synthesize(text, syn_config=syn):
            yield chunk.audio_int16_bytes
            job.checkpoint()
