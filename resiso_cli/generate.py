"""`resiso llm`, `resiso tts`, `resiso image`, `resiso submit`: submit work and stream it."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Optional

import typer

from . import output
from .session import connected

if TYPE_CHECKING:  # imported where a command connects: `resiso --help` needs neither
    from .client import Client, JobStream


def _read_arg(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def llm(
    prompt: str = typer.Argument(..., help="The prompt; '-' reads it from stdin."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (repeatable output)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop sequence (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", help="Served model name."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Domain to run in."),
    priority: Optional[str] = typer.Option(None, "--priority", help="realtime|normal|batch"),
    timeout_ms: Optional[int] = typer.Option(None, "--timeout-ms", help="Deadline for the job."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
) -> None:
    """Generate text, printing tokens as they arrive. Ctrl-C cancels the job."""
    params: dict[str, Any] = {"prompt": _read_arg(prompt)}
    for key, value in (("system", system), ("max_tokens", max_tokens),
                       ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                       ("seed", seed), ("model", model)):
        if value is not None:
            params[key] = value
    if stop:
        params["stop"] = stop
    with connected(as_json) as client:
        stream = client.submit("llm", params, domain=domain, priority=priority,
                               timeout_ms=timeout_ms)
        printed = False
        try:
            for ev in stream:
                if ev["event"] == "token" and not as_json:
                    sys.stdout.write(ev.get("text", ""))
                    sys.stdout.flush()
                    printed = True
                elif ev["event"] == "queued" and ev.get("retry") and not as_json:
                    output.err.print(f"\n[yellow]{ev.get('reason')}[/]")
        except KeyboardInterrupt:
            _cancel_on_interrupt(client, stream)
        if printed:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise SystemExit(output.report_final(stream.final, as_json))


def _cancel_on_interrupt(client: Client, stream: JobStream) -> None:
    output.err.print(f"\ncancelling {stream.task_id}")
    try:
        client.cancel(stream.task_id)
    except Exception:
        pass
    output.err.print(f"{stream.task_id} cancelled")
    raise SystemExit(output.FAILED)


def tts(
    text: str = typer.Argument(..., help="Text to speak; '-' reads it from stdin."),
    out: Optional[str] = typer.Option(None, "--out", "-o",
                                      help="WAV file to write ('-' = stdout); "
                                           "default ./<task_id>.wav"),
    voice: Optional[str] = typer.Option(None, "--voice"),
    speed: Optional[float] = typer.Option(None, "--speed", help="0.25-4, 1 = normal."),
    domain: Optional[str] = typer.Option(None, "--domain"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Synthesize speech to a WAV file; audio streams sentence by sentence."""
    params: dict[str, Any] = {"text": _read_arg(text)}
    if voice is not None:
        params["voice"] = voice
    if speed is not None:
        params["speed"] = speed
    with connected(as_json) as client:
        stream = client.submit("tts", params, domain=domain)
        pcm, rate = bytearray(), None
        try:
            for ev in stream:
                if ev["event"] == "audio":
                    pcm += ev["pcm"]
                    rate = ev.get("sample_rate", rate)
        except KeyboardInterrupt:
            _cancel_on_interrupt(client, stream)
        final = stream.final
        if final.get("event") == "result":
            rate = rate or final.get("sample_rate") or 22050
            path = out or f"./{stream.task_id}.wav"
            data = _wav_bytes(bytes(pcm), rate)
            if path == "-":
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            else:
                with open(path, "wb") as f:
                    f.write(data)
                final = {**final, "out": os.path.abspath(path)}
                if not as_json:
                    print(os.path.abspath(path))
        raise SystemExit(output.report_final(final, as_json and out != "-"))


def _wav_bytes(pcm: bytes, rate: int) -> bytes:
    import io
    import wave
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def image(
    prompt: str = typer.Argument(..., help="What to draw; '-' reads it from stdin."),
    width: Optional[int] = typer.Option(None, "--width"),
    height: Optional[int] = typer.Option(None, "--height"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale."),
    turbo: bool = typer.Option(False, "--turbo", help="Turbo model: no guidance, few steps."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="PNG to write; "
                                      "default ./<task_id>.png"),
    watch: Optional[bool] = typer.Option(None, "--watch/--no-wait",
                                         help="Show progress and save (default when stderr is "
                                              "a terminal) / print the task id and return."),
    domain: Optional[str] = typer.Option(None, "--domain"),
    priority: Optional[str] = typer.Option(None, "--priority"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate an image. Ctrl-C while watching detaches; the job keeps running."""
    params: dict[str, Any] = {"prompt": _read_arg(prompt), "use_turbo": turbo}
    for key, value in (("width", width), ("height", height), ("steps", steps), ("seed", seed),
                       ("negative_prompt", negative), ("guidance_scale", guidance)):
        if value is not None:
            params[key] = value
    no_wait = watch is False
    with connected(as_json) as client:
        stream = client.submit("image", params, domain=domain, priority=priority,
                               stream=not no_wait)
        if no_wait:
            acc = stream.accepted
            if as_json:
                output.print_json({k: acc.get(k) for k in
                                   ("task_id", "status", "position", "estimated_time_ms")})
            else:
                print(stream.task_id)
            raise SystemExit(output.OK)
        show_bar = watch is True or (watch is None and output.stderr_is_tty())
        raise SystemExit(follow_image(client, stream, out, show_bar, as_json))


def follow_image(client: Client, stream: JobStream, out: Optional[str], show_bar: bool,
                 as_json: bool, save: bool = True) -> int:
    from .progress import StepProgress
    try:
        if show_bar:
            with StepProgress(stream.task_id or "image") as bar:
                for ev in stream:
                    bar.update(ev)
        else:
            stream.wait()
    except KeyboardInterrupt:
        output.err.print(f"\ndetached from {stream.task_id}; it keeps running. "
                         f"Follow it with: resiso watch {stream.task_id}")
        return output.OK
    final = stream.final
    if final.get("event") == "result" and save:
        final = {**final, "out": save_result(client, stream.task_id,
                                             out or f"./{stream.task_id}.png")}
        if not as_json:
            print(final["out"])
    return output.report_final(final, as_json)


def save_result(client: Client, task_id: str, path: str) -> str:
    data = client.get(task_id, data=True).get("data")
    if data is None:
        output.fail(output.FAILED, f"{task_id} has no result file")
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return "-"
    with open(path, "wb") as f:
        f.write(data)
    return os.path.abspath(path)


def submit(
    domain: str = typer.Argument(..., help="Domain name (see `resiso status`)."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p",
                                              help="key=value (JSON values allowed)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the task id and return."),
    priority: Optional[str] = typer.Option(None, "--priority"),
    timeout_ms: Optional[int] = typer.Option(None, "--timeout-ms"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Submit a job to any domain with raw parameters and wait for its result."""
    import json
    params: dict[str, Any] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            output.fail(output.USAGE, f"--param wants key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    with connected(as_json) as client:
        stream = client.submit("", params, domain=domain, priority=priority,
                               timeout_ms=timeout_ms, stream=not no_wait)
        if no_wait:
            print(stream.task_id)
            raise SystemExit(output.OK)
        final = stream.wait()
        if not as_json and final.get("event") == "result":
            print(final.get("result", final.get("status")))
        raise SystemExit(output.report_final(final, as_json))
