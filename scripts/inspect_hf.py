"""Inspect a Hugging Face model for a MAX port: walls, native guard, deltas with evidence, donors.

Reads config.json (and safetensors headers when present; never weights) of a
Hub ID or local folder, and the installed transformers' modeling and
configuration code for its model_type, as text (``hf_source``). In order:

1. walls (the check-walls catalogue): a stop finding ends the report with exit 2, before any advice;
2. the native guard: if MAX registers the class it prints the max serve command and stops;
3. the config split: keys HF reads (with file:line), keys present that HF never reads (decoys,
   flagged where the donor reads them), and keys the donor reads that HF does not;
4. the delta list, config, tensor and code signals merged, each with its evidence;
5. donors ranked for the hardware (``--device``): one that cannot run the checkpoint there ranks
   below every one that can, with the reason.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from dataclasses import asdict
from typing import Any

import cli_support
import delta_signals
import hf_source
import max_registry
import model_anatomy
import model_source
import port_layout
import wall_scan

EXIT_CODES = {1: "wall warnings to review (check-walls exit 1); the report is complete",
              2: "a wall stops the port (check-walls exit 2): no donor advice is given"}

# Device files a GPU driver creates (NVIDIA, AMD ROCm); read without importing torch or max.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia/version")


class KeyStatus(str, enum.Enum):
    """How the Hugging Face class treats a config.json key."""

    HF_READS = "hf_reads"  # the modeling code (or a shared module it calls) reads it
    GENERIC = "generic"  # read by transformers' generic machinery, metadata, or training-only
    DECOY = "decoy"  # present, but the HF class never reads it
    NOT_CHECKED = "not_checked"  # no HF source to check against (remote code or unknown model_type)

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
    parser.add_argument("--device", choices=[d.value for d in delta_signals.Device], default="cpu",
                        help="rank donors for this hardware (default cpu: the tiny-replica loop; a donor that "
                             "cannot run there ranks last, with the reason)")
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


def gpu_present() -> bool:
    """True when a GPU driver's device files exist (no torch or max import)."""
    return any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def split_keys(config: dict[str, Any], reading: hf_source.SourceReading | None,
               donor_reads: max_registry.KeysRead | None) -> dict[str, Any]:
    """Top-level keys of the (text) config by how HF treats them, and donor keys HF does not read."""
    text = model_source.text_config(config)
    rows = []
    for key, value in text.items():
        if reading is None:
            status, where = KeyStatus.NOT_CHECKED, []
        elif reading.key_is_read(key):
            status, where = KeyStatus.HF_READS, [str(e) for e in reading.key_evidence(key)[:2]]
        elif key in PIPELINE_KEYS or key in TRAINING_ONLY_KEYS or key in GENERIC_READ_KEYS:
            status, where = KeyStatus.GENERIC, [PIPELINE_KEYS.get(key, "transformers' generic code or training")]
        else:
            status, where = KeyStatus.DECOY, []
        donor_reads_it = bool(donor_reads and (key in donor_reads.config_class or key in donor_reads.anywhere))
        rows.append({"key": key, "value": value, "status": status.value, "hf_read_at": where,
                     "read_by_donor": donor_reads_it})
    decoys = [r["key"] for r in rows if r["status"] == KeyStatus.DECOY]
    differently = []
    if reading is not None and donor_reads is not None:
        for key in sorted(donor_reads.config_class):
            if reading.key_is_read(key) or key in PIPELINE_KEYS or key in TRAINING_ONLY_KEYS:
                continue
            fields = [name for name, aliases in model_anatomy.ALIASES.items() if key in aliases]
            if not fields:
                continue
            hf_keys = sorted({alias for name in fields for alias in model_anatomy.ALIASES[name]
                              if alias != key and "." not in alias and reading.key_is_read(alias)})
            if key in GENERIC_READ_KEYS or not (hf_keys or key in text):
                continue  # absent on both sides: the donor's default is what HF does too
            how = (f"HF reads {', '.join(hf_keys)} instead" if hf_keys
                   else "HF reads no key for it and derives it in code (or does not have it)")
            differently.append({"key": key, "field": fields[0], "in_config": key in text,
                                "donor_read_at": donor_reads.config_class[key][:2], "hf_keys": hf_keys,
                                "note": f"the donor reads {key} for {fields[0]}; {how}"})
    return {"rows": rows, "decoys": decoys,
            "decoys_read_by_donor": [r["key"] for r in rows if r["status"] == KeyStatus.DECOY and r["read_by_donor"]],
            "donor_reads_hf_computes_differently": differently}


# Keys transformers' shared model code reads for every family (weight tying in modeling_utils).
GENERIC_READ_KEYS = {"tie_word_embeddings"}


def _checkpoint_dtype(config: dict[str, Any]) -> str | None:
    text = model_source.text_config(config)
    for holder in (text, config):
        for key in ("torch_dtype", "dtype"):
            if isinstance(holder.get(key), str):
                return holder[key]
    return None


