"""Does a tiny replica notice port bugs? Mutate it in transformers and measure.

Each mutation reproduces one classic porting bug on the HF side: as a config
edit where the config has a switch for it, otherwise as a weight edit that is
mathematically the same as the bug. For every applicable mutation the report
measures max |delta logprob| over a fixed prompt (at each position, on the
unmutated model's top-k tokens, the tokens a comparison sees). The replica
passes when every applicable mutation moves logprobs by at least
``tolerances.sensitivity_threshold(dtype)``, a fresh re-run of the
unmutated model moves them by exactly 0, and the unmutated reference is not
flat (``hf_reference.check_not_flat``'s rule). Models load through
``hf_reference`` (float32, eager attention), like compare and layer-diff.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import hf_reference
import tolerances
from cli_support import ScriptError
from tiny_config import resample_factors

NORM_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "layer_norm_epsilon")
ACTIVATION_FIELDS = ("hidden_act", "hidden_activation")
PARALLEL_FIELDS = ("use_parallel_residual", "parallel_attn")
PERTURB_RELATIVE_STD = 0.1


@dataclass
class MutationResult:
    """One row of the sensitivity table."""

    name: str
    kind: str  # "config edit", "weight edit" or "-" when not applicable
    how: str
    applicable: bool
    delta: float | None = None
    passed: bool | None = None


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
    def passed(self) -> bool:
        return (self.rerun_delta == 0.0 and not self.flat
                and all(m.passed for m in self.mutations if m.applicable))

    def failures(self) -> list[str]:
        failed = [m.name for m in self.mutations if m.applicable and not m.passed]
        if self.rerun_delta != 0.0:
            failed.insert(0, "rerun")
        if self.flat:
            failed.insert(0, "flat reference")
        return failed

    def to_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "dtype": self.dtype, "threshold": self.threshold,
                "reference_spread": self.reference_spread, "flat_reference_threshold": tolerances.FLAT_REFERENCE_SPREAD,
                "flat": self.flat,
                "rerun_delta": self.rerun_delta, "prompt_tokens": self.prompt_tokens, "passed": self.passed,
                "failures": self.failures(), "mutations": [asdict(m) for m in self.mutations]}

    def table(self) -> str:
        rows = [f"sensitivity of {self.replica} (threshold {self.threshold:g} = "
                f"{tolerances.SENSITIVITY_FACTOR:g} x {self.dtype} tolerance; {self.prompt_tokens} prompt tokens)",
                f"{'mutation':<26} {'kind':<12} {'max|dlogprob|':>14}  result  how"]
        rows.append(f"{'rerun (unmutated)':<26} {'-':<12} {self.rerun_delta:>14.3g}  "
                    f"{'PASS' if self.rerun_delta == 0.0 else 'FAIL'}    must be exactly 0")
        if self.reference_spread is not None:
            rows.append(f"{'reference spread':<26} {'-':<12} {self.reference_spread:>14.3g}  "
                        f"{'FAIL' if self.flat else 'PASS'}    mean top-minus-mean logprob, at least "
                        f"{tolerances.FLAT_REFERENCE_SPREAD:g} (flat: {hf_reference.FLAT_MESSAGE})")
        for m in self.mutations:
            delta = f"{m.delta:14.3g}" if m.delta is not None else f"{'-':>14}"
            verdict = ("PASS" if m.passed else "FAIL") if m.applicable else "n/a "
            rows.append(f"{m.name:<26} {m.kind:<12} {delta}  {verdict}    {m.how}")
        rows.append("PASSED" if self.passed else f"FAILED: {', '.join(self.failures())}")
        return "\n".join(rows)


@dataclass
class Mutation:
    """A bug to reproduce: how to tell if it applies and how to build the mutant."""

    name: str
    kind: str
    how: str
    applies: Callable[[Any], str | None]  # None when applicable, else why not
    config_edit: Callable[[Any], None] | None = None
    weight_edit: Callable[[Any, Any], None] | None = None


# --- helpers over transformers configs and modules ---------------------------------------


def _rope_dicts(config: Any) -> list[dict[str, Any]]:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return []
    if all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotary_dim(config: Any) -> int:
    factors = [p.get("partial_rotary_factor") for p in _rope_dicts(config) if p.get("partial_rotary_factor")]
    factor = factors[0] if factors else (getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(_head_dim(config) * factor)


def _first_field(config: Any, names: tuple[str, ...]) -> str | None:
    for name in names:
        if getattr(config, name, None) is not None:
            return name
    return None


def _decoder_layers(model: Any) -> list[Any]:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ScriptError("cannot find the decoder layers (model.model.layers)")
    return list(layers)


def _attention_parts(attention: Any, config: Any) -> list[tuple[Any, int, int]]:
    """(linear, row offset, head count) for the q and k projections, fused or not."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if hasattr(attention, "q_proj"):
        return [(attention.q_proj, 0, heads), (attention.k_proj, 0, kv_heads)]
    if hasattr(attention, "qkv_proj"):
        dim = _head_dim(config)
        return [(attention.qkv_proj, 0, heads), (attention.qkv_proj, heads * dim, kv_heads)]
    raise ScriptError("cannot find q/k projections (q_proj/k_proj or qkv_proj)")


