"""Initialize a tiny replica's weights so that port bugs show in its logits.

transformers' default init (std 0.02, unit norm weights, zero biases) gives
almost uniform logits: a port with a wrong RoPE theta still matches to 1e-3.
The "peaked" init used here instead:

1. draws every matrix from N(0, std), adds N(0, norm_std) to every norm
   weight (around 1, or around 0 for norms computed as 1 + w) and draws every
   bias and other vector from N(0, bias_std);
2. scales the embeddings so the first norm that reads them sees a mean square
   of ``eps_headroom`` x its eps, so a wrong norm eps moves the output; learned
   position embeddings are scaled with the token embedding, by the same factor,
   so the tokens keep their share of the input;
3. scales the final norm (else ``project_out``, else an untied LM head) so the
   logits have standard deviation ``logit_std`` (or half the final softcap when
   the config has one, so the softcap is in its non-linear range);
4. with q/k norms, scales the query and key rows feeding them so each sees
   ``eps_headroom`` x its eps too (a wrong q/k-norm eps then moves the output);
5. with an attention softcap, scales the query rows of every block's query
   projection (separate or fused, Linear or Conv1D) so the attention scores
   reach the cap's non-linear range.

The parts come from ``model_anatomy.resolve_layout``. Each step is recorded in
the manifest under ``calibration``: applied (with the module it scaled and the
scale) or not applicable (with the reason). A step that should apply but
cannot raises ScriptError naming the step; no step is skipped silently.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

import model_anatomy
from cli_support import ScriptError

NORM_EPS_ATTRS = model_anatomy.NORM_EPS_ATTRS  # re-exported for replica_sensitivity

# Calibration loops: rounds, and the step size below which a loop has settled.
EMBEDDING_ROUNDS = 4
EMBEDDING_SETTLED = 0.02
SOFTCAP_ROUNDS = 3
SOFTCAP_SETTLED = 0.05
LOGIT_ROUNDS = 8
LOGIT_SETTLED = 0.02
MIN_SCORE = 1e-6  # floor of the measured attention score, so a zero score cannot divide by zero
# With a fixed position table the token embedding is scaled to this x the table's mean square at the
# first norm (tokens keep half its input; driven to eps_headroom x eps they vanished: CTRL scale 2e-9).
TABLE_SHARE_FACTOR = 2.0
# Post-LN blocks without a norm before them (OpenAI GPT): the embeddings (tokens and learned positions
# together) get this x the attention biases' mean square at the first norm, so the tokens alone still
# outweigh the biases (at 2 x, tokens moved the logits by 0.45 of their norm, below the tests' 0.5).
POST_LN_SHARE_FACTOR = 4.0
MAX_LOGIT_STEP = 1000.0  # largest factor one logit round applies (a near-zero spread must not explode)
SOFTCAP_SHARE = 0.5  # with a final softcap, aim the logit spread at this share of the cap (its non-linear range)

# The probe text the replica is built, calibrated and checked with (tiny records it in the manifest).
PROMPT = ("The capital of France is Paris. Once upon a time there was a little robot who wanted to learn "
          "how to read and write.")


@dataclass
class InitOptions:
    """How replica weights are drawn ("default" keeps transformers' own init)."""

    mode: str = "peaked"
    std: float = 0.3
    norm_std: float = 0.3
    bias_std: float = 0.1
    eps_headroom: float = 30.0
    logit_std: float = 4.0

    def describe(self) -> dict[str, Any]:
        if self.mode == "default":
            return {"mode": "default", "note": "transformers' own init (config.initializer_range), no calibration"}
        return asdict(self)


def is_norm(module: Any) -> bool:
    """True for normalization layers (RMSNorm, LayerNorm and family variants)."""
    return model_anatomy.is_norm_module(module)


def norm_eps(module: Any) -> float | None:
    """The eps a norm module uses."""
    return model_anatomy.norm_eps(module)


class StepStatus(str, enum.Enum):
    """What one calibration step did (recorded in the manifest)."""

    APPLIED = "applied"
    NOT_APPLICABLE = "not applicable"  # the model lacks the feature the step calibrates (the reason says which)


def initialize(model: Any, config: Any, options: InitOptions, calibration_ids: Any) -> dict[str, Any]:
    """Re-draw the weights of ``model`` in place; return the settings for the manifest.

    Every calibration step either applies to the resolved layout (the manifest names the module it
    scaled) or is not applicable with the reason; a step that should apply but cannot raises
    ScriptError naming it.
    """
    settings = options.describe()
    if options.mode == "default":
        return settings
    import torch

    layout = model_anatomy.resolve_layout(model)
    view = model_anatomy.config_view(config.to_dict())
    offset_norms = _draw_weights(model, options)
    with torch.no_grad():
        steps = {
            "embedding": _calibrate_embedding(model, layout, options, calibration_ids),
            "qk_norms": _calibrate_qk_norms(model, layout, options, calibration_ids),
            "attention_softcap": _calibrate_attention_softcap(model, layout, view, calibration_ids),
            "final_logits": _calibrate_logits(model, layout, view, options, calibration_ids, offset_norms),
        }
    settings["embedding_scale"] = steps["embedding"].get("scale")
    settings["query_scale"] = steps["attention_softcap"].get("scale")
    settings["final_norm_scale"] = steps["final_logits"]["scale"]
    settings["calibration"] = steps
    settings["offset_norms"] = bool(offset_norms)
    return settings


def _applied(module: str, scale: float, **extra: Any) -> dict[str, Any]:
    return {"status": StepStatus.APPLIED.value, "module": module, "scale": scale, **extra}


def _not_applicable(reason: str) -> dict[str, Any]:
    return {"status": StepStatus.NOT_APPLICABLE.value, "reason": reason, "scale": None}


def _draw_weights(model: Any, options: InitOptions) -> set[int]:
    """Draw all parameters; return ids of norm modules computed as (1 + w)."""
    import torch

    seen: set[int] = set()
    offset_norms: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if is_norm(module) and name == "weight":
                    if torch.count_nonzero(param) == 0:
                        offset_norms.add(id(module))
                    param.add_(torch.randn_like(param) * options.norm_std)
                elif param.ndim >= 2:
                    param.normal_(0.0, options.std)
                else:
                    param.normal_(0.0, options.bias_std)
    return offset_norms


def _forward(model: Any, ids: Any) -> Any:
    return model(input_ids=ids).logits.float()


def is_mean_centred(module: Any) -> bool:
    """LayerNorm-style norms (mean removed, then scaled by the variance), as opposed to RMSNorm."""
    import torch

    name = type(module).__name__.lower()
    return isinstance(module, torch.nn.LayerNorm) or ("layernorm" in name and "rms" not in name)


def _embedding_norms(layout: model_anatomy.ModelLayout) -> list[str]:
    """The norm that first reads the embeddings, or (post-LN blocks) every norm of block 0 in order."""
    if layout.first_norm:
        return [layout.first_norm]
    return [norm.path for norm in layout.blocks[0].norms] if layout.blocks else []


def _first_norm_mean_square(model: Any, paths: list[str], ids: Any) -> tuple[str, float, float] | None:
    """The first of ``paths`` to run: its path, the mean square (variance for LayerNorm) of its input, its eps."""
    found: list[tuple[str, float, float]] = []

    def hook_for(path: str):
        def hook(module, inputs):
            if found or not inputs:
                return
            eps = norm_eps(module)
            if eps is None:
                return
            x = inputs[0].float()
            measured = x.var(dim=-1, unbiased=False).mean() if is_mean_centred(module) else x.pow(2).mean()
            found.append((path, float(measured), eps))
        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(hook_for(path)) for path in paths]
    try:
        _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _calibrate_embedding(model: Any, layout: model_anatomy.ModelLayout, options: InitOptions, ids: Any) -> dict[str, Any]:
    """Scale the embeddings so the first norm sees ``eps_headroom`` x its eps.

    Learned position embeddings are scaled with the token embedding, by the same factor: scaling the
    token embedding alone lets the positions dominate and drives the tokens to about 0.
    """
    paths = _embedding_norms(layout)
    if not paths:
        return _not_applicable("no norm reads the embeddings")
    tables = [model.get_submodule(layout.token_embedding)]
    if layout.position_embedding:
        tables.append(model.get_submodule(layout.position_embedding))
    floor = _fixed_table_floor(model, layout, paths, ids)
    total, norm_path = 1.0, None
    for _ in range(EMBEDDING_ROUNDS):
        measured = _first_norm_mean_square(model, paths, ids)
        if measured is None:
            return _not_applicable(f"none of {', '.join(paths)} ran with an eps attribute")
        norm_path, mean_square, eps = measured
        if mean_square <= 0:
            break
        share = TABLE_SHARE_FACTOR if layout.position_table else POST_LN_SHARE_FACTOR
        target = max(options.eps_headroom * eps, share * floor)
        # Above a fixed table the token part is what scales: aim its share (mean square - floor) at target - floor.
        scale = ((target - floor) / max(mean_square - floor, MIN_SCORE)) ** 0.5 if floor else \
            (target / mean_square) ** 0.5
        for table in tables:
            table.weight.mul_(scale)
        total *= scale
        if abs(scale - 1.0) < EMBEDDING_SETTLED:
            break
    scaled = [layout.token_embedding] + ([layout.position_embedding] if layout.position_embedding else [])
    if floor:
        source = layout.norm_input_floor()
        return _applied(", ".join(scaled), total, norm=norm_path, fixed_table_floor=floor,
                        note=f"{source} alone gives the first norm a mean square of {floor:.3g}: the embeddings "
                             "are scaled to an equal share, not to eps_headroom x eps")
    return _applied(", ".join(scaled), total, norm=norm_path)


