"""Ungated MLP ``down(act(up(x)))`` with biases and any listed transformers activation name.

Mirrors transformers: modeling_gpt_neox.py ``GPTNeoXMLP``
(``dense_h_to_4h`` / ``dense_4h_to_h``), modeling_phi.py ``PhiMLP``
(``fc1`` / ``fc2``), modeling_gpt2.py ``GPT2MLP`` (``c_fc`` / ``c_proj``, Conv1D:
transpose in the adapter), modeling_opt.py (``fc1`` / ``fc2``); activations
from activations.py ``ACT2FN``.

MAX 26.7 APIs: ``max.nn.linear.Linear`` (``has_bias``), ``ops.gelu``
(``approximate="none"`` / ``"tanh"``), ``ops.relu``, ``ops.silu``,
``ops.sigmoid``, ``ops.tanh``. MAX's own ``MLP`` is gated (``down(act(gate) *
up)``) and its activation names are MAX's, not transformers': ``gelu_new`` or
``gelu_pytorch_tanh`` are not among them. Self-contained: imports only max and
the standard library.
"""

from __future__ import annotations

from collections.abc import Callable

from max.dtype import DType
from max.graph import DeviceRef, TensorValue, ops
from max.nn.layer import Module
from max.nn.linear import Linear

BLOCK_VERSION = "1"

QUICK_GELU_SCALE = 1.702  # transformers QuickGELUActivation: x * sigmoid(1.702 * x)


def _relu2(x: TensorValue) -> TensorValue:
    r = ops.relu(x)
    return r * r


def _quick_gelu(x: TensorValue) -> TensorValue:
    return x * ops.sigmoid(x * QUICK_GELU_SCALE)


ACTIVATIONS: dict[str, Callable[[TensorValue], TensorValue]] = {
    "gelu": lambda x: ops.gelu(x, approximate="none"),  # erf GELU
    "gelu_new": lambda x: ops.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: ops.gelu(x, approximate="tanh"),  # same tanh formula, factored differently
    "gelu_pytorch_tanh": lambda x: ops.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": ops.relu,
    "relu2": _relu2,
    "silu": ops.silu,
    "swish": ops.silu,
    "sigmoid": ops.sigmoid,
    "tanh": ops.tanh,
}


def activation(name: str) -> Callable[[TensorValue], TensorValue]:
    """The MAX function for a transformers ``hidden_act`` name; unknown names raise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not in the block's table {sorted(ACTIVATIONS)}; add it with its formula"
        ) from None


class UngatedMLP(Module):
    """``down(act(up(x)))``; weights load as ``up_proj`` and ``down_proj`` (``.weight``, ``.bias``)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: DType,
        device: DeviceRef,
        hidden_act: str,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.act = activation(hidden_act)
        self.hidden_act = hidden_act
        self.up_proj = Linear(hidden_size, intermediate_size, dtype, device, has_bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype, device, has_bias=bias)

    def __call__(self, x: TensorValue) -> TensorValue:
        return self.down_proj(self.act(self.up_proj(x)))
