"""TTS engine on Coqui TTS (`coqui-tts`, import name `TTS`): a local checkpoint + config.

`model` is the checkpoint file (or a directory holding `model.pth`/`best_model.pth` and
`config.json`); `config_path` overrides where the config is. Loading goes through Coqui's own
`TTS.api.TTS(model_path=..., config_path=...)`.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from .base import EngineUnavailable, JobControl
from .speech import SpeechEngine, split_sentences


def _checkpoint(model: str) -> str:
    if os.path.isdir(model):
        for name in ("model.pth", "best_model.pth", "model_file.pth", "checkpoint.pth"):
            if os.path.isfile(os.path.join(model, name)):
                return os.path.join(model, name)
        raise EngineUnavailable(f"no checkpoint (model.pth / best_model.pth) in {model}")
    if not os.path.isfile(model):
        raise EngineUnavailable(f"checkpoint {model} does not exist")
    return model


class CoquiEngine(SpeechEngine):
    def load(self) -> None:
        model = os.path.expanduser(self.domain["model"])
        checkpoint = _checkpoint(model)
        config = self.domain["config_path"] or os.path.join(os.path.dirname(checkpoint),
                                                            "config.json")
        if not os.path.isfile(config):
            raise EngineUnavailable(f"Coqui config {config} does not exist")
        try:
            import torch
            torch.set_num_threads(self.ctx.threads)
            from TTS.api import TTS
        except Exception as exc:  # Coqui's import chain fails in many ways (torchaudio, ...)
            raise EngineUnavailable(f"Coqui TTS cannot be imported: "
                                    f"{type(exc).__name__}: {exc}")
        gpu = self.ctx.device == "cuda"
        self.tts = TTS(model_path=checkpoint, config_path=config)
        if gpu:
            self.tts.to("cuda")
        self.sample_rate = int(self.tts.synthesizer.output_sample_rate)
        self.model = self.tts.synthesizer.tts_model
        self.base_length = getattr(self.model, "length_scale", 1.0)

    def sentences(self, text: str, voice: str, speed: float,
                  job: JobControl) -> Iterator[bytes]:
        import numpy as np
        if hasattr(self.model, "length_scale"):
            self.model.length_scale = self.base_length / speed
        kw: dict[str, Any] = {}
        if voice and getattr(self.tts, "is_multi_speaker", False):
            kw["speaker"] = voice
        for sentence in split_sentences(text):
            wav = np.asarray(self.tts.tts(text=sentence, **kw), dtype=np.float32)
            peak = float(np.abs(wav).max()) if wav.size else 0.0
            if peak > 1.0:
                wav = wav / peak
            yield (wav * 32767).astype("<i2").tobytes()
            job.checkpoint()
