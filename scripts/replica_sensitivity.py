"""Does a tiny replica notice port bugs? Mutate it in transformers and measure.

Each mutation reproduces one classic porting bug on the HF side and names the
delta code (``delta_codes.DeltaCode``) it proves observable: as a config edit
where the config has a switch for it, a weight edit that is mathematically the
same as the bug, or a structural edit (forward hooks that rewire the block).
For every mutation that runs, the report measures max |delta logprob| over a
fixed prompt (at each position, on the unmutated model's top-k tokens, the
tokens a comparison sees).

Every mutation ends in one :class:`Outcome`: ``moved`` (at least
``tolerances.sensitivity_threshold(dtype)``), ``did not move``, ``not
applicable`` (the model lacks the feature; the row says why) or ``tool error``
(the model has the feature but this tool cannot edit it; the row names the
part). The replica passes when every applicable mutation moved, a fresh re-run
of the unmutated model moves logprobs by exactly 0 and the reference is not
flat (``hf_reference.check_not_flat``'s rule). A tool error is neither a pass
nor a failed replica: :func:`sensitivity_report` raises
:class:`SensitivityToolError` (exit 3, naming the parts) after running the
rest. Encoder and encoder-decoder classes that transformers also registers as
causal LMs are refused before any model is loaded (:class:`NotDecoderOnly`,
exit 2). Models load through ``hf_reference`` (float32, eager attention).
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hf_reference
import model_anatomy
import tolerances
from cli_support import EXIT_STOP, ScriptError
from delta_codes import DeltaCode
from tiny_config import resample_factors

# --- config vocabulary -----------------------------------------------------------------------------
# The keys come from model_anatomy's one alias table (top-level spellings: the mutations read and edit
# the loaded HF config object, where nested keys such as ffn_config.* are not attributes).


def _aliases(name: str) -> tuple[str, ...]:
    return tuple(key for key in model_anatomy.ALIASES[name] if "." not in key)


NORM_EPS_KEYS = _aliases("norm_eps")
ACTIVATION_KEYS = _aliases("activation")
PARALLEL_KEYS = _aliases("parallel_block")
EXPERT_COUNT_KEYS = _aliases("num_experts")
TOPK_KEYS = _aliases("experts_per_token")
RENORMALIZE_KEYS = _aliases("norm_topk_prob")
LOGIT_SCALE_KEYS = _aliases("logit_scale")

# Relative std of the noise the "one layer perturbed" mutation adds to the middle layer's matrices.
PERTURB_RELATIVE_STD = 0.1
# Factor the rope_theta mutation applies: far enough from 1 that every frequency moves visibly.
ROPE_THETA_FACTOR = 0.05
# Factor the eps mutations apply: the calibrated first norm sees 30 x eps, so x100 moves it clearly.
EPS_FACTOR = 100.0
# The shared-expert gate mutation pins the gate logit here: sigmoid(30) = 1 - 9e-14, i.e. no gate.
UNGATED_LOGIT = 30.0
# Two tensors count as "the same input" in the structural probes when they agree to this (float32).
PROBE_ATOL = 1e-5
# Relative spread below which the ratio of router scores to a candidate score function is "constant".
ROUTER_RATIO_RTOL = 1e-4
# Families whose fused query_key_value is laid out per head ([q_h; k_h; v_h] for each head h).
PER_HEAD_FUSED_QKV = ("gpt_neox", "gpt_neox_japanese", "bloom", "persimmon")
# Families whose fused QKV layout is neither [q; k; v] nor per head: editing it would be a guess.
UNKNOWN_FUSED_QKV = ("codegen",)
# Class-name fragments of activation modules (transformers.activations, torch.nn, family classes like BloomGelu).
ACTIVATION_CLASS_MARKERS = ("gelu", "silu", "swish", "relu", "activation", "tanh", "sigmoid", "mish", "quickgelu")
# Activation names of the GELU family: exact (erf) vs tanh approximations. The two differ by less than
# 1e-3 anywhere, so no replica moves logprobs 100x compare's tolerance with this bug (measured 1.6e-3 to
# 3.7e-3 nats on GPT-2, Falcon and Phi replicas): that row's bar is compare's own tolerance (the bug
# must be a DIVERGED, not a MATCH), named "bounded" in the table.
EXACT_GELU = ("gelu",)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")

# Exit code of the up-front refusal of a non-decoder class: a hard stop, like a wall.
NOT_DECODER_EXIT = EXIT_STOP


class Outcome(str, enum.Enum):
    """How one mutation ended."""

    MOVED = "moved"  # applicable, ran, moved logprobs by at least the threshold
    DID_NOT_MOVE = "did not move"  # applicable, ran, below the threshold: the replica is blind to it
    NOT_APPLICABLE = "not applicable"  # the model lacks the feature (the row says why)
    TOOL_ERROR = "tool error"  # the feature exists but the tool cannot edit it (the row names the part)


class EditKind(str, enum.Enum):
    """How a mutation reproduces its bug."""

    CONFIG = "config edit"
    WEIGHT = "weight edit"
    STRUCTURE = "structural edit"  # forward hooks or module attributes


class Verdict(str, enum.Enum):
    """The report's verdict."""

    PASSED = "PASSED"
    FAILED = "FAILED"  # the replica is blind to a bug, is flat, or is not deterministic
    TOOL_ERROR = "TOOL ERROR"  # some mutation could not be built: no verdict on the replica


class NotApplicable(Exception):
    """Raised by a mutation's plan: the model lacks the feature (the message says why)."""


class ToolError(Exception):
    """Raised by a mutation's plan or edit: the feature exists but cannot be edited (names the part)."""


class NotDecoderOnly(ScriptError):
    """The replica is an encoder or encoder-decoder class: refused before loading anything (exit 2)."""

    exit_code = NOT_DECODER_EXIT


class SensitivityToolError(ScriptError):
    """Some mutation ended in a tool error (exit 3); ``report`` holds every row."""

    def __init__(self, report: "SensitivityReport"):
        self.report = report
        rows = "; ".join(f"{m.name}: {m.reason}" for m in report.mutations if m.outcome is Outcome.TOOL_ERROR)
        super().__init__(f"the sensitivity report could not build every mutation (a tool error, not a verdict on "
                         f"the replica): {rows}")


@dataclass
class MutationResult:
    """One row of the sensitivity table."""

    name: str
    code: str | None  # the delta code the mutation proves observable; None for baseline features
    kind: str
    how: str
    outcome: Outcome
    delta: float | None = None
    reason: str = ""  # why not applicable, or the part a tool error could not edit
    threshold: float | None = None  # the bar this row had to reach (None when it did not run)

    @property
    def applicable(self) -> bool:
        return self.outcome in (Outcome.MOVED, Outcome.DID_NOT_MOVE)

    @property
    def passed(self) -> bool | None:
        return self.outcome is Outcome.MOVED if self.applicable else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "code": self.code, "kind": self.kind, "how": self.how,
                "outcome": self.outcome.value, "applicable": self.applicable, "delta": self.delta,
                "passed": self.passed, "reason": self.reason, "threshold": self.threshold}


