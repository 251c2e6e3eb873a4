"""Build a tiny random replica of a Hugging Face causal LM that still catches port bugs.

The replica keeps the architecture, every semantic config field and the size
relations a port must honor (head_dim vs hidden / heads, the KV-head ratio,
the rotated share of a head, the per-layer pattern, top-k vs experts), shrinks
the sizes (layers, hidden size, heads, experts, vocab) unless the source is
already small (then its shapes are kept, so the source reuses the replica's
compiled graph; the manifest's ``shapes`` says which), sets a sliding window
to the smallest one MAX compiles with its native mask and probes it with a
prompt twice as long, draws peaked position-sensitive weights, and saves
safetensors, a working tokenizer and a tiny_replica.json manifest listing
every changed field and every kept relation. With
--sensitivity it then checks that known port bugs (mutations) move the
replica's logprobs far beyond the comparison tolerance.

MODEL is a Hub ID, a local model directory, or a bare config.json. The real
tokenizer is used (and its vocab size kept) when it is local or cached;
otherwise a small BPE tokenizer is trained and the vocab shrunk to it.
The library entry points are ``build_replica`` and
``replica_sensitivity.sensitivity_report``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cli_support
import hf_reference
import input_files
import max_compat
import model_anatomy
import model_source
import tiny_config
import tiny_tokenizer
from cli_support import ScriptError
from replica_init import PROMPT, InitOptions
from tiny_config import ShrinkOptions, shrink_config

EXIT_CODES = {1: "the replica failed the sensitivity report (--sensitivity)",
              2: "refused: the model is not a decoder-only causal LM (encoder or encoder-decoder)"}

MANIFEST = "tiny_replica.json"
# A replica with a sliding window is probed with a prompt this many windows long, so half of its
# positions attend past the window and a port that ignores the window moves their logprobs.
PROBE_WINDOWS = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
TRAINED_VOCAB = 512
DTYPES = ("float32", "bfloat16", "float16")
# The peaked init draws with std 0.3; far above 10 the activations overflow float16/bfloat16 within a
# few layers and the calibration no longer means anything.
MAX_STD = 10.0
# torch.manual_seed takes up to 2**64 - 1; the 32-bit range keeps a seed usable by numpy-style RNGs too.
MAX_SEED = 2**32 - 1
# A config dict handed to build_replica is walked recursively (deepcopy); real configs nest 3-4 levels.
MAX_CONFIG_DEPTH = 32
# Prefix of the staging folder made beside --output for one run (hidden, removed on failure).
STAGING_PREFIX = ".tiny-staging-"


@dataclass
class ReplicaOptions:
    """Everything that decides what replica gets built."""

    shrink: ShrinkOptions = field(default_factory=ShrinkOptions)
    init: InitOptions = field(default_factory=InitOptions)
    dtype: str = "float32"
    seed: int = 0
    revision: str | None = None
    trust_remote_code: bool = False
    force: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser, trust_remote_code=True)
    parser.add_argument("--output", required=True, help="folder to write the replica into")
    parser.add_argument("--force", action="store_true", help="replace --output if it already has files")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--init", choices=("peaked", "default"), default="peaked",
                        help="peaked: large init, random norms/biases, calibrated scales (default); "
                             "default: transformers' own init (near-uniform logits; for comparison only)")
    parser.add_argument("--init-std", type=float, default=0.3, help="std of weight matrices (default: 0.3)")
    parser.add_argument("--norm-std", type=float, default=0.3, help="std of the noise added to norm weights (default: 0.3)")
    parser.add_argument("--bias-std", type=float, default=0.1, help="std of biases and other vectors (default: 0.1)")
    parser.add_argument("--layers", type=int, default=2, help="minimum number of layers (default: 2)")
    parser.add_argument("--hidden-size", type=int, default=64,
                        help="hidden size when the config names no attention heads (default: 64; otherwise "
                             "hidden follows heads x head_dim and the source's ratio between them)")
    parser.add_argument("--head-dim", type=int, default=16, help="head dimension (default: 16)")
    parser.add_argument("--sliding-window", type=int, default=None,
                        help="sliding window of a replica whose source has one (default: the smallest window "
                             "MAX compiles with its native mask in --dtype, "
                             f"{max_compat.sliding_window_floor('float32')} in float32; smaller ones are refused)")
    parser.add_argument("--always-shrink", action="store_true",
                        help="shrink even a source small enough to keep its shapes (default: keep them)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="after building, run the mutation sensitivity report; exit 1 when it fails")
    cli_support.add_json_flag(parser)


def options_from_args(args: argparse.Namespace) -> ReplicaOptions:
    """The replica options the flags ask for (checked by ``check_options``)."""
    options = ReplicaOptions(
        shrink=ShrinkOptions(hidden_size=args.hidden_size, head_dim=args.head_dim, min_layers=args.layers,
                             sliding_window=args.sliding_window, keep_small_source=not args.always_shrink),
        init=InitOptions(mode=args.init, std=args.init_std, norm_std=args.norm_std, bias_std=args.bias_std),
        dtype=args.dtype,
        seed=args.seed,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        force=args.force,
    )
    check_options(options)
    return options


def check_options(options: ReplicaOptions) -> None:
    """Refuse sizes and numbers that are not sane, naming the flag; runs before torch is imported."""
    shrink = options.shrink
    bounds = {
        "--layers": (shrink.min_layers, 1, tiny_config.MAX_REPLICA_LAYERS),
        "--hidden-size": (shrink.hidden_size, 1, tiny_config.MAX_REPLICA_HIDDEN),
        "--head-dim": (shrink.head_dim, 2, tiny_config.MAX_REPLICA_HEAD_DIM),
        "--seed": (options.seed, 0, MAX_SEED),
        "max_positions": (shrink.max_positions, 1, tiny_config.MAX_POSITIONS),
        "experts": (shrink.experts, 1, tiny_config.MAX_SOURCE_WIDTH),
        "experts_per_tok": (shrink.experts_per_tok, 1, tiny_config.MAX_SOURCE_WIDTH),
    }
    if shrink.sliding_window is not None:
        bounds["--sliding-window"] = (shrink.sliding_window, _window_floor(options.dtype), tiny_config.MAX_POSITIONS)
    for flag, (value, low, high) in bounds.items():
        if not tiny_config.is_int(value):
            raise ScriptError(f"{flag} is {value!r}, expected a whole number")
        if not low <= value <= high:
            why = " (MAX's native sliding-window mask refuses smaller windows)" if flag == "--sliding-window" else ""
            raise ScriptError(f"{flag} is {value}, expected {low} to {high}{why}")
    if shrink.head_dim % 2:
        raise ScriptError("--head-dim must be even (RoPE rotates pairs of dimensions)")
    init = options.init
    for flag, value, low_ok in (("--init-std", init.std, False), ("--norm-std", init.norm_std, True),
                                ("--bias-std", init.bias_std, True)):
        finite = tiny_config.is_real(value)
        if not finite or value < 0 or (value == 0 and not low_ok) or value > MAX_STD:
            low = "at least 0" if low_ok else "above 0"
            raise ScriptError(f"{flag} is {value!r}, expected a finite number {low} and at most {MAX_STD:g}")
    for name in ("eps_headroom", "logit_std"):
        value = getattr(init, name)
        if not tiny_config.is_real(value) or value <= 0:
            raise ScriptError(f"init option {name} is {value!r}, expected a finite number above 0")
    if options.dtype not in DTYPES:
        raise ScriptError(f"unknown dtype {options.dtype!r}; choose from {', '.join(DTYPES)}")
    if init.mode not in ("peaked", "default"):
        raise ScriptError(f"unknown init mode {init.mode!r}")


def _window_floor(dtype: str) -> int:
    """MAX's smallest native sliding window for a replica saved in ``dtype`` (float32 for an unknown one)."""
    return max_compat.sliding_window_floor(dtype if dtype in max_compat.SLIDING_WINDOW_FLOOR else "float32")


