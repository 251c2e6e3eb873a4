"""Norms computed in float32: LayerNorm (weight and bias, weight only, or weightless) and RMSNorm with an optional ``(1 + w)`` offset.

Mirrors transformers:
- ``torch.nn.LayerNorm`` as the decoder norm of modeling_gpt_neox.py
  (GPTNeoXLayer), modeling_phi.py (PhiDecoderLayer) and modeling_stablelm.py
  (StableLmDecoderLayer); ``bias=False`` gives the weight-only variant;
- modeling_olmo.py ``OlmoLayerNorm`` (no weight, no bias, float32);
- modeling_gemma.py ``GemmaRMSNorm`` (float32 throughout, scale ``1 + w``)
  and modeling_llama.py ``LlamaRMSNorm`` (normalize in float32, cast to the
  input dtype, then multiply by ``w``).

MAX 26.7 APIs: ``max.nn.layer.Module``, ``max.graph.Weight``,
``ops.layer_norm``, ``ops.mean``, ``ops.rsqrt``, ``ops.cast``,
``ops.broadcast_to``, ``ops.constant``. The llama3 graph's
``norm_method="layer_norm"`` builds ``ConstantLayerNorm``, which has no
weights; ``LayerNormF32`` is the one to use when the checkpoint has a weight.
Self-contained: imports only max and the standard library.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, TensorValue, Weight, ops
from max.nn.layer import Module

BLOCK_VERSION = "1"


def _filled(value: float, dims: int, device: DeviceRef) -> TensorValue:
    """A float32 vector of ``dims`` copies of ``value`` on ``device``."""
    return ops.broadcast_to(ops.constant(value, DType.float32, device), (dims,))


class LayerNormF32(Module):
    """LayerNorm over the last axis in float32, cast back to the input dtype.

    ``weight=False`` is the weightless norm (gamma 1, beta 0, no weights to
    load); ``bias=False`` keeps the weight only. Weights load as ``weight``
    and ``bias``.
    """

    def __init__(
        self,
        dims: int,
        dtype: DType,
        device: DeviceRef,
        eps: float = 1e-5,
        *,
        weight: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if bias and not weight:
            raise ValueError("a LayerNorm with a bias but no weight is not a transformers variant")
        self.dims = dims
        self.eps = eps
        self.device = device
        self.weight = Weight("weight", dtype, (dims,), device=device) if weight else None
        self.bias = Weight("bias", dtype, (dims,), device=device) if bias else None

    def __call__(self, x: TensorValue) -> TensorValue:
        device = x.device
        gamma = (
            ops.cast(self.weight, DType.float32).to(device)
            if self.weight is not None
            else _filled(1.0, self.dims, device)
        )
        beta = (
            ops.cast(self.bias, DType.float32).to(device)
            if self.bias is not None
            else _filled(0.0, self.dims, device)
        )
        normed = ops.layer_norm(x.cast(DType.float32), gamma=gamma, beta=beta, epsilon=self.eps)
        return normed.cast(x.dtype)


class RMSNormF32(Module):
    """RMSNorm over the last axis: ``x * rsqrt(mean(x^2) + eps) * (offset + w)``.

    ``weight_offset=1.0`` is Gemma's ``(1 + w)`` norm. With
    ``scale_in_float32=True`` (Gemma) the weight multiplies the float32
    normalized value before the cast back; with ``False`` (Llama) the
    normalized value is cast to the input dtype first, then multiplied by the
    weight in that dtype. The weight loads as ``weight``.
    """

    def __init__(
        self,
        dims: int,
        dtype: DType,
        device: DeviceRef,
        eps: float = 1e-6,
        *,
        weight_offset: float = 0.0,
        scale_in_float32: bool = True,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.eps = eps
        self.weight_offset = weight_offset
        self.scale_in_float32 = scale_in_float32
        self.weight = Weight("weight", dtype, (dims,), device=device)

    def __call__(self, x: TensorValue) -> TensorValue:
        xf = x.cast(DType.float32)
        mean_square = ops.mean(xf * xf, axis=-1)
        normed = xf * ops.rsqrt(mean_square + self.eps)
        scale = ops.cast(self.weight, DType.float32).to(x.device)
        if self.weight_offset != 0.0:
            scale = scale + self.weight_offset
        if self.scale_in_float32:
            return (normed * scale).cast(x.dtype)
        return normed.cast(x.dtype) * scale.cast(x.dtype)