@dataclass
class SensitivityReport:
    """The mutation table and the verdict."""

    replica: str
    dtype: str
    threshold: float
    rerun_delta: float
    prompt_tokens: int
    mutations: list[MutationResult] = field(default_factory=list)
    reference_spread: float | None = None  # mean (top - mean) logprob of the unmutated replica

    @property
    def flat(self) -> bool:
        return self.reference_spread is not None and hf_reference.is_flat(self.reference_spread)

    @property
    def tool_errors(self) -> list[MutationResult]:
        return [m for m in self.mutations if m.outcome is Outcome.TOOL_ERROR]

    @property
    def verdict(self) -> Verdict:
        if self.tool_errors:
            return Verdict.TOOL_ERROR
        return Verdict.FAILED if self.failures() else Verdict.PASSED

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASSED

    def failures(self) -> list[str]:
        failed = [m.name for m in self.mutations if m.outcome is Outcome.DID_NOT_MOVE]
        if self.rerun_delta != 0.0:
            failed.insert(0, "rerun")
        if self.flat:
            failed.insert(0, "flat reference")
        return failed

    def to_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "dtype": self.dtype, "threshold": self.threshold,
                "reference_spread": self.reference_spread, "flat_reference_threshold": tolerances.FLAT_REFERENCE_SPREAD,
                "flat": self.flat, "rerun_delta": self.rerun_delta, "prompt_tokens": self.prompt_tokens,
                "verdict": self.verdict.value, "passed": self.passed, "failures": self.failures(),
                "tool_errors": [m.name for m in self.tool_errors],
                "mutations": [m.to_dict() for m in self.mutations]}

    def table(self) -> str:
        rows = [f"sensitivity of {self.replica} (threshold {self.threshold:g} = "
                f"{tolerances.SENSITIVITY_FACTOR:g} x {self.dtype} tolerance; {self.prompt_tokens} prompt tokens)",
                f"{'mutation':<28} {'kind':<15} {'max|dlogprob|':>14}  result  how"]
        rows.append(f"{'rerun (unmutated)':<28} {'-':<15} {self.rerun_delta:>14.3g}  "
                    f"{'PASS' if self.rerun_delta == 0.0 else 'FAIL'}    must be exactly 0")
        if self.reference_spread is not None:
            rows.append(f"{'reference spread':<28} {'-':<15} {self.reference_spread:>14.3g}  "
                        f"{'FAIL' if self.flat else 'PASS'}    mean top-minus-mean logprob, at least "
                        f"{tolerances.FLAT_REFERENCE_SPREAD:g} (flat: {hf_reference.FLAT_MESSAGE})")
        labels = {Outcome.MOVED: "PASS ", Outcome.DID_NOT_MOVE: "FAIL ", Outcome.NOT_APPLICABLE: "n/a  ",
                  Outcome.TOOL_ERROR: "ERROR"}
        for m in self.mutations:
            delta = f"{m.delta:14.3g}" if m.delta is not None else f"{'-':>14}"
            text = m.how if m.applicable else f"{m.outcome.value}: {m.reason}"
            rows.append(f"{m.name:<28} {m.kind:<15} {delta}  {labels[m.outcome]}   {text}")
        if self.verdict is Verdict.TOOL_ERROR:
            rows.append(f"TOOL ERROR (no verdict on the replica): {', '.join(m.name for m in self.tool_errors)}")
        else:
            rows.append("PASSED" if self.passed else f"FAILED: {', '.join(self.failures())}")
        return "\n".join(rows)


@dataclass
class Subject:
    """What a mutation's plan inspects: the replica's fresh HF config and the unmutated model."""

    config: Any
    model: Any
    model_type: str


# A plan inspects the subject and returns the edit (raising NotApplicable or ToolError instead).
# A config edit takes the fresh config; a weight or structural edit takes (model copy, config).
Plan = Callable[[Subject], Callable[..., None]]


@dataclass
class Mutation:
    """A bug to reproduce, tied to the delta code it proves observable."""

    name: str
    code: DeltaCode | None
    kind: EditKind
    how: str
    plan: Plan
    bounded: bool = False  # the bug's own size is bounded: passes beyond compare's tolerance, not the 100x bar


# --- the decoder-only rule --------------------------------------------------------------------------


def decoder_only_refusal(config: dict[str, Any]) -> str | None:
    """Why a config (config.json dict) is not a decoder-only causal LM, or None when it is one.

    The one rule is ``wall_scan.not_causal_lm`` (check-walls and inspect use it too), fed with the
    modeling code as ``hf_source`` reads it: builds nothing, imports no torch.
    """
    import hf_source
    import wall_scan

    architectures = config.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures and \
        isinstance(architectures[0], str) else ""
    reading = hf_source.read_model(config)
    if reading is None:
        return None  # a model type transformers does not ship: not a refusal; its loader fails (exit 3)
    return wall_scan.not_causal_lm(config, arch, reading)


def check_decoder_only(config: dict[str, Any], label: str = "the replica") -> None:
    """Raise NotDecoderOnly (exit 2) when ``config`` is not a decoder-only causal LM."""
    reason = decoder_only_refusal(config)
    if reason:
        raise NotDecoderOnly(f"{label} {reason}; the sensitivity report and the port tools handle "
                             "decoder-only causal LMs only")


# --- config helpers ----------------------------------------------------------------------------------


