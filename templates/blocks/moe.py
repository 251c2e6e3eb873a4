"""CPU-safe dense mixture of experts: every expert runs on every token and the routing weight is zero outside each token's top-k.

Mirrors transformers: modeling_qwen2_moe.py ``Qwen2MoeSparseMoeBlock``
(``Qwen2MoeTopKRouter``: softmax router, top-k, optional ``norm_topk_prob``
renormalization; ``Qwen2MoeExperts``: fused ``gate_up_proj`` ``[E, 2I, H]`` and
``down_proj`` ``[E, H, I]``; ``shared_expert`` with a sigmoid
``shared_expert_gate``), modeling_mixtral.py (softmax, renormalized), and
modeling_deepseek_v3.py ``DeepseekV3TopkRouter`` (sigmoid scores, top-k chosen
on ``scores + e_score_correction_bias``, weights from the scores; its expert
groups are not modelled here).

MAX 26.7 APIs: ``ops.matmul`` (batched), ``ops.softmax``, ``ops.sigmoid``,
``ops.top_k``, ``ops.where``, ``ops.sum``, ``max.graph.Weight``. Why dense:
``max.nn.moe.MoE`` uses ``grouped_matmul_ragged`` / ``moe_create_indices``,
which have no CPU implementation in MAX 26.7. The dense form costs every
expert on every token, so it suits tiny replicas; on a GPU switch to
``max.nn.moe.MoE`` for speed (unmeasured here: no GPU on this machine).
Selection is by threshold (weight kept where the score is at least the k-th
largest), so exact ties at the k-th score keep more than k experts.
Self-contained: imports only max, numpy and the standard library.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorValue, Weight, ops
from max.nn.layer import Module

BLOCK_VERSION = "1"


class RouterScore(str, Enum):
    """How router logits become expert scores."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


def routing_weights(
    logits: TensorValue,
    top_k: int,
    score: RouterScore,
    renormalize: bool,
    selection_bias: TensorValue | None = None,
    routed_scaling: float = 1.0,
) -> TensorValue:
    """Dense ``[tokens, experts]`` float32 weights: the scores of each token's top-k, zero elsewhere."""
    logits = logits.cast(DType.float32)
    scores = ops.softmax(logits) if score is RouterScore.SOFTMAX else ops.sigmoid(logits)
    choose = scores if selection_bias is None else scores + selection_bias.cast(DType.float32)
    top_values, _ = ops.top_k(choose, top_k, axis=-1)
    kth = top_values[:, top_k - 1 : top_k]
    zero = ops.broadcast_to(ops.constant(0.0, DType.float32, logits.device), scores.shape)
    weights = ops.where(choose >= kth, scores, zero)
    if renormalize:
        weights = weights / ops.sum(weights, axis=-1)
    if routed_scaling != 1.0:
        weights = weights * routed_scaling
    return weights


