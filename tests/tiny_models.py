"""Tiny random configs, one per supported architecture (vocab matches the SmolLM2 tokenizer)."""

from __future__ import annotations

VOCAB = 49152
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(**COMMON, rope_theta=10000.0)


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**COMMON, sliding_window=16)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**COMMON)


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(**COMMON, head_dim=8)


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)


def _gemma3():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(**COMMON, pad_token_id=0)


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512)


TINY_CONFIGS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
}


def save_tiny_model(model_type: str, out, hf_tokenizer, seed: int = 0):
    """Build a tiny random base model of ``model_type`` and save it with the tokenizer."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    model = AutoModel.from_config(config)
    model.save_pretrained(out)
    hf_tokenizer.save_pretrained(out)
    return out
