"""The reference GPT: configuration, model, tokenizer, data, generation."""

from model.generate import generate, stream_generate
from model.gpt import PRESETS, GPTConfig, GPTModel

__all__ = ["GPTConfig", "GPTModel", "PRESETS", "generate", "stream_generate"]