def inspect(source: model_source.ModelSource, *, donor_slug: str | None = None,
            read_tensors: bool = True, device: str = "cpu") -> dict[str, Any]:
    """The full inspection report as a JSON-ready dict (``exit_code`` says how it ended)."""
    config = model_source.read_config(source)
    normalized = model_source.normalize_config(config)
    text = model_source.text_config(config)
    architecture = normalized.architecture
    findings = wall_scan.scan_walls(source, config=config)
    walls_exit = wall_scan.exit_code_for(findings)
    report: dict[str, Any] = {
        "model": source.display_name,
        "architecture": architecture,
        "model_type": normalized.model_type,
        "text_model_type": text.get("model_type") if text is not config else None,
        "config_spelling": normalized.spelling,
        "max_version": cli_support.max_version(),
        "device": device,
        "gpu_detected": gpu_present(),
        "walls": {"exit_code": walls_exit, "findings": [asdict(f) for f in findings]},
        "exit_code": walls_exit,
    }
    if walls_exit == cli_support.EXIT_STOP:
        report["stop"] = "a wall stops the port (see walls); no donor advice until it is resolved or scoped out"
        return report
    entries = max_registry.registrations()
    found = max_registry.match(architecture, entries)
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
    reading = None if "auto_map" in config else hf_source.read_model(config)
    source_note = (f"read {reading.modeling_file} ({reading.causal_lm_class}) and {reading.configuration_file}"
                   if reading else "not applicable: remote code (auto_map) or a model_type the installed "
                   "transformers does not ship; config keys and code signals are not checked against HF")
    signals = delta_signals.detect(config, tensors, reading)
    donors = max_registry.donors(entries)
    quantized = "quantization_config" in config or "quantization_config" in text
    ranked = delta_signals.rank_donors(signals, donors, normalized.model_type, device=device,
                                       checkpoint_dtype=_checkpoint_dtype(config), quantized=quantized)
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
    keys = split_keys(config, reading, reads)
    report.update({
        "tensors": tensor_note,
        "hf_source": source_note,
        "hf_keys": keys,
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
        "verified_ports": port_starts(signals),
    })
    return report


def port_starts(signals: list[Any]) -> list[dict[str, Any]]:
    """The skill's verified ports (``scaffold --start-from PATH``), most of this model's deltas covered first."""
    codes = {str(s.code) for s in signals}
    starts = []
    for port in port_layout.verified_ports():
        implemented = {str(item.get("signal")) for item in port.implements if isinstance(item, dict)}
        starts.append({"slug": port.slug, "path": port_layout.display_path(port.path), "donor": port.donor,
                       "covers": sorted(codes & implemented), "implements": sorted(implemented)})
    return sorted(starts, key=lambda start: (-len(start["covers"]), start["slug"]))


def main(args: argparse.Namespace) -> int:
    cli_support.warn_if_untested_max()
    source = model_source.resolve(args.model, args.revision)
    report = inspect(source, donor_slug=args.donor, read_tensors=not args.no_tensors, device=args.device)
    if args.json:
        cli_support.print_json(report)
    else:
        print_report(report)
    return int(report["exit_code"])


def print_report(report: dict[str, Any]) -> None:
    print(f"Model: {report['model']}")
    print(f"Architecture: {report['architecture']}  model_type: {report['model_type']}"
          f"  (config spelling: {report['config_spelling']})")
    walls = report["walls"]["findings"]
    print("\nWalls (check-walls):" + ("" if walls else " none"))
    for finding in walls:
        print(f"  {finding['level'].upper():<5} {finding['code']}: {finding['message']}")
    if report["walls"]["exit_code"] == cli_support.EXIT_STOP:
        print(f"\nSTOP: {report['stop']}")
        return
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
    print(f"HF source: {report['hf_source']}")
    keys = report["hf_keys"]
    if keys["decoys"]:
        flagged = [f"{k} (read by the donor!)" if k in keys["decoys_read_by_donor"] else k for k in keys["decoys"]]
        print("Decoys (in config.json, never read by the HF class): " + ", ".join(flagged))
    for row in keys["donor_reads_hf_computes_differently"]:
        print(f"Donor reads {row['key']} ({row['donor_read_at'][0]}): {row['note']}")
    print("\nDelta signals (config, tensors and HF code merged):")
    for signal in report["delta_signals"] or [{"code": "none", "detail": "plain Llama-style block", "evidence": []}]:
        evidence = "; ".join(signal["evidence"][:2])
        print(f"  {signal['code']:<20} {signal['detail']}" + (f"  [{evidence}]" if evidence else ""))
    print(f"\nDonor ranking for --device {report['device']}"
          + (" (a GPU is present: --device gpu ranks for it)" if report["gpu_detected"] and report["device"] == "cpu"
             else "") + ":")
    for rank, donor in enumerate(report["donor_ranking"], 1):
        print(f"  {rank}. {donor['slug']} (score {donor['score']}): " + "; ".join(donor["reasons"]))
    starts = report.get("verified_ports") or []
    if starts:
        print("\nVerified ports to start from instead (scaffold --start-from PATH; see map-to-max.md):")
        for start in starts:
            covered = ", ".join(start["covers"]) or "none of this model's deltas"
            print(f"  {start['slug']} ({start['path']}, from {start['donor']}): implements {covered}")
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
