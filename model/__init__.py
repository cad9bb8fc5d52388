"""The reference GPT: configuration, model, tokenizer, data, generation."""

from model.gpt import PRESETS, GPTConfig, GPTModel

__all__ = ["GPTConfig", "GPTModel", "PRESETS"]
