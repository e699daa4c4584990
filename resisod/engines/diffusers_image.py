"""Image engine on diffusers: SD 1.5 / SD-Turbo / SDXL-Turbo directories and builtin:tiny-sd.

Progress is reported after every denoising step; cancellation and preemption take effect in
the same step callback, so a job stops or pauses at the next step boundary.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .. import builtin
from .base import Engine, EngineUnavailable, JobControl
from ..devices import place_torch


class DiffusersEngine(Engine):
    kind = "image"

    def load(self) -> None:
        try:
            path = builtin.image_dir(self.domain["model"], self.ctx.state_dir)
        except builtin.BuiltinMissing as exc:
            raise EngineUnavailable(str(exc))
        try:
            import torch
            from diffusers import AutoPipelineForText2Image
        except ImportError as exc:
            raise EngineUnavailable(f"diffusers/torch are not installed: {exc}")
        if builtin.is_builtin(self.domain["model"]):
            from . import tiny_sd
            tiny_sd.ensure(path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise EngineUnavailable(f"{path} is not a diffusers model directory "
                                    f"(no model_index.json)")
        self.device, dtype = place_torch(
            torch, self.ctx.device, self.ctx.threads, self.ctx.gpu_share, self.domain["dtype"])
        try:
            self.pipe = AutoPipelineForText2Image.from_pretrained(
                path, torch_dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise EngineUnavailable(f"cannot load the pipeline in {path}: {exc}")
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.torch = torch

    def warm_up(self) -> dict[str, float]:
        """Two steps at the default size: the first pays for allocations and kernel choice,
        the second is timed as the domain's step estimate (UNet and scheduler; the VAE decode
        is shared over the steps as it is in `Domain.learn`)."""
        torch, marks = self.torch, []

        def on_step(pipe: Any, i: int, timestep: Any, kwargs: dict) -> dict:
            if self.device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return kwargs

        with torch.inference_mode():
            t0 = time.perf_counter()
            self.pipe(prompt="warm-up", width=self.domain["default_width"],
                      height=self.domain["default_height"], num_inference_steps=2,
                      guidance_scale=0.0, generator=torch.Generator(device="cpu").manual_seed(0),
                      callback_on_step_end=on_step, output_type="pil")
            total = time.perf_counter() - t0
        step = marks[1] - marks[0] if len(marks) == 2 else total / 2
        # a step plus its share of the fixed costs (text encoder, VAE decode) over a
        # default-length job: what a finished job's duration per step will be
        fixed = max(0.0, total - 2 * step)
        return {"step_ms": round((step + fixed / self.domain["default_steps"]) * 1000, 3)}

    def unload(self) -> None:
        del self.pipe
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        torch = self.torch
        t0 = time.perf_counter()
        steps = params["steps"]
        generator = torch.Generator(device="cpu").manual_seed(params["seed"])

        def on_step(pipe: Any, i: int, timestep: Any, kwargs: dict) -> dict:
            job.emit("progress", step=i + 1, total=steps, progress=(i + 1) / steps)
            job.checkpoint()  # raises Cancelled out of the pipeline; it stays usable
            return kwargs

        job.checkpoint()
        with torch.inference_mode():
            image = self.pipe(
                prompt=params["prompt"], negative_prompt=params["negative_prompt"] or None,
                width=params["width"], height=params["height"], num_inference_steps=steps,
                guidance_scale=params["guidance_scale"], generator=generator,
                callback_on_step_end=on_step).images[0]
        path = os.path.join(self.ctx.results_dir, f"{job.task_id}.png")
        tmp = path + ".tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        return {"image_path": path, "width": image.width, "height": image.height,
                "seed": params["seed"], "steps": steps, "size_bytes": os.path.getsize(path),
                "generation_time_ms": round((time.perf_counter() - t0) * 1000, 1)}
