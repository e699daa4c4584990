"""GPU as the first-class target: real-size models with random weights, resiso vs the raw
libraries, measured in the same run.

Models (built once with random weights, cached under --cache, default build/bench-models/):
  llm  LlamaForCausalLM, ~1.4B parameters (hidden 1536, 28 layers, 12 heads, 2 KV heads,
       intermediate 8960, untied head), SmolLM2's tokenizer (vocab 49152); bf16 on CUDA
  sd   an SD 1.5-size pipeline (UNet ~860M, CLIP text encoder 12 x 768, VAE 128-512), its
       random weights scaled by 0.5 so fp16 activations stay finite; fp16, 512x512
Phases (one daemon per [resources] setting; ratios against numbers of this run only):
  LLM alone    TTFT p50/p95 and decode tok/s: resiso vs `model.generate` in this process (same
               model directory, dtype, prompts, greedy, run for run interleaved); on a GPU also
               `generate` on a static KV cache, compiled, the fast raw path that resiso's
               worker (compile = "auto": static cache + torch.compile on CUDA) must keep 0.9x of
  image alone  steps/min over a window of jobs back to back: resiso vs the pipeline called here
  together     chats while images render back to back, with preemption "adaptive", "always"
               and isolation = false under CUDA time-slicing (gpu_compute = "timeslice"), and
               with adaptive preemption under NVIDIA MPS (gpu_compute = "mps": each worker
               capped at its gpu_allocation share of the SMs, LLM 70 %, image 30 %): TTFT
               p95 and tok/s vs LLM alone, steps/min vs image alone. Where MPS is not in
               effect (no GPU, no nvidia-cuda-mps-control, a failed start), the MPS row says
               so and why, and is not measured
  OOM          an image far over the image worker's VRAM budget (16384x16384) must end with
               `gpu_oom`, and the next image must succeed
--small runs the same code on the CPU with tiny shapes (64x64, few steps, few chats). A CPU
cannot run out of GPU memory, so there the OOM case is a `null` domain job with `oom_mb` (the
worker gets torch's own OutOfMemoryError), and the output says so; its numbers only show that
the code path works. Without --small and without a GPU, it says so, runs --small instead and
exits 0. Exit 1 when the OOM check fails. Tables go to stdout, phase timings to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
               ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)  # quiet libraries here and in the daemon's workers
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, Daemon, StepLoop, cached_dir, median, pct, ready_daemon,  # noqa: E402
                    table, timed_chat)
from resiso_cli.client import Client, Rejected  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three kinds of trees.",
           "Explain what a CPU does in two sentences.", "Write a haiku about the sea.",
           "Give me a tip for learning to cook.", "Why is the sky blue?"]
GUIDANCE = 7.5  # classifier-free guidance, as SD 1.5 is run: two UNet rows per step
OOM_SIDE = 16384  # latents 2048x2048: one activation of the first block is ~5 GiB in fp16

# the shapes: SD 1.5's UNet, CLIP text encoder and VAE, or tiny ones for --small
FULL = {"name": "full", "llm": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                    num_key_value_heads=2, intermediate_size=8960),
        "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=768, norm_num_groups=32, sample_size=64,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, vocab_size=49408),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    norm_num_groups=32, sample_size=512),
        "side": 512, "steps": 20, "max_tokens": 64, "rounds": 12, "chats": 16, "think_s": 0.3,
        "settle_s": 3.0, "window_s": 20.0}
SMALL = {"name": "small", "llm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128),
         "unet": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                      norm_num_groups=16, sample_size=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
         "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, vocab_size=0),
         "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     sample_size=64),
         "side": 64, "steps": 4, "max_tokens": 16, "rounds": 4, "chats": 5, "think_s": 0.1,
         "settle_s": 0.3, "window_s": 1.5}


# -- models --------------------------------------------------------------------------------

def params_of(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build_llm(out: str, sh: dict, device: str, dtype) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from resisod import builtin
    gguf = builtin.llm_path("builtin:smollm2-135m-instruct")  # its tokenizer, as tests use it
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **sh["llm"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"params": params_of(model)}, f)


def build_sd(out: str, sh: dict, device: str, dtype) -> None:
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel
    from resisod.engines.tiny_sd import char_clip_tokenizer
    with tempfile.TemporaryDirectory() as src:
        tokenizer, vocab = char_clip_tokenizer(src)
    torch.manual_seed(0)
    clip = {**sh["clip"], "vocab_size": max(sh["clip"]["vocab_size"], len(vocab))}
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(
            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **clip))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, attention_head_dim=8,
                                    **sh["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, **sh["vae"])
    with torch.no_grad():
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.mul_(0.5)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype).save_pretrained(out)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"params": params_of(unet), "text_params": params_of(text),
                   "vae_params": params_of(vae)}, f)


# -- measuring -----------------------------------------------------------------------------

def prompt_ids(tok, prompt: str) -> list[int]:
    """The prompt as the transformers engine builds it (chat template, no extra specials)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False).input_ids)