def _fixed_table_floor(model: Any, layout: model_anatomy.ModelLayout, paths: list[str], ids: Any) -> float:
    """The first norm's input mean square with the token embedding zeroed: what a fixed position table
    (CTRL, XGLM: rebuilt at load, so not scalable) contributes; 0.0 without one.

    Post-LN blocks with no norm before them (OpenAI GPT: ln_1(x + attn(x))): the first norm also reads
    the attention's biases, which the embeddings do not scale; the floor is its input with the token and
    position embeddings both zeroed (scaled to eps_headroom x eps, the embeddings went to 3e-6 and the
    positions moved nothing).
    """
    if layout.norm_input_floor() is None:
        return 0.0
    post_ln = not layout.position_table
    tables = [layout.token_embedding] + ([layout.position_embedding] if post_ln and layout.position_embedding else [])
    weights = [model.get_submodule(path).weight for path in tables]
    saved = [weight.detach().clone() for weight in weights]
    for weight in weights:
        weight.zero_()
    try:
        measured = _first_norm_mean_square(model, paths, ids)
    finally:
        for weight, kept in zip(weights, saved):
            weight.copy_(kept)
    return measured[1] if measured else 0.0


def _scores_of(module: Any, attention: model_anatomy.AttentionLayout, hidden: Any, scaling: float) -> float:
    """Mean |q.k| x scaling of one attention call, from its q/k projections (RoPE and q/k norms left out)."""
    query_module = module.get_submodule(attention.query_projection.path.rpartition(".")[2])
    key_module = module.get_submodule(attention.key_projection.path.rpartition(".")[2])
    q = query_module(hidden).float()[..., attention.query_rows()]
    k = key_module(hidden).float()[..., attention.key_rows()]
    q = q.view(*q.shape[:-1], attention.num_heads, attention.head_dim)
    k = k.view(*k.shape[:-1], attention.num_kv_heads, attention.head_dim)
    k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=-2)
    raw = (q.unsqueeze(-3) * k.unsqueeze(-4)).sum(-1) * scaling
    return float(raw.abs().mean())


