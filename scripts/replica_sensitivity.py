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

The model is read only through ``model_anatomy``: ``config_view`` for the config's fields (and the
key each came from, which config edits write) and ``resolve_layout`` for the module tree (blocks,
q/k/v/o rows, norms, MLP/MoE, router, experts, shared-expert gate, position embedding and offset).
A part the resolver cannot name is a tool error naming it. MoE routers are hooked where their
top-k weights are (see ``RouterConvention``); a feature fixed by construction in a family's code
(``ROUTER_SCORING_FIXED``, ``WHOLE_HEAD_ROTARY_ONLY``) is "not applicable" with why; a top-k fixed
in the code (``TOPK_FIXED``) is mutated by dropping the last pick.
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

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
TOPK_KEYS = _aliases("experts_per_token")
LOGIT_SCALE_KEYS = _aliases("logit_scale")

# Relative std of the noise the "one layer perturbed" mutation adds to the middle layer's matrices.
PERTURB_RELATIVE_STD = 0.1
# Factor the rope_theta mutation applies: far enough from 1 that every frequency moves visibly.
ROPE_THETA_FACTOR = 0.05
# The partial-rotary mutant's fraction sits this many dims above its even target rotary dim, so that a
# family computing int(head_dim x fraction) and one computing round(...) both get the target.
ROTARY_FRACTION_MARGIN = 0.25
# Families whose modeling code cannot run RoPE on part of each head (the sin/cos tables and the rotated
# slice are sized apart, so any fraction below 1 crashes in transformers itself): when their RoPE covers
# the whole head, the "whole -> half" mutant is not applicable, for this reason.
WHOLE_HEAD_ROTARY_ONLY = {
    "gpt_neox_japanese": "its rotary embedding sizes sin/cos from the whole head while the attention rotates "
                         "head x fraction dims (modeling_gpt_neox_japanese: no fraction below 1 runs)",
    "solar_open": "its attention rotates the whole head while the rotary embedding sizes sin/cos from head x "
                  "fraction (modeling_solar_open: no fraction below 1 runs)",
}
# Factor the eps mutations apply: the calibrated first norm sees 30 x eps, so x100 moves it clearly.
EPS_FACTOR = 100.0
# A norm's eps "is" a config key's value within this relative difference (float32 round trips).
EPS_MATCH_RTOL = 1e-4
# The shared-expert gate mutation pins the gate logit here: sigmoid(30) = 1 - 9e-14, i.e. no gate.
UNGATED_LOGIT = 30.0
# Two tensors count as "the same input" in the structural probes when they agree to this (float32).
PROBE_ATOL = 1e-5
# Relative spread below which the ratio of router scores to a candidate score function is "constant".
ROUTER_RATIO_RTOL = 1e-4
# Class-name fragments of activation modules (transformers.activations, torch.nn, family classes like BloomGelu).
ACTIVATION_CLASS_MARKERS = ("gelu", "silu", "swish", "relu", "activation", "tanh", "sigmoid", "mish", "quickgelu")
# Activation names of the GELU family: exact (erf) vs tanh approximations. The two differ by less than
# 1e-3 anywhere, so no replica moves logprobs 100x compare's tolerance with this bug (measured 1.6e-3 to
# 3.7e-3 nats on GPT-2, Falcon and Phi replicas): that row's bar is compare's own tolerance (the bug
# must be a DIVERGED, not a MATCH), named "bounded" in the table.
EXACT_GELU = ("gelu",)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")

# "sliding window removed" sets the window (or Llama 4's attention chunk) this wide: wider than any prompt.
NO_WINDOW = 1 << 20
CHUNK_KEY = "attention_chunk_size"
# GPT-OSS's experts gate with x * sigmoid(alpha x), alpha = 1.702 kept as this attribute (hidden_act is not
# read); the activation mutation sets it to 1, i.e. SiLU, the activation a port would take from hidden_act.
GATE_SLOPE_ATTR = "alpha"
GATE_SLOPE_KEY = "swiglu_alpha"  # the same slope as a config key (MiniMax-M3), hidden_act forced to silu
SILU_SLOPE = 1.0
# Families whose router scoring is fixed by construction (neither a softmax/sigmoid choice nor a
# renormalization switch): the router mutations are not applicable, for this reason.
ROUTER_SCORING_FIXED = {
    "phimoe": "the router is a sparsemixer (modeling_phimoe.sparsemixer): each pick's weight is a softmax over "
              "the logits masked around that pick, fixed in the code, so there is no softmax/sigmoid kind or "
              "renormalization to get wrong",
}

# Families whose experts-per-token count is fixed by construction (the key is not read): "MoE top-k" drops
# the last pick in the router output instead of editing the key.
TOPK_FIXED = {
    "phimoe": "the sparsemixer router always picks two experts (modeling_phimoe.sparsemixer selects a first and "
              "a second expert; num_experts_per_tok is not read past its signature)",
}
# Families whose modeling code cannot run with one expert per token: "MoE top-k" raises k instead of lowering it.
TOPK_NOT_ONE = {
    "longcat_flash": "its experts squeeze the [1, tokens] expert mask of top-1 routing to one dimension, and "
                     "torch.where then yields one index tensor, not (pick, token)",
}

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
    """What a mutation's plan inspects: the replica's fresh HF config and the unmutated model.

    ``view`` is the config's ConfigView and ``layout`` the model's ModelLayout (model_anatomy; the
    layout is resolved once per report through the shared ``anatomy`` cache). A part the resolver
    cannot name is a ToolError naming it.
    """

    config: Any
    model: Any
    model_type: str
    anatomy: dict[str, Any] = field(default_factory=dict)

    @property
    def view(self) -> model_anatomy.ConfigView:
        return _view(self.config)

    @property
    def layout(self) -> model_anatomy.ModelLayout:
        if "layout" not in self.anatomy:
            try:
                self.anatomy["layout"] = model_anatomy.resolve_layout(self.model, _view(self.model.config))
            except model_anatomy.AnatomyError as exc:
                self.anatomy["layout"] = exc
        found = self.anatomy["layout"]
        if isinstance(found, Exception):
            raise ToolError(str(found))
        return found


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
    # Why the bug's size is bounded on this model (its bar is then compare's tolerance), or None: for a
    # bound that depends on the model's structure, not on the bug alone.
    bounded_on: Callable[[Subject], str | None] | None = None


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


# --- config view ---------------------------------------------------------------------------------------
# Reading goes through model_anatomy.config_view; edits go to the loaded HF config object, at the key
# the view read the field from (``view.key(name)``; a dotted key walks sub-configs and dicts).


def _view(config: Any) -> model_anatomy.ConfigView:
    """The ConfigView of a loaded HF config object."""
    return model_anatomy.config_view(config.to_dict())


def _key_parent(config: Any, key: str) -> tuple[Any, str]:
    """The object (sub-config or dict) holding the last part of a dotted key, and that part."""
    *parents, last = key.split(".")
    target = config
    for part in parents:
        target = target.get(part) if isinstance(target, dict) else getattr(target, part, None)
        if target is None:
            raise ToolError(f"the config key {key} names no part of the loaded config ({part} is missing)")
    return target, last


def _get_key(config: Any, key: str) -> Any:
    target, last = _key_parent(config, key)
    return target.get(last) if isinstance(target, dict) else getattr(target, last, None)


def _set_key(config: Any, key: str, value: Any) -> None:
    target, last = _key_parent(config, key)
    if isinstance(target, dict):
        target[last] = value
    else:
        setattr(target, last, value)


def _present_keys(config: Any, keys: tuple[str, ...]) -> list[str]:
    """Every spelling of a field (model_anatomy's alias table) that the loaded config sets."""
    return [key for key in keys if getattr(config, key, None) is not None]