def raw_chat(model, tok, torch, prompt: str, n: int, static: bool = False
             ) -> tuple[float, float]:
    """`generate` in this process: TTFT and decode tok/s from when each new token arrives;
    `static`: on a static KV cache, which `generate` compiles (the fast path on a GPU)."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt = True

        def put(self, value):  # the first call carries the prompt; then one per new token
            if self.prompt:
                self.prompt = False
            else:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids(tok, prompt)], device=model.device)
    s = Stamps()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                   min_new_tokens=n, do_sample=False, streamer=s, pad_token_id=tok.eos_token_id,
                   **({"cache_implementation": "static"} if static else {}))
    return (s.times[0] - t0) * 1000, (len(s.times) - 1) / (s.times[-1] - s.times[0])


def resiso_image(socket: str, side: int, steps: int):
    def job(n: int, loop: StepLoop) -> None:
        with Client(socket) as c:
            s = c.submit("image", {"prompt": f"a lighthouse {n}", "steps": steps, "width": side,
                                   "height": side, "guidance_scale": GUIDANCE, "seed": n})
            cancelled = False
            for ev in s:
                if ev["event"] == "progress":
                    loop.steps.append(time.monotonic())
                    if loop.stop.is_set() and not cancelled:
                        cancelled = True
                        try:
                            c.cancel(s.task_id)
                        except Rejected:
                            pass  # it ended meanwhile
            if s.final["event"] == "error" and s.final.get("code") != "cancelled":
                loop.errors.append(s.final)
    return job


def raw_image(pipe, torch, side: int, steps: int):
    def job(n: int, loop: StepLoop) -> None:
        def on_step(p, i, t, kw):
            loop.steps.append(time.monotonic())
            if loop.stop.is_set():
                p._interrupt = True  # the remaining steps (and nothing else) are skipped
            return kw
        with torch.inference_mode():
            pipe(prompt=f"a lighthouse {n}", width=side, height=side, num_inference_steps=steps,
                 guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(n),
                 callback_on_step_end=on_step)
    return job


def config(sh: dict, llm: str, sd: str, gpu: bool, preemption: str, isolation: bool,
           compute: str = "timeslice") -> str:
    dev = "cuda" if gpu else "cpu"
    return f"""
    [resources]
    isolation = {str(isolation).lower()}
    preemption = "{preemption}"
    gpu_compute = "{compute}"
    [domains.llm]
    kind = "llm"
    engine = "transformers"
    model = "{llm}"
    device = "{dev}"
    dtype = "{'bf16' if gpu else 'fp32'}"
    priority = "realtime"
    [domains.image]
    kind = "image"
    engine = "diffusers"
    model = "{sd}"
    device = "{dev}"
    dtype = "{'fp16' if gpu else 'fp32'}"
    priority = "batch"
    preemptible = true
    default_width = {sh['side']}
    default_height = {sh['side']}
    default_steps = {sh['steps']}
    max_side = {OOM_SIDE}
    """ + ("" if gpu else '    [domains.null]\n    kind = "null"\n')


def worker_place(c: Client, domain: str) -> tuple[set[int], int]:
    w = c.status()["domains"][domain]["workers"][0]
    return set(w["cpus"]) or set(range(os.cpu_count() or 1)), w["threads"] or 1


def chat(c: Client, prompt: str, n: int) -> tuple[float, float]:
    return timed_chat(c, {"prompt": prompt, "temperature": 0, "max_tokens": n})


def llm_alone(c: Client, sh: dict, llm_dir: str, dev: str, dt, torch) -> dict:
    """resiso vs `generate`, run for run interleaved; the raw side on the LLM worker's cores
    and thread count, the client off them (as in bench/llm.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dt).to(dev).eval()
    cpus, threads = worker_place(c, "llm")
    torch.set_num_threads(threads)
    every = set(range(os.cpu_count() or 1))
    # on a GPU the fast raw path too: generate on a static cache, compiled (the worker's
    # engine compiles its own lone-job decode the same way, compile = "auto")
    static = dev == "cuda"
    runs: dict[str, list] = {"raw": [], "resiso": [], "static": []}
    if static:
        os.sched_setaffinity(0, cpus)
        for _ in range(2):  # compiles, for the longest prompt: a new size would compile again
            raw_chat(model, tok, torch, max(PROMPTS, key=len), sh["max_tokens"], static=True)
    for i in range(sh["rounds"] + 1):  # round 0 warms both up and is not counted
        p = PROMPTS[i % len(PROMPTS)]
        os.sched_setaffinity(0, cpus)
        r = raw_chat(model, tok, torch, p, sh["max_tokens"])
        f = raw_chat(model, tok, torch, p, sh["max_tokens"], static=True) if static else None
        os.sched_setaffinity(0, (every - cpus) or every)
        q = chat(c, p, sh["max_tokens"])
        if i:
            runs["raw"].append(r)
            runs["resiso"].append(q)
            if f is not None:
                runs["static"].append(f)
    os.sched_setaffinity(0, every)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    out = {k: tuple(list(x) for x in zip(*v)) for k, v in runs.items() if v}
    out["runs_on"] = c.status()["domains"]["llm"]["workers"][0].get("runs_on")
    return out