def main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    manifest, backup = build_replica_with_backup(args.model, args.output, options)
    report = None
    if args.sensitivity:
        from replica_sensitivity import sensitivity_report

        report = sensitivity_report(args.output, trust_remote_code=options.trust_remote_code)
    if args.json:
        cli_support.print_json({
            "output": str(Path(args.output)),
            "manifest": manifest,
            "sensitivity": report.to_dict() if report else None,
            "passed": report.passed if report else None,
            "backup": backup,
        })
    else:
        print(describe_manifest(manifest))
        if backup:
            print(f"previous replica moved to {backup}")
        if report:
            print()
            print(report.table())
    return cli_support.EXIT_FINDINGS if report and not report.passed else cli_support.EXIT_OK


# --- building -------------------------------------------------------------------


def build_replica(model: str | dict[str, Any], output_dir: str | Path, options: ReplicaOptions | None = None) -> dict[str, Any]:
    """Build a replica of ``model`` (MODEL string or a raw config dict) in ``output_dir``; return the manifest.

    Raises ScriptError on bad input; writes nothing when the input is bad.
    """
    return build_replica_with_backup(model, output_dir, options)[0]


def build_replica_with_backup(model: str | dict[str, Any], output_dir: str | Path,
                              options: ReplicaOptions | None = None) -> tuple[dict[str, Any], str | None]:
    """``build_replica``, also returning where ``--force`` moved the previous replica (or None)."""
    options = options or ReplicaOptions()
    check_options(options)
    output = input_files.check_output_dir(output_dir, "--output")
    if isinstance(model, dict):
        source, source_name = None, "(config dict)"
        label = "the config dict"
        input_files.check_json_depth(model, label, MAX_CONFIG_DEPTH)
        original = dict(model)
        if not original.get("architectures"):
            raise ScriptError("the config dict has no 'architectures' list")
    else:
        source = model_source.resolve(model, options.revision)
        original = model_source.read_config(source)
        source_name = source.display_name
        label = f"config.json of {source_name}"
    tiny_config.check_source_config(original, label)
    if not original.get("model_type"):
        raise ScriptError(f"config of {source_name} has no model_type")
    from replica_sensitivity import check_decoder_only

    check_decoder_only(original, source_name)  # exit 2 before any torch import: the tools port decoder-only LMs
    if "auto_map" in original and not options.trust_remote_code:
        raise ScriptError(f"{source_name} uses its own modeling code (auto_map); "
                          "rerun with --trust-remote-code if you trust it")
    if source is not None and source.local_dir is not None:
        input_files.check_not_inside(output, source.local_dir, "--output", "source model folder")
    replace = _check_existing_output(output, options.force)
    # The sizes the replica will have, checked now (pure dict work) rather than after the torch import.
    tiny_config.check_replica_sizes(shrink_config(model_source.text_config(original), options.shrink).config)
    staging, made_parents = input_files.make_staging_dir(output, f"{STAGING_PREFIX}{output.name}-", "--output")
    try:
        manifest = _build_in(staging, source, original, source_name, options)
        try:
            backup = input_files.move_into_place(staging, output, replace)
        except OSError as exc:
            raise ScriptError(f"cannot put the replica at {output}: {exc.strerror or exc}") from None
    except BaseException:
        input_files.discard_staging(staging, made_parents)
        raise
    return manifest, None if backup is None else str(backup)


