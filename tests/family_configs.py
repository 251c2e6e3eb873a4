"""Full-size config.json dicts shaped like real Hub checkpoints, one per family.

They are written as bare config.json folders (no weights, no tokenizer) to
test that replicas shrink real sizes and keep real semantics. Values follow
the public configs of the named models (old ``rope_theta``/``rope_scaling``
spelling, as most Hub checkpoints still use).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

LONGROPE_LONG = [1.0 + 0.05 * i for i in range(48)]
LONGROPE_SHORT = [1.0 + 0.01 * i for i in range(48)]

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # Mistral-7B-v0.1
    "mistral": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # Qwen2.5-7B-Instruct
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": 131072,
        "use_sliding_window": False, "max_window_layers": 28, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # Qwen3-8B
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 36,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # Qwen3-30B-A3B
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "attention_bias": False, "sliding_window": None, "use_sliding_window": False,
        "max_window_layers": 48, "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # gemma-2-9b
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
        "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "vocab_size": 256000, "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
    # gemma-3-4b-it (multimodal; the replica is its text model)
    "gemma3": {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
            "sliding_window": 1024, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "vocab_size": 262208,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        },
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "torch_dtype": "bfloat16",
    },
    # Phi-4-mini-instruct
    "phi3": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
        "vocab_size": 200064, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "long_factor": LONGROPE_LONG, "short_factor": LONGROPE_SHORT},
        "sliding_window": 262144, "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 199999,
        "eos_token_id": 199999, "pad_token_id": 199999, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    },
    # stablelm-2-1_6b
    "stablelm": {
        "architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 100352, "max_position_embeddings": 4096, "rope_theta": 10000, "partial_rotary_factor": 0.25,
        "layer_norm_eps": 1e-5, "use_qkv_bias": True, "qk_layernorm": False, "use_parallel_residual": False,
        "hidden_act": "silu", "bos_token_id": 100257, "eos_token_id": 100257, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # OLMo-2-1124-7B
    "olmo2": {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 100352, "max_position_embeddings": 4096, "rope_theta": 500000, "rms_norm_eps": 1e-6,
        "attention_bias": False, "hidden_act": "silu", "pad_token_id": 100277, "eos_token_id": 100257,
        "bos_token_id": None, "tie_word_embeddings": False, "torch_dtype": "float32",
    },
    # granite-3.1-8b-instruct
    "granite": {
        "architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": 4096,
        "intermediate_size": 12800, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 49155, "max_position_embeddings": 131072, "rope_theta": 10000000.0, "rms_norm_eps": 1e-5,
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
        "logits_scaling": 16.0, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # Mixtral-8x7B-v0.1
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "sliding_window": None, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "router_aux_loss_coef": 0.02, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # AFM-4.5B (arcee)
    "arcee": {
        "architectures": ["ArceeForCausalLM"], "model_type": "arcee", "hidden_size": 2560,
        "intermediate_size": 18432, "num_hidden_layers": 36, "num_attention_heads": 20, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 128004, "max_position_embeddings": 65536, "rope_theta": 10000.0,
        "rope_scaling": {"factor": 20.0, "original_max_position_embeddings": 4096, "rope_type": "yarn"},
        "rms_norm_eps": 1e-5, "hidden_act": "relu2", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}


def write_family_config(folder: str | Path, family: str) -> Path:
    """Write the family's full-size config.json into ``folder``; return the config.json path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(copy.deepcopy(FAMILY_CONFIGS[family]), indent=2) + "\n")
    return path
