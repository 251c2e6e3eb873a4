"""Decoder blocks: parallel residual (one shared norm or two) and sequential residual with optional post-norms.

Mirrors transformers:
- modeling_gpt_neox.py ``GPTNeoXLayer`` with ``use_parallel_residual``:
  ``x + attn(ln1(x)) + mlp(ln2(x))`` (two norms); without it, sequential;
- modeling_phi.py ``PhiDecoderLayer`` and modeling_gptj.py ``GPTJBlock``:
  ``x + attn(ln(x)) + mlp(ln(x))`` (one shared norm);
- modeling_gemma2.py ``Gemma2DecoderLayer`` / modeling_olmo2.py
  ``Olmo2DecoderLayer``: a norm on each sublayer's output before the residual
  add (``post_attention_norm`` / ``post_mlp_norm`` here).

MAX 26.7 APIs: ``max.nn.layer.Module``; the attention is called with the
``(layer_idx, x, kv_collection, freqs_cis, input_row_offsets)`` signature that
``max.nn.transformer.Transformer`` uses for its layers. The norms, attention
and MLP are passed in, so any module works (this file imports no other
block). Self-contained: imports only max and the standard library.
"""

from __future__ import annotations

from max.graph import TensorValue
from max.nn.kv_cache import PagedCacheValues
from max.nn.layer import Module

BLOCK_VERSION = "1"


class ParallelResidualBlock(Module):
    """``x + attn(norm_a(x)) + mlp(norm_m(x))``; ``mlp_norm=None`` shares the input norm.

    Weights load under ``self_attn``, ``mlp``, ``input_layernorm`` and, with
    two norms, ``post_attention_layernorm`` (GPT-NeoX's name for the MLP-side
    norm, which reads the block input, not the attention output).
    """

    def __init__(self, attention: Module, mlp: Module, input_norm: Module, mlp_norm: Module | None = None) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = input_norm
        self.shared_norm = mlp_norm is None
        if mlp_norm is not None:
            self.post_attention_layernorm = mlp_norm

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        freqs_cis: TensorValue,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        normed = self.input_layernorm(x)
        attn_out = self.self_attn(
            layer_idx, normed, kv_collection, freqs_cis=freqs_cis, input_row_offsets=input_row_offsets
        )
        mlp_in = normed if self.shared_norm else self.post_attention_layernorm(x)
        return x + attn_out + self.mlp(mlp_in)


class SequentialResidualBlock(Module):
    """``h = x + post_a(attn(pre_a(x)))``, then ``h + post_m(mlp(pre_m(h)))``; absent norms are skipped.

    Weights load under ``self_attn``, ``mlp``, ``input_layernorm``,
    ``post_attention_layernorm`` (pre-MLP norm), and the optional
    ``post_attention_norm`` / ``post_mlp_norm`` on the sublayer outputs.
    """

    def __init__(
        self,
        attention: Module,
        mlp: Module,
        input_norm: Module | None,
        pre_mlp_norm: Module | None,
        *,
        post_attention_norm: Module | None = None,
        post_mlp_norm: Module | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        present = []
        for name, norm in (
            ("input_layernorm", input_norm),
            ("post_attention_layernorm", pre_mlp_norm),
            ("post_attention_norm", post_attention_norm),
            ("post_mlp_norm", post_mlp_norm),
        ):
            if norm is not None:
                setattr(self, name, norm)
                present.append(name)
        self.present_norms = tuple(present)

    def _maybe(self, name: str, x: TensorValue) -> TensorValue:
        return getattr(self, name)(x) if name in self.present_norms else x

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        freqs_cis: TensorValue,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        attn_out = self.self_attn(
            layer_idx,
            self._maybe("input_layernorm", x),
            kv_collection,
            freqs_cis=freqs_cis,
            input_row_offsets=input_row_offsets,
        )
        h = x + self._maybe("post_attention_norm", attn_out)
        mlp_out = self.mlp(self._maybe("post_attention_layernorm", h))
        return h + self._maybe("post_mlp_norm", mlp_out)
