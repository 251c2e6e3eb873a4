"""Build a tiny random replica of a Hugging Face causal LM that still catches port bugs.

The replica keeps the architecture and every semantic config field, shrinks
the sizes (layers, hidden size, heads with the same GQA ratio, experts, vocab),
draws peaked position-sensitive weights, and saves safetensors, a working
tokenizer and a tiny_replica.json manifest listing every changed field. With
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
import model_source
from cli_support import ScriptError
from replica_init import InitOptions
from tiny_config import ShrinkOptions, shrink_config

EXIT_CODES = {1: "the replica failed the sensitivity report (--sensitivity)", 2: "not used"}

MANIFEST = "tiny_replica.json"
# A fixed prompt: long enough to exceed the shrunk sliding window many times over.
PROMPT = ("The capital of France is Paris. Once upon a time there was a little robot who wanted to learn "
          "how to read and write.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
TRAINED_VOCAB = 512
DTYPES = ("float32", "bfloat16", "float16")


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
                        help="hidden size when it is not heads x head_dim (default: 64)")
    parser.add_argument("--head-dim", type=int, default=16, help="head dimension (default: 16)")
    parser.add_argument("--sliding-window", type=int, default=4, help="sliding window of the replica (default: 4)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="after building, run the mutation sensitivity report; exit 1 when it fails")
    cli_support.add_json_flag(parser)


def options_from_args(args: argparse.Namespace) -> ReplicaOptions:
    for name in ("layers", "hidden_size", "head_dim", "sliding_window"):
        if getattr(args, name) < 1:
            raise ScriptError(f"--{name.replace('_', '-')} must be at least 1")
    if args.head_dim % 2:
        raise ScriptError("--head-dim must be even (RoPE rotates pairs of dimensions)")
    for name in ("init_std", "norm_std", "bias_std"):
        if getattr(args, name) < 0:
            raise ScriptError(f"--{name.replace('_', '-')} must not be negative")
    return ReplicaOptions(
        shrink=ShrinkOptions(hidden_size=args.hidden_size, head_dim=args.head_dim, min_layers=args.layers,
                             sliding_window=args.sliding_window),
        init=InitOptions(mode=args.init, std=args.init_std, norm_std=args.norm_std, bias_std=args.bias_std),
        dtype=args.dtype,
        seed=args.seed,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        force=args.force,
    )


def main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    manifest = build_replica(args.model, args.output, options)
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
        })
    else:
        print(describe_manifest(manifest))
        if report:
            print()
            print(report.table())
    return cli_support.EXIT_FINDINGS if report and not report.passed else cli_support.EXIT_OK


# --- building -------------------------------------------------------------------


def build_replica(model: str | dict[str, Any], output_dir: str | Path, options: ReplicaOptions | None = None) -> dict[str, Any]:
    """Build a replica of ``model`` (MODEL string or a raw config dict) in ``output_dir``; return the manifest.

    Raises ScriptError on bad input; writes nothing when the input is bad.
    """
    options = options or ReplicaOptions()
    output = Path(output_dir)
    if str(output_dir).strip() == "":
        raise ScriptError("--output is empty")
    if options.dtype not in DTYPES:
        raise ScriptError(f"unknown dtype {options.dtype!r}; choose from {', '.join(DTYPES)}")
    if options.init.mode not in ("peaked", "default"):
        raise ScriptError(f"unknown init mode {options.init.mode!r}")
    if isinstance(model, dict):
        source, original, source_name = None, dict(model), "(config dict)"
        if not original.get("architectures"):
            raise ScriptError("the config dict has no 'architectures' list")
    else:
        source = model_source.resolve(model, options.revision)
        original = model_source.read_config(source)
        source_name = source.display_name
    if not original.get("model_type"):
        raise ScriptError(f"config of {source_name} has no model_type")
    if "auto_map" in original and not options.trust_remote_code:
        raise ScriptError(f"{source_name} uses its own modeling code (auto_map); "
                          "rerun with --trust-remote-code if you trust it")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not options.force:
            raise ScriptError(f"{output} already exists and is not empty; use --force to replace it")

    import torch  # heavy imports only once the input is known to be good
    import transformers

    from replica_init import initialize, quiet_transformers

    quiet_transformers()

    text = model_source.text_config(original)
    causal_arch = _text_only_architecture(original, text)
    hf_layer_types = _hf_layer_types(text, options.trust_remote_code)

    staging = output.with_name(output.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        tokenizer_info = _write_tokenizer(source, staging, options)
        shrunk = shrink_config(
            original, options.shrink, layer_types=hf_layer_types,
            vocab_size=tokenizer_info.pop("vocab_size_for_config"),
            special_ids=tokenizer_info.pop("special_ids"), dtype=options.dtype,
            causal_lm_architecture=causal_arch,
        )
        if source is not None and options.trust_remote_code and source.is_local:
            for path in source.local_dir.glob("*.py"):
                shutil.copy(path, staging / path.name)
        _write_json(staging / "config.json", shrunk.config)
        torch.manual_seed(options.seed)
        config = transformers.AutoConfig.from_pretrained(staging, trust_remote_code=options.trust_remote_code)
        hf_model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=options.trust_remote_code, attn_implementation="eager")
        hf_model.eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(staging, trust_remote_code=options.trust_remote_code)
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        init_settings = initialize(hf_model, config, options.init, ids)
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
            "changes": [asdict(change) for change in shrunk.changes],
            "seed": options.seed,
            "init": init_settings,
            "tokenizer": tokenizer_info,
            "prompt": PROMPT,
            "prompt_tokens": int(ids.shape[1]),
        }
        _write_json(staging / MANIFEST, manifest)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        staging.rename(output)
    except ScriptError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - transformers errors become one line
        shutil.rmtree(staging, ignore_errors=True)
        raise ScriptError(f"transformers could not build the replica: {type(exc).__name__}: {exc}") from None
    return manifest


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def _text_only_architecture(original: dict[str, Any], text: dict[str, Any]) -> str | None:
    """The causal-LM class of a nested text_config (multimodal configs), else None."""
    if text is original:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.get("model_type", ""))
    if not name:
        raise ScriptError(f"no text-only causal-LM class for text_config model_type {text.get('model_type')!r}")
    return name


def _hf_layer_types(text: dict[str, Any], trust_remote_code: bool) -> list[str] | None:
    """Per-layer attention types as transformers derives them (from layer_types or pattern fields)."""
    import transformers

    # A deep copy: transformers rewrites rope dicts it is given in place.
    fields = copy.deepcopy({k: v for k, v in text.items() if k not in ("model_type", "architectures", "auto_map")})
    try:
        config = transformers.AutoConfig.for_model(text["model_type"], **fields)
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


def describe_manifest(manifest: dict[str, Any]) -> str:
    """Human-readable summary of a replica manifest."""
    replica = manifest["replica"]
    lines = [
        f"replica of {manifest['source']['model']} ({manifest['source']['architecture']}) -> "
        f"{replica['architecture']}, {replica['parameters']:,} parameters, {replica['dtype']}",
        f"tokenizer: {manifest['tokenizer']['kind']} (vocab {manifest['tokenizer']['vocab_size']}); "
        f"init: {manifest['init']['mode']}; seed {manifest['seed']}",
        "changed fields:",
    ]
    for change in manifest["changes"]:
        lines.append(f"  {change['field']}: {json.dumps(change['old'])} -> {json.dumps(change['new'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