def _permute_rows(linear: Any, offset: int, order: list[int]) -> None:
    import torch

    index = torch.tensor(order)
    rows = linear.weight[offset:offset + len(order)].clone()
    linear.weight[offset:offset + len(order)] = rows[index]
    if getattr(linear, "bias", None) is not None:
        bias = linear.bias[offset:offset + len(order)].clone()
        linear.bias[offset:offset + len(order)] = bias[index]


def _permute_norm(norm: Any, order: list[int], head_dim: int) -> None:
    """Apply a per-head or full-width permutation to a q/k norm weight, whichever its size fits."""
    import torch

    if norm is None or getattr(norm, "weight", None) is None:
        return
    size = norm.weight.shape[0]
    if size == len(order):
        norm.weight.copy_(norm.weight.clone()[torch.tensor(order)])
    elif size == head_dim and len(order) % head_dim == 0:
        norm.weight.copy_(norm.weight.clone()[torch.tensor(order[:head_dim])])


def _within_heads(per_head: list[int], heads: int, head_dim: int) -> list[int]:
    return [h * head_dim + i for h in range(heads) for i in per_head]


# --- the mutations ---------------------------------------------------------------------------


def _edit_rope_theta(config: Any) -> None:
    for params in _rope_dicts(config):
        params["rope_theta"] = params["rope_theta"] * 0.05


def _has_rope(config: Any) -> str | None:
    return None if any(p.get("rope_theta") for p in _rope_dicts(config)) else "no RoPE parameters"


def _has_partial(config: Any) -> str | None:
    if _has_rope(config):
        return "no RoPE parameters"
    if getattr(config, "partial_rotary_factor", None) is None and not any(
            "partial_rotary_factor" in p for p in _rope_dicts(config)):
        return "config has no partial_rotary_factor"
    return None


def _edit_partial(config: Any) -> None:
    current = _rotary_dim(config) / _head_dim(config)
    new = 1.0 if current < 1.0 else 0.5
    if getattr(config, "partial_rotary_factor", None) is not None:
        config.partial_rotary_factor = new
    half = int(_head_dim(config) * new) // 2
    for params in _rope_dicts(config):
        params["partial_rotary_factor"] = new
        for name in ("long_factor", "short_factor"):  # longrope lists have one entry per rotary pair
            if isinstance(params.get(name), list):
                params[name] = resample_factors(params[name], half)


def _uses_sliding(config: Any) -> str | None:
    if not getattr(config, "sliding_window", None):
        return "no sliding window"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return "no layer uses sliding attention"
    return None


def _edit_no_sliding(config: Any) -> None:
    config.sliding_window = 1 << 20  # wider than any prompt: the same as no window


def _has_eps(config: Any) -> str | None:
    return None if _first_field(config, NORM_EPS_FIELDS) else "no norm eps field"


def _edit_eps(config: Any) -> None:
    for name in NORM_EPS_FIELDS:
        if getattr(config, name, None) is not None:
            setattr(config, name, getattr(config, name) * 100)


def _flip_norm_offset(model: Any, config: Any) -> None:
    from replica_init import is_norm

    offset_style = _norm_offset_style(model)
    for module in model.modules():
        if is_norm(module) and getattr(module, "weight", None) is not None:
            module.weight.add_(-1.0 if offset_style else 1.0)
    _ = config


