"""Inspect a Hugging Face model for a MAX port: native guard, config map, delta signals, donors.

Reads config.json (and safetensors headers when present; never weights) of a
Hub ID or local folder. If MAX already registers the architecture class it
prints the max serve command and stops. Otherwise it maps every config key,
including nested text_config, rope_scaling/rope_parameters and
quantization_config, to where MAX reads it, lists the delta signals from the
config and tensor names, and ranks donor families with reasons.

For the chosen donor it separates the keys its config class reads from the
keys no donor code reads: those are the candidate deltas to implement.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

import cli_support
import delta_signals
import max_registry
import model_source

EXIT_CODES = {1: "not used", 2: "not used"}

# Keys MAX handles outside the donor's config class, or that do not affect inference.
PIPELINE_KEYS = {
    "architectures": "architecture lookup in MAX's registry (SupportedArchitecture.name)",
    "model_type": "transformers AutoConfig class selection",
    "torch_dtype": "default weight encoding (--quantization-encoding)",
    "dtype": "default weight encoding (--quantization-encoding)",
    "transformers_version": "metadata, not read",
    "bos_token_id": "tokenizer / generation settings",
    "eos_token_id": "generation stop tokens",
    "pad_token_id": "tokenizer / generation settings",
    "sep_token_id": "tokenizer / generation settings",
    "decoder_start_token_id": "tokenizer / generation settings",
    "use_cache": "training/HF runtime switch, not read (MAX always uses its KV cache)",
    "auto_map": "remote-code class mapping (see check-walls)",
    "quantization_config": "weight quantization parsing (pipeline level)",
    "_name_or_path": "metadata, not read",
    "text_config": "nested language-model config (keys listed individually)",
    "rope_scaling": "RoPE scaling (keys listed individually)",
    "rope_parameters": "RoPE settings (keys listed individually)",
}
TRAINING_ONLY_KEYS = {
    "initializer_range", "attention_dropout", "hidden_dropout", "hidden_dropout_prob", "dropout",
    "attention_probs_dropout_prob", "embd_pdrop", "resid_pdrop", "attn_pdrop", "output_router_logits",
    "router_aux_loss_coef", "router_z_loss_coef", "pretraining_tp", "gradient_checkpointing",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "problem_type",
    "use_return_dict", "tf_legacy_loss", "use_bfloat16", "chunk_size_feed_forward", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "id2label", "label2id",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--donor", metavar="SLUG",
                        help="map config keys against this donor slug instead of the top-ranked one")
    parser.add_argument("--no-tensors", action="store_true",
                        help="skip safetensors headers (config-only delta signals)")
    cli_support.add_json_flag(parser)


def flatten_config(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Every key of the config as (dotted path, value); nested dicts are expanded."""
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("id2label", "label2id", "auto_map"):
            rows.append((path, "{...}"))
            rows.extend(flatten_config(value, path + "."))
        else:
            rows.append((path, value))
    return rows


def serve_commands(model: str) -> dict[str, str]:
    """The max serve commands for a natively supported model (default device and CPU fp32)."""
    return {
        "default": f"max serve --model {model}",
        "cpu_fp32": f"max serve --model {model} --devices cpu --quantization-encoding float32",
    }


def map_config_keys(config: dict[str, Any], reads: max_registry.KeysRead | None) -> list[dict[str, Any]]:
    """One row per config key: its value and where MAX reads it (or that nothing does)."""
    rows = []
    for path, value in flatten_config(config):
        leaf = path.rsplit(".", 1)[-1]
        parent = path.rsplit(".", 1)[0] if "." in path else None
        parent_leaf = parent.rsplit(".", 1)[-1] if parent else None
        status, where = _status(leaf, reads)
        if status == "unread" and parent_leaf == "quantization_config":
            status, where = "pipeline", [PIPELINE_KEYS["quantization_config"]]
        rows.append({"key": path, "value": value, "status": status, "read_at": where})
    return rows


def _status(key: str, reads: max_registry.KeysRead | None) -> tuple[str, list[str]]:
    if reads is not None and key in reads.config_class:
        return "donor_config", reads.config_class[key][:3]
    if reads is not None and key in reads.anywhere:
        return "donor_code", reads.anywhere[key][:3]
    if key in PIPELINE_KEYS:
        return "pipeline", [PIPELINE_KEYS[key]]
    if key in TRAINING_ONLY_KEYS:
        return "training_only", ["not used at inference"]
    return "unread", []