def _first_key(config: Any, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if getattr(config, key, None) is not None:
            return key
    return None


def _present_keys(config: Any, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if getattr(config, key, None) is not None]


def _rope_dicts(config: Any) -> list[dict[str, Any]]:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return []
    if all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def _heads(config: Any) -> int:
    return int(config.num_attention_heads)


def _kv_heads(config: Any) -> int:
    if getattr(config, "multi_query", False) is True and not getattr(config, "new_decoder_architecture", False):
        return 1
    for key in ("num_key_value_heads", "num_kv_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return _heads(config)


def _head_dim(config: Any) -> int:
    value = getattr(config, "head_dim", None)
    return value if isinstance(value, int) and value > 0 else config.hidden_size // _heads(config)


def _rotary_dim(config: Any) -> int:
    explicit = getattr(config, "rotary_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    factors = [p.get("partial_rotary_factor") for p in _rope_dicts(config) if p.get("partial_rotary_factor")]
    factor = factors[0] if factors else (getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(_head_dim(config) * factor)


def _has_rope(config: Any) -> bool:
    """RoPE configured by rope parameters, or by a rotary_dim key (GPT-J style, base fixed in the code)."""
    rotary_dim = getattr(config, "rotary_dim", None)
    return any(p.get("rope_theta") for p in _rope_dicts(config)) or (isinstance(rotary_dim, int) and rotary_dim > 0)


def _has_rope_theta(config: Any) -> bool:
    return any(p.get("rope_theta") for p in _rope_dicts(config))


def _expert_count(config: Any) -> int:
    key = _first_key(config, EXPERT_COUNT_KEYS)
    value = getattr(config, key, None) if key else None
    return value if isinstance(value, int) else 0


# --- layout adapter ------------------------------------------------------------------------------------
# TODO(H1 model_anatomy): a local adapter over the HF module tree, written before model_anatomy.resolve_layout
# was published (02:37); switch these helpers (blocks, q/k rows, o projection, norms, MoE router and
# shared-expert gate, position embedding and offset) to its ModelLayout/BlockLayout.


def _named(model: Any) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_projection(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _blocks(model: Any, config: Any) -> list[tuple[str, Any]]:
    """The decoder blocks (name, module): the module list as long as the layer count that holds attention."""
    import torch

    layers = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers and len(module) > 0:
            if all(_attention_of(block) is not None for block in module):
                return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise ToolError(f"cannot find the decoder blocks (a module list of {layers} blocks with attention)")


def _attention_of(block: Any) -> Any | None:
    """The innermost attention module of a block that owns its projections."""
    found = None
    for module in block.modules():
        if "attention" in type(module).__name__.lower() and any(_is_projection(c) for c in module.children()):
            found = module if found is None or _contains(found, module) else found
    return found


def _contains(outer: Any, inner: Any) -> bool:
    return any(m is inner for m in outer.modules()) and outer is not inner


def _mlp_of(block: Any, attention: Any) -> tuple[str, Any]:
    """The block's direct child that is its MLP or MoE (has parameters; not attention, not a norm)."""
    candidates = [(name, child) for name, child in block.named_children()
                  if not _is_norm(child) and child is not attention and not _contains(child, attention)
                  and next(child.parameters(), None) is not None]
    if len(candidates) > 1:
        named = [c for c in candidates if any(t in c[0].lower() for t in ("mlp", "ffn", "feed_forward", "moe"))]
        candidates = named or candidates
    if len(candidates) > 1 and all(_is_projection(c) for _, c in candidates):
        # The MLP's projections sit in the block itself (OPT: fc1, fc2): its input is the input projection's.
        first = [c for c in candidates if c[0] in MLP_INPUT_NAMES]
        candidates = first[:1] if first else candidates
    if len(candidates) != 1:
        raise ToolError(f"cannot tell the block's MLP among {[name for name, _ in candidates]}")
    return candidates[0]


@dataclass
class HeadFeatures:
    """Where each head's output features sit in a projection (q or k), fused or not."""

    module: Any
    rows: list[list[int]]  # rows[h] = the output feature indices of head h, in order


def _projection(attention: Any, names: tuple[str, ...]) -> Any | None:
    for name in names:
        module = getattr(attention, name, None)
        if module is not None and _is_projection(module):
            return module
    return None


Q_NAMES = ("q_proj", "query", "q", "wq", "q_lin")
K_NAMES = ("k_proj", "key", "k", "wk", "k_lin")
FUSED_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack")
O_NAMES = ("o_proj", "dense", "out_proj", "c_proj", "o", "wo", "proj")
# The MLP input projection when a block holds its MLP projections directly (no MLP module).
MLP_INPUT_NAMES = ("fc1", "fc_in", "c_fc", "up_proj", "dense_h_to_4h", "w1")


def _out_features(module: Any) -> int:
    weight = module.weight
    return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])


def _qk_features(attention: Any, config: Any, model_type: str, where: str) -> tuple[HeadFeatures, HeadFeatures]:
    """The q and k head features of an attention module (separate, fused [q;k;v], per head or grouped)."""
    heads, kv, dim = _heads(config), _kv_heads(config), _head_dim(config)
    q, k = _projection(attention, Q_NAMES), _projection(attention, K_NAMES)
    if q is not None and k is not None:
        return (HeadFeatures(q, [list(range(h * dim, (h + 1) * dim)) for h in range(heads)]),
                HeadFeatures(k, [list(range(j * dim, (j + 1) * dim)) for j in range(kv)]))
    fused = _projection(attention, FUSED_NAMES)
    if fused is None:
        raise ToolError(f"cannot find the q/k projections of {where} (separate q/k or a fused qkv)")
    if model_type in UNKNOWN_FUSED_QKV:
        raise ToolError(f"the fused QKV layout of {where} ({model_type}) is not one this tool can edit")
    if _out_features(fused) != (heads + 2 * kv) * dim:
        raise ToolError(f"the fused QKV of {where} has {_out_features(fused)} outputs, not "
                        f"(heads + 2 kv) x head_dim = {(heads + 2 * kv) * dim}")
    span = lambda start: list(range(start, start + dim))  # noqa: E731
    grouped = model_type == "falcon" and getattr(config, "new_decoder_architecture", False)
    if grouped:  # per kv group: [q heads of the group; k; v]
        group, width = heads // kv, (heads // kv + 2) * dim
        q_rows = [span((h // group) * width + (h % group) * dim) for h in range(heads)]
        k_rows = [span(j * width + group * dim) for j in range(kv)]
    elif model_type in PER_HEAD_FUSED_QKV or (model_type == "falcon" and kv == heads):
        q_rows = [span(h * 3 * dim) for h in range(heads)]  # per head: [q_h; k_h; v_h]
        k_rows = [span(h * 3 * dim + dim) for h in range(heads)]
    else:  # [q; k; v]
        q_rows = [span(h * dim) for h in range(heads)]
        k_rows = [span(heads * dim + j * dim) for j in range(kv)]
    return HeadFeatures(fused, q_rows), HeadFeatures(fused, k_rows)


def _permute_outputs(module: Any, rows: list[int], order: list[int]) -> None:
    """Output features ``rows`` of a Linear/Conv1D take the values of ``rows[order[i]]``."""
    import torch

    index, source = torch.tensor(rows), torch.tensor([rows[i] for i in order])
    conv = type(module).__name__ == "Conv1D"
    weight = module.weight
    if conv:
        weight[:, index] = weight[:, source].clone()
    else:
        weight[index] = weight[source].clone()
    if getattr(module, "bias", None) is not None:
        module.bias[index] = module.bias[source].clone()


def _permute_inputs(module: Any, order: list[int]) -> None:
    """Input features of a Linear/Conv1D reordered: feature i takes feature ``order[i]``."""
    import torch

    index = torch.tensor(order)
    if type(module).__name__ == "Conv1D":
        module.weight.copy_(module.weight.clone()[index])
    else:
        module.weight.copy_(module.weight.clone()[:, index])


Q_NORM_NAMES = ("q_norm", "q_layernorm", "query_layernorm")
K_NORM_NAMES = ("k_norm", "k_layernorm", "key_layernorm")


def _norm_named(attention: Any, names: tuple[str, ...]) -> Any | None:
    return next((getattr(attention, n) for n in names if getattr(attention, n, None) is not None), None)


def _qk_norms(attention: Any) -> list[Any]:
    return [n for n in (_norm_named(attention, Q_NORM_NAMES), _norm_named(attention, K_NORM_NAMES)) if n is not None]


def _permute_norm(norm: Any, order_full: list[int], per_head: list[int] | None) -> None:
    """Apply a full-width or per-head permutation to a q/k norm weight, whichever its size fits."""
    import torch

    if norm is None or getattr(norm, "weight", None) is None:
        return
    size = norm.weight.shape[0]
    if size == len(order_full):
        norm.weight.copy_(norm.weight.clone()[torch.tensor(order_full)])
    elif per_head is not None and size == len(per_head):
        norm.weight.copy_(norm.weight.clone()[torch.tensor(per_head)])


def _attention_parts(subject: Subject) -> list[tuple[str, Any]]:
    return [(name, _attention_of(block)) for name, block in _blocks(subject.model, subject.config)]


def _resolve_in(model: Any, subject: Subject) -> list[tuple[str, Any]]:
    """The same (block name, attention) pairs in a deep copy of the subject's model."""
    named = dict(model.named_modules())
    names = _named(subject.model)
    return [(name, named[names[id(attention)]]) for name, attention in _attention_parts(subject)]


# --- the mutations: config edits -------------------------------------------------------------------


def _plan_rope_theta(subject: Subject) -> Callable[..., None]:
    if not _has_rope(subject.config):
        raise NotApplicable("no RoPE parameters (rope_theta or rotary_dim)")
    if not _has_rope_theta(subject.config):
        return _sinusoid_table_edit(subject)

    def edit(config: Any) -> None:
        for params in _rope_dicts(config):
            params["rope_theta"] = params["rope_theta"] * ROPE_THETA_FACTOR
    return _ConfigEdit(edit)


def _sinusoid_table(base: float, positions: int, dim: int) -> Any:
    """[sin | cos] of position x base^(-2i/dim), the table GPT-J-style attention keeps as embed_positions."""
    import torch

    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
    angles = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :].float()
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


def _sinusoid_table_edit(subject: Subject) -> Callable[..., None]:
    """RoPE whose base is fixed in the code: rebuild each attention's sin/cos table with base x factor.

    The base is read back from the table (row 1 holds sin(base^(-2i/dim))) and the rebuilt table must
    reproduce the original exactly, so a layout this tool does not know is a tool error, not a guess.
    """
    import torch

    parts = _attention_parts(subject)
    tables = [(name, getattr(attention, "embed_positions", None)) for name, attention in parts]
    missing = [name for name, table in tables if not isinstance(table, torch.Tensor) or table.ndim != 2]
    if missing:
        raise ToolError(f"the RoPE base is fixed in the code and {missing[0]} has no sin/cos table "
                        "(embed_positions) to rebuild")
    positions, dim = tables[0][1].shape
    if dim < 4:
        raise ToolError(f"the sin/cos table of {tables[0][0]} is too narrow ({dim}) to read its base")
    second = float(torch.asin(tables[0][1][1, 1].clamp(-1, 1)))
    base = second ** (-dim / 2) if second > 0 else 0.0
    rebuilt = _sinusoid_table(base, positions, dim) if base > 1 else None
    if rebuilt is None or not torch.allclose(rebuilt, tables[0][1].float(), atol=PROBE_ATOL):
        raise ToolError(f"the sin/cos table of {tables[0][0]} is not the [sin | cos] layout this tool rebuilds")
    mutated = _sinusoid_table(base * ROPE_THETA_FACTOR, positions, dim)

    def edit(model: Any, config: Any) -> None:
        for _, attention in _resolve_in(model, subject):
            attention.embed_positions = mutated.to(attention.embed_positions.dtype)
    return _ModelEdit(edit)


def _plan_partial(subject: Subject) -> Callable[..., None]:
    config = subject.config
    if not _has_rope(config):
        raise NotApplicable("no RoPE parameters")
    rotary_dim = getattr(config, "rotary_dim", None)
    if isinstance(rotary_dim, int) and rotary_dim > 0:
        def edit_dim(cfg: Any) -> None:
            dim = _head_dim(cfg)
            cfg.rotary_dim = dim if rotary_dim < dim else dim // 2
        return edit_dim
    if getattr(config, "partial_rotary_factor", None) is None and not any(
            "partial_rotary_factor" in p for p in _rope_dicts(config)):
        raise NotApplicable("RoPE covers the whole head (no partial_rotary_factor, rotary_pct or rotary_dim)")

    def edit(cfg: Any) -> None:
        current = _rotary_dim(cfg) / _head_dim(cfg)
        new = 1.0 if current < 1.0 else 0.5
        if getattr(cfg, "partial_rotary_factor", None) is not None:
            cfg.partial_rotary_factor = new
        half = int(_head_dim(cfg) * new) // 2
        for params in _rope_dicts(cfg):
            params["partial_rotary_factor"] = new
            for name in ("long_factor", "short_factor"):  # longrope lists have one entry per rotary pair
                if isinstance(params.get(name), list):
                    params[name] = resample_factors(params[name], half)
    return edit


def _plan_no_sliding(subject: Subject) -> Callable[..., None]:
    config = subject.config
    if not getattr(config, "sliding_window", None):
        raise NotApplicable("no sliding window")
    if getattr(config, "use_sliding_window", None) is False:
        raise NotApplicable("use_sliding_window is false")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        raise NotApplicable("no layer uses sliding attention")

    def edit(cfg: Any) -> None:
        cfg.sliding_window = 1 << 20  # wider than any prompt: the same as no window
    return edit


def _plan_eps(subject: Subject) -> Callable[..., None]:
    keys = _present_keys(subject.config, NORM_EPS_KEYS)
    if not keys:
        return _norm_module_eps_edit(subject)

    def edit(cfg: Any) -> None:
        for key in keys:
            setattr(cfg, key, getattr(cfg, key) * EPS_FACTOR)
    return _ConfigEdit(edit)


def _measured_layer_norm_eps(norm: Any) -> float | None:
    """The eps of a weightless LayerNorm, measured: on [a, -a, ...] it returns a / sqrt(a^2 + eps)."""
    import torch

    width = int(norm.normalized_shape[-1])
    amplitude = 1e-3  # comparable to any usual eps (1e-6 .. 1e-5), so the output reveals it
    probe = torch.tensor([amplitude, -amplitude] * (width // 2) + [0.0] * (width % 2))
    with torch.no_grad():
        out = norm(probe.reshape(1, 1, width)).reshape(-1).double()
    variance = float(probe.double().var(unbiased=False))
    gain = float(out[0]) / amplitude
    if gain <= 0:
        return None
    eps = 1.0 / gain**2 - variance
    return eps if eps > 0 else None


def _norm_module_eps_edit(subject: Subject) -> Callable[..., None]:
    """No eps key: the eps lives in the norm modules (an attribute) or is fixed in their code.

    Attributes are scaled. A weightless LayerNorm with the eps fixed in its code is replaced by
    layer_norm with its measured eps x factor. Any other norm is a tool error naming it.
    """
    from replica_init import NORM_EPS_ATTRS

    names = _named(subject.model)
    plan: list[tuple[str, str | None, float | None]] = []
    for module in subject.model.modules():
        if not _is_norm(module) or next(module.children(), None) is not None:
            continue
        attr = next((a for a in NORM_EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)
        if attr is not None:
            plan.append((names[id(module)], attr, None))
            continue
        weightless = next(module.parameters(), None) is None and hasattr(module, "normalized_shape")
        eps = _measured_layer_norm_eps(module) if weightless else None
        if eps is None:
            raise ToolError(f"no norm eps key ({', '.join(NORM_EPS_KEYS)}) and the eps of {names[id(module)]} "
                            f"({type(module).__name__}) is neither an attribute nor measurable")
        plan.append((names[id(module)], None, eps))
    if not plan:
        raise NotApplicable("no norm layers")

    def edit(model: Any, config: Any) -> None:
        import torch

        modules = dict(model.named_modules())
        for name, attr, eps in plan:
            norm = modules[name]
            if attr is not None:
                setattr(norm, attr, getattr(norm, attr) * EPS_FACTOR)
            else:
                shape, wrong = tuple(norm.normalized_shape), eps * EPS_FACTOR
                norm.forward = lambda x, shape=shape, wrong=wrong: torch.nn.functional.layer_norm(
                    x.float(), shape, None, None, eps=wrong).to(x.dtype)
    return _ModelEdit(edit)


def _activation_modules(subject: Subject) -> list[str]:
    """Names of the activation modules inside the blocks' MLPs (leaf modules named like an activation)."""
    names = _named(subject.model)
    found = []
    for _, block in _blocks(subject.model, subject.config):
        attention = _attention_of(block)
        for module in block.modules():
            if module is block or _contains(attention, module) or next(module.children(), None) is not None:
                continue
            if next(module.parameters(), None) is None and any(
                    t in type(module).__name__.lower() for t in ACTIVATION_CLASS_MARKERS):
                found.append(names[id(module)])
    return found


def _plan_activation(subject: Subject) -> Callable[..., None]:
    keys = _present_keys(subject.config, ACTIVATION_KEYS)
    if not keys:
        modules = _activation_modules(subject)
        if not modules:
            raise ToolError(f"no activation key ({', '.join(ACTIVATION_KEYS)}) and no activation module in "
                            "the MLPs (a function call in the code cannot be swapped)")

        def swap(model: Any, config: Any) -> None:
            """The activation fixed in the code replaced by SiLU (or SiLU by tanh GELU)."""
            import torch

            named = dict(model.named_modules())
            for name in modules:
                silu = "silu" in type(named[name]).__name__.lower() or "swish" in type(named[name]).__name__.lower()
                replacement = torch.nn.GELU(approximate="tanh") if silu else torch.nn.SiLU()
                named[name].forward = replacement.forward
        return _ModelEdit(swap)

    def edit(cfg: Any) -> None:
        for key in keys:
            current = str(getattr(cfg, key))
            setattr(cfg, key, "gelu_pytorch_tanh" if current in ("silu", "swish") else "silu")
    return edit


def _plan_gelu_variant(subject: Subject) -> Callable[..., None]:
    keys = _present_keys(subject.config, ACTIVATION_KEYS)
    values = {str(getattr(subject.config, key)) for key in keys}
    if not values & set(EXACT_GELU + TANH_GELU):
        raise NotApplicable(f"the activation is not a GELU ({', '.join(sorted(values)) or 'no activation key'})")

    def edit(cfg: Any) -> None:
        for key in keys:
            current = str(getattr(cfg, key))
            if current in EXACT_GELU:
                setattr(cfg, key, "gelu_pytorch_tanh")
            elif current in TANH_GELU:
                setattr(cfg, key, "gelu")
    return edit


def _plan_drop(key: str) -> Plan:
    def plan(subject: Subject) -> Callable[..., None]:
        if not getattr(subject.config, key, None):
            raise NotApplicable(f"config has no {key}")
        return lambda cfg: setattr(cfg, key, None)
    return plan


def _plan_logit_scale(subject: Subject) -> Callable[..., None]:
    key = _first_key(subject.config, LOGIT_SCALE_KEYS)
    if key is None:
        raise NotApplicable(f"no logit scale ({', '.join(LOGIT_SCALE_KEYS)})")
    if float(getattr(subject.config, key)) == 1.0:
        raise NotApplicable(f"{key} is 1")
    return lambda cfg: setattr(cfg, key, 1.0)


def _is_moe(subject: Subject) -> bool:
    return _expert_count(subject.config) > 1


def _plan_topk(subject: Subject) -> Callable[..., None]:
    if not _is_moe(subject):
        raise NotApplicable("not a mixture of experts")
    key = _first_key(subject.config, TOPK_KEYS)
    if key is None:
        raise ToolError(f"the experts-per-token key is not one of {', '.join(TOPK_KEYS)}")
    k, experts = int(getattr(subject.config, key)), _expert_count(subject.config)
    new = k - 1 if k > 1 else k + 1
    if new > experts:
        raise NotApplicable(f"top-{k} of {experts} experts: no other k")
    return lambda cfg: setattr(cfg, key, new)


# --- the mutations: weight edits ----------------------------------------------------------------------


def _norm_offset_style(model: Any) -> bool:
    """True when norms compute x * (1 + w): probed on a copy of the first norm."""
    import torch

    norm = next((m for m in model.modules() if _is_norm(m) and getattr(m, "weight", None) is not None), None)
    if norm is None:
        return False
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.zero_()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        out = probe(torch.randn(1, 2, probe.weight.shape[0]))
    return bool(out.abs().max() > 0)


def _plan_norm_offset(subject: Subject) -> Callable[..., None]:
    if not any(_is_norm(m) and getattr(m, "weight", None) is not None for m in subject.model.modules()):
        raise NotApplicable("no norm has a learnable weight")
    offset_style = _norm_offset_style(subject.model)

    def edit(model: Any, config: Any) -> None:
        for module in model.modules():
            if _is_norm(module) and getattr(module, "weight", None) is not None:
                module.weight.add_(-1.0 if offset_style else 1.0)
    return edit


def _plan_tie(subject: Subject) -> Callable[..., None]:
    if subject.model.get_output_embeddings() is None:
        raise ToolError("cannot find the LM head (get_output_embeddings() is None)")

    def edit(model: Any, config: Any) -> None:
        """Tied: the port loads a separate lm_head that is absent (MAX zero-fills it). Untied: it ties."""
        import torch

        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
            head.weight = torch.nn.Parameter(torch.zeros_like(embed.weight))
        else:
            head.weight.copy_(embed.weight)
    return edit


def _plan_gqa(subject: Subject) -> Callable[..., None]:
    config = subject.config
    heads, kv = _heads(config), _kv_heads(config)
    if kv in (1, heads):
        raise NotApplicable("no grouped KV heads (MHA or MQA)")
    parts = _attention_parts(subject)
    for name, attention in parts:  # resolve every part now: a missing one is a tool error, not a failed row
        _qk_features(attention, config, subject.model_type, name)
        if _projection(attention, O_NAMES) is None:
            raise ToolError(f"cannot find the attention output projection of {name} (one of {', '.join(O_NAMES)})")

    def edit(model: Any, cfg: Any) -> None:
        """Query head h reads KV head h % kv instead of h // group: reorder q heads and the o inputs."""
        group, dim = heads // kv, _head_dim(cfg)
        source = [(h // group) + (h % group) * kv for h in range(heads)]
        order = [source[h] * dim + i for h in range(heads) for i in range(dim)]
        for name, attention in _resolve_in(model, subject):
            q, _ = _qk_features(attention, cfg, subject.model_type, name)
            rows = [r for head_rows in q.rows for r in head_rows]
            _permute_outputs(q.module, rows, order)
            _permute_norm(_norm_named(attention, Q_NORM_NAMES), order, None)  # a full-width q norm follows
            _permute_inputs(_projection(attention, O_NAMES), order)
    return edit


def _plan_rope_style(subject: Subject) -> Callable[..., None]:
    config = subject.config
    if not _has_rope(config):
        raise NotApplicable("no RoPE parameters")
    parts = _attention_parts(subject)
    for name, attention in parts:
        _qk_features(attention, config, subject.model_type, name)

    def edit(model: Any, cfg: Any) -> None:
        """Reorder each q/k head's rotary dims [evens, odds]: RoPE then pairs the other way."""
        rot, dim = _rotary_dim(cfg), _head_dim(cfg)
        per_head = list(range(0, rot, 2)) + list(range(1, rot, 2)) + list(range(rot, dim))
        for name, attention in _resolve_in(model, subject):
            q, k = _qk_features(attention, cfg, subject.model_type, name)
            for features, norm_names in ((q, Q_NORM_NAMES), (k, K_NORM_NAMES)):
                rows = [r for head_rows in features.rows for r in head_rows]
                order = [h * dim + i for h in range(len(features.rows)) for i in per_head]
                _permute_outputs(features.module, rows, order)
                _permute_norm(_norm_named(attention, norm_names), order, per_head)
    return edit


def _plan_perturb(subject: Subject) -> Callable[..., None]:
    blocks = _blocks(subject.model, subject.config)
    middle = blocks[len(blocks) // 2][0]

    def edit(model: Any, config: Any) -> None:
        import torch

        block = dict(model.named_modules())[middle]
        generator = torch.Generator().manual_seed(1234)
        for param in block.parameters():
            if param.ndim >= 2:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(noise.to(param.dtype) * float(param.float().std()) * PERTURB_RELATIVE_STD)
    return edit


def _position_embedding(subject: Subject) -> tuple[str, Any] | None:
    """The learned absolute position embedding (name, module), or None."""
    import torch

    positions = getattr(subject.config, "max_position_embeddings", None)
    token = subject.model.get_input_embeddings()
    for name, module in subject.model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module is not token and isinstance(positions, int):
            if module.num_embeddings >= positions and module.embedding_dim == token.embedding_dim:
                return name, module
    return None


def _plan_learned_positions(subject: Subject) -> Callable[..., None]:
    found = _position_embedding(subject)
    if found is None:
        raise NotApplicable("no learned absolute position embedding")
    name, module = found
    offset = getattr(module, "offset", None)

    def edit(model: Any, config: Any) -> None:
        target = dict(model.named_modules())[name]
        if isinstance(offset, int) and offset:
            target.offset = 0  # the port reads row p instead of p + offset
        else:
            target.weight.zero_()  # the port never adds the position embeddings
    return edit


def _plan_head_dim(subject: Subject) -> Callable[..., None]:
    config = subject.config
    heads, dim = _heads(config), _head_dim(config)
    if dim * heads == config.hidden_size:
        raise NotApplicable("head_dim x heads equals hidden_size")
    parts = _attention_parts(subject)
    for name, attention in parts:
        if not isinstance(getattr(attention, "scaling", None), float):
            raise ToolError(f"cannot find the score scale of {name} (no float 'scaling' attribute)")
    wrong = (config.hidden_size // heads) ** -0.5

    def edit(model: Any, cfg: Any) -> None:
        """Scores scaled by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim), as a port sizing from hidden."""
        correct = dim ** -0.5
        for _, attention in _resolve_in(model, subject):
            attention.scaling = attention.scaling * wrong / correct
    return edit


def _plan_qk_norm_eps(subject: Subject) -> Callable[..., None]:
    from replica_init import NORM_EPS_ATTRS

    norms = [n for _, attention in _attention_parts(subject) for n in _qk_norms(attention)]
    if not norms:
        raise NotApplicable("no q/k norm")
    if not all(any(isinstance(getattr(n, a, None), float) for a in NORM_EPS_ATTRS) for n in norms):
        raise ToolError(f"cannot find the eps of the q/k norms (none of {', '.join(NORM_EPS_ATTRS)})")

    def edit(model: Any, config: Any) -> None:
        for _, attention in _resolve_in(model, subject):
            for norm in _qk_norms(attention):
                for attr in NORM_EPS_ATTRS:
                    if isinstance(getattr(norm, attr, None), float):
                        setattr(norm, attr, getattr(norm, attr) * EPS_FACTOR)
    return edit


# --- the mutations: structural edits --------------------------------------------------------------------


def _first_tensor(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden_arg(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _with_hidden(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=value)


def _probe_ids(config: Any) -> Any:
    import torch

    vocab = int(getattr(config, "vocab_size", 2) or 2)
    return torch.arange(1, 9).remainder(vocab).unsqueeze(0)


def _block_parts(subject: Subject) -> list[tuple[str, Any, Any, str, Any]]:
    """Per block: (name, block, attention, MLP child name, MLP)."""
    parts = []
    for name, block in _blocks(subject.model, subject.config):
        attention = _attention_of(block)
        mlp_name, mlp = _mlp_of(block, attention)
        parts.append((name, block, attention, mlp_name, mlp))
    return parts


def _probe_parallel(subject: Subject) -> tuple[bool, dict[str, str]]:
    """Whether the first block's MLP input ignores the attention output, and the norm that feeds each MLP.

    Runs the unmutated model twice: once as is, once with the first block's attention output doubled.
    Returns (parallel, {block name: name of the norm child whose output is the MLP input}).
    """
    import torch

    parts = _block_parts(subject)
    captured: dict[str, Any] = {}
    feeding: dict[str, str] = {}
    scale = {"factor": 1.0}
    handles = []
    first = parts[0][0]
    for name, block, attention, mlp_name, mlp in parts:
        for norm_name, norm in ((n, c) for n, c in block.named_children() if _is_norm(c)):
            def norm_hook(module, args, output, name=name, norm_name=norm_name):
                captured.setdefault(f"{name}/norms", []).append((norm_name, _first_tensor(output).detach().clone()))
            handles.append(norm.register_forward_hook(norm_hook))

        def mlp_pre(module, args, kwargs, name=name):
            captured[f"{name}/mlp"] = _hidden_arg(args, kwargs).detach().clone()
        handles.append(mlp.register_forward_pre_hook(mlp_pre, with_kwargs=True))
        if name == first:
            def attention_hook(module, args, output):
                if scale["factor"] == 1.0:
                    return None
                if isinstance(output, tuple):
                    return (output[0] * scale["factor"],) + output[1:]
                return output * scale["factor"]
            handles.append(attention.register_forward_hook(attention_hook))
    ids = _probe_ids(subject.config)
    try:
        with torch.no_grad():
            subject.model(input_ids=ids)
            plain = captured[f"{first}/mlp"]
            for name, *_ in parts:
                mlp_in = captured.get(f"{name}/mlp")
                for norm_name, out in captured.get(f"{name}/norms", []):
                    if mlp_in is not None and out.shape == mlp_in.shape and torch.allclose(out, mlp_in, atol=PROBE_ATOL):
                        feeding.setdefault(name, norm_name)
            captured.clear()
            scale["factor"] = 2.0
            subject.model(input_ids=ids)
            doubled = captured[f"{first}/mlp"]
    finally:
        for handle in handles:
            handle.remove()
    parallel = plain.shape == doubled.shape and torch.allclose(plain, doubled, atol=PROBE_ATOL)
    return parallel, feeding


def _plan_parallel(subject: Subject) -> Callable[..., None]:
    """Sequential block with a parallel flag: flip it. Parallel block (flag or not): rewire it sequential.

    The block's kind is probed, not read from the flag: some families ignore or constrain the flag
    (Falcon's new decoder architecture is parallel whatever parallel_attn says).
    """
    key = _first_key(subject.config, PARALLEL_KEYS)
    parallel, feeding = _probe_parallel(subject)
    if not parallel:
        if key is not None and isinstance(getattr(subject.config, key), bool):
            current = getattr(subject.config, key)
            return _ConfigEdit(lambda cfg: setattr(cfg, key, not current))
        raise NotApplicable("the block is sequential (probed: the MLP input depends on the attention output) "
                            "and the config has no parallel flag")
    parts = _block_parts(subject)
    missing = [name for name, *_ in parts if name not in feeding]
    if missing:
        raise ToolError(f"cannot find the norm feeding the MLP of {missing[0]} (parallel block)")
    names = _named(subject.model)
    plan = [(names[id(block)], names[id(attention)], names[id(mlp)], f"{names[id(block)]}.{feeding[name]}")
            for name, block, attention, _, mlp in parts]

    def edit(model: Any, config: Any) -> None:
        """The MLP reads norm(x + attention output) instead of norm(x): a sequential port of a parallel block."""
        modules = dict(model.named_modules())
        for block_name, attention_name, mlp_name, norm_name in plan:
            state: dict[str, Any] = {}
            norm = modules[norm_name]

            def block_pre(module, args, kwargs, state=state):
                state["x"] = _hidden_arg(args, kwargs)

            def attention_post(module, args, output, state=state):
                state["a"] = _first_tensor(output)

            def mlp_pre(module, args, kwargs, state=state, norm=norm):
                return _with_hidden(args, kwargs, norm(state["x"] + state["a"]))
            modules[block_name].register_forward_pre_hook(block_pre, with_kwargs=True)
            modules[attention_name].register_forward_hook(attention_post)
            modules[mlp_name].register_forward_pre_hook(mlp_pre, with_kwargs=True)
    return edit


class _ConfigEdit:
    """Marks a plan's edit as a config edit when a mutation can be either (a flag or a structural edit)."""

    def __init__(self, edit: Callable[[Any], None]):
        self.edit = edit

    def __call__(self, config: Any) -> None:
        self.edit(config)


class _ModelEdit:
    """Marks a plan's edit as a structural edit of the model when a config mutation has no key to edit."""

    def __init__(self, edit: Callable[[Any, Any], None]):
        self.edit = edit

    def __call__(self, model: Any, config: Any) -> None:
        self.edit(model, config)


def _moe_routers(subject: Subject) -> list[tuple[str, Any]]:
    """(name, router module) of every MoE layer: the experts' gate modules."""
    names = _named(subject.model)
    routers = []
    for name, block in _blocks(subject.model, subject.config):
        for child_name, module in block.named_modules():
            leaf = child_name.rsplit(".", 1)[-1]
            if "shared" in child_name:
                continue
            if "router" in type(module).__name__.lower() or (leaf == "gate" and getattr(module, "weight", None) is not None):
                if getattr(module, "weight", None) is not None and module.weight.ndim == 2 and \
                        module.weight.shape[0] == _expert_count(subject.config):
                    routers.append((names[id(module)], module))
                    break
    return routers


def _router_probe(subject: Subject) -> dict[str, Any]:
    """Run the model once and read each router's (logits, scores, indices): the kind and normalization."""
    import torch

    routers = _moe_routers(subject)
    if not routers:
        raise ToolError("cannot find the MoE routers (a gate with one weight row per expert)")
    seen: dict[str, Any] = {}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o))
               for name, module in routers]
    try:
        with torch.no_grad():
            subject.model(input_ids=_probe_ids(subject.config))
    finally:
        for handle in handles:
            handle.remove()
    kinds = {}
    for name, output in seen.items():
        order = _router_output_order(output, _expert_count(subject.config))
        if order is None:
            raise ToolError(f"the router {name} does not return its logits, top-k scores and top-k indices")
        kinds[name] = dict(_router_kind(name, *(output[i] for i in order)), order=order)
    if len(kinds) != len(routers):
        raise ToolError(f"a router never ran on the probe: {sorted(set(n for n, _ in routers) - set(kinds))}")
    return {"routers": routers, "kinds": kinds}


def _router_output_order(output: Any, experts: int) -> tuple[int, int, int] | None:
    """Positions of (logits [T, experts], scores [T, k], indices [T, k] integers) in a router's output tuple."""
    import torch

    if not isinstance(output, tuple) or len(output) != 3 or not all(isinstance(t, torch.Tensor) for t in output):
        return None
    logits = [i for i, t in enumerate(output) if t.is_floating_point() and t.ndim == 2 and t.shape[-1] == experts]
    indices = [i for i, t in enumerate(output) if not t.is_floating_point() and t.ndim == 2]
    scores = [i for i, t in enumerate(output) if t.is_floating_point() and t.ndim == 2 and i not in logits[:1]]
    if len(indices) != 1 or not logits or not scores or output[scores[0]].shape != output[indices[0]].shape:
        return None
    return logits[0], scores[0], indices[0]


def _router_kind(name: str, logits: Any, scores: Any, indices: Any) -> dict[str, Any]:
    import torch

    logits = logits.float()
    normalized = bool(torch.allclose(scores.float().sum(-1), torch.ones(scores.shape[0]), atol=PROBE_ATOL))
    for kind, probs in (("softmax", torch.softmax(logits, -1)), ("sigmoid", torch.sigmoid(logits))):
        ratio = scores.float() / probs.gather(-1, indices)
        row = ratio / ratio[:, :1]
        if torch.allclose(row, torch.ones_like(row), rtol=ROUTER_RATIO_RTOL, atol=ROUTER_RATIO_RTOL):
            return {"kind": kind, "normalized": normalized}
    raise ToolError(f"cannot tell the scoring of router {name} (neither softmax nor sigmoid top-k scores)")


def _rescore(logits: Any, scores: Any, indices: Any, kind: str, normalized: bool) -> Any:
    """Top-k scores for the same experts under ``kind``, renormalized or scaled like the original."""
    import torch

    logits = logits.float()
    probs = torch.softmax(logits, -1) if kind == "softmax" else torch.sigmoid(logits)
    chosen = probs.gather(-1, indices)
    if normalized:
        return (chosen / chosen.sum(-1, keepdim=True)).to(scores.dtype)
    return chosen.to(scores.dtype)


def _router_edit(subject: Subject, change: Callable[[dict[str, Any]], tuple[str, bool]]) -> Callable[..., None]:
    probe = _router_probe(subject)

    def edit(model: Any, config: Any) -> None:
        modules = dict(model.named_modules())
        for name, _ in probe["routers"]:
            kind, normalized = change(probe["kinds"][name])
            order = probe["kinds"][name]["order"]

            def hook(module, args, output, kind=kind, normalized=normalized, order=order):
                logits, scores, indices = (output[i] for i in order)
                result = list(output)
                result[order[1]] = _rescore(logits, scores, indices, kind, normalized)
                return tuple(result)
            modules[name].register_forward_hook(hook)
    return edit


def _plan_router_kind(subject: Subject) -> Callable[..., None]:
    if not _is_moe(subject):
        raise NotApplicable("not a mixture of experts")
    return _router_edit(subject, lambda k: ("sigmoid" if k["kind"] == "softmax" else "softmax", k["normalized"]))


def _plan_renormalize(subject: Subject) -> Callable[..., None]:
    if not _is_moe(subject):
        raise NotApplicable("not a mixture of experts")
    # The router's own output decides (a key can be ignored: Cohere2-MoE's softmax over the top-k always
    # sums to 1 whatever norm_topk_prob says); the key is flipped only when the router cannot be hooked.
    try:
        return _router_edit(subject, lambda k: (k["kind"], not k["normalized"]))
    except ToolError:
        key = _first_key(subject.config, RENORMALIZE_KEYS)
        if key is None or not isinstance(getattr(subject.config, key), bool):
            raise
        current = getattr(subject.config, key)
        return _ConfigEdit(lambda cfg: setattr(cfg, key, not current))


def _plan_shared_gate(subject: Subject) -> Callable[..., None]:
    if not _is_moe(subject):
        raise NotApplicable("not a mixture of experts")
    names = _named(subject.model)
    gates = [names[id(m)] for _, block in _blocks(subject.model, subject.config)
             for child, m in block.named_modules() if child.rsplit(".", 1)[-1] == "shared_expert_gate"]
    if not gates:
        shared = any("shared_expert" in child for _, b in _blocks(subject.model, subject.config)
                     for child, _ in b.named_modules())
        raise NotApplicable("the shared expert has no gate" if shared else "no shared expert")

    def edit(model: Any, config: Any) -> None:
        """The port adds the shared expert ungated: its sigmoid gate pinned at 1."""
        modules = dict(model.named_modules())
        for name in gates:
            modules[name].register_forward_hook(lambda m, a, o: o.new_full(o.shape, UNGATED_LOGIT))
    return edit


MUTATIONS = [
    Mutation("rope_theta x0.05", None, EditKind.CONFIG, f"every rope_theta (all layer types) x {ROPE_THETA_FACTOR:g} "
             "(a base fixed in the code: the sin/cos tables rebuilt)", _plan_rope_theta),
    Mutation("partial_rotary_factor", DeltaCode.PARTIAL_ROTARY, EditKind.CONFIG,
             "partial_rotary_factor: <1 -> 1.0, 1.0 -> 0.5 (rotary_dim: < head_dim -> head_dim)", _plan_partial),
    Mutation("sliding window removed", DeltaCode.SLIDING_WINDOW, EditKind.CONFIG,
             "sliding_window set wider than the prompt", _plan_no_sliding),
    Mutation("norm eps x100", None, EditKind.CONFIG, f"every norm eps key x {EPS_FACTOR:g} (no key: each norm's "
             "eps, attribute or measured)", _plan_eps),
    Mutation("norm weight offset", DeltaCode.NORM_OFFSET, EditKind.WEIGHT,
             "norm weights +1 (w -> 1+w) or -1 for (1+w) norms", _plan_norm_offset),
    Mutation("activation swap", DeltaCode.ACTIVATION, EditKind.CONFIG,
             "activation key: silu -> gelu_pytorch_tanh, others -> silu (no key: the MLPs' activation modules)",
             _plan_activation),
    Mutation("exact vs tanh GELU", DeltaCode.ACTIVATION, EditKind.CONFIG,
             "gelu -> gelu_pytorch_tanh, tanh approximations -> gelu (bar: compare's tolerance)",
             _plan_gelu_variant, bounded=True),
    Mutation("tie vs untie", DeltaCode.TIED_EMBEDDINGS, EditKind.WEIGHT,
             "tied: lm_head zero-filled (as MAX fills an absent weight); untied: lm_head := embeddings",
             _plan_tie),
    Mutation("attention softcap removed", DeltaCode.ATTN_SOFTCAP, EditKind.CONFIG,
             "attn_logit_softcapping set to None", _plan_drop("attn_logit_softcapping")),
    Mutation("final softcap removed", DeltaCode.LOGIT_SOFTCAP, EditKind.CONFIG,
             "final_logit_softcapping set to None", _plan_drop("final_logit_softcapping")),
    Mutation("logit scale removed", DeltaCode.LOGIT_SCALE, EditKind.CONFIG,
             f"logit scale ({', '.join(LOGIT_SCALE_KEYS)}) set to 1", _plan_logit_scale),
    Mutation("parallel vs sequential", DeltaCode.PARALLEL_BLOCK, EditKind.STRUCTURE,
             "parallel block (probed): the MLP reads norm(x + attention); sequential with a flag: flag flipped",
             _plan_parallel),
    Mutation("GQA head mapping", DeltaCode.GQA, EditKind.WEIGHT,
             "q head h uses KV head h % kv (q heads and output-projection inputs reordered)", _plan_gqa),
    Mutation("head_dim from hidden", DeltaCode.HEAD_DIM_OVERRIDE, EditKind.STRUCTURE,
             "attention scores scaled by 1/sqrt(hidden/heads), not 1/sqrt(head_dim)", _plan_head_dim),
    Mutation("RoPE style", DeltaCode.ROPE_STYLE, EditKind.WEIGHT,
             "the other pairing: q/k rotary dims reordered [evens, odds] per head", _plan_rope_style),
    Mutation("qk-norm eps x100", DeltaCode.QK_NORM, EditKind.STRUCTURE, f"q/k norm eps x {EPS_FACTOR:g}",
             _plan_qk_norm_eps),
    Mutation("learned positions", DeltaCode.LEARNED_POSITIONS, EditKind.STRUCTURE,
             "offset dropped (row p instead of p + offset); no offset: position embeddings not added",
             _plan_learned_positions),
    Mutation("MoE top-k", DeltaCode.MOE, EditKind.CONFIG, "experts per token k -> k-1 (k=1: 2)", _plan_topk),
    Mutation("router kind", DeltaCode.ROUTER, EditKind.STRUCTURE,
             "router scores sigmoid instead of softmax (or softmax instead of sigmoid) for the same experts",
             _plan_router_kind),
    Mutation("router renormalization", DeltaCode.ROUTER_RENORMALIZE, EditKind.STRUCTURE,
             "top-k weights renormalized <-> not (router hooked; unhookable router: norm_topk_prob flipped)",
             _plan_renormalize),
    Mutation("shared-expert gate", DeltaCode.SHARED_EXPERT_GATE, EditKind.STRUCTURE,
             "shared expert added ungated (sigmoid gate pinned at 1)", _plan_shared_gate),
    Mutation("one layer perturbed", None, EditKind.WEIGHT,
             f"middle layer's matrices + noise ({PERTURB_RELATIVE_STD:g} x their std)", _plan_perturb),
]


# --- running -------------------------------------------------------------------------------------


def sensitivity_report(replica_dir: str | Path, *, dtype: str | None = None, trust_remote_code: bool = False,
                       top_k: int | None = None, raise_on_tool_error: bool = True) -> SensitivityReport:
    """Run every mutation against the replica in ``replica_dir`` and return the report.

    ``dtype`` picks the tolerance (default: the replica manifest's dtype). The
    models run in float32, so the deltas are properties of the replica. Raises
    NotDecoderOnly (exit 2) before loading anything for an encoder or
    encoder-decoder config, and SensitivityToolError (exit 3) after the run
    when a mutation ended in a tool error (unless ``raise_on_tool_error`` is
    false: the report then has verdict TOOL ERROR).
    """
    replica = Path(replica_dir)
    if not (replica / "config.json").is_file():
        raise ScriptError(f"{replica} has no config.json; build a replica first")
    try:
        raw_config = json.loads((replica / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ScriptError(f"cannot read {replica / 'config.json'}: {exc}") from None
    if not isinstance(raw_config, dict):
        raise ScriptError(f"{replica / 'config.json'} is not a JSON object")
    check_decoder_only(raw_config, str(replica))

    import torch
    import transformers

    from replica_init import PROMPT, quiet_transformers

    quiet_transformers()
    manifest_path = replica / "tiny_replica.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    dtype = tolerances.canonical_dtype(dtype or manifest.get("replica", {}).get("dtype") or "float32")
    threshold = tolerances.sensitivity_threshold(dtype)
    top_k = top_k or tolerances.TOP_K
    tokenizer = transformers.AutoTokenizer.from_pretrained(replica, trust_remote_code=trust_remote_code)
    ids = torch.tensor([tokenizer(manifest.get("prompt", PROMPT))["input_ids"]])

    def load(config: Any = None) -> Any:
        return hf_reference.load(str(replica), dtype="float32", trust_remote_code=trust_remote_code, config=config)

    def logprobs(model: Any) -> Any:
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]

    def fresh_config() -> Any:
        return transformers.AutoConfig.from_pretrained(replica, trust_remote_code=trust_remote_code)

    base_model = load()
    base = logprobs(base_model)
    watched = base.topk(min(top_k, base.shape[-1]), dim=-1).indices

    def delta(other: Any) -> float:
        return float((other.gather(-1, watched) - base.gather(-1, watched)).abs().max())

    report = SensitivityReport(str(replica), dtype, threshold, delta(logprobs(load())), int(ids.shape[1]),
                               reference_spread=hf_reference.reference_spread(base))
    model_type = str(raw_config.get("model_type") or "")
    for mutation in MUTATIONS:
        bar = tolerances.logprob_atol(dtype) if mutation.bounded else threshold
        report.mutations.append(_run_mutation(mutation, Subject(fresh_config(), base_model, model_type),
                                              load, logprobs, delta, bar))
    if report.tool_errors and raise_on_tool_error:
        raise SensitivityToolError(report)
    return report


def _run_mutation(mutation: Mutation, subject: Subject, load: Callable, logprobs: Callable, delta: Callable,
                  threshold: float) -> MutationResult:
    """Plan, build and measure one mutant; every way it can end is one Outcome."""
    import torch

    code = mutation.code.value if mutation.code else None
    row = lambda outcome, **kw: MutationResult(mutation.name, code, kind, mutation.how, outcome, **kw)  # noqa: E731
    kind = mutation.kind.value
    try:
        edit = mutation.plan(subject)
        config_edit = isinstance(edit, _ConfigEdit) or (mutation.kind is EditKind.CONFIG
                                                        and not isinstance(edit, _ModelEdit))
        kind = (EditKind.CONFIG if config_edit else
                EditKind.STRUCTURE if isinstance(edit, _ModelEdit) else mutation.kind).value
        if config_edit:
            edit(subject.config)
            model = load(subject.config)
        else:
            model = copy.deepcopy(subject.model)
            with torch.no_grad():
                edit(model, subject.config)
        moved = delta(logprobs(model))
    except NotApplicable as exc:
        return row(Outcome.NOT_APPLICABLE, reason=str(exc))
    except ToolError as exc:
        return row(Outcome.TOOL_ERROR, reason=str(exc))
    except ScriptError as exc:
        return row(Outcome.TOOL_ERROR, reason=f"the mutant could not load: {exc}")
    except Exception as exc:  # noqa: BLE001 - a mutant that cannot run is a tool error, never a failed replica
        error = " ".join(str(exc).split())[:160]
        return row(Outcome.TOOL_ERROR, reason=f"the mutant could not run: {type(exc).__name__}: {error}")
    return row(Outcome.MOVED if moved >= threshold else Outcome.DID_NOT_MOVE, delta=moved, threshold=threshold)