def _check_existing_output(output: Path, force: bool) -> bool:
    """Whether an existing, non-empty ``output`` is a replica that --force may move aside."""
    if not output.is_dir() or not any(output.iterdir()):
        return False
    if not force:
        raise ScriptError(f"{output} already exists and is not empty; use --force to move it to a backup")
    if not (output / MANIFEST).is_file():
        raise ScriptError(f"--output {output} holds files but no {MANIFEST}, so tiny did not make it; "
                          "refusing to replace it even with --force (choose another folder)")
    return True


def _build_in(staging: Path, source: model_source.ModelSource | None, original: dict[str, Any], source_name: str,
              options: ReplicaOptions) -> dict[str, Any]:
    """Write the replica into ``staging``; return its manifest."""
    import torch  # heavy imports only once the input is known to be good
    import transformers

    from replica_init import initialize, quiet_transformers

    quiet_transformers()

    text = model_source.text_config(original)
    causal_arch, composite = _text_only_architecture(original, text)
    hf_layer_types = _hf_layer_types(text, options.trust_remote_code)
    try:
        tokenizer_info = _write_tokenizer(source, staging, options)
        shrunk = shrink_config(
            original, options.shrink, layer_types=hf_layer_types,
            vocab_size=tokenizer_info.pop("vocab_size_for_config"),
            special_ids=tokenizer_info.pop("special_ids"), dtype=options.dtype,
            causal_lm_architecture=causal_arch, keep_composite=composite,
        )
        tiny_config.check_replica_sizes(shrunk.config)
        if source is not None and options.trust_remote_code and source.is_local:
            for path in source.local_dir.glob("*.py"):
                if path.is_file():
                    shutil.copy(path, staging / path.name)
        _write_json(staging / "config.json", shrunk.config)
        torch.manual_seed(options.seed)
        config = hf_reference.load_config(str(staging), trust_remote_code=options.trust_remote_code)
        hf_model = hf_reference.from_config(config, trust_remote_code=options.trust_remote_code)
        _check_hf_layer_types(config, hf_layer_types, shrunk)
        tokenizer = transformers.AutoTokenizer.from_pretrained(staging, trust_remote_code=options.trust_remote_code)
        prompt, prompt_rule = probe_prompt(shrunk.config, lambda text: len(tokenizer(text)["input_ids"]))
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        init_settings = initialize(hf_model, config, options.init, ids)
        # A flat replica is a failed build: compare and layer-diff would refuse it after a compile.
        spread = hf_reference.check_not_flat(
            hf_reference.logprob_rows(hf_model, ids[0].tolist()), "the replica's weights came out flat")
        hf_model.to(getattr(torch, options.dtype))
        hf_model.save_pretrained(staging)
        _write_json(staging / "config.json", shrunk.config)  # keep the original spelling of every field
        manifest = {
            "tool": "make_tiny_model.py",
            "source": {"model": source_name if source is None else source.spec, "revision": options.revision,
                       "architecture": (original.get("architectures") or [None])[0],
                       "model_type": original.get("model_type")},
            "replica": {"architecture": shrunk.config["architectures"][0], "model_type": shrunk.config.get("model_type"),
                        "text_only": shrunk.text_only, "dtype": options.dtype,
                        "parameters": sum(p.numel() for p in {id(p): p for p in hf_model.parameters()}.values()),
                        "kept_layers": shrunk.kept_layers, "layer_types": shrunk.layer_signatures},
            "shapes": shrunk.shapes,
            "changes": [asdict(change) for change in shrunk.changes],
            "relations": shrunk.relations,
            "seed": options.seed,
            "init": init_settings,
            "tokenizer": tokenizer_info,
            "prompt": prompt,
            "prompt_tokens": int(ids.shape[1]),
            "prompt_rule": prompt_rule,
            "reference_spread": spread,  # mean (top - mean) logprob over the prompt, float32 eager
        }
        _write_json(staging / MANIFEST, manifest)
    except ScriptError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers errors become one line
        raise ScriptError(f"transformers could not build the replica: {type(exc).__name__}: {exc}") from None
    return manifest