def image_alone(d: Daemon, c: Client, sh: dict, sd_dir: str, dev: str, dt, torch) -> dict:
    """Steps/min of jobs back to back over windows of the same length: the pipeline here (on
    the image worker's cores and thread count), then resiso."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog
    dlog.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, torch_dtype=dt).to(dev)
    pipe.set_progress_bar_config(disable=True)
    cpus, threads = worker_place(c, "image")
    torch.set_num_threads(threads)
    raw, _ = StepLoop(raw_image(pipe, torch, sh["side"], sh["steps"]), cpus).window(
        sh["settle_s"], sh["window_s"])
    del pipe
    if dev == "cuda":
        torch.cuda.empty_cache()
    res, _ = StepLoop(resiso_image(d.socket, sh["side"], sh["steps"])).window(
        sh["settle_s"], sh["window_s"])
    return {"raw": raw, "resiso": res}


def together(d: Daemon, c: Client, sh: dict) -> dict:
    """Chats (with a pause between them) while images render back to back."""
    def chats() -> list[tuple[float, float]]:
        runs = []
        for i in range(sh["chats"]):
            runs.append(chat(c, PROMPTS[i % len(PROMPTS)], sh["max_tokens"]))
            time.sleep(sh["think_s"])
        return runs
    rate, runs = StepLoop(resiso_image(d.socket, sh["side"], sh["steps"])).window(
        sh["settle_s"], during=chats)
    return {"ttft": [r[0] for r in runs], "tps": [r[1] for r in runs], "steps": rate,
            "preemptions": c.status()["domains"]["image"]["preemptions"]}


def oom_case(c: Client, sh: dict, gpu: bool) -> tuple[list, bool]:
    if gpu:
        what = f"image {OOM_SIDE}x{OOM_SIDE}, 1 step, on cuda"
        bad = c.run("image", {"prompt": "too big", "width": OOM_SIDE, "height": OOM_SIDE,
                              "steps": 1}, timeout_ms=300000)
        nxt = c.run("image", {"prompt": "after", "steps": sh["steps"]}, timeout_ms=300000)
    else:
        what = 'null job {"oom_mb": 100000} (simulated: no GPU under --small)'
        bad, nxt = c.run("null", {"oom_mb": 100000}), c.run("null", {"steps": 1})
    ok = bad.get("code") == "gpu_oom" and nxt["event"] == "result"
    print(f"gpu_oom case: {what} -> {bad['event']} {bad.get('code')}: "
          f"{bad.get('message', '')[:160]}; next request -> {nxt['event']}")
    return [what, f"{bad['event']} {bad.get('code', '')}", nxt["event"], "ok" if ok else "FAIL"], ok


# key, row label, preemption, isolation, gpu_compute
SETUPS = (("adaptive", 'together, preemption "adaptive"', "adaptive", True, "timeslice"),
          ("always", 'together, preemption "always"', "always", True, "timeslice"),
          ("off", "together, isolation = false", "adaptive", False, "timeslice"),
          ("mps", 'together, gpu_compute "mps", preemption "adaptive"', "adaptive", True,
           "mps"))


def report(out: dict, meta: dict, sh: dict, dev: str) -> None:
    (rt, rs), (qt, qs) = out["llm"]["raw"], out["llm"]["resiso"]
    ir, iq = out["image"]["raw"], out["image"]["resiso"]
    print(table(
        f"LLM alone: {meta['llm']['params'] / 1e9:.2f}B random-weight Llama on {dev}, greedy, "
        f"{sh['max_tokens']} tokens, {len(rt)} runs each",
        ["path", "TTFT p50 ms", "TTFT p95 ms", "decode tok/s p50", "TTFT p50 ratio",
         "tok/s ratio"],
        [["model.generate in-process", pct(rt, .5), pct(rt, .95), median(rs), "1.00", "1.00"]]
        + ([["model.generate, static cache + compiled", pct(out["llm"]["static"][0], .5),
             pct(out["llm"]["static"][0], .95), median(out["llm"]["static"][1]),
             f"{pct(out['llm']['static'][0], .5) / pct(rt, .5):.2f}",
             f"{median(out['llm']['static'][1]) / median(rs):.2f}"]]
           if "static" in out["llm"] else [])
        + [["resiso (daemon + worker)", pct(qt, .5), pct(qt, .95), median(qs),
            f"{pct(qt, .5) / pct(rt, .5):.2f}", f"{median(qs) / median(rs):.2f}"]]))
    print(f"resiso's LLM worker decodes on: {out['llm']['runs_on']}")
    if "static" in out["llm"]:
        fast = median(out["llm"]["static"][1])
        print(f"target (GPU): resiso decode tok/s >= 0.90x static compiled generate -> "
              f"{median(qs) / fast:.2f}")
    print("\n" + table(
        f"Image alone: SD 1.5-shaped pipeline on {dev}, {sh['side']}x{sh['side']}, "
        f"{sh['steps']} steps, guidance {GUIDANCE}, jobs back to back for {sh['window_s']:g} s",
        ["path", "steps/min", "ratio"], [["pipeline called in-process", f"{ir:.0f}", "1.00"],
                                         ["resiso (daemon + worker)", f"{iq:.0f}",
                                          f"{iq / ir:.2f}"]]))
    rows = [["alone (resiso)", pct(qt, .95), "1.00", median(qs), "1.00", f"{iq:.0f}", "1.00",
             "-"]]
    notes = []
    for key, label, _, _, asked in SETUPS:
        compute = out[key]["compute"]
        if asked == "mps" and compute["mode"] != "mps":
            # MPS asked, time-slicing had: a measured row would pass one for the other
            rows.append([f"{label}: MPS not in effect"] + ["-"] * 7)
            notes.append(f"{label}: MPS not in effect ({compute['reason']}); the daemon "
                         f"ran under time-slicing, so this row was not measured")
            continue
        t, s, st = out[key]["ttft"], out[key]["tps"], out[key]["steps"]
        rows.append([label, pct(t, .95), f"{pct(t, .95) / pct(qt, .95):.2f}", median(s),
                     f"{median(s) / median(qs):.2f}", f"{st:.0f}", f"{st / iq:.2f}",
                     out[key]["preemptions"]])
    print("\n" + table(
        f"LLM and image together: {sh['chats']} chats while images render back to back",
        ["setup", "TTFT p95 ms", "TTFT p95 / alone", "tok/s p50", "tok/s / alone",
         "image steps/min", "image vs alone", "preemptions"], rows))
    for line in notes:
        print(line)
    print("\n" + table("OOM case: a request over the image worker's VRAM budget, then the next",
                       ["request", "final event", "next request", "check"], [out["oom"]]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (a smoke run)")
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "bench-models"),
                    help="where the random-weight models are built once and kept")
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    t0 = time.monotonic()
    log = lambda what: print(f"[{time.monotonic() - t0:6.1f} s] {what}", file=sys.stderr)  # noqa
    import torch
    gpu = not a.small and torch.cuda.is_available()
    if not a.small and not gpu:
        print("no GPU found (torch.cuda.is_available() is false): running the --small variant "
              "on the CPU instead\n")
    sh, dev = (FULL, "cuda") if gpu else (SMALL, "cpu")
    ldt, idt = (torch.bfloat16, torch.float16) if gpu else (torch.float32, torch.float32)
    llm_dir, sd_dir = (os.path.join(a.cache, f"{m}-{sh['name']}-v1") for m in ("llm", "sd"))
    built = [cached_dir(llm_dir, lambda p: build_llm(p, sh, dev, ldt), "bench.json"),
             cached_dir(sd_dir, lambda p: build_sd(p, sh, dev, idt), "bench.json")]
    if gpu:
        torch.cuda.empty_cache()
    meta = {}
    for k, p in (("llm", llm_dir), ("sd", sd_dir)):
        with open(os.path.join(p, "bench.json")) as f:
            meta[k] = json.load(f)
    m = {k: f"{v / 1e6:.3g}M" for k, v in {**meta["sd"], "llm": meta["llm"]["params"]}.items()}
    print(f"models in {a.cache} ({'built' if any(built) else 'cached'}, "
          f"{time.monotonic() - t0:.1f} s in all): LLM {m['llm']} params {str(ldt)[6:]}; UNet "
          f"{m['params']} + text encoder {m['text_params']} + VAE {m['vae_params']} "
          f"{str(idt)[6:]}; device: {torch.cuda.get_device_name() if gpu else 'cpu'}\n")
    out: dict = {}
    for key, label, preemption, isolation, compute in SETUPS:
        with ready_daemon(config(sh, llm_dir, sd_dir, gpu, preemption, isolation,
                                 compute)) as d, d.client() as c:
            log(f"daemon ready: {label[10:]}")
            in_effect = c.status()["gpu_compute"]
            if compute == "mps" and in_effect["mode"] != "mps":
                out[key] = {"compute": in_effect}
                log(f"{label} skipped: MPS not in effect ({in_effect['reason']})")
                continue
            if key == "adaptive":  # the baselines, on the first setup (time-slicing)
                out["llm"] = llm_alone(c, sh, llm_dir, dev, ldt, torch)
                log("LLM alone done")
                out["image"] = image_alone(d, c, sh, sd_dir, dev, idt, torch)
                log("image alone done")
            else:
                chat(c, "warm up", 4)
            out[key] = {**together(d, c, sh), "compute": in_effect}
            log(f"{label} done")
            if key == "adaptive":
                out["oom"], oom_ok = oom_case(c, sh, gpu)
    print()
    report(out, meta, sh, dev)
    print(f"\ntotal {time.monotonic() - t0:.1f} s")
    return 0 if oom_ok else 1


if __name__ == "__main__":
    sys.exit(main())