def inspect(source: model_source.ModelSource, *, donor_slug: str | None = None,
            read_tensors: bool = True) -> dict[str, Any]:
    """The full inspection report as a JSON-ready dict."""
    config = model_source.read_config(source)
    normalized = model_source.normalize_config(config)
    text = model_source.text_config(config)
    architecture = normalized.architecture
    entries = max_registry.registrations()
    found = max_registry.match(architecture, entries)
    report: dict[str, Any] = {
        "model": source.display_name,
        "architecture": architecture,
        "model_type": normalized.model_type,
        "text_model_type": text.get("model_type") if text is not config else None,
        "config_spelling": normalized.spelling,
        "max_version": cli_support.max_version(),
    }
    if found:
        report["native"] = {
            "registered": True,
            "registrations": [{"slug": e.slug, "task": e.task, "module_v3": e.module_v3} for e in found],
            "serve_commands": serve_commands(source.spec),
        }
        report["stop"] = "MAX already registers this architecture: serve it, no port needed"
        return report
    report["native"] = {"registered": False, "close_names": max_registry.close_names(architecture, entries)}

    tensors = None
    tensor_note = "skipped (--no-tensors)"
    if read_tensors:
        weights = model_source.weight_files(source)
        if weights.format == "safetensors":
            tensors = model_source.read_tensor_infos(source, weights)
            tensor_note = f"read {len(tensors)} tensor headers from {len(weights.files)} file(s)"
        else:
            tensor_note = f"no safetensors headers (weights format: {weights.format}); config-only signals"
    signals = delta_signals.detect(config, tensors)
    donors = max_registry.donors(entries)
    ranked = delta_signals.rank_donors(signals, donors, normalized.model_type)
    chosen = donor_slug or (ranked[0].slug if ranked else None)
    by_slug = {d.slug: d for d in donors}
    if donor_slug and donor_slug not in by_slug:
        raise cli_support.ScriptError(
            f"--donor {donor_slug}: not a text-generation donor slug in MAX (see list-archs --donors)")
    reads = None
    if chosen:
        donor = by_slug[chosen]
        reads = max_registry.config_keys_read(chosen, donor.config_class_from)
    rows = map_config_keys(config, reads)
    report.update({
        "tensors": tensor_note,
        "delta_signals": [asdict(s) for s in signals],
        "donor_ranking": [asdict(r) for r in ranked],
        "chosen_donor": None if chosen is None else {
            "slug": chosen,
            "config_class": by_slug[chosen].config_class,
            "config_class_reads": [r["key"] for r in rows if r["status"] == "donor_config"],
            "read_elsewhere_in_donor_code": [r["key"] for r in rows if r["status"] == "donor_code"],
            "unread_candidate_deltas": [r["key"] for r in rows if r["status"] == "unread"],
        },
        "config_keys": rows,
    })
    return report


def main(args: argparse.Namespace) -> int:
    cli_support.warn_if_untested_max()
    source = model_source.resolve(args.model, args.revision)
    report = inspect(source, donor_slug=args.donor, read_tensors=not args.no_tensors)
    if args.json:
        cli_support.print_json(report)
        return 0
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    print(f"Model: {report['model']}")
    print(f"Architecture: {report['architecture']}  model_type: {report['model_type']}"
          f"  (config spelling: {report['config_spelling']})")
    native = report["native"]
    if native["registered"]:
        slugs = ", ".join(f"{r['slug']} ({r['task']})" for r in native["registrations"])
        print(f"\nNATIVE: MAX {report['max_version']} already registers {report['architecture']}: {slugs}")
        print("No port needed. Serve it:")
        for command in native["serve_commands"].values():
            print(f"  {command}")
        return
    hint = f" (close: {', '.join(native['close_names'])})" if native["close_names"] else ""
    print(f"\nNot native in MAX {report['max_version']}{hint}. Tensors: {report['tensors']}")
    print("\nDelta signals:")
    for signal in report["delta_signals"] or [{"code": "none", "detail": "plain Llama-style block", "evidence": []}]:
        evidence = "; ".join(signal["evidence"][:2])
        print(f"  {signal['code']:<20} {signal['detail']}" + (f"  [{evidence}]" if evidence else ""))
    print("\nDonor ranking:")
    for rank, donor in enumerate(report["donor_ranking"], 1):
        print(f"  {rank}. {donor['slug']} (score {donor['score']}): " + "; ".join(donor["reasons"]))
    chosen = report["chosen_donor"]
    if chosen:
        print(f"\nChosen donor: {chosen['slug']} (config class {chosen['config_class']})")
        print("  read by the donor config class: " + (", ".join(chosen["config_class_reads"]) or "-"))
        print("  read elsewhere in donor code:   " + (", ".join(chosen["read_elsewhere_in_donor_code"]) or "-"))
        print("  read by no donor code (candidate deltas): "
              + (", ".join(chosen["unread_candidate_deltas"]) or "-"))
    print("\nEvery config key (status: where MAX reads it):")
    for row in report["config_keys"]:
        where = row["read_at"][0] if row["read_at"] else ""
        value = repr(row["value"])
        value = value if len(value) <= 40 else value[:37] + "..."
        print(f"  {row['key']:<40} {value:<42} {row['status']:<14} {where}")


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