def _norm_offset_style(model: Any) -> bool:
    """True when norms compute x * (1 + w): probed on a copy of the first norm."""
    import copy

    import torch

    from replica_init import is_norm

    norm = next((m for m in model.modules() if is_norm(m) and getattr(m, "weight", None) is not None), None)
    if norm is None:
        return False
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.zero_()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        out = probe(torch.randn(1, 2, probe.weight.shape[0]))
    return bool(out.abs().max() > 0)


def _always(config: Any) -> str | None:
    return None


def _has_activation(config: Any) -> str | None:
    return None if _first_field(config, ACTIVATION_FIELDS) else "no activation field"


def _edit_activation(config: Any) -> None:
    for name in ACTIVATION_FIELDS:
        current = getattr(config, name, None)
        if current is not None:
            setattr(config, name, "gelu_pytorch_tanh" if str(current) in ("silu", "swish") else "silu")


def _edit_tie(model: Any, config: Any) -> None:
    """Tied: the port loads a separate lm_head that is absent (MAX zero-fills it). Untied: it ties."""
    import torch

    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(torch.zeros_like(embed.weight))
    else:
        head.weight.copy_(embed.weight)
    _ = config


def _has_field(name: str) -> Callable[[Any], str | None]:
    return lambda config: None if getattr(config, name, None) is not None else f"config has no {name}"


def _drop_field(name: str) -> Callable[[Any], None]:
    return lambda config: setattr(config, name, None)


def _has_parallel(config: Any) -> str | None:
    return None if _first_field(config, PARALLEL_FIELDS) else "config has no parallel-block flag"


def _edit_parallel(config: Any) -> None:
    name = _first_field(config, PARALLEL_FIELDS)
    setattr(config, name, not getattr(config, name))


def _has_gqa(config: Any) -> str | None:
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv in (1, config.num_attention_heads):
        return "no grouped KV heads (MHA or MQA)"
    return None


