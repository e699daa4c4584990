"""TTS engine on the espeak-ng program (formant synthesis, very fast, robotic)."""
from __future__ import annotations

import io
import shutil
import subprocess
import wave
from typing import Any, Iterator

from ..protocol import Code
from .base import EngineUnavailable, JobControl, JobError
from ..voices import language_of_name
from .speech import SpeechEngine, split_sentences

BASE_WPM = 175
# espeak-ng's voice for each language the router knows by name
ESPEAK_VOICE = {"zh": "cmn", "yue": "yue", "en": "en-us", "ja": "ja", "ko": "ko"}


class EspeakEngine(SpeechEngine):
    def load(self) -> None:
        self.exe = shutil.which("espeak-ng") or shutil.which("espeak")
        if not self.exe:
            raise EngineUnavailable("espeak-ng is not installed (apt-get install espeak-ng)")
        out = subprocess.run([self.exe, "--voices"], capture_output=True, text=True,
                             timeout=30).stdout
        # columns: Pty Language Age/Gender VoiceName File Other
        self.voices = {line.split()[1] for line in out.splitlines()[1:] if line.split()}
        self.voices |= {line.split()[3] for line in out.splitlines()[1:]
                        if len(line.split()) > 3}
        self.default = self.resolve(self.domain["voice"] or self.domain["model"] or "en-us")
        self.sample_rate = 22050

    def resolve(self, voice: str) -> str:
        """espeak-ng's name for a voice given as a locale or language (`zh-CN` -> cmn)."""
        if voice in self.voices:
            return voice
        return ESPEAK_VOICE.get(language_of_name(voice) or "", voice)

    def voice_id(self, params: dict[str, Any]) -> str:
        voice = self.resolve(params["voice"]) if params["voice"] else self.default
        if voice not in self.voices and voice != self.default:
            raise JobError(Code.BAD_REQUEST, f"unknown voice {voice!r}; see `espeak-ng "
                           f"--voices` for the {len(self.voices)} installed")
        return voice

    def sentences(self, text: str, voice: str, speed: float,
                  job: JobControl) -> Iterator[bytes]:
        for sentence in split_sentences(text):
            wav = subprocess.run([self.exe, "-v", voice, "-s", str(int(BASE_WPM * speed)),
                                  "--stdout", sentence], capture_output=True, check=True,
                                 timeout=60).stdout
            with wave.open(io.BytesIO(wav)) as w:
                self.sample_rate = w.getframerate()
                yield w.readframes(w.getnframes())
            job.checkpoint()