def _rope_dicts(config: Any) -> list[dict[str, Any]]:
    """The loaded config's RoPE parameter dicts to edit (one, or one per layer type); a composite (Emu3)
    keeps them in its text config."""
    params = getattr(config, "rope_parameters", None)
    if params is None and hasattr(config, "get_text_config"):
        params = getattr(config.get_text_config(), "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return []
    if all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def _has_rope(view: model_anatomy.ConfigView) -> bool:
    """RoPE configured by rope parameters, or by a rotary dim key (GPT-J style, base fixed in the code)."""
    return _has_rope_theta(view) or view.key("rotary_dim") is not None


def _has_rope_theta(view: model_anatomy.ConfigView) -> bool:
    settings = [view.rope] + list(view.rope_by_layer_type.values())
    return any(s is not None and s.theta for s in settings)


def _head_dim(view: model_anatomy.ConfigView) -> int:
    if not view.head_dim:
        raise ToolError("cannot tell the head size from the config (no head_dim, hidden size or heads)")
    return int(view.head_dim)


# --- the model's layout (model_anatomy.resolve_layout) ---------------------------------------------------


def _module(model: Any, path: str) -> Any:
    return model.get_submodule(path) if path else model


def _ffn_input_path(block: model_anatomy.BlockLayout) -> str:
    """The module whose input is the block's feed-forward input (the MLP, the MoE, or an inline up projection)."""
    if block.moe is not None:
        return block.moe.path
    if block.mlp is None:
        raise ToolError(f"the block {block.path} has no MLP or MoE the resolver could name")
    if block.mlp.path != block.path:
        return block.mlp.path
    first = block.mlp.gate_up or block.mlp.up or block.mlp.gate
    return first.path  # type: ignore[union-attr]


def _ffn_leaves(model: Any, block: model_anatomy.BlockLayout) -> list[str]:
    """Paths of the leaf modules of a block's feed-forward part (an inline MLP: the block minus attention)."""
    root = block.moe.path if block.moe is not None else block.mlp.path if block.mlp is not None else block.path
    attention = block.attention.path
    leaves = []
    for name, module in _module(model, root).named_modules():
        path = f"{root}.{name}" if name else root
        if path == attention or path.startswith(attention + "."):
            continue
        if next(module.children(), None) is None:
            leaves.append(path)
    return leaves


def _norm_paths(model: Any, layout: model_anatomy.ModelLayout) -> list[str]:
    """Every norm the resolver names (model, block, attention and MLP norms), containers opened to their norms."""
    found: list[str | None] = [layout.embedding_norm, layout.final_norm]
    if layout.per_layer_inputs is not None:
        found.append(layout.per_layer_inputs.norm)
    for block in layout.blocks:
        found += [n.path for n in block.norms]
        attention = block.attention
        found += [attention.q_norm, attention.k_norm, attention.v_norm, attention.sub_norm]
        if attention.latent is not None:
            found += [attention.latent.q_a_norm, attention.latent.kv_a_norm]
        for mlp in (block.mlp, block.moe.shared_expert if block.moe else None):
            if mlp is not None:
                found.append(mlp.sub_norm)
    paths: list[str] = []
    for path in dict.fromkeys(p for p in found if p):
        module = _module(model, path)
        children = [(n, c) for n, c in module.named_children() if model_anatomy.is_norm_module(c)]
        paths += [f"{path}.{n}" for n, _ in children] if children else [path]
    return paths


def _qk_norm_paths(layout: model_anatomy.ModelLayout) -> list[str]:
    """The q/k norm paths of every attention (one path once: Llama 4's single qk_norm serves both)."""
    return list(dict.fromkeys(p for b in layout.blocks for p in (b.attention.q_norm, b.attention.k_norm) if p))


@dataclass
class HeadFeatures:
    """Where each head's output features sit in a projection (q or k), fused or not."""

    projection: model_anatomy.Projection
    rows: list[list[int]]  # rows[h] = the output feature indices of head h, in order


def _head_features(attention: model_anatomy.AttentionLayout, which: str) -> HeadFeatures:
    """The query or key head features of an attention, from the resolver's rows (AnatomyError -> ToolError)."""
    try:
        if attention.qkv_kind is model_anatomy.QKVKind.MIXTURE_OF_HEADS:
            # JetMoE: every query expert (STACKED) maps to the kv heads; the keys are the shared kv projection's
            projection = attention.q if which == "query" else attention.qkv
            rows = attention.query_rows() if which == "query" else attention.key_rows()
            heads = attention.num_kv_heads
        elif which == "query":
            projection, rows, heads = attention.query_projection, attention.query_rows(), attention.num_heads
        else:
            projection, rows, heads = attention.key_projection, attention.key_rows(), attention.num_kv_heads
    except model_anatomy.AnatomyError as exc:
        raise ToolError(str(exc)) from None
    if projection is None:
        raise ToolError(f"the {which} projection of the mixture of attention heads {attention.path} is unresolved")
    width, extra = divmod(len(rows), heads)
    if extra:
        raise ToolError(f"the {which} rows of {attention.path} are not {heads} heads of one size")
    return HeadFeatures(projection, [rows[h * width:(h + 1) * width] for h in range(heads)])


def _permute_outputs(module: Any, projection: model_anatomy.Projection, rows: list[int], order: list[int]) -> None:
    """Output features ``rows`` of a Linear/Conv1D take the values of ``rows[order[i]]``."""
    import torch

    index, source = torch.tensor(rows), torch.tensor([rows[i] for i in order])
    weight = module.weight
    if projection.transposed or projection.storage is model_anatomy.WeightStorage.STACKED:
        weight[:, index] = weight[:, source].clone()  # Conv1D [in, out]; stacked experts [experts, out, in]
    else:
        weight[index] = weight[source].clone()
    if getattr(module, "bias", None) is not None:
        module.bias[index] = module.bias[source].clone()


def _permute_inputs(module: Any, projection: model_anatomy.Projection, order: list[int]) -> None:
    """Input features of a Linear/Conv1D reordered: feature i takes feature ``order[i]``."""
    import torch

    index = torch.tensor(order)
    if projection.storage is model_anatomy.WeightStorage.STACKED:
        module.weight.copy_(module.weight.clone()[:, :, index])  # [experts, out, in]
    elif projection.transposed:
        module.weight.copy_(module.weight.clone()[index])
    else:
        module.weight.copy_(module.weight.clone()[:, index])


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


# --- the mutations: config edits -------------------------------------------------------------------


def _plan_rope_theta(subject: Subject) -> Callable[..., None]:
    view = subject.view
    if not _has_rope(view):
        raise NotApplicable("no RoPE parameters (rope_theta or rotary_dim)")
    if not _has_rope_theta(view):
        return _sinusoid_table_edit(subject)

    def edit(config: Any) -> None:
        for params in _rope_dicts(config):
            if params.get("rope_theta"):
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

    paths = [block.attention.path for block in subject.layout.blocks]
    tables = [(path, getattr(_module(subject.model, path), "embed_positions", None)) for path in paths]
    missing = [path for path, table in tables if not isinstance(table, torch.Tensor) or table.ndim != 2]
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
        for path in paths:
            attention = _module(model, path)
            attention.embed_positions = mutated.to(attention.embed_positions.dtype)
    return _ModelEdit(edit)


def _other_rotary_dim(current: int, head_dim: int) -> int:
    """The mutant's rotary dim: the whole head when RoPE covers part of it, else half of it.

    RoPE rotates dims in pairs, so both are rounded down to an even count (a shrunk head of 17 dims
    rotates 16 or 8): an odd rotary dim is not a port bug but a model no family can run.
    """
    whole = head_dim - head_dim % 2
    half = (head_dim // 2) - (head_dim // 2) % 2
    return whole if current < whole else half


def _measured_rotary_dim(subject: Subject) -> int | None:
    """The rotary dim the model's RoPE module computes (twice its inverse frequencies), None when unknown."""
    path = subject.layout.rotary
    inv_freq = getattr(_module(subject.model, path), "inv_freq", None) if path else None
    return 2 * int(inv_freq.numel()) if inv_freq is not None and inv_freq.ndim == 1 else None


def _plan_partial(subject: Subject) -> Callable[..., None]:
    view = subject.view
    if not _has_rope(view):
        raise NotApplicable("no RoPE parameters")
    head_dim = _head_dim(view)
    dim_key = view.key("rotary_dim")
    if dim_key is not None and "." not in dim_key:
        current = int(_get_key(subject.config, dim_key))
        measured = _measured_rotary_dim(subject)
        if measured is not None and measured != current and _rope_dicts(subject.config):
            # The code does not read the key (MiniMax-M3 sizes RoPE from rope_parameters): the bug is a port
            # that obeys it, i.e. the model rotating `current` dims through the fraction the code reads.
            target = current - current % 2
            fraction = (target + ROTARY_FRACTION_MARGIN) / head_dim

            def obey(cfg: Any) -> None:
                for params in _rope_dicts(cfg):
                    params["partial_rotary_factor"] = fraction
            return obey
        target = _other_rotary_dim(current, head_dim)
        if target in (0, current):
            raise NotApplicable(f"a head of {head_dim} dims has no other even rotary dim than {current}")
        return lambda cfg: _set_key(cfg, dim_key, target)
    fraction_key = view.key("rotary_fraction") or ""
    settings = [view.rope, *view.rope_by_layer_type.values()]
    if not fraction_key and not any(s is not None and s.partial_rotary_factor is not None for s in settings):
        raise NotApplicable("RoPE covers the whole head (no partial_rotary_factor, rotary_pct or rotary_dim)")
    current = int(view.rotary_dim if view.rotary_dim is not None else head_dim)
    target = _other_rotary_dim(current, head_dim)
    if target < current and subject.model_type in WHOLE_HEAD_ROTARY_ONLY:  # whole -> half
        raise NotApplicable(f"RoPE covers the whole head ({fraction_key or 'rotary fraction'}="
                            f"{view.rotary_fraction:g}) and {WHOLE_HEAD_ROTARY_ONLY[subject.model_type]}")
    if target in (0, current):
        raise NotApplicable(f"a head of {head_dim} dims has no other even rotary dim than {current}")
    # A fraction a quarter dim above target: int() and round() of head_dim x fraction both give target.
    fraction = 1.0 if target == head_dim else (target + ROTARY_FRACTION_MARGIN) / head_dim
    top_keys = tuple(k for k in model_anatomy.ALIASES["rotary_fraction"] if "." not in k)

    def edit(cfg: Any) -> None:
        for key in _present_keys(cfg, top_keys):
            setattr(cfg, key, fraction)
        for params in _rope_dicts(cfg):
            if "partial_rotary_factor" in params or fraction_key.startswith("rope_parameters"):
                params["partial_rotary_factor"] = fraction
            for name in ("long_factor", "short_factor"):  # longrope lists have one entry per rotary pair
                if isinstance(params.get(name), list):
                    params[name] = resample_factors(params[name], target // 2)
    return edit


def _plan_no_sliding(subject: Subject) -> Callable[..., None]:
    view, config = subject.view, subject.config
    kinds = set(view.layer_types)
    chunk = getattr(config, CHUNK_KEY, None)
    if any("chunk" in kind for kind in kinds) and isinstance(chunk, int) and chunk > 0:
        # Chunked attention (Llama 4): the same bug as a dropped window, one chunk wider than any prompt.
        return lambda cfg: setattr(cfg, CHUNK_KEY, NO_WINDOW)
    if not view.sliding_window:
        raise NotApplicable("no sliding window")
    import hf_source

    reading = hf_source.read_model(config.to_dict())
    if reading is not None and reading.window_flash_only:
        raise NotApplicable(f"{reading.modeling_file} uses sliding_window only in its flash-attention path: the "
                            "eager/sdpa reference attends to the whole prefix")
    if getattr(config, "use_sliding_window", None) is False:
        raise NotApplicable("use_sliding_window is false")
    if not any("sliding" in kind for kind in kinds):
        raise NotApplicable("no layer uses sliding attention")
    key = view.key("sliding_window") or "sliding_window"
    return lambda cfg: _set_key(cfg, key, NO_WINDOW)


def _eps_bounded(subject: Subject) -> str | None:
    """A norm-input floor (model_anatomy.ModelLayout.norm_input_floor) bounds what any eps bug can move."""
    floor = subject.layout.norm_input_floor()
    if floor is None:
        return None
    return (f"{floor} keeps every norm's input mean square far above eps, on the model as on the replica, so "
            "a wrong eps moves little on either; the bar is compare's tolerance (the bug must not MATCH)")


def _plan_eps(subject: Subject) -> Callable[..., None]:
    keys = _present_keys(subject.config, NORM_EPS_KEYS)
    if not keys or _eps_key_unread(subject, keys):
        return _norm_module_eps_edit(subject)

    def edit(cfg: Any) -> None:
        for key in keys:
            setattr(cfg, key, getattr(cfg, key) * EPS_FACTOR)
    return _ConfigEdit(edit)


def _eps_key_unread(subject: Subject, keys: list[str]) -> bool:
    """True when some norm's eps matches no eps key of the config: the code does not build it from the key
    (BioGPT's nn.LayerNorm(dim) keeps torch's 1e-5 while layer_norm_eps says 1e-12), so editing the key
    would leave that norm as it is."""
    values = [float(getattr(subject.config, key)) for key in keys]
    paths = _norm_paths(subject.model, subject.layout)
    for path in paths:
        eps = model_anatomy.norm_eps(_module(subject.model, path))
        if eps is not None and not any(abs(eps - v) <= EPS_MATCH_RTOL * v for v in values):
            return True
    # An eps fixed in the code can equal the key's value (CTRL's blocks: nn.LayerNorm(d, eps=1e-6), and
    # layer_norm_epsilon=1e-6 reaches only the final norm): build the model from the edited config and
    # check that every norm's eps moved.
    import torch

    probe_config = copy.deepcopy(subject.config)
    for key in keys:
        setattr(probe_config, key, getattr(probe_config, key) * EPS_FACTOR)
    try:
        with torch.device("meta"):
            probe = type(subject.model)(probe_config)
    except Exception:  # noqa: BLE001 - any class that cannot be built on the meta device
        return False  # keep the value comparison above
    for path in paths:
        before, after = (model_anatomy.norm_eps(_module(m, path)) for m in (subject.model, probe))
        if before is not None and after is not None and abs(after - before * EPS_FACTOR) > EPS_MATCH_RTOL * after:
            return True
    return False


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


def _eps_attr(module: Any) -> str | None:
    return next((a for a in model_anatomy.NORM_EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)


def _norm_module_eps_edit(subject: Subject) -> Callable[..., None]:
    """No eps key: the eps lives in the norm modules (an attribute) or is fixed in their code.

    Attributes are scaled. A weightless LayerNorm with the eps fixed in its code is replaced by
    layer_norm with its measured eps x factor. Any other norm is a tool error naming it.
    """
    plan: list[tuple[str, str | None, float | None]] = []
    for path in _norm_paths(subject.model, subject.layout):
        module = _module(subject.model, path)
        attr = _eps_attr(module)
        if attr is not None:
            plan.append((path, attr, None))
            continue
        weightless = next(module.parameters(), None) is None and hasattr(module, "normalized_shape")
        eps = _measured_layer_norm_eps(module) if weightless else None
        if eps is None:
            raise ToolError(f"no norm eps key ({', '.join(NORM_EPS_KEYS)}) and the eps of {path} "
                            f"({type(module).__name__}) is neither an attribute nor measurable")
        plan.append((path, None, eps))
    if not plan:
        raise NotApplicable("no norm layers")

    def edit(model: Any, config: Any) -> None:
        import torch

        for path, attr, eps in plan:
            norm = _module(model, path)
            if attr is not None:
                setattr(norm, attr, getattr(norm, attr) * EPS_FACTOR)
            else:
                shape, wrong = tuple(norm.normalized_shape), eps * EPS_FACTOR
                norm.forward = lambda x, shape=shape, wrong=wrong: torch.nn.functional.layer_norm(
                    x.float(), shape, None, None, eps=wrong).to(x.dtype)
    return _ModelEdit(edit)


def _activation_modules(subject: Subject) -> list[str]:
    """Paths of the activation modules in the blocks' feed-forward parts (weightless leaves named like one)."""
    found = []
    for block in subject.layout.blocks:
        for path in _ffn_leaves(subject.model, block):
            module = _module(subject.model, path)
            if next(module.parameters(), None) is None and any(
                    t in type(module).__name__.lower() for t in ACTIVATION_CLASS_MARKERS):
                found.append(path)
    return found


def _gate_slopes(subject: Subject) -> list[str]:
    """Expert modules whose gate activation x * sigmoid(alpha x) keeps its slope as a float attribute
    (GPT-OSS's clamped SwiGLU: the config's hidden_act is not read)."""
    paths = []
    for block in subject.layout.blocks:
        if block.moe is not None and block.moe.experts_fused and "," not in block.moe.experts:
            if isinstance(getattr(_module(subject.model, block.moe.experts), GATE_SLOPE_ATTR, None), float):
                paths.append(block.moe.experts)
    return paths


def _plan_activation(subject: Subject) -> Callable[..., None]:
    if isinstance(getattr(subject.config, GATE_SLOPE_KEY, None), float):
        # MiniMax-M3: the gate is x * sigmoid(swiglu_alpha x) and the config forces hidden_act to silu.
        return _ConfigEdit(lambda cfg: setattr(cfg, GATE_SLOPE_KEY, SILU_SLOPE))
    slopes = _gate_slopes(subject) if subject.view.is_moe else []
    if slopes:
        def slope(model: Any, config: Any) -> None:
            """The gate's x * sigmoid(1.702 x) ported as SiLU (slope 1)."""
            for path in slopes:
                setattr(_module(model, path), GATE_SLOPE_ATTR, SILU_SLOPE)
        return _ModelEdit(slope)
    keys = _present_keys(subject.config, ACTIVATION_KEYS)
    if not keys:
        modules = _activation_modules(subject)
        if not modules:
            raise ToolError(f"no activation key ({', '.join(ACTIVATION_KEYS)}) and no activation module in "
                            "the MLPs (a function call in the code cannot be swapped)")

        def swap(model: Any, config: Any) -> None:
            """The activation fixed in the code replaced by SiLU (or SiLU by tanh GELU)."""
            import torch

            for path in modules:
                module = _module(model, path)
                silu = any(t in type(module).__name__.lower() for t in ("silu", "swish"))
                replacement = torch.nn.GELU(approximate="tanh") if silu else torch.nn.SiLU()
                module.forward = replacement.forward
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
        return lambda cfg: _drop_key(cfg, key)
    return plan


# A cap that never binds, for a config that refuses None for a softcap field (Gemma 3n's strict dataclass
# types final_logit_softcapping as a float): tanh(x / cap) * cap equals x to float32 precision for |x| < 1e4.
UNBOUNDED_CAP = 1e12


def _drop_key(cfg: Any, key: str) -> None:
    """Set ``key`` to None, or to UNBOUNDED_CAP where the config's field type refuses None."""
    try:
        setattr(cfg, key, None)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's StrictDataclassFieldValidationError
        if "NoneType" not in str(exc):
            raise
        setattr(cfg, key, UNBOUNDED_CAP)


def _plan_logit_scale(subject: Subject) -> Callable[..., None]:
    view = subject.view
    key = view.key("logit_scale")
    if key is None or view.logit_scale is None:
        raise NotApplicable(f"no logit scale ({', '.join(LOGIT_SCALE_KEYS)})")
    if float(view.logit_scale) == 1.0:
        raise NotApplicable(f"{key} is 1")
    return lambda cfg: _set_key(cfg, key, 1.0)


def _not_moe(view: model_anatomy.ConfigView) -> str:
    if view.num_experts == 1:
        return (f"not a mixture of experts ({view.key('num_experts')}=1: every token takes the one expert with "
                "weight 1, so top-k and router scoring change nothing)")
    return "not a mixture of experts"


def _plan_topk(subject: Subject) -> Callable[..., None]:
    view = subject.view
    if not view.is_moe:
        raise NotApplicable(_not_moe(view))
    if subject.model_type in TOPK_FIXED:
        return _ModelEdit(_drop_last_pick(subject))
    key = view.key("experts_per_token")
    present = _present_keys(subject.config, TOPK_KEYS)
    if key is None and present and isinstance(getattr(subject.config, present[0]), list):
        key = present[0]
        values = list(getattr(subject.config, key))  # one k per layer (HunYuan's moe_topk)
        if not all(isinstance(v, int) and 0 < v for v in values):
            raise ToolError(f"the per-layer experts-per-token list {key} is not whole numbers")
        changed = [v - 1 if v > 1 else v + 1 for v in values]
        if any(v > int(view.num_experts) for v in changed):
            raise NotApplicable(f"top-k {values} of {view.num_experts} experts: no other k")
        return lambda cfg: setattr(cfg, key, changed)
    if key is None or view.experts_per_token is None:
        raise ToolError(f"the experts-per-token key is not one of {', '.join(TOPK_KEYS)}")
    k, experts = int(view.experts_per_token), int(view.num_experts)  # type: ignore[arg-type]
    new = k - 1 if k > 1 else k + 1
    if new == 1 and subject.model_type in TOPK_NOT_ONE:
        new = k + 1
    if new > experts:
        raise NotApplicable(f"top-{k} of {experts} experts: no other k"
                            + (f" (not 1: {TOPK_NOT_ONE[subject.model_type]})" if subject.model_type in TOPK_NOT_ONE
                               else ""))
    return lambda cfg: _set_key(cfg, key, new)


def _drop_last_pick(subject: Subject) -> Callable[[Any, Any], None]:
    """k fixed in the code (PhiMoE's sparsemixer picks two): the port routes one expert fewer, the last
    pick's weight zeroed in each router's (logits, weights, indices) output."""
    routers = [block.moe.router for block in subject.layout.blocks if block.moe is not None]
    if not routers:
        raise ToolError(f"MoE top-k: {TOPK_FIXED[subject.model_type]}, but the resolver found no router")

    def hook(module: Any, args: Any, output: Any) -> Any:
        floats = [i for i, t in enumerate(output) if _is_float(t, 2)] if isinstance(output, tuple) else []
        ints = [i for i, t in enumerate(output) if _is_int(t, 2)] if isinstance(output, tuple) else []
        weights = [i for i in floats if ints and output[i].shape == output[ints[0]].shape]
        if len(weights) != 1 or output[weights[0]].shape[-1] < 2:
            raise ToolError(f"MoE top-k: the router {type(module).__name__} returns no (weights, indices) pair "
                            "of two or more picks")
        result = list(output)
        trimmed = output[weights[0]].clone()
        trimmed[:, -1] = 0
        result[weights[0]] = trimmed
        return tuple(result)

    def edit(model: Any, config: Any) -> None:
        for path in routers:
            _module(model, path).register_forward_hook(hook)
    return edit


# --- the mutations: weight edits ----------------------------------------------------------------------


def _weighted_norms(subject: Subject) -> list[str]:
    return [p for p in _norm_paths(subject.model, subject.layout)
            if getattr(_module(subject.model, p), "weight", None) is not None]


def _norm_offset_style(model: Any, path: str) -> bool:
    """True when the norm at ``path`` computes x * (1 + w): probed on a copy with w = 0."""
    import torch

    probe = copy.deepcopy(_module(model, path)).float()
    with torch.no_grad():
        probe.weight.zero_()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        out = probe(torch.randn(1, 2, probe.weight.shape[-1]))
    return bool(out.abs().max() > 0)


def _plan_norm_offset(subject: Subject) -> Callable[..., None]:
    paths = _weighted_norms(subject)
    if not paths:
        raise NotApplicable("no norm has a learnable weight")
    offset_style = _norm_offset_style(subject.model, paths[0])

    def edit(model: Any, config: Any) -> None:
        for path in paths:
            _module(model, path).weight.add_(-1.0 if offset_style else 1.0)
    return edit


def _plan_tie(subject: Subject) -> Callable[..., None]:
    layout = subject.layout
    head_path, embed_path = layout.lm_head, layout.token_embedding
    head, embed = _module(subject.model, head_path), _module(subject.model, embed_path)
    if tuple(head.weight.shape) != tuple(embed.weight.shape):
        raise NotApplicable(f"the LM head {head_path} {tuple(head.weight.shape)} and the token embedding "
                            f"{embed_path} {tuple(embed.weight.shape)} differ in shape: no port can tie them")

    def edit(model: Any, config: Any) -> None:
        """Tied: the port loads a separate lm_head that is absent (MAX zero-fills it). Untied: it ties."""
        import torch

        head, embed = _module(model, head_path), _module(model, embed_path)
        if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
            head.weight = torch.nn.Parameter(torch.zeros_like(embed.weight))
        else:
            head.weight.copy_(embed.weight)
    return edit


def _plan_gqa(subject: Subject) -> Callable[..., None]:
    view = subject.view
    heads, kv = view.num_heads, view.num_kv_heads
    if not heads or not kv or kv in (1, heads):
        raise NotApplicable("no grouped KV heads (MHA or MQA)")
    attentions = [block.attention for block in subject.layout.blocks]
    for attention in attentions:  # resolve every part now: a missing one is a tool error, not a failed row
        _head_features(attention, "query")
        if attention.num_kv_heads in (1, attention.num_heads):
            raise ToolError(f"the config groups {heads} heads into {kv} KV heads but {attention.path} has "
                            f"{attention.num_kv_heads}")

    def edit(model: Any, cfg: Any) -> None:
        """Query head h reads KV head h % kv instead of h // group: reorder q heads and the o inputs.

        Mixture of heads (JetMoE: head j of every query expert reads kv head j): each expert's heads are
        rotated by one, so each reads its neighbour's kv head (the stacked q rows and o inputs).
        """
        for attention in attentions:
            n, groups, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
            group = n // groups
            source = [(h // group) + (h % group) * groups for h in range(n)]
            if attention.qkv_kind is model_anatomy.QKVKind.MIXTURE_OF_HEADS:
                n, source = groups, [(h + 1) % groups for h in range(groups)]
            order = [source[h] * dim + i for h in range(n) for i in range(dim)]
            q = _head_features(attention, "query")
            rows = [r for head_rows in q.rows for r in head_rows]
            _permute_outputs(_module(model, q.projection.path), q.projection, rows, order)
            if attention.q_norm and attention.q_norm != attention.k_norm:
                _permute_norm(_module(model, attention.q_norm), order, None)  # a full-width q norm follows
            _permute_inputs(_module(model, attention.o.path), attention.o, order)
    return edit


def _plan_rope_style(subject: Subject) -> Callable[..., None]:
    view = subject.view
    if not _has_rope(view):
        raise NotApplicable("no RoPE parameters")
    blocks = subject.layout.blocks
    if any(attention.latent is not None for block in blocks for attention in block.attentions):
        return _plan_latent_rope_style(blocks)
    for block in blocks:
        _head_features(block.attention, "query")
        if not _shares_kv(block.attention):
            _head_features(block.attention, "key")
    rot, dim = view.rotary_dim or _head_dim(view), _head_dim(view)

    def rotary_of(block: model_anatomy.BlockLayout) -> int:
        """The block's rotary dim: the config's, or (a head size of its own, Gemma 4's global layers) its
        layer type's rotary fraction of that head."""
        size = block.attention.head_dim
        if size == dim:
            return rot
        kinds = view.layer_types
        settings = view.rope_by_layer_type.get(kinds[block.index]) if block.index < len(kinds) else None
        fraction = settings.partial_rotary_factor if settings and settings.partial_rotary_factor else 1.0
        rotated = int(size * fraction)
        return rotated - rotated % 2

    def edit(model: Any, cfg: Any) -> None:
        """Reorder each q/k head's rotary dims [evens, odds]: RoPE then pairs the other way."""
        for block in blocks:
            attention, size, rotated = block.attention, block.attention.head_dim, rotary_of(block)
            per_head = list(range(0, rotated, 2)) + list(range(1, rotated, 2)) + list(range(rotated, size))
            for which, norm in (("query", attention.q_norm), ("key", attention.k_norm)):
                if which == "key" and _shares_kv(attention):
                    continue  # its keys are layer kv_source's, reordered there
                features = _head_features(attention, which)
                rows = [r for head_rows in features.rows for r in head_rows]
                order = [h * size + i for h in range(len(features.rows)) for i in per_head]
                _permute_outputs(_module(model, features.projection.path), features.projection, rows, order)
                if norm and (which == "query" or norm != attention.q_norm):
                    _permute_norm(_module(model, norm), order, per_head)
    return edit


def _shares_kv(attention: model_anatomy.AttentionLayout) -> bool:
    """The attention reads an earlier layer's keys and values (Gemma 3n's KV-sharing layers)."""
    return attention.qkv_kind is model_anatomy.QKVKind.SHARED_KV


def _plan_latent_rope_style(blocks: Sequence[model_anatomy.BlockLayout]) -> Callable[..., None]:
    """Latent attention: each query head's RoPE part and the shared RoPE key reordered [evens, odds]."""
    attentions = [attention for block in blocks for attention in block.attentions]
    for attention in attentions:
        if attention.latent is None or attention.q is None:
            raise ToolError(f"RoPE style: {attention.path} mixes latent and other attention, or its latent "
                            "queries have no per-head projection")

    def edit(model: Any, cfg: Any) -> None:
        for attention in attentions:
            latent = attention.latent
            width = latent.rope_head_dim
            pairing = list(range(0, width, 2)) + list(range(1, width, 2))
            query_rows = latent.query_rope_rows(attention.num_heads)
            query_order = [h * width + i for h in range(attention.num_heads) for i in pairing]
            _permute_outputs(_module(model, attention.q.path), attention.q, query_rows, query_order)
            _permute_outputs(_module(model, latent.kv_a.path), latent.kv_a, latent.key_rope_rows(), pairing)
    return edit


def _plan_perturb(subject: Subject) -> Callable[..., None]:
    blocks = subject.layout.blocks
    middle = blocks[len(blocks) // 2].path

    def edit(model: Any, config: Any) -> None:
        import torch

        block = _module(model, middle)
        generator = torch.Generator().manual_seed(1234)
        for param in block.parameters():
            if param.ndim >= 2:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(noise.to(param.dtype) * float(param.float().std()) * PERTURB_RELATIVE_STD)
    return edit


def _plan_learned_positions(subject: Subject) -> Callable[..., None]:
    layout = subject.layout
    path, offset = layout.position_embedding, layout.position_offset
    if path is None and layout.position_table is not None:
        table = layout.position_table

        def drop_table(model: Any, config: Any) -> None:
            """A fixed (sinusoidal) table, XGLM's and CTRL's: the port never adds the positions."""
            target = model
            for part in table.split("."):
                target = getattr(target, part)
            if hasattr(target, "register_forward_hook"):
                target.register_forward_hook(lambda module, args, output: output * 0)
            else:  # the table is a tensor (a buffer or a plain attribute)
                target.zero_()
        return drop_table
    if path is None:
        raise NotApplicable("no absolute position embedding, learned or fixed")
    if offset and getattr(_module(subject.model, path), "offset", None) != offset:
        raise ToolError(f"the position embedding {path} skips {offset} rows but keeps no 'offset' attribute to edit")

    def edit(model: Any, config: Any) -> None:
        target = _module(model, path)
        if offset:
            target.offset = 0  # the port reads row p instead of p + offset
        else:
            target.weight.zero_()  # the port never adds the position embeddings
    return edit


def _plan_head_dim(subject: Subject) -> Callable[..., None]:
    """Scores scaled from hidden/heads. Latent attention scales by its query head (nope + rope parts), and
    its head_dim may exist only as a config alias of the rotated part (GLM-4-MoE-Lite's attribute_map)."""
    view = subject.view
    latent = [b.attention for b in subject.layout.blocks if b.attention.qkv_kind is model_anatomy.QKVKind.LATENT]
    aliased = getattr(subject.config, "head_dim", None)
    differs = view.head_dim_differs or (bool(latent) and isinstance(aliased, int) and bool(view.num_heads)
                                        and aliased * int(view.num_heads) != view.hidden_size)
    if not differs:
        raise NotApplicable("head_dim x heads equals hidden_size")
    heads = int(view.num_heads)  # type: ignore[arg-type]
    dims = {b.attention.path: b.attention.head_dim if b.attention.qkv_kind is model_anatomy.QKVKind.LATENT
            else _head_dim(view) for b in subject.layout.blocks}
    for path in dims:
        if not isinstance(getattr(_module(subject.model, path), "scaling", None), float):
            raise ToolError(f"cannot find the score scale of {path} (no float 'scaling' attribute)")
    wrong = (int(view.hidden_size) // heads) ** -0.5  # type: ignore[arg-type]

    def edit(model: Any, cfg: Any) -> None:
        """Scores scaled by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim), as a port sizing from hidden."""
        for path, dim in dims.items():
            attention = _module(model, path)
            attention.scaling = attention.scaling * wrong / dim ** -0.5
    return edit


def _eps_modules(model: Any, path: str) -> list[Any]:
    """The modules holding a norm's eps: the norm, or each per-head norm of a container (StableLM)."""
    module = _module(model, path)
    if _eps_attr(module) is not None:
        return [module]
    return [child for child in module.children() if _eps_attr(child) is not None]


def _plan_qk_norm_eps(subject: Subject) -> Callable[..., None]:
    paths = _qk_norm_paths(subject.layout)
    if not paths:
        raise NotApplicable("no q/k norm")
    missing = [p for p in paths if not _eps_modules(subject.model, p)]
    if missing:
        raise ToolError(f"cannot find the eps of the q/k norm {missing[0]} "
                        f"(none of {', '.join(model_anatomy.NORM_EPS_ATTRS)})")

    def edit(model: Any, config: Any) -> None:
        for path in paths:
            for norm in _eps_modules(model, path):
                attr = _eps_attr(norm)
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


def _probe_parallel(subject: Subject) -> tuple[bool, dict[str, str]]:
    """Whether the first block's MLP input ignores the attention output, and the norm that feeds each MLP.

    Runs the unmutated model twice: once as is, once with the first block's attention output doubled.
    Returns (parallel, {block path: path of the block norm whose output is the MLP input}).
    """
    import torch

    model, blocks = subject.model, subject.layout.blocks
    captured: dict[str, Any] = {}
    feeding: dict[str, str] = {}
    scale = {"factor": 1.0}
    handles = []
    first = blocks[0].path
    for block in blocks:
        for norm in block.norms:
            def norm_hook(module, args, output, name=block.path, norm_path=norm.path):
                captured.setdefault(f"{name}/norms", []).append((norm_path, _first_tensor(output).detach().clone()))
            handles.append(_module(model, norm.path).register_forward_hook(norm_hook))

        def mlp_pre(module, args, kwargs, name=block.path):
            captured[f"{name}/mlp"] = _hidden_arg(args, kwargs).detach().clone()
        handles.append(_module(model, _ffn_input_path(block)).register_forward_pre_hook(mlp_pre, with_kwargs=True))
        if block.path == first:
            def attention_hook(module, args, output):
                if scale["factor"] == 1.0:
                    return None
                if isinstance(output, (tuple, list)):  # OpenAI GPT's attention returns a list
                    return type(output)([output[0] * scale["factor"], *output[1:]])
                return output * scale["factor"]
            handles.append(_module(model, block.attention.path).register_forward_hook(attention_hook))
    ids = _probe_ids(subject.config)
    try:
        with torch.no_grad():
            model(input_ids=ids)
            plain = captured[f"{first}/mlp"]
            for block in blocks:
                mlp_in = captured.get(f"{block.path}/mlp")
                for norm_path, out in captured.get(f"{block.path}/norms", []):
                    if mlp_in is not None and out.shape == mlp_in.shape and torch.allclose(out, mlp_in, atol=PROBE_ATOL):
                        feeding.setdefault(block.path, norm_path)
            captured.clear()
            scale["factor"] = 2.0
            model(input_ids=ids)
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
    key = subject.view.key("parallel_block")
    several = subject.layout.single_stream_refusal()
    if several:  # the probe and the rewiring read and add one block input; a block here maps stream stacks
        raise NotApplicable(several)
    shortcut = [block for block in subject.layout.blocks if block.moe_shortcut]
    if shortcut:
        return _shortcut_sequential(shortcut)
    parallel, feeding = _probe_parallel(subject)
    if not parallel:
        if key is not None and "." not in key and isinstance(getattr(subject.config, key, None), bool):
            current = getattr(subject.config, key)
            return _ConfigEdit(lambda cfg: setattr(cfg, key, not current))
        raise NotApplicable("the block is sequential (probed: the MLP input depends on the attention output) "
                            "and the config has no parallel flag")
    blocks = subject.layout.blocks
    missing = [block.path for block in blocks if block.path not in feeding]
    if missing:
        raise ToolError(f"cannot find the norm feeding the MLP of {missing[0]} (parallel block)")
    plan = [(block.path, block.attention.path, _ffn_input_path(block), feeding[block.path]) for block in blocks]

    def edit(model: Any, config: Any) -> None:
        """The MLP reads norm(x + attention output) instead of norm(x): a sequential port of a parallel block."""
        for block_path, attention_path, mlp_path, norm_path in plan:
            state: dict[str, Any] = {}
            norm = _module(model, norm_path)

            def block_pre(module, args, kwargs, state=state):
                state["x"] = _hidden_arg(args, kwargs)

            def attention_post(module, args, output, state=state):
                state["a"] = _first_tensor(output)

            def mlp_pre(module, args, kwargs, state=state, norm=norm):
                return _with_hidden(args, kwargs, norm(state["x"] + state["a"]))
            _module(model, block_path).register_forward_pre_hook(block_pre, with_kwargs=True)
            _module(model, attention_path).register_forward_hook(attention_post)
            _module(model, mlp_path).register_forward_pre_hook(mlp_pre, with_kwargs=True)
    return edit


def _shortcut_sequential(blocks: Sequence[model_anatomy.BlockLayout]) -> Callable[..., None]:
    """LongCat-Flash's MoE is a branch beside the block's later sublayers, added at the block's end: the
    sequential port adds it after the first dense MLP instead, so the second attention and MLP read it."""
    for block in blocks:
        if block.moe is None or len(block.mlps) < 2:
            raise ToolError(f"parallel vs sequential: the MoE shortcut of {block.path} has no second dense MLP")
    plan = [(block.path, block.moe.path, block.mlps[0].path) for block in blocks]  # type: ignore[union-attr]

    def edit(model: Any, config: Any) -> None:
        for block_path, moe_path, mlp_path in plan:
            state: dict[str, Any] = {}

            def moe_post(module, args, output, state=state):
                state["moe"] = _first_tensor(output)

            def mlp_post(module, args, output, state=state):
                return output + state["moe"].view(output.shape)

            def block_post(module, args, output, state=state):
                if isinstance(output, (tuple, list)):
                    return type(output)([output[0] - state["moe"].view(output[0].shape), *output[1:]])
                return output - state["moe"].view(output.shape)
            _module(model, moe_path).register_forward_hook(moe_post)
            _module(model, mlp_path).register_forward_hook(mlp_post)
            _module(model, block_path).register_forward_hook(block_post)
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


# --- MoE routers ------------------------------------------------------------------------------------------
# A router's top-k weights reach the experts by one of four conventions, told apart by the shapes of what
# the router returns and what the experts receive (transformers 5):
#   ROUTER_TUPLE   the router returns (logits [T, E], weights [T, k], indices [T, k])      Qwen2-MoE, Mixtral
#   EXPERTS_INPUT  the router returns logits [T, E]; the MoE block picks and weighs, and the experts
#                  module receives (hidden, indices [T, k], weights [T, k])               DeepSeek-V3 style
#   DENSE_SCORES   the router returns (scores [T, E] zero outside the top k, logits [T, E])   Llama 4
#   SORTED_GATES   the router returns logits [T, E] and the weights flattened [T*k] in the order of a
#                  sorting permutation [T*k] it also returns                                GraniteMoE


class RouterConvention(str, enum.Enum):
    """Where a router's top-k weights can be rewritten."""

    ROUTER_TUPLE = "router tuple"
    EXPERTS_INPUT = "experts input"
    DENSE_SCORES = "dense scores"
    SORTED_GATES = "sorted gates"
    ROUTE_METHOD = "route method"  # the MoE block's or experts' route_tokens_to_experts(logits) -> indices, weights
    # (top-k weights, top-k indices) without the logits, scored inside from the router's one 2-D weight
    # (LongCat-Flash's F.linear on classifier.weight): the logits are recomputed from the router's input
    WEIGHTS_INDICES = "weights and indices"


ROUTE_METHOD_NAME = "route_tokens_to_experts"  # the method transformers' MoE code scores the router logits in


@dataclass
class Routing:
    """One MoE block's router, as probed: where its weights live and how they are scored."""

    router: str
    experts: str | None
    convention: RouterConvention
    kind: str  # softmax or sigmoid
    normalized: bool  # the top-k weights are divided by their sum
    scale: float  # a constant factor on the weights (DeepSeek's routed_scaling_factor), 1.0 for none
    positions: tuple[int, ...] = ()  # where the parts sit in the router's output tuple or the experts' args


def _is_float(t: Any, ndim: int) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == ndim


def _is_int(t: Any, ndim: int) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and not t.is_floating_point() and t.ndim == ndim


def _scoring(logits: Any, weights: Any, indices: Any) -> tuple[str, bool, float] | None:
    """(kind, normalized, scale) when the top-k weights are softmax or sigmoid probabilities of the chosen
    experts, as they are or divided by their sum, times one constant; None when they are neither."""
    import torch

    logits, weights = logits.float(), weights.float()
    for kind, probs in (("softmax", torch.softmax(logits, -1)), ("sigmoid", torch.sigmoid(logits))):
        ratio = weights / probs.gather(-1, indices)
        if not torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=ROUTER_RATIO_RTOL, atol=ROUTER_RATIO_RTOL):
            continue
        first = ratio[:, 0]
        if torch.allclose(first, first[:1].expand_as(first), rtol=ROUTER_RATIO_RTOL, atol=ROUTER_RATIO_RTOL):
            return kind, False, float(first[0])
        sums = weights.sum(-1)
        if torch.allclose(sums, sums[:1].expand_as(sums), rtol=ROUTER_RATIO_RTOL, atol=ROUTER_RATIO_RTOL):
            return kind, True, float(sums[0])
    return None


def _rescore(logits: Any, indices: Any, kind: str, normalized: bool, scale: float, like: Any) -> Any:
    """Top-k weights for the same experts under ``kind``, renormalized or not, times ``scale``."""
    import torch

    logits = logits.float()
    probs = torch.softmax(logits, -1) if kind == "softmax" else torch.sigmoid(logits)
    chosen = probs.gather(-1, indices)
    if normalized:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    return (chosen * scale).to(like.dtype)


def _logits_in(output: Any, experts: int) -> int | None:
    """Position of the [T, experts] logits in a router output (-1: the output is the logits tensor)."""
    if _is_float(output, 2) and output.shape[-1] == experts:
        return -1
    if isinstance(output, tuple):
        found = [i for i, t in enumerate(output) if _is_float(t, 2) and t.shape[-1] == experts]
        return found[-1] if found else None
    return None


def _router_logits(router: Any, hidden: Any) -> Any:
    """[tokens, scored experts] logits of a router from its input: its one 2-D weight (and bias), in float32."""
    import torch

    weights = [p for p in router.parameters() if p.ndim == 2]
    if len(weights) != 1:
        return None
    bias = next((p for p in router.parameters() if p.ndim == 1 and p.shape[0] == weights[0].shape[0]), None)
    flat = hidden.reshape(-1, weights[0].shape[1]).float()
    with torch.no_grad():
        return torch.nn.functional.linear(flat, weights[0].float(), None if bias is None else bias.float())


def _read_routing(moe: model_anatomy.MoELayout, output: Any, experts_call: tuple | None, k: int | None,
                  logits_of: Callable[[], Any] | None = None) -> tuple[Routing | None, Any]:
    """The Routing of one router from its output and the experts' call, and the (logits, weights, indices)
    it was scored on (None, None when no convention fits). ``logits_of`` recomputes the logits from the
    router's input, for a router that returns only its top-k weights and indices."""
    experts = moe.num_experts
    flat = _flat_args(experts_call)
    if isinstance(output, tuple) and len(output) == 2 and logits_of is not None:
        floats = [i for i, t in enumerate(output) if _is_float(t, 2)]
        ints = [i for i, t in enumerate(output) if _is_int(t, 2)]
        if len(floats) == 1 and len(ints) == 1 and output[floats[0]].shape == output[ints[0]].shape:
            logits = logits_of()
            if logits is not None and logits.shape[0] == output[ints[0]].shape[0]:
                parts = (logits, output[floats[0]], output[ints[0]])
                return _routing(moe, RouterConvention.WEIGHTS_INDICES, parts, (floats[0], ints[0]))
    if isinstance(output, tuple) and len(output) == 3:
        logits = [i for i, t in enumerate(output) if _is_float(t, 2) and t.shape[-1] == experts]
        indices = [i for i, t in enumerate(output) if _is_int(t, 2)]
        weights = [i for i, t in enumerate(output) if _is_float(t, 2) and i not in logits[:1]]
        if len(indices) == 1 and logits and weights and output[weights[0]].shape == output[indices[0]].shape:
            parts = (output[logits[0]], output[weights[0]], output[indices[0]])
            return _routing(moe, RouterConvention.ROUTER_TUPLE, parts, (logits[0], weights[0], indices[0]))
    if isinstance(output, tuple) and len(output) == 2 and all(_is_float(t, 2) for t in output) and k:
        sparse = [i for i, t in enumerate(output) if int((t != 0).sum(-1).max()) <= k < t.shape[-1]]
        if len(sparse) == 1 and output[1 - sparse[0]].shape == output[sparse[0]].shape:
            scores, logits = output[sparse[0]], output[1 - sparse[0]]
            indices = logits.float().topk(k, dim=-1).indices
            parts = (logits, scores.gather(-1, indices), indices)
            return _routing(moe, RouterConvention.DENSE_SCORES, parts, (1 - sparse[0], sparse[0]))
    position = _logits_in(output, experts)
    if position is None:
        return None, None
    logits = output if position == -1 else output[position]
    tokens = logits.shape[0]
    if isinstance(output, tuple) and k:
        gates = [i for i, t in enumerate(output) if _is_float(t, 1) and t.shape[0] == tokens * k]
        perms = [i for i, t in enumerate(output) if _is_int(t, 1) and t.shape[0] == tokens * k
                 and bool((t.sort().values == _arange(tokens * k)).all())]
        if len(gates) == 1 and perms:
            indices = logits.float().topk(k, dim=-1).indices
            for perm in perms:
                weights = output[gates[0]].new_zeros(tokens * k)
                weights[output[perm]] = output[gates[0]]
                parts = (logits, weights.view(tokens, k), indices)
                found = _routing(moe, RouterConvention.SORTED_GATES, parts, (position, gates[0], perm))
                if found[0] is not None:
                    return found
    ints = [i for i, t in enumerate(flat) if _is_int(t, 2) and t.shape[0] == tokens]
    floats = [i for i, t in enumerate(flat) if _is_float(t, 2) and t.shape[0] == tokens and i
              and any(t.shape == flat[j].shape for j in ints)]
    if len(ints) == 1 and len(floats) == 1:
        parts = (logits, flat[floats[0]], flat[ints[0]])
        return _routing(moe, RouterConvention.EXPERTS_INPUT, parts, (position, floats[0], ints[0]))
    return None, None


def _arange(n: int) -> Any:
    import torch

    return torch.arange(n)


def _flat_args(call: tuple | None) -> list[Any]:
    """An experts call's (args, kwargs) as one list: positional first, then keyword values in order."""
    if call is None:
        return []
    args, kwargs = call
    return list(args) + list(kwargs.values())


def _routing(moe: model_anatomy.MoELayout, convention: RouterConvention, parts: tuple, positions: tuple
             ) -> tuple[Routing | None, Any]:
    scoring = _scoring(*parts)
    if scoring is None:
        return None, parts
    kind, normalized, scale = scoring
    return Routing(moe.router, moe.experts if "," not in moe.experts else None, convention, kind, normalized,
                   scale, positions), parts


def _route_method_owner(model: Any, moe: model_anatomy.MoELayout) -> str | None:
    """The experts module or MoE block that scores the router logits in its own route method, if any."""
    for path in (moe.experts if "," not in moe.experts else None, moe.path):
        if path and callable(getattr(_module(model, path), ROUTE_METHOD_NAME, None)):
            return path
    return None


def _wrap_route_method(owner: Any, after: Callable[[Any, tuple], Any]) -> None:
    """Replace the instance's route method: ``after(logits, result)`` sees each call and may return a new result."""
    original = getattr(owner, ROUTE_METHOD_NAME)

    def routed(router_logits, *args, **kwargs):
        result = original(router_logits, *args, **kwargs)
        changed = after(router_logits, result)
        return result if changed is None or not isinstance(changed, tuple) else changed
    setattr(owner, ROUTE_METHOD_NAME, routed)


def _read_route_method(moe: model_anatomy.MoELayout, owner: str, logits: Any, result: Any
                       ) -> tuple[Routing | None, Any]:
    """A route method's (indices, weights) pair, in either order, scored against the logits it was given."""
    if not (isinstance(result, tuple) and len(result) == 2) or not _is_float(logits, getattr(logits, "ndim", -1)):
        return None, None
    logits = logits.reshape(-1, logits.shape[-1])  # DeepSeek-V2 passes [batch, seq, experts]
    ints = [i for i, t in enumerate(result) if _is_int(t, 2)]
    floats = [i for i, t in enumerate(result) if _is_float(t, 2)]
    if len(ints) != 1 or len(floats) != 1 or result[ints[0]].shape != result[floats[0]].shape:
        return None, None
    parts = (logits, result[floats[0]], result[ints[0]])
    found, parts = _routing(moe, RouterConvention.ROUTE_METHOD, parts, (floats[0], ints[0]))
    if found is not None:
        found.experts = owner
    return found, parts


def _router_probe(subject: Subject) -> list[Routing]:
    """Run the model once, reading each router's output and its experts' call: one Routing per MoE block."""
    import torch

    moes = [block.moe for block in subject.layout.blocks if block.moe is not None]
    if not moes:
        raise ToolError("the config has experts but the resolver found no MoE block")
    outputs: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    calls: dict[str, tuple] = {}
    routed: dict[str, tuple[str, Any, Any]] = {}  # router path -> (owner path, method input logits, its result)
    wrapped: list[Any] = []  # modules whose route method the probe replaced (restored after it)
    handles = []
    for moe in moes:
        owner = _route_method_owner(subject.model, moe)
        if owner is not None:
            def record(logits, result, path=moe.router, at=owner) -> None:
                routed.setdefault(path, (at, logits, result))
            _wrap_route_method(_module(subject.model, owner), record)
            wrapped.append(_module(subject.model, owner))
        handles.append(_module(subject.model, moe.router).register_forward_hook(
            lambda m, a, o, path=moe.router: outputs.setdefault(path, o)))
        def keep_input(module, args, kwargs, path=moe.router) -> None:
            inputs.setdefault(path, _hidden_arg(args, kwargs))
        handles.append(_module(subject.model, moe.router).register_forward_pre_hook(keep_input, with_kwargs=True))
        if "," not in moe.experts:
            handles.append(_module(subject.model, moe.experts).register_forward_pre_hook(
                lambda m, a, kw, path=moe.experts: calls.setdefault(path, (a, kw)), with_kwargs=True))
    try:
        with torch.no_grad():
            subject.model(input_ids=_probe_ids(subject.config))
    finally:
        for handle in handles:
            handle.remove()
        for owner_module in wrapped:
            owner_module.__dict__.pop(ROUTE_METHOD_NAME, None)
    k = subject.view.experts_per_token
    routings = []
    for moe in moes:
        if moe.router not in outputs and moe.router not in routed:
            raise ToolError(f"the router {moe.router} never ran on the probe")
        def logits_of(moe=moe) -> Any:
            hidden = inputs.get(moe.router)
            return None if hidden is None else _router_logits(_module(subject.model, moe.router), hidden.detach())
        routing, parts = (_read_routing(moe, outputs[moe.router], calls.get(moe.experts), k, logits_of)
                          if moe.router in outputs else (None, None))  # DeepSeek-V2 reads gate.weight directly
        if routing is None and moe.router in routed:
            routing, parts = _read_route_method(moe, *routed[moe.router])
        if routing is None:
            fixed = ROUTER_SCORING_FIXED.get(subject.model_type)
            if fixed:
                raise NotApplicable(fixed)
            if parts is None:
                raise ToolError(f"the router {moe.router} returns neither (logits, top-k weights, top-k indices), "
                                "nor logits with the top-k weights and indices passed to its experts, nor dense "
                                "top-k scores, nor sorted top-k gates")
            raise ToolError(f"cannot tell the scoring of router {moe.router} (the top-k weights are neither "
                            "softmax nor sigmoid probabilities of the chosen experts, renormalized or not)")
        routings.append(routing)
    return routings


def _router_edit(subject: Subject, change: Callable[[Routing], tuple[str, bool]]) -> Callable[..., None]:
    """Hooks that rewrite each router's top-k weights as ``change`` scores them, for the same experts."""
    routings = _router_probe(subject)
    k = subject.view.experts_per_token

    def edit(model: Any, config: Any) -> None:
        for routing in routings:
            kind, normalized = change(routing)
            _hook_routing(model, routing, kind, normalized, k)
    return edit


def _hook_routing(model: Any, routing: Routing, kind: str, normalized: bool, k: int | None) -> None:
    positions, scale = routing.positions, routing.scale
    router = _module(model, routing.router)
    if routing.convention is RouterConvention.ROUTER_TUPLE:
        def tuple_hook(module, args, output):
            logits, weights, indices = (output[i] for i in positions)
            result = list(output)
            result[positions[1]] = _rescore(logits, indices, kind, normalized, scale, weights)
            return tuple(result)
        router.register_forward_hook(tuple_hook)
    elif routing.convention is RouterConvention.DENSE_SCORES:
        def dense_hook(module, args, output):
            logits, scores = output[positions[0]], output[positions[1]]
            indices = logits.float().topk(k, dim=-1).indices
            dense = scores.new_zeros(scores.shape).scatter(-1, indices, _rescore(logits, indices, kind, normalized,
                                                                                 scale, scores))
            result = list(output)
            result[positions[1]] = dense
            return tuple(result)
        router.register_forward_hook(dense_hook)
    elif routing.convention is RouterConvention.SORTED_GATES:
        def sorted_hook(module, args, output):
            logits = output[positions[0]]
            indices = logits.float().topk(k, dim=-1).indices
            weights = _rescore(logits, indices, kind, normalized, scale, output[positions[1]]).reshape(-1)
            result = list(output)
            result[positions[1]] = weights[output[positions[2]]]
            return tuple(result)
        router.register_forward_hook(sorted_hook)
    elif routing.convention is RouterConvention.WEIGHTS_INDICES:
        def weights_hook(module, args, kwargs, output):
            logits = _router_logits(module, _hidden_arg(args, kwargs))
            weights, indices = output[positions[0]], output[positions[1]]
            result = list(output)
            result[positions[0]] = _rescore(logits, indices, kind, normalized, scale, weights)
            return tuple(result)
        router.register_forward_hook(weights_hook, with_kwargs=True)
    elif routing.convention is RouterConvention.ROUTE_METHOD:
        def rescored(logits, result):
            logits = logits.reshape(-1, logits.shape[-1])
            weights, indices = result[positions[0]], result[positions[1]]
            new = list(result)
            new[positions[0]] = _rescore(logits, indices, kind, normalized, scale, weights)
            return tuple(new)
        _wrap_route_method(_module(model, routing.experts), rescored)
    else:
        state: dict[str, Any] = {}

        def logits_hook(module, args, output):
            state["logits"] = output if positions[0] == -1 else output[positions[0]]

        def experts_pre(module, args, kwargs):
            flat = list(args) + list(kwargs.values())
            weights, indices = flat[positions[1]], flat[positions[2]]
            new = _rescore(state["logits"], indices, kind, normalized, scale, weights)
            if positions[1] < len(args):
                return tuple(new if i == positions[1] else a for i, a in enumerate(args)), kwargs
            name = list(kwargs)[positions[1] - len(args)]
            return args, dict(kwargs, **{name: new})
        router.register_forward_hook(logits_hook)
        _module(model, routing.experts).register_forward_pre_hook(experts_pre, with_kwargs=True)


def _plan_router_kind(subject: Subject) -> Callable[..., None]:
    if not subject.view.is_moe:
        raise NotApplicable(_not_moe(subject.view))
    if subject.view.experts_per_token == 1 and all(r.normalized for r in _router_probe(subject)):
        raise NotApplicable("top-1 routing with the top-k weights renormalized: the one pick's weight is 1 "
                            "whatever the scoring, and softmax and sigmoid pick the same expert")
    return _router_edit(subject, lambda r: ("sigmoid" if r.kind == "softmax" else "softmax", r.normalized))


def _plan_renormalize(subject: Subject) -> Callable[..., None]:
    if not subject.view.is_moe:
        raise NotApplicable(_not_moe(subject.view))
    scale_free = [block.path for block in subject.layout.blocks if block.moe is not None
                  and block.moe.shared_expert is None and block.norm(model_anatomy.NormRole.MLP_OUTPUT) is not None]
    if scale_free and len(scale_free) == sum(block.moe is not None for block in subject.layout.blocks):
        raise NotApplicable(f"each MoE output goes through a norm before the residual add ({scale_free[0]} and "
                            "every other MoE block, no shared expert): renormalizing the top-k weights scales a "
                            "token's MoE output by one factor, which that norm removes")
    # The router's own output decides (a key can be ignored: Cohere2-MoE's softmax over the top-k always
    # sums to 1 whatever norm_topk_prob says); the key is flipped only when the router cannot be hooked.
    try:
        return _router_edit(subject, lambda r: (r.kind, not r.normalized))
    except ToolError:
        key = subject.view.key("norm_topk_prob")
        if key is None or not isinstance(_get_key(subject.config, key), bool):
            raise
        current = _get_key(subject.config, key)
        return _ConfigEdit(lambda cfg: _set_key(cfg, key, not current))


def _plan_shared_gate(subject: Subject) -> Callable[..., None]:
    if not subject.view.is_moe:
        raise NotApplicable(_not_moe(subject.view))
    moes = [block.moe for block in subject.layout.blocks if block.moe is not None]
    gates = [moe.shared_expert_gate for moe in moes if moe.shared_expert_gate]
    if not gates:
        shared = any(moe.shared_expert is not None for moe in moes)
        raise NotApplicable("the shared expert has no gate" if shared else "no shared expert")

    def edit(model: Any, config: Any) -> None:
        """The port adds the shared expert ungated: its sigmoid gate pinned at 1."""
        for path in gates:
            _module(model, path).register_forward_hook(lambda m, a, o: o.new_full(o.shape, UNGATED_LOGIT))
    return edit


MUTATIONS = [
    Mutation("rope_theta x0.05", None, EditKind.CONFIG, f"every rope_theta (all layer types) x {ROPE_THETA_FACTOR:g} "
             "(a base fixed in the code: the sin/cos tables rebuilt)", _plan_rope_theta),
    Mutation("partial_rotary_factor", DeltaCode.PARTIAL_ROTARY, EditKind.CONFIG,
             "rotary fraction (or rotary_dim): part of the head -> the whole head, whole -> half "
             "(an even rotary dim: RoPE rotates pairs)", _plan_partial),
    Mutation("sliding window removed", DeltaCode.SLIDING_WINDOW, EditKind.CONFIG,
             "sliding_window (or Llama 4's attention_chunk_size) set wider than the prompt", _plan_no_sliding),
    Mutation("norm eps x100", None, EditKind.CONFIG, f"every norm eps key x {EPS_FACTOR:g} (no key, or a norm whose "
             "eps is not the key's: each norm's eps, attribute or measured)", _plan_eps, bounded_on=_eps_bounded),
    Mutation("norm weight offset", DeltaCode.NORM_OFFSET, EditKind.WEIGHT,
             "norm weights +1 (w -> 1+w) or -1 for (1+w) norms", _plan_norm_offset),
    Mutation("activation swap", DeltaCode.ACTIVATION, EditKind.CONFIG,
             "activation key: silu -> gelu_pytorch_tanh, others -> silu (no key: the MLPs' activation modules; "
             "a gate x*sigmoid(1.702x): its slope set to 1, SiLU)",
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
    Mutation("MoE top-k", DeltaCode.MOE, EditKind.CONFIG, "experts per token k -> k-1 (k=1, or a family that cannot "
             "run top-1: k+1)", _plan_topk),
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
        return hf_reference.load_config(str(replica), trust_remote_code=trust_remote_code)

    base_model = load()
    base = logprobs(base_model)
    watched = base.topk(min(top_k, base.shape[-1]), dim=-1).indices

    def delta(other: Any) -> float:
        return float((other.gather(-1, watched) - base.gather(-1, watched)).abs().max())

    report = SensitivityReport(str(replica), dtype, threshold, delta(logprobs(load())), int(ids.shape[1]),
                               reference_spread=hf_reference.reference_spread(base))
    model_type = str(raw_config.get("model_type") or "")
    anatomy: dict[str, Any] = {}  # the unmutated model's layout, resolved once for every plan
    for mutation in MUTATIONS:
        subject = Subject(fresh_config(), base_model, model_type, anatomy)
        bound = _bound_reason(mutation, subject)
        bar = tolerances.logprob_atol(dtype) if mutation.bounded or bound else threshold
        result = _run_mutation(mutation, subject, load, logprobs, delta, bar)
        if bound and result.applicable:
            result.reason = f"bounded: {bound}"
        report.mutations.append(result)
    if report.tool_errors and raise_on_tool_error:
        raise SensitivityToolError(report)
    return report


def _bound_reason(mutation: Mutation, subject: Subject) -> str | None:
    """Why ``mutation``'s bug is bounded on this subject, or None (also when the layout does not resolve: the
    plan then reports that)."""
    if mutation.bounded_on is None:
        return None
    try:
        return mutation.bounded_on(subject)
    except (ToolError, NotApplicable):
        return None


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
