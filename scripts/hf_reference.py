"""The one way to load and run the Hugging Face reference that every port is checked against.

compare, layer-diff, tiny, the sensitivity report and the gates all load
transformers through this module, so they all compare against the same math:

* **eager attention by default.** transformers' default attention in 5.12 is
  ``sdpa``, and its sdpa path drops attention-score soft-capping
  (``attn_logit_softcapping``) without a word: on a Gemma-2 replica the logits
  moved by 37.6, so a correct port looked DIVERGED and a port without the cap
  looked right. The eager path runs the modeling file's own formula. Another
  implementation can be asked for (``--attn-implementation``); a model that
  cannot run the one asked for is a one-line exit 3, never a silent switch.
* **float32 math unless the caller asks otherwise** (``--dtype`` picks the
  reference dtype and the tolerance; the attention implementation is separate).
* **a flatness check** (``reference_spread`` / ``check_not_flat``): a reference
  whose logprobs are nearly the same for every token (zeroed embeddings give
  exactly -ln(vocab) everywhere) cannot tell a correct port from a wrong one,
  so no verdict is given on it.

torch and transformers are imported only inside the functions.
"""

from __future__ import annotations

from typing import Any, Sequence

import model_source
import tolerances
from cli_support import ScriptError

DEFAULT_ATTN_IMPLEMENTATION = "eager"
# The implementations transformers 5.12 accepts by name; the flash ones need a GPU and their package.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
REPLICA_DOCS = "references/tiny-replica-cpu-loop.md#a-flat-reference"
FLAT_MESSAGE = "the reference is flat: the replica cannot tell a correct port from a wrong one"


def add_attn_argument(parser: Any) -> None:
    """--attn-implementation for the scripts that load the reference (compare, layer-diff)."""
    parser.add_argument("--attn-implementation", default=DEFAULT_ATTN_IMPLEMENTATION, choices=ATTN_IMPLEMENTATIONS,
                        help="transformers attention implementation of the HF reference (default: eager; sdpa "
                             "drops attention soft-capping); a model that cannot run it exits 3")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(exc).__name__


def check_attn_implementation(name: str) -> str:
    """``name`` when transformers knows it; ScriptError naming the choices otherwise."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ScriptError(f"--attn-implementation {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    return name


def _confirm(model: Any, wanted: str, label: str) -> Any:
    """Refuse a model whose config reports another attention implementation than ``wanted``."""
    got = getattr(model.config, "_attn_implementation", None)
    if got != wanted:
        raise ScriptError(f"transformers loaded {label} with attention {got!r}, not {wanted!r}; refusing to compare "
                          f"against other math (pass --attn-implementation {got} to accept it)")
    return model


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def native_config_class(model_type: str) -> Any | None:
    """transformers' own config class for ``model_type``, or None when transformers ships none.

    Importing ``max.pipelines`` registers MAX's config shims with ``AutoConfig``
    (``exist_ok=True``); for ``deepseek_v4`` the shim replaces transformers'
    class with one that no transformers model accepts, so the registry cannot
    be trusted in a process that also imports MAX.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = CONFIG_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def config_for_model(model_type: str, **fields: Any) -> Any:
    """``AutoConfig.for_model`` that builds transformers' own class even after MAX registered a shim."""
    from transformers import AutoConfig

    native = native_config_class(model_type)
    return native(**fields) if native is not None else AutoConfig.for_model(model_type, **fields)


def load_config(location: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """``AutoConfig.from_pretrained``, reloaded with transformers' own class where a MAX shim answered."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    native = native_config_class(getattr(config, "model_type", ""))
    if native is not None and type(config) is not native and not getattr(config, "auto_map", None):
        config = native.from_pretrained(location, revision=revision)
    return config


def load(location: str, *, dtype: str = "float32", device: str = "cpu",
         attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION, revision: str | None = None,
         trust_remote_code: bool = False, config: Any = None, label: str | None = None) -> Any:
    """The reference causal LM at ``location`` in eval mode, with the attention implementation asked for.

    ``config`` replaces the checkpoint's config (the sensitivity report's mutants).
    Exit 3 (ScriptError) when transformers cannot load it with that implementation.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _quiet()
    check_attn_implementation(attn_implementation)
    label = label or location
    dtype = tolerances.canonical_dtype(dtype)
    try:
        if config is None:
            config = load_config(location, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation, config=config)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a one-line exit 3
        raise ScriptError(f"cannot load the HF reference {label} with attn_implementation={attn_implementation!r}: "
                          f"{_first_line(exc)}") from None
    return _confirm(model, attn_implementation, label).to(device).eval()