def _scale_rows(projection: Any, rows: list[int], layout: model_anatomy.Projection, scale: float) -> None:
    """Multiply the given output features of a Linear (weight rows) or Conv1D (weight columns) by ``scale``."""
    if layout.transposed:
        projection.weight[:, rows] *= scale
    else:
        projection.weight[rows] *= scale
    if projection.bias is not None:
        projection.bias[rows] *= scale


def _calibrate_attention_softcap(model: Any, layout: model_anatomy.ModelLayout, view: model_anatomy.ConfigView,
                                 ids: Any) -> dict[str, Any]:
    """Scale the query rows so attention scores reach about the softcap (when there is one)."""
    cap = view.attn_softcap
    if not cap:
        return _not_applicable("the config has no attention softcap")
    attentions = [block.attention for block in layout.blocks]
    scores: list[float] = []

    def capture_for(attention: model_anatomy.AttentionLayout):
        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None:
                raise ScriptError(f"calibration step attention_softcap cannot read the input of {attention.path}")
            scaling = getattr(module, "scaling", None)
            if not isinstance(scaling, float):
                scaling = (view.query_scale or attention.head_dim) ** -0.5
            scores.append(_scores_of(module, attention, hidden, scaling))
        return capture

    total = 1.0
    for _ in range(SOFTCAP_ROUNDS):
        scores.clear()
        handles = [model.get_submodule(a.path).register_forward_pre_hook(capture_for(a), with_kwargs=True)
                   for a in attentions]
        try:
            _forward(model, ids)
        finally:
            for handle in handles:
                handle.remove()
        if not scores:
            raise ScriptError("calibration step attention_softcap cannot apply: no attention module of the "
                              f"resolved layout ran ({attentions[0].path if attentions else 'no blocks'})")
        scale = cap / max(sum(scores) / len(scores), MIN_SCORE)
        for attention in attentions:
            projection = attention.query_projection
            _scale_rows(model.get_submodule(projection.path), attention.query_rows(), projection, scale)
        total *= scale
        if abs(scale - 1.0) < SOFTCAP_SETTLED:
            break
    first = attentions[0].query_projection.path
    return _applied(f"{first} and the same projection of every block (query rows)", total)


