"""Named shapes of randomly initialised models (``eap.random_model``, ``load_model("random:<shape>")``).

The full-size entries are the published configs' numbers (HF ``config.json``); the ``-tiny``
entries keep each family's features at test size.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

#: Named shapes of randomly initialised models: (family, HuggingFace config fields). The full-size
#: entries are the layer/width/head/KV-head/MLP numbers and the rope/norm facts of the published
#: configs (HF ``config.json``); the ``-tiny`` entries keep each family's features (GQA, rope
#: scaling, biases, partial rotary, softcaps, sliding windows) at test size. The vocabulary size of
#: the real config is kept (the unembedding costs what it really costs); only the first ids are
#: used, by the embedded word-level IOI tokenizer.
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)),
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024)),
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": ("llama", dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        vocab_size=128256)),
    "llama-tiny": ("llama", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, original_max_position_embeddings=16), max_position_embeddings=64,
        tie_word_embeddings=True, vocab_size=64)),
    # Qwen/Qwen2.5-0.5B (q/k/v biases are part of the Qwen2 architecture)
    "qwen2.5-0.5b": ("qwen2", dict(
        num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        sliding_window=32768, max_window_layers=24, use_sliding_window=False, tie_word_embeddings=True,
        vocab_size=151936)),
    "qwen-tiny": ("qwen2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=64,
        use_sliding_window=False, tie_word_embeddings=True, vocab_size=64)),
    # EleutherAI/pythia-160m (parallel attention/MLP, rotary on a quarter of each head)
    "pythia-160m": ("gpt-neox", dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
        rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5, use_parallel_residual=True,
        max_position_embeddings=2048, tie_word_embeddings=False, vocab_size=50304)),
    "pythia-tiny": ("gpt-neox", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, hidden_act="gelu",
        rotary_pct=0.5, rotary_emb_base=10000, layer_norm_eps=1e-5, use_parallel_residual=True,
        max_position_embeddings=64, tie_word_embeddings=False, vocab_size=64)),
    # google/gemma-2-2b (norms with 1 + w, post-norms, softcaps, sliding window on every other layer)
    "gemma-2-2b": ("gemma2", dict(
        num_hidden_layers=26, hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        intermediate_size=9216, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096, max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=256000)),
    "gemma-2-tiny": ("gemma2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
        max_position_embeddings=64, tie_word_embeddings=True, vocab_size=64)),
    # Qwen/Qwen3-0.6B (per-head q/k RMSNorm before rotary, head_dim 128 != hidden / heads)
    "qwen3-0.6b": ("qwen3", dict(
        num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, attention_bias=False, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=True, vocab_size=151936)),
    "qwen3-tiny": ("qwen3", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=64,
        use_sliding_window=False, tie_word_embeddings=True, vocab_size=64)),
    # microsoft/Phi-3-mini-4k-instruct (fused qkv_proj and gate_up_proj, sliding window 2047 on every layer)
    "phi-3-mini": ("phi3", dict(
        num_hidden_layers=32, hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        tie_word_embeddings=False, vocab_size=32064)),
    "phi-3-tiny": ("phi3", dict(  # grouped (as Phi-3-medium) to exercise the fused ungrouping
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
        original_max_position_embeddings=64, sliding_window=5, tie_word_embeddings=False, vocab_size=64)),
    # google/gemma-2b (Gemma v1: multi-query attention, 1 + w norms, embedding x sqrt(d), GeGLU)
    "gemma-2b": ("gemma", dict(
        num_hidden_layers=18, hidden_size=2048, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        intermediate_size=16384, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=256000)),
    "gemma-tiny": ("gemma", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=True, vocab_size=64)),
    # EleutherAI/gpt-j-6b (parallel attention and MLP under one LayerNorm, interleaved rotary on 64 of 256)
    "gpt-j-6b": ("gptj", dict(
        n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_inner=None, n_positions=2048,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False, vocab_size=50400)),
    "gpt-j-tiny": ("gptj", dict(
        n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, vocab_size=64)),
    # google/gemma-3-1b-pt (text): per-head q/k norms, post-norms, 5 local layers (window 512, rope 1e4) per global
    # layer (rope 1e6), MQA, no softcaps
    "gemma-3-1b": ("gemma3", dict(
        num_hidden_layers=26, hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=6912, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, sliding_window=512, sliding_window_pattern=6, max_position_embeddings=32768,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        tie_word_embeddings=True, vocab_size=262144)),
    "gemma-3-tiny": ("gemma3", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        tie_word_embeddings=True, vocab_size=64)),
    # allenai/OLMo-2-0425-1B (no pre-norms, post-norms, q/k RMSNorm over all heads, untied unembedding)
    "olmo-2-1b": ("olmo2", dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=8192, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=500000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False, vocab_size=100352)),
    "olmo-2-tiny": ("olmo2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=64,
        tie_word_embeddings=False, vocab_size=64)),
    # allenai/OLMo-2-0325-32B: grouped-query (40 query heads, 8 key/value heads) under the k norm
    # over all key heads (statistics over the original key heads; eap.arch.mixednorm)
    "olmo-2-32b": ("olmo2", dict(
        num_hidden_layers=64, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
        intermediate_size=27648, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=500000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False, vocab_size=100352)),
    "olmo-2-tiny-gqa": ("olmo2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=64,
        tie_word_embeddings=False, vocab_size=64)),
}
