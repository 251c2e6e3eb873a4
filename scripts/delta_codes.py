"""The one catalogue of delta codes: how a model departs from a plain Llama decoder block.

Each :class:`DeltaCode` names one departure and carries a one-line meaning.
``delta_signals`` (config and tensor signals), ``hf_source`` (signals read from
the transformers modeling code), the replica sensitivity mutations and the
building blocks all name deltas with these codes, so a signal, the mutation
that proves a replica can see it, and the block that implements it line up.

The values are stable strings (``DeltaCode.GQA == "gqa"``): codes are added,
never renamed. Imports nothing heavy.
"""

from __future__ import annotations

import enum


class DeltaCategory(str, enum.Enum):
    """Which part of the decoder a delta belongs to."""

    ATTENTION = "attention"
    POSITIONS = "positions"
    NORM = "norm"
    BLOCK = "block"
    MLP = "mlp"
    MOE = "moe"
    HEAD = "head"
    WEIGHTS = "weights"
    MIXER = "mixer"


class DeltaCode(str, enum.Enum):
    """A delta from a plain Llama block; ``.meaning`` says what it is in one line."""

    # attention
    GQA = "gqa"
    MQA = "mqa"
    HEAD_DIM_OVERRIDE = "head_dim_override"
    QK_NORM = "qk_norm"
    QK_NORM_FULL_WIDTH = "qk_norm_full_width"
    FUSED_QKV = "fused_qkv"
    FUSED_QKV_PER_HEAD = "fused_qkv_per_head"
    ATTENTION_BIAS = "attention_bias"
    ATTENTION_OUT_BIAS = "attention_out_bias"
    ATTENTION_SCALING = "attention_scaling"
    ATTENTION_SCALE = "attention_scale"
    ATTENTION_SCALE_LAYER_INDEX = "attention_scale_layer_index"
    QKV_CLIP = "qkv_clip"
    ATTENTION_SINKS = "attention_sinks"
    ATTN_SOFTCAP = "attn_softcap"
    SLIDING_WINDOW = "sliding_window"
    PER_LAYER_ATTENTION = "per_layer_attention"
    MLA = "mla"
    # positions
    ROPE_SCALING = "rope_scaling"
    ROPE_STYLE = "rope_style"
    ROPE_INTERLEAVED = "rope_interleaved"
    PARTIAL_ROTARY = "partial_rotary"
    ROPE_PER_LAYER_TYPE = "rope_per_layer_type"
    NOPE_LAYERS = "nope_layers"
    NO_ROPE = "no_rope"
    LEARNED_POSITIONS = "learned_positions"
    ALIBI = "alibi"
    # norms
    LAYERNORM = "layernorm"
    LAYERNORM_WEIGHTLESS = "layernorm_weightless"
    NORM_OFFSET = "norm_offset"
    SANDWICH_NORM = "sandwich_norm"
    POST_NORM = "post_norm"
    # block
    PARALLEL_BLOCK = "parallel_block"
    RESIDUAL_SCALE = "residual_scale"
    # MLP
    ACTIVATION = "activation"
    MLP_UNGATED = "mlp_ungated"
    MLP_BIAS = "mlp_bias"
    FUSED_GATE_UP = "fused_gate_up"
    # mixture of experts
    MOE = "moe"
    SHARED_EXPERTS = "shared_experts"
    SHARED_EXPERT_GATE = "shared_expert_gate"
    ROUTER = "router"
    TOPK_SOFTMAX_ROUTER = "topk_softmax_router"
    SIGMOID_ROUTER = "sigmoid_router"
    ROUTER_RENORMALIZE = "router_renormalize"
    # embeddings and head
    TIED_EMBEDDINGS = "tied_embeddings"
    EMBEDDING_SCALE = "embedding_scale"
    MUP_MULTIPLIERS = "mup_multipliers"
    LOGIT_SCALE = "logit_scale"
    LOGIT_SOFTCAP = "logit_softcap"
    LM_HEAD_BIAS = "lm_head_bias"
    # weight layout
    CONV1D_WEIGHTS = "conv1d_weights"
    # other mixers
    SSM = "ssm"

    @property
    def meaning(self) -> str:
        """What the delta is, in one line."""
        return _MEANINGS[self][1]

    @property
    def category(self) -> DeltaCategory:
        """The part of the decoder the delta belongs to."""
        return _MEANINGS[self][0]