def _edit_gqa_mapping(model: Any, config: Any) -> None:
    """Query head h reads KV head h % kv instead of h // group: reorder q heads (and o_proj columns)."""
    import torch

    heads = config.num_attention_heads
    kv = config.num_key_value_heads
    group = heads // kv
    dim = _head_dim(config)
    source_head = [(h // group) + (h % group) * kv for h in range(heads)]
    order = [source_head[h] * dim + i for h in range(heads) for i in range(dim)]
    for layer in _decoder_layers(model):
        attention = layer.self_attn
        q_linear, offset, _ = _attention_parts(attention, config)[0]
        _permute_rows(q_linear, offset, order)
        _permute_norm(getattr(attention, "q_norm", None), order, dim)
        out = attention.o_proj
        out.weight.copy_(out.weight.clone()[:, torch.tensor(order)])


def _edit_rope_style(model: Any, config: Any) -> None:
    """Pair dims (2i, 2i+1) instead of (i, i + d/2): permute the rotary rows of q and k the same way."""
    rot = _rotary_dim(config)
    dim = _head_dim(config)
    per_head = list(range(0, rot, 2)) + list(range(1, rot, 2)) + list(range(rot, dim))
    for layer in _decoder_layers(model):
        attention = layer.self_attn
        for (linear, offset, heads), norm_name in zip(_attention_parts(attention, config), ("q_norm", "k_norm")):
            order = _within_heads(per_head, heads, dim)
            _permute_rows(linear, offset, order)
            _permute_norm(getattr(attention, norm_name, None), order, dim)


def _perturb_layer(model: Any, config: Any) -> None:
    import torch

    layers = _decoder_layers(model)
    layer = layers[len(layers) // 2]
    generator = torch.Generator().manual_seed(1234)
    for param in layer.parameters():
        if param.ndim >= 2:
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype) * float(param.float().std()) * PERTURB_RELATIVE_STD)
    _ = config


MUTATIONS = [
    Mutation("rope_theta x0.05", "config edit", "every rope_theta (all layer types) x 0.05", _has_rope,
             config_edit=_edit_rope_theta),
    Mutation("partial_rotary_factor", "config edit", "partial_rotary_factor: <1 -> 1.0, 1.0 -> 0.5", _has_partial,
             config_edit=_edit_partial),
    Mutation("sliding window removed", "config edit", "sliding_window set wider than the prompt", _uses_sliding,
             config_edit=_edit_no_sliding),
    Mutation("norm eps x100", "config edit", "every norm eps field x 100", _has_eps, config_edit=_edit_eps),
    Mutation("norm weight offset", "weight edit", "norm weights +1 (w -> 1+w) or -1 for (1+w) norms", _always,
             weight_edit=_flip_norm_offset),
    Mutation("activation swap", "config edit", "hidden_act/hidden_activation: silu -> gelu_pytorch_tanh, others -> silu", _has_activation,
             config_edit=_edit_activation),
    Mutation("tie vs untie", "weight edit", "tied: lm_head zero-filled (as MAX fills an absent weight); untied: lm_head := embeddings "
             "(flipping the flag in transformers would draw a random head)",
             _always, weight_edit=_edit_tie),
    Mutation("attention softcap removed", "config edit", "attn_logit_softcapping set to None",
             _has_field("attn_logit_softcapping"), config_edit=_drop_field("attn_logit_softcapping")),
    Mutation("final softcap removed", "config edit", "final_logit_softcapping set to None",
             _has_field("final_logit_softcapping"), config_edit=_drop_field("final_logit_softcapping")),
    Mutation("parallel vs sequential", "config edit", "parallel-residual flag flipped", _has_parallel,
             config_edit=_edit_parallel),
    Mutation("GQA head mapping", "weight edit", "q head h uses KV head h % kv (q/o heads reordered)", _has_gqa,
             weight_edit=_edit_gqa_mapping),
    Mutation("RoPE style", "weight edit", "interleaved pairs instead of half-split (q/k rotary rows permuted)",
             _has_rope, weight_edit=_edit_rope_style),
    Mutation("one layer perturbed", "weight edit",
             f"middle layer's matrices + noise ({PERTURB_RELATIVE_STD:g} x their std)", _always,
             weight_edit=_perturb_layer),
]


# --- running -------------------------------------------------------------------------------------


def sensitivity_report(replica_dir: str | Path, *, dtype: str | None = None, trust_remote_code: bool = False,
                       top_k: int | None = None) -> SensitivityReport:
    """Run every mutation against the replica in ``replica_dir`` and return the report.

    ``dtype`` picks the tolerance (default: the replica manifest's dtype). The
    models run in float32, so the deltas are properties of the replica.
    """
    import torch
    import transformers

    from replica_init import quiet_transformers

    quiet_transformers()
    replica = Path(replica_dir)
    if not (replica / "config.json").is_file():
        raise ScriptError(f"{replica} has no config.json; build a replica first")
    manifest_path = replica / "tiny_replica.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    dtype = tolerances.canonical_dtype(dtype or manifest.get("replica", {}).get("dtype") or "float32")
    threshold = tolerances.sensitivity_threshold(dtype)
    top_k = top_k or tolerances.TOP_K
    tokenizer = transformers.AutoTokenizer.from_pretrained(replica, trust_remote_code=trust_remote_code)
    from replica_init import PROMPT

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
    for mutation in MUTATIONS:
        config = fresh_config()
        reason = mutation.applies(config)
        if reason:
            report.mutations.append(MutationResult(mutation.name, "-", reason, False))
            continue
        try:
            if mutation.config_edit:
                mutation.config_edit(config)
                model = load(config)
            else:
                model = copy.deepcopy(base_model)
                with torch.no_grad():
                    mutation.weight_edit(model, config)
            moved = delta(logprobs(model))
        except ScriptError:
            raise
        except Exception as exc:  # noqa: BLE001 - a mutant that cannot run is a failed row, not a crash
            error = " ".join(str(exc).split())[:160]
            report.mutations.append(MutationResult(mutation.name, mutation.kind,
                                                   f"{mutation.how} (mutant failed: {type(exc).__name__}: {error})",
                                                   True, None, False))
            continue
        report.mutations.append(MutationResult(mutation.name, mutation.kind, mutation.how, True, moved,
                                               moved >= threshold))
    return report