def probe_prompt(config: dict[str, Any], count_tokens) -> tuple[str, str]:
    """The replica's probe prompt and why it has that length: longer than the sliding window when there is one.

    ``count_tokens`` gives a text's length in the replica tokenizer's tokens.
    """
    window = tiny_config.replica_sliding_window(config)
    if not window:
        return PROMPT, "the fixed probe prompt (the replica has no sliding window)"
    positions = model_anatomy.config_view(config).max_positions
    target = PROBE_WINDOWS * window if not positions else min(PROBE_WINDOWS * window, positions)
    if target <= window:
        return PROMPT, (f"the fixed probe prompt: the sliding window ({window}) is not below the position limit "
                        f"({positions}), so no prompt can reach past it")
    text = tiny_tokenizer.probe_text(PROMPT, count_tokens, target)
    return text, (f"at least {target} tokens ({PROBE_WINDOWS} x the sliding window of {window}, capped at the "
                  "position limit), so positions past the window show whether a port honors it")


def _check_hf_layer_types(config: Any, source_types: list[str] | None, shrunk: tiny_config.ShrunkConfig) -> None:
    """Refuse a replica whose per-layer attention types (as transformers derives them) are not the kept layers'."""
    if not source_types or not shrunk.kept_layers:
        return
    replica = getattr(config, "layer_types", None)
    expected = [source_types[i] for i in shrunk.kept_layers]
    if isinstance(replica, (list, tuple)) and list(replica) != expected:
        raise ScriptError(f"the replica's layer types {list(replica)} are not those of the kept source layers "
                          f"{shrunk.kept_layers} ({expected}); a pattern field did not follow the kept layers")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def _text_only_architecture(original: dict[str, Any], text: dict[str, Any]) -> tuple[str | None, bool]:
    """The causal-LM class of a nested text_config (multimodal configs), else None; and whether that
    class reads the composite config (True: the text config type has no causal-LM mapping entry, but the
    composite type's causal-LM class builds only the language model from it, as MllamaForCausalLM and
    Emu3ForCausalLM do)."""
    if text is original:
        return None, False
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.get("model_type", ""))
    if name:
        return name, False
    outer = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(original.get("model_type", ""))
    cls = getattr(transformers, outer, None) if outer else None
    text_class = getattr(cls, "config_class", None)
    if text_class is not None and getattr(text_class, "model_type", None) == text.get("model_type"):
        return outer, True
    raise ScriptError(f"no text-only causal-LM class for text_config model_type {text.get('model_type')!r}")