_A, _P, _N, _B = DeltaCategory.ATTENTION, DeltaCategory.POSITIONS, DeltaCategory.NORM, DeltaCategory.BLOCK
_M, _E, _H = DeltaCategory.MLP, DeltaCategory.MOE, DeltaCategory.HEAD

_MEANINGS: dict[DeltaCode, tuple[DeltaCategory, str]] = {
    DeltaCode.GQA: (_A, "fewer key/value heads than query heads (grouped-query attention)"),
    DeltaCode.MQA: (_A, "one key/value head shared by every query head (multi-query attention)"),
    DeltaCode.HEAD_DIM_OVERRIDE: (_A, "head_dim is set explicitly and heads x head_dim != hidden_size"),
    DeltaCode.QK_NORM: (_A, "queries and keys are normalized (per head) before RoPE"),
    DeltaCode.QK_NORM_FULL_WIDTH: (_A, "one QK-norm spans all heads (OLMo2-style), not one per head"),
    DeltaCode.FUSED_QKV: (_A, "query, key and value come from one fused projection, concatenated [q; k; v]"),
    DeltaCode.FUSED_QKV_PER_HEAD: (_A, "the fused QKV projection is laid out per head [q_h; k_h; v_h]"),
    DeltaCode.ATTENTION_BIAS: (_A, "the q/k/v projections have biases"),
    DeltaCode.ATTENTION_OUT_BIAS: (_A, "the attention output projection has a bias"),
    DeltaCode.ATTENTION_SCALING: (_A, "attention scores are clipped, rescaled or get sinks (umbrella code)"),
    DeltaCode.ATTENTION_SCALE: (_A, "the score scale is not 1/sqrt(head_dim) (query_pre_attn_scalar, "
                                    "attention multiplier, no scaling)"),
    DeltaCode.ATTENTION_SCALE_LAYER_INDEX: (_A, "scores are also divided by the layer index (+1)"),
    DeltaCode.QKV_CLIP: (_A, "q/k/v activations are clamped to +-clip_qkv"),
    DeltaCode.ATTENTION_SINKS: (_A, "attention has learned sink logits per head"),
    DeltaCode.ATTN_SOFTCAP: (_A, "attention scores are soft-capped with tanh"),
    DeltaCode.SLIDING_WINDOW: (_A, "some or all layers attend only to a sliding window (or chunk)"),
    DeltaCode.PER_LAYER_ATTENTION: (_A, "layers differ in attention kind (sliding/global/chunked pattern)"),
    DeltaCode.MLA: (_A, "multi-head latent attention (compressed KV)"),
    DeltaCode.ROPE_SCALING: (_P, "RoPE frequencies are scaled (linear, dynamic, yarn, llama3, longrope...)"),
    DeltaCode.ROPE_STYLE: (_P, "a config key sets the RoPE pairing; check interleaved vs rotate-half"),
    DeltaCode.ROPE_INTERLEAVED: (_P, "RoPE rotates adjacent pairs (interleaved), not the two halves"),
    DeltaCode.PARTIAL_ROTARY: (_P, "RoPE covers only part of each head"),
    DeltaCode.ROPE_PER_LAYER_TYPE: (_P, "RoPE settings differ per layer type"),
    DeltaCode.NOPE_LAYERS: (_P, "some layers apply no RoPE (NoPE layers)"),
    DeltaCode.NO_ROPE: (_P, "no rotary embedding anywhere in the model"),
    DeltaCode.LEARNED_POSITIONS: (_P, "learned absolute position embeddings are added to the token embeddings"),
    DeltaCode.ALIBI: (_P, "ALiBi linear attention bias instead of RoPE"),
    DeltaCode.LAYERNORM: (_N, "LayerNorm (mean-centred, maybe with bias) instead of RMSNorm"),
    DeltaCode.LAYERNORM_WEIGHTLESS: (_N, "LayerNorm with no learnable weight or bias"),
    DeltaCode.NORM_OFFSET: (_N, "the norm multiplies by (1 + weight)"),
    DeltaCode.SANDWICH_NORM: (_N, "norms both before and after attention and MLP"),
    DeltaCode.POST_NORM: (_N, "norms after the attention and MLP outputs, no input norm"),
    DeltaCode.PARALLEL_BLOCK: (_B, "attention and MLP read the same input and their outputs are summed"),
    DeltaCode.RESIDUAL_SCALE: (_B, "residual branches are scaled before they are added"),
    DeltaCode.ACTIVATION: (_M, "the MLP activation is not SiLU (or is exact vs tanh GELU)"),
    DeltaCode.MLP_UNGATED: (_M, "the MLP is up -> activation -> down, with no gate projection"),
    DeltaCode.MLP_BIAS: (_M, "the MLP projections have biases"),
    DeltaCode.FUSED_GATE_UP: (_M, "gate and up projections are one fused matrix"),
    DeltaCode.MOE: (_E, "mixture-of-experts MLP"),
    DeltaCode.SHARED_EXPERTS: (_E, "MoE layers also run always-on shared expert(s)"),
    DeltaCode.SHARED_EXPERT_GATE: (_E, "the shared expert's output is scaled by a sigmoid gate"),
    DeltaCode.ROUTER: (_E, "router details to match (scoring, grouping, normalization; umbrella code)"),
    DeltaCode.TOPK_SOFTMAX_ROUTER: (_E, "router takes a softmax over the experts and keeps the top-k"),
    DeltaCode.SIGMOID_ROUTER: (_E, "router scores each expert with a sigmoid"),
    DeltaCode.ROUTER_RENORMALIZE: (_E, "the top-k routing weights are renormalized to sum to 1"),
    DeltaCode.TIED_EMBEDDINGS: (_H, "the LM head reuses the token embedding matrix"),
    DeltaCode.EMBEDDING_SCALE: (_H, "token embeddings are multiplied by a constant (sqrt(hidden) or a key)"),
    DeltaCode.MUP_MULTIPLIERS: (_H, "MuP-style multipliers scale embeddings, residuals, attention or logits"),
    DeltaCode.LOGIT_SCALE: (_H, "the logits are multiplied (or divided) by a constant"),
    DeltaCode.LOGIT_SOFTCAP: (_H, "the final logits are soft-capped with tanh"),
    DeltaCode.LM_HEAD_BIAS: (_H, "the LM head has a bias"),
    DeltaCode.CONV1D_WEIGHTS: (DeltaCategory.WEIGHTS, "projections are GPT-2 Conv1D: weights stored transposed "
                                                      "(in, out)"),
    DeltaCode.SSM: (DeltaCategory.MIXER, "state-space or convolutional mixer layers"),
}

if set(_MEANINGS) != set(DeltaCode):  # pragma: no cover - a code without a meaning is a programming error
    raise RuntimeError(f"delta codes without a meaning: {sorted(set(DeltaCode) - set(_MEANINGS))}")


def parse(code: str) -> DeltaCode:
    """The DeltaCode for a string value (ValueError when unknown)."""
    return DeltaCode(code)


def catalogue() -> list[dict[str, str]]:
    """Every code with its category and meaning, JSON-ready, in declaration order."""
    return [{"code": c.value, "category": c.category.value, "meaning": c.meaning} for c in DeltaCode]
