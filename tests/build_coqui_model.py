"""Build a tiny random-weight Glow-TTS model with Coqui's own config classes and save it.

Run in a subprocess with tests/standins on PYTHONPATH (see tests/standins/README.md).
Usage: python build_coqui_model.py OUT_DIR
"""
import os
import sys

import torch
from TTS.tts.configs.glow_tts_config import GlowTTSConfig
from TTS.tts.configs.shared_configs import CharactersConfig
from TTS.tts.models.glow_tts import GlowTTS

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
config = GlowTTSConfig(
    num_chars=40, hidden_channels_enc=32, hidden_channels_dec=32, hidden_channels_dp=32,
    use_phonemes=False, text_cleaner="basic_cleaners",
    characters=CharactersConfig(characters="abcdefghijklmnopqrstuvwxyz",
                                punctuations="!'(),-.:;? ", pad="<PAD>", eos="<EOS>",
                                bos="<BOS>", blank="<BLNK>", characters_class="TTS.tts.utils.text.characters.Graphemes"),
    num_flow_blocks_dec=2, num_block_layers=2,
)
config.encoder_params["num_layers"] = 2
config.encoder_params["hidden_channels_ffn"] = 64
config.audio.sample_rate = 22050
model = GlowTTS.init_from_config(config)
torch.save({"model": model.state_dict(), "config": config.to_dict()},
           os.path.join(out, "model.pth"))
config.save_json(os.path.join(out, "config.json"))
print("ok")
