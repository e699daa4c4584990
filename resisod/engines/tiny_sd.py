"""`builtin:tiny-sd`: a miniature Stable Diffusion pipeline built from configs.

Fixed-seed random weights: it draws noise, not pictures. It exists so the whole image path
(tokenizer, text encoder, UNet, VAE, scheduler, progress, cancel, PNG) runs offline on any
machine; it is saved once under the state dir and from then on loaded through the same
`from_pretrained` path as a real model directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile


def _byte_alphabet() -> list[str]:
    # the byte-to-unicode table of GPT-2/CLIP's byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def char_clip_tokenizer(directory: str) -> tuple[object, dict[str, int]]:
    """A CLIP tokenizer over single byte-level characters, written to `directory` (no real
    CLIP vocabulary ships offline), and its vocabulary (the specials last)."""
    from transformers import CLIPTokenizer
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"),
                              os.path.join(directory, "merges.txt"), model_max_length=77)
    return tokenizer, vocab


def build(target: str, seed: int = 1234) -> None:
    """Write the pipeline to `target` (atomically: a half-built model is never loaded)."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    work = tempfile.mkdtemp(prefix=".tiny-sd-", dir=os.path.dirname(target))
    try:
        tokenizer, vocab = char_clip_tokenizer(os.path.join(work, "tok-src"))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"]))
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                                                           "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=16)
        # four VAE blocks: latents are 1/8 of the image side, as in real SD (the pipeline
        # derives its latent size from the VAE's depth)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
            norm_num_groups=8, sample_size=256)
        scheduler = EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        out = os.path.join(work, "model")
        pipe.save_pretrained(out)
        with open(os.path.join(out, "README.txt"), "w") as f:
            f.write("resiso builtin:tiny-sd - random weights, draws noise. Point "
                    "[domains.image].model at a real SD-Turbo directory for pictures.\n")
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure(target: str) -> str:
    if not os.path.isfile(os.path.join(target, "model_index.json")):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        build(target)
    return target
