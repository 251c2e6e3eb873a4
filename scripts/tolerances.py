"""Comparison tolerances shared by compare, layer-diff and the replica sensitivity check.

One place holds them so that "MATCH" in compare and "sensitive enough" in the
tiny-replica report mean the same thing:

* ``LOGPROB_ATOL[dtype]``: the largest absolute difference in a token's
  log-probability that compare still calls a match. fp32 on the CPU agrees to
  about 1e-5 in practice (6e-6 measured on a 2-layer replica), so 1e-3 leaves
  headroom for kernel differences without hiding real bugs. bf16/fp16 round
  every activation, so their tolerances are much wider.
* ``SENSITIVITY_FACTOR``: a replica is sensitive enough when every applicable
  mutation moves some logprob by at least this many times the tolerance.
* ``HIDDEN_ATOL`` / ``HIDDEN_RTOL``: per-block hidden-state tolerances for
  layer-by-layer comparison (relative to the block's activation scale).
* ``FLAT_REFERENCE_SPREAD``: the smallest reference spread (mean over the
  probed positions of top logprob minus the vocabulary's mean logprob) on
  which compare, layer-diff, tiny, the gates and the sensitivity report give
  any verdict. See its comment.
"""

from __future__ import annotations

LOGPROB_ATOL = {
    "float32": 1e-3,
    "bfloat16": 0.15,
    "float16": 0.05,
}

SENSITIVITY_FACTOR = 100.0

HIDDEN_RTOL = {
    "float32": 1e-3,
    "bfloat16": 3e-2,
    "float16": 1e-2,
}

# A reference whose logprobs are (nearly) the same for every token gives every port the same answer:
# zeroed embeddings make every logprob exactly -ln(vocab) on both sides, so any graph "matches".
# The floor is the float32 sensitivity threshold (SENSITIVITY_FACTOR x the float32 tolerance, 0.1
# nats): below it the top token stands out from the average token by less than the smallest move
# the sensitivity report asks a port bug to cause. Measured on 2-layer replicas of transformers'
# default configs: zeroed embeddings 1.8e-15, default init 0.48, peaked init 11.9 (Llama) and 28.7
# (Gemma-2).
FLAT_REFERENCE_SPREAD = SENSITIVITY_FACTOR * LOGPROB_ATOL["float32"]

TOP_K = 5  # how many top tokens each side reports for tie-tolerant checks (MAX caps k at 7)

_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
            "half": "float16", "float": "float32"}


def canonical_dtype(dtype: str) -> str:
    """Map dtype spellings (``bf16``, ``torch.float32``, ``F32``...) to float32/bfloat16/float16."""
    name = str(dtype).lower().replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in LOGPROB_ATOL:
        raise ValueError(f"no tolerance defined for dtype {dtype!r}; use one of {sorted(LOGPROB_ATOL)}")
    return name


def logprob_atol(dtype: str) -> float:
    """Absolute logprob tolerance for comparisons run in ``dtype``."""
    return LOGPROB_ATOL[canonical_dtype(dtype)]


def sensitivity_threshold(dtype: str = "float32") -> float:
    """The smallest max |Δ logprob| a mutation must cause for a replica to pass."""
    return SENSITIVITY_FACTOR * logprob_atol(dtype)


def hidden_rtol(dtype: str) -> float:
    """Relative tolerance for per-block hidden-state comparison in ``dtype``."""
    return HIDDEN_RTOL[canonical_dtype(dtype)]
