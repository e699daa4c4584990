"""What every TTS engine shares: sentence streaming, the WAV result, the on-disk cache.

An engine only says how to turn one sentence into 16-bit mono PCM; this base streams one
`audio` event per sentence (so a client can start playing early), writes the WAV, and serves
repeated requests from a bounded least-recently-used cache under the state dir, and from the
cache shared between daemons when one is configured ([cache] backend = "redis").
"""
from __future__ import annotations

import hashlib
import io
import os
import time
import wave
from typing import IO, Any, Iterator

from ..voices import split_sentences
from .base import Engine, JobControl

__all__ = ["SpeechEngine", "SpeechCache", "split_sentences", "read_wav", "write_wav"]


def write_wav(path: str, pcm: bytes, rate: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    os.replace(tmp, path)  # readers never see half a file


def read_wav(path: str | IO[bytes]) -> tuple[bytes, int]:
    with wave.open(path, "rb") as w:
        return w.readframes(w.getnframes()), w.getframerate()


class SpeechCache:
    """Content-addressed WAV files; mtime is the recency, the oldest go when over budget."""

    def __init__(self, directory: str, limit_mb: int):
        self.dir = directory
        self.limit = limit_mb * 1024 * 1024
        os.makedirs(directory, exist_ok=True)

    def key(self, *parts: Any) -> str:
        return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        path = os.path.join(self.dir, key + ".wav")
        try:
            os.utime(path)
            return path
        except FileNotFoundError:
            return None

    def put(self, key: str, pcm: bytes, rate: int) -> None:
        if self.limit <= 0:
            return
        write_wav(os.path.join(self.dir, key + ".wav"), pcm, rate)
        self.evict()

    def evict(self) -> None:
        entries = []
        for name in os.listdir(self.dir):
            try:
                st = os.stat(os.path.join(self.dir, name))
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, name))
        total = sum(e[1] for e in entries)
        for _, size, name in sorted(entries):
            if total <= self.limit:
                break
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
            total -= size


class SpeechEngine(Engine):
    kind = "tts"
    sample_rate = 22050

    def voice_id(self, params: dict[str, Any]) -> str:
        """The voice a request names, checked; raise JobError(bad_request) if unknown."""
        return params["voice"]

    def voice_name(self, voice: str) -> str:
        """The name of the voice that spoke, for the result ("" is the domain's default)."""
        return voice or self.domain["voice"] or self.domain["model"].removeprefix("builtin:")

    def cached(self, cache: SpeechCache, key: str) -> tuple[bytes, int] | None:
        """The audio for `key` from the disk cache, else from the cache shared between
        daemons (then copied to disk, which spares Redis the next time)."""
        path = cache.get(key)
        if path is not None:
            return read_wav(path)
        data = self.ctx.shared_cache.get(key) if self.ctx.shared_cache is not None else None
        if data is None:
            return None
        try:
            pcm, rate = read_wav(io.BytesIO(data))
        except (wave.Error, EOFError):
            return None  # not a WAV (another program's key?): synthesize instead
        cache.put(key, pcm, rate)
        return pcm, rate

    def sentences(self, text: str, voice: str, speed: float,
                  job: JobControl) -> Iterator[bytes]:
        """16-bit mono PCM at `sample_rate`, one chunk per sentence."""
        raise NotImplementedError

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        t0 = time.perf_counter()
        voice = self.voice_id(params)
        cache = SpeechCache(os.path.join(self.ctx.state_dir, "tts-cache"),
                            self.domain["cache_mb"])
        key = cache.key(self.domain["engine"], self.domain["model"], voice, params["speed"],
                        params["text"])
        out = os.path.join(self.ctx.results_dir, f"{job.task_id}.wav")
        shared = self.ctx.shared_cache
        hit = self.cached(cache, key)
        if hit is not None:
            pcm, rate = hit
            job.emit("audio", pcm=pcm, sample_rate=rate, index=0)
            write_wav(out, pcm, rate)
            n_chunks = 1
        else:
            chunks = []
            rate = self.sample_rate
            for i, pcm in enumerate(self.sentences(params["text"], voice, params["speed"], job)):
                job.checkpoint()
                chunks.append(pcm)
                job.emit("audio", pcm=pcm, sample_rate=rate, index=i)
            pcm = b"".join(chunks)
            n_chunks = len(chunks)
            write_wav(out, pcm, rate)
            cache.put(key, pcm, rate)
            if shared is not None:
                with open(out, "rb") as f:
                    shared.put(key, f.read())
        return {
            "audio_path": out, "duration_ms": round(len(pcm) / 2 / rate * 1000, 1),
            "size_bytes": os.path.getsize(out), "sample_rate": rate,
            "generation_time_ms": round((time.perf_counter() - t0) * 1000, 2),
            "cached": hit is not None, "voice": self.voice_name(voice),
            "chunks": n_chunks,
        }
