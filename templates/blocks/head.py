"""Head extras: an LM head that multiplies its logits and soft-caps them, the divisor for MAX's ``logits_scaling``, and the embedding multiplier.

Mirrors transformers:
- modeling_cohere.py ``CohereForCausalLM`` (``logits * logit_scale``);
- modeling_gemma2.py ``Gemma2ForCausalLM`` (final softcap:
  ``cap * tanh(logits / cap)``) and ``Gemma2Model`` (embeddings times
  ``sqrt(hidden_size)``);
- modeling_granite.py ``GraniteForCausalLM`` (``logits / logits_scaling``,
  a divisor, which is what MAX's ``Transformer(logits_scaling=...)`` does) and
  ``GraniteModel`` (``embedding_multiplier``).

MAX 26.7 APIs: ``max.nn.linear.Linear`` (subclassed so the weight keeps the
name ``weight`` and ``set_shared_weight`` ties it to the embedding),
``ops.tanh``; ``Transformer``'s ``embedding_multiplier`` multiplies and its
``logits_scaling`` divides. Self-contained: imports only max and the standard
library.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, TensorValue, ops
from max.nn.linear import Linear

BLOCK_VERSION = "1"


def logits_scaling_divisor(logit_multiplier: float) -> float:
    """The value for ``Transformer(logits_scaling=...)`` that multiplies logits by ``logit_multiplier``.

    MAX divides by ``logits_scaling``; Cohere's ``logit_scale`` multiplies, so
    it needs the reciprocal. Granite's ``logits_scaling`` already divides: pass
    it unchanged.
    """
    if logit_multiplier == 0:
        raise ValueError("a zero logit multiplier flattens every distribution")
    return 1.0 / logit_multiplier


class ScaledLMHead(Linear):
    """LM head ``softcap(multiplier * x @ W^T)``; ``final_softcap=None`` skips the cap.

    The cap is ``cap * tanh(logits / cap)``, applied after the multiplier, as
    in Gemma 2. Weights load as ``weight`` (bias-free, like every listed head).
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        dtype: DType,
        device: DeviceRef,
        *,
        logit_multiplier: float = 1.0,
        final_softcap: float | None = None,
    ) -> None:
        super().__init__(hidden_size, vocab_size, dtype, device, has_bias=False)
        if final_softcap is not None and final_softcap <= 0:
            raise ValueError(f"final_softcap must be positive, got {final_softcap}")
        self.logit_multiplier = logit_multiplier
        self.final_softcap = final_softcap

    def __call__(self, x: TensorValue) -> TensorValue:
        logits = super().__call__(x).cast(DType.float32)
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.final_softcap is not None:
            logits = ops.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