def _norm_input_spread(values: Any, mean_centred: bool) -> float:
    """Mean over rows of the input's mean square (its variance for a mean-centred norm)."""
    values = values.float()
    if mean_centred:
        values = values - values.mean(dim=-1, keepdim=True)
    return float(values.pow(2).mean())


def _calibrate_qk_norms(model: Any, layout: model_anatomy.ModelLayout, options: InitOptions,
                        ids: Any) -> dict[str, Any]:
    """Scale the query and key rows so each q/k norm sees ``eps_headroom`` x its eps, as the first norm does.

    With the peaked init a q/k norm's input is thousands of times its eps, so a port with the wrong
    q/k-norm eps would match; at this headroom the eps moves the output.
    """
    targets = [(block.attention, role, path) for block in layout.blocks
               for role, path in (("query", block.attention.q_norm), ("key", block.attention.k_norm)) if path]
    if not targets:
        return _not_applicable("the attention has no q/k norms")
    # A norm shared by q and k (one module) runs twice per call: query first, then key.
    measured: dict[str, list[float]] = {}

    def hook_for(path: str, mean_centred: bool):
        def hook(module, inputs):
            measured.setdefault(path, []).append(_norm_input_spread(inputs[0], mean_centred))
        return hook

    total: dict[tuple[str, str], float] = {(role, path): 1.0 for _, role, path in targets}
    for _ in range(EMBEDDING_ROUNDS):
        measured.clear()
        handles = []
        for path in dict.fromkeys(path for _, _, path in targets):
            module = model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(hook_for(path, is_mean_centred(module))))
        try:
            _forward(model, ids)
        finally:
            for handle in handles:
                handle.remove()
        largest_step = 0.0
        for attention, role, path in targets:
            eps = norm_eps(model.get_submodule(path))
            if path not in measured or eps is None:
                raise ScriptError(f"calibration step qk_norms cannot apply: {path} "
                                  + ("did not run" if path not in measured else "has no eps attribute"))
            spread = measured[path][0 if role == "query" else -1]
            if spread <= 0:
                continue
            scale = (options.eps_headroom * eps / spread) ** 0.5
            projection = attention.query_projection if role == "query" else attention.key_projection
            rows = attention.query_rows() if role == "query" else attention.key_rows()
            _scale_rows(model.get_submodule(projection.path), rows, projection, scale)
            total[(role, path)] *= scale
            largest_step = max(largest_step, abs(scale - 1.0))
        if largest_step < EMBEDDING_SETTLED:
            break
    first = targets[0][2]
    return _applied(f"the query/key rows feeding {first} and every other q/k norm ({len(targets)})",
                    min(total.values()), max_scale=max(total.values()))