def routing_weights_reference(
    logits: np.ndarray,
    top_k: int,
    score: RouterScore,
    renormalize: bool,
    selection_bias: np.ndarray | None = None,
    routed_scaling: float = 1.0,
) -> np.ndarray:
    """numpy twin of ``routing_weights``, for tests."""
    logits = logits.astype(np.float64)
    if score is RouterScore.SOFTMAX:
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        scores = shifted / shifted.sum(-1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    choose = scores if selection_bias is None else scores + selection_bias
    kth = np.sort(choose, axis=-1)[:, -top_k][:, None]
    weights = np.where(choose >= kth, scores, 0.0)
    if renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * routed_scaling


class _GatedMLP(Module):
    """``down(silu(gate(x)) * up(x))`` without biases: the shared expert, weights ``gate_proj``/``up_proj``/``down_proj``."""

    def __init__(self, hidden: int, intermediate: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.gate_proj = _Projection(intermediate, hidden, dtype, device)
        self.up_proj = _Projection(intermediate, hidden, dtype, device)
        self.down_proj = _Projection(hidden, intermediate, dtype, device)

    def __call__(self, x: TensorValue) -> TensorValue:
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class _Projection(Module):
    """Bias-free ``x @ weight.T`` with ``weight`` ``[out, in]``."""

    def __init__(self, out_dim: int, in_dim: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.weight = Weight("weight", dtype, (out_dim, in_dim), device=device)

    def __call__(self, x: TensorValue) -> TensorValue:
        return x @ self.weight.to(x.device).T


class _Experts(Module):
    """All experts at once: ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (transformers 5 layout)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden = hidden
        self.intermediate = intermediate
        self.gate_up_proj = Weight("gate_up_proj", dtype, (num_experts, 2 * intermediate, hidden), device=device)
        self.down_proj = Weight("down_proj", dtype, (num_experts, hidden, intermediate), device=device)

    def __call__(self, x: TensorValue, weights: TensorValue) -> TensorValue:
        """``sum_e weights[:, e] * expert_e(x)`` for ``x`` ``[tokens, H]`` and ``weights`` ``[tokens, E]``."""
        gate_up = ops.matmul(ops.unsqueeze(x, 0), self.gate_up_proj.to(x.device).transpose(1, 2))  # [E, T, 2I]
        gate = gate_up[:, :, : self.intermediate]
        up = gate_up[:, :, self.intermediate :]
        out = ops.matmul(ops.silu(gate) * up, self.down_proj.to(x.device).transpose(1, 2))  # [E, T, H]
        scale = ops.unsqueeze(weights.cast(x.dtype).transpose(0, 1), -1)  # [E, T, 1]
        return ops.sum(out * scale, axis=0).reshape((-1, self.hidden))


class DenseMoE(Module):
    """Router ``gate`` (``[E, H]``), ``experts``, optional ``shared_expert`` and sigmoid ``shared_expert_gate``.

    Expert activation is SiLU-gated (Qwen2-MoE, Mixtral, DeepSeek). Set
    ``selection_bias=True`` for DeepSeek-V3's ``e_score_correction_bias``
    (loaded as ``gate.e_score_correction_bias``).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        top_k: int,
        dtype: DType,
        device: DeviceRef,
        score: RouterScore = RouterScore.SOFTMAX,
        renormalize: bool = False,
        selection_bias: bool = False,
        routed_scaling: float = 1.0,
        shared_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and num_experts {num_experts}")
        self.top_k = top_k
        self.score = score
        self.renormalize = renormalize
        self.routed_scaling = routed_scaling
        self.gate = _Router(num_experts, hidden_size, dtype, device, selection_bias)
        self.experts = _Experts(num_experts, hidden_size, moe_intermediate_size, dtype, device)
        self.has_shared = shared_intermediate_size is not None
        self.has_shared_gate = shared_expert_gate
        if shared_intermediate_size is not None:
            self.shared_expert = _GatedMLP(hidden_size, shared_intermediate_size, dtype, device)
            if shared_expert_gate:
                self.shared_expert_gate = _Projection(1, hidden_size, dtype, device)

    def __call__(self, x: TensorValue) -> TensorValue:
        weights = routing_weights(
            self.gate(x), self.top_k, self.score, self.renormalize, self.gate.selection_bias(), self.routed_scaling
        )
        out = self.experts(x, weights)
        if self.has_shared:
            shared = self.shared_expert(x)
            if self.has_shared_gate:
                shared = ops.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class _Router(Module):
    """Router logits ``x @ weight.T`` in float32; optional ``e_score_correction_bias``."""

    def __init__(self, num_experts: int, hidden: int, dtype: DType, device: DeviceRef, with_bias: bool) -> None:
        super().__init__()
        self.weight = Weight("weight", dtype, (num_experts, hidden), device=device)
        self.e_score_correction_bias = (
            Weight("e_score_correction_bias", DType.float32, (num_experts,), device=device) if with_bias else None
        )

    def selection_bias(self) -> TensorValue | None:
        return None if self.e_score_correction_bias is None else TensorValue(self.e_score_correction_bias)

    def __call__(self, x: TensorValue) -> TensorValue:
        return x.cast(DType.float32) @ ops.cast(self.weight, DType.float32).to(x.device).T