def _hf_layer_types(text: dict[str, Any], trust_remote_code: bool) -> list[str] | None:
    """Per-layer attention types as transformers derives them (from layer_types or pattern fields)."""
    # A deep copy: transformers rewrites rope dicts it is given in place.
    fields = copy.deepcopy({k: v for k, v in text.items() if k not in ("model_type", "architectures", "auto_map")})
    try:
        config = hf_reference.config_for_model(text["model_type"], **fields)
    except Exception:  # noqa: BLE001 - unknown or remote-code model type: use the raw list
        return text.get("layer_types")
    value = getattr(config, "layer_types", None)
    return list(value) if isinstance(value, (list, tuple)) else None


def _write_tokenizer(source: model_source.ModelSource | None, output: Path, options: ReplicaOptions) -> dict[str, Any]:
    """Save the real tokenizer when available, else train a small one; return its manifest entry."""
    from transformers import AutoTokenizer

    reason = "no model source (config dict)"
    if source is not None:
        location = source.location
        has_files = not source.is_local or any((source.local_dir / f).is_file() for f in TOKENIZER_FILES)
        if has_files:
            try:
                tokenizer = AutoTokenizer.from_pretrained(location, revision=options.revision,
                                                          trust_remote_code=options.trust_remote_code)
                tokenizer.save_pretrained(output)
                return {"kind": "real", "source": location, "vocab_size": len(tokenizer),
                        "vocab_size_for_config": None, "special_ids": None}
            except Exception as exc:  # noqa: BLE001 - fall back to a trained tokenizer
                reason = f"real tokenizer not available: {type(exc).__name__}"
        else:
            reason = "no tokenizer files next to the config"
    from tiny_tokenizer import train_bpe_tokenizer

    size = train_bpe_tokenizer(output, vocab_size=TRAINED_VOCAB)
    return {"kind": "trained_bpe", "reason": reason, "vocab_size": size, "vocab_size_for_config": size,
            "special_ids": {"bos": 1, "eos": 2, "pad": 3}}


def describe_shapes(shapes: dict[str, Any]) -> str:
    """One line: whether the replica kept the source's shapes, and why."""
    if shapes.get("kept"):
        return ("shapes: kept from the source (it is small enough), so serving the source reuses this "
                "replica's compiled graph")
    reasons = "; ".join(shapes.get("reasons") or []) or "see the rule in tiny_replica.json"
    return f"shapes: shrunk (the source is not small enough to keep: {reasons})"


def describe_relations(relations: dict[str, Any]) -> str:
    """One line: which size relations of the source the replica kept (a lost one is named)."""
    lost = [f"{name} ({r['source']} -> {r['replica']})" for name, r in relations.items() if not r.get("kept")]
    if lost:
        return "relations NOT kept: " + "; ".join(lost)
    return "relations kept: " + (", ".join(relations) or "none recorded")


def describe_manifest(manifest: dict[str, Any]) -> str:
    """Human-readable summary of a replica manifest."""
    replica = manifest["replica"]
    lines = [
        f"replica of {manifest['source']['model']} ({manifest['source']['architecture']}) -> "
        f"{replica['architecture']}, {replica['parameters']:,} parameters, {replica['dtype']}",
        f"tokenizer: {manifest['tokenizer']['kind']} (vocab {manifest['tokenizer']['vocab_size']}); "
        f"init: {manifest['init']['mode']}; seed {manifest['seed']}",
        describe_shapes(manifest.get("shapes") or {}),
        describe_relations(manifest.get("relations") or {}),
        "changed fields:",
    ]
    for change in manifest["changes"]:
        lines.append(f"  {change['field']}: {json.dumps(change['old'])} -> {json.dumps(change['new'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