def final_norm(model: Any) -> Any | None:
    """The norm applied before the LM head, as model_anatomy resolves it (None when the model has none)."""
    path = model_anatomy.resolve_layout(model).final_norm
    return model.get_submodule(path) if path else None


def _logit_scale_target(model: Any, layout: model_anatomy.ModelLayout) -> tuple[str, str]:
    """The module whose weight sets the logit scale: a prediction head's norm, the final norm, project_out, an
    untied LM head, else the last post-norm."""
    # ModernBERT-decoder: the head's own norm feeds the LM head; scaling the final norm instead would move
    # the head GELU's input and hide an exact-vs-tanh GELU mistake.
    transform = getattr(layout, "head_transform", None)
    if transform is not None and getattr(model.get_submodule(transform.norm), "weight", None) is not None:
        return transform.norm, "head_transform_norm"
    if layout.final_norm and getattr(model.get_submodule(layout.final_norm), "weight", None) is not None:
        return layout.final_norm, "final_norm"
    if layout.project_out:
        return layout.project_out, "project_out"
    if not layout.tied:
        return layout.lm_head, "lm_head"
    last = layout.blocks[-1].norm(model_anatomy.NormRole.MLP_RESIDUAL) if layout.blocks else None
    if last is not None and getattr(model.get_submodule(last.path), "weight", None) is not None:
        return last.path, "last_post_norm"  # post-LN (OpenAI GPT): the last block's residual norm feeds the head
    why = f"the final norm {layout.final_norm} has no weight" if layout.final_norm else "the model has no final norm"
    raise ScriptError(f"calibration step final_logits cannot apply to {layout.model_class}: {why} and the LM head "
                      f"{layout.lm_head} is tied to the token embedding (scaling it would undo the embedding step)")


def _calibrate_logits(model: Any, layout: model_anatomy.ModelLayout, view: model_anatomy.ConfigView,
                      options: InitOptions, ids: Any, offset_norms: set[int]) -> dict[str, Any]:
    """Scale the final norm (or the module standing in for it) so the logits have ``logit_std`` spread."""
    path, kind = _logit_scale_target(model, layout)
    module = model.get_submodule(path)
    cap = view.final_softcap
    target = max(options.logit_std, SOFTCAP_SHARE * cap) if cap else options.logit_std
    total = 1.0
    for _ in range(LOGIT_ROUNDS):
        logits = _forward(model, ids)
        measured = float(logits.std(dim=-1).mean())
        if measured <= 0:
            break
        scale = min(target / measured, MAX_LOGIT_STEP)
        if id(module) in offset_norms:
            module.weight.copy_((1.0 + module.weight) * scale - 1.0)
        else:
            module.weight.mul_(scale)
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(scale)
        total *= scale
        if abs(scale - 1.0) < LOGIT_SETTLED:
            break
    return _applied(path, total, kind=kind)


def quiet_transformers() -> None:
    """Silence transformers' info logs and progress bars (the scripts print their own summary)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