def from_config(config: Any, *, attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
                trust_remote_code: bool = False) -> Any:
    """A freshly initialized float32 reference model for ``config`` (tiny builds its replica this way)."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet()
    check_attn_implementation(attn_implementation)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001
        raise ScriptError(f"transformers cannot build {type(config).__name__} with "
                          f"attn_implementation={attn_implementation!r}: {_first_line(exc)}") from None
    return _confirm(model, attn_implementation, type(config).__name__).eval()


def forward(model: Any, token_ids: Sequence[int], device: str = "cpu", *,
            hidden_states: bool = False) -> tuple[Any, Any]:
    """One forward pass: float64 log-softmax rows (numpy, [T, vocab]) and, on request, the hidden states."""
    import torch

    with torch.no_grad():
        output = model(input_ids=torch.tensor([list(token_ids)], device=device), output_hidden_states=hidden_states)
        rows = torch.log_softmax(output.logits[0].double(), dim=-1).cpu().numpy()
    return rows, (output.hidden_states if hidden_states else None)


def logprob_rows(model: Any, token_ids: Sequence[int], device: str = "cpu") -> Any:
    """float64 log-softmax rows (numpy, [T, vocab]) of one forward pass over ``token_ids``."""
    return forward(model, token_ids, device)[0]


def reference_spread(rows: Any) -> float:
    """Mean over rows of (top logprob - mean logprob over the vocabulary); 0 for a uniform reference.

    ``rows`` are log-softmax rows (numpy or torch, [positions, vocab]); logits
    work too, since the gap does not change when a row is shifted.
    """
    import numpy as np

    values = _as_rows(rows)
    return float(np.mean(values.max(axis=-1) - values.mean(axis=-1)))


def _as_rows(rows: Any) -> Any:
    import numpy as np

    values = np.asarray(rows.detach().cpu().double().numpy() if hasattr(rows, "detach") else rows, dtype=np.float64)
    values = values.reshape(-1, values.shape[-1])
    if not values.size:
        raise ValueError("no positions to measure the reference spread on")
    return values


def is_flat(spread: float) -> bool:
    """True when ``spread`` is below ``tolerances.FLAT_REFERENCE_SPREAD`` (or not a number)."""
    return not spread >= tolerances.FLAT_REFERENCE_SPREAD


def flat_reason(spread: float, positions: int) -> str:
    """The one-line flat-reference message, with the measured spread and where to read."""
    return (f"{FLAT_MESSAGE} (mean gap between the top and the mean logprob {spread:.3g} nats over {positions} "
            f"position(s), below {tolerances.FLAT_REFERENCE_SPREAD:g}; see {REPLICA_DOCS})")


def check_not_flat(rows: Any, what: str = "") -> float:
    """The spread of ``rows``; ScriptError (exit 3) with the flat-reference message when it is flat."""
    spread = reference_spread(rows)
    if is_flat(spread):
        positions = int(_as_rows(rows).shape[0])
        raise ScriptError((f"{what}: " if what else "") + flat_reason(spread, positions))
    return spread


# --- loading by model name (what the scripts call) ------------------------------------------


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """Token ids for one prompt, through the chat template when the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        if isinstance(encoded, dict) or hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return [int(i) for i in encoded]
    return [int(i) for i in tokenizer.encode(prompt)]


def load_tokenizer(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The tokenizer of MODEL; a loader failure is a one-line ScriptError."""
    from transformers import AutoTokenizer

    location = model_source.resolve(model, revision).location
    try:
        return AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a one-line exit 3
        raise ScriptError(f"cannot load the tokenizer of {model}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def load_model(model: str, revision: str | None, dtype: str, device: str, trust_remote_code: bool,
               attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION) -> Any:
    """The HF reference for MODEL (a Hub ID or a local folder), eager attention unless asked otherwise."""
    location = model_source.resolve(model, revision).location
    return load(location, dtype=dtype, device=device, attn_implementation=attn_implementation,
                revision=revision, trust_remote_code=trust_remote_code, label=model)
