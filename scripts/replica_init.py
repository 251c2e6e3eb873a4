"""Initialize a tiny replica's weights so that port bugs show in its logits.

transformers' default init (std 0.02, unit norm weights, zero biases) gives
almost uniform logits: a port with a wrong RoPE theta still matches to 1e-3.
The "peaked" init used here instead:

1. draws every matrix from N(0, std), adds N(0, norm_std) to every norm
   weight (around 1, or around 0 for norms computed as 1 + w) and draws every
   bias and other vector from N(0, bias_std);
2. scales the input embedding so the first norm sees a mean square of
   ``eps_headroom`` x its eps, so a wrong norm eps moves the output;
3. scales the final norm so the logits have standard deviation
   ``logit_std`` (or half the final softcap when the config has one, so the
   softcap is in its non-linear range), which makes them peaked;
4. with an attention softcap, scales the query projections so the attention
   scores reach the cap's non-linear range.

Every scale applied is returned for the replica manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

NORM_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")

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
    return "norm" in type(module).__name__.lower()


def norm_eps(module: Any) -> float | None:
    for attr in NORM_EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


def initialize(model: Any, config: Any, options: InitOptions, calibration_ids: Any) -> dict[str, Any]:
    """Re-draw the weights of ``model`` in place; return the settings for the manifest."""
    settings = options.describe()
    if options.mode == "default":
        return settings
    import torch

    offset_norms = _draw_weights(model, options)
    with torch.no_grad():
        settings["embedding_scale"] = _calibrate_embedding(model, options, calibration_ids)
        settings["query_scale"] = _calibrate_attention_softcap(model, config, calibration_ids)
        settings["final_norm_scale"] = _calibrate_logits(model, config, options, calibration_ids, offset_norms)
    settings["offset_norms"] = bool(offset_norms)
    return settings


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


def _first_norm_mean_square(model: Any, ids: Any) -> tuple[float, float] | None:
    """Mean square (or variance for LayerNorm) of the first norm's input, and its eps."""
    import torch

    found: list[tuple[float, float]] = []

    def hook(module, inputs):
        if found or not inputs:
            return
        x = inputs[0].float()
        eps = norm_eps(module)
        if eps is None:
            return
        if isinstance(module, torch.nn.LayerNorm):
            found.append((float(x.var(dim=-1, unbiased=False).mean()), eps))
        else:
            found.append((float(x.pow(2).mean()), eps))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if is_norm(m)]
    try:
        _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _calibrate_embedding(model: Any, options: InitOptions, ids: Any) -> float:
    embedding = model.get_input_embeddings()
    total = 1.0
    for _ in range(4):
        measured = _first_norm_mean_square(model, ids)
        if measured is None or measured[0] <= 0:
            break
        mean_square, eps = measured
        scale = (options.eps_headroom * eps / mean_square) ** 0.5
        embedding.weight.mul_(scale)
        total *= scale
        if abs(scale - 1.0) < 0.02:
            break
    return total


def _attention_modules(model: Any) -> list[Any]:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def _calibrate_attention_softcap(model: Any, config: Any, ids: Any) -> float | None:
    """Scale q projections so attention scores reach about the softcap (when there is one)."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if not cap:
        return None
    scores: list[float] = []
    attentions = _attention_modules(model)

    def capture(module, args, kwargs):
        # Recompute raw scores from the q/k projections of this call.
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q = module.q_proj(hidden).float()
        k = module.k_proj(hidden).float()
        head_dim = module.head_dim
        q = q.view(*q.shape[:-1], -1, head_dim)
        k = k.view(*k.shape[:-1], -1, head_dim)
        group = q.shape[-2] // k.shape[-2]
        k = k.repeat_interleave(group, dim=-2)
        raw = (q.unsqueeze(-3) * k.unsqueeze(-4)).sum(-1) * module.scaling
        scores.append(float(raw.abs().mean()))

    total = 1.0
    for _ in range(3):
        scores.clear()
        handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in attentions]
        try:
            _forward(model, ids)
        finally:
            for handle in handles:
                handle.remove()
        if not scores:
            return None
        scale = cap / max(sum(scores) / len(scores), 1e-6)
        for module in attentions:
            module.q_proj.weight.mul_(scale)
            if module.q_proj.bias is not None:
                module.q_proj.bias.mul_(scale)
        total *= scale
        if abs(scale - 1.0) < 0.05:
            break
    return total


def final_norm(model: Any) -> Any | None:
    """The norm applied before the LM head (model.model.norm and its usual aliases)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        module = getattr(base, name, None)
        if module is not None and is_norm(module):
            return module
    return None


def _calibrate_logits(model: Any, config: Any, options: InitOptions, ids: Any, offset_norms: set[int]) -> float | None:
    norm = final_norm(model)
    if norm is None or getattr(norm, "weight", None) is None:
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    target = max(options.logit_std, 0.5 * cap) if cap else options.logit_std
    total = 1.0
    for _ in range(8):
        logits = _forward(model, ids)
        measured = float(logits.std(dim=-1).mean())
        if measured <= 0:
            break
        scale = min(target / measured, 1000.0)
        if id(norm) in offset_norms:
            norm.weight.copy_((1.0 + norm.weight) * scale - 1.0)
        else:
            norm.weight.mul_(scale)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(scale)
        total *= scale
        if abs(scale - 1.0) < 0.02:
            break
    return total


def quiet_transformers() -> None:
    """Silence transformers' info logs and progress bars (the scripts print their own summary)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
