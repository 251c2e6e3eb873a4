"""List the architectures the installed MAX registers, check one class, or list donors.

Reads MAX's own registration table (max/pipelines/architectures/__init__.py)
with ast instead of importing max.pipelines, so it runs in well under a
second. Every registration is listed, including names registered more than
once (for example Qwen3ForCausalLM for text generation and for embeddings)
and the *_ModuleV3 alternates, which are flagged.

--match CLASS checks one class (the native-architecture guard). --donors
lists the text-generation families a port can start from, with their block
shape, whether they build their own graph, and whether they were measured to
build and match transformers on the CPU in float32; and, in a separate
``verified_ports`` field, the verified ports the skill ships
(templates/ports/<slug>), with the deltas each implements, which
``scaffold --start-from <path>`` copies as well.
"""

from __future__ import annotations

import argparse
import sys

import cli_support
import max_registry
import port_layout

EXIT_CODES = {
    1: "--match: the class is not registered in the installed MAX (close names are printed)",
    2: "not used",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--match", metavar="CLASS",
                       help="print every slug and task registered for this architecture class")
    group.add_argument("--donors", action="store_true",
                       help="list text-generation slugs usable as donors, with block shape and CPU fp32 status, "
                            "and (field verified_ports) the verified ports under templates/ports")
    parser.add_argument("--include-module-v3", action="store_true",
                        help="with --donors, also list *_ModuleV3 alternates")
    cli_support.add_json_flag(parser)


def registration_row(entry: max_registry.Registration) -> dict:
    return {
        "name": entry.name,
        "slug": entry.slug,
        "task": entry.task,
        "module_v3": entry.module_v3,
        "speculates_on": entry.speculates_on,
    }


def main(args: argparse.Namespace) -> int:
    version = cli_support.warn_if_untested_max()
    if args.include_module_v3 and not args.donors:
        raise cli_support.ScriptError("--include-module-v3 only applies with --donors")
    entries = max_registry.registrations()
    if args.match is not None:
        return _match(args, entries, version)
    if args.donors:
        return _donors(args, entries, version)
    rows = [registration_row(e) for e in entries]
    if args.json:
        cli_support.print_json({"max_version": version, "count": len(rows), "architectures": rows})
        return 0
    print(f"MAX {version} registers {len(rows)} architectures (name, slug, task):")
    for row in rows:
        flags = [flag for flag, on in (("ModuleV3", row["module_v3"]),
                                       (f"speculator for {row['speculates_on']}", row["speculates_on"])) if on]
        extra = f"  [{', '.join(flags)}]" if flags else ""
        print(f"  {row['name']:<48} {row['slug']:<28} {row['task'] or '?'}{extra}")
    return 0


def _match(args: argparse.Namespace, entries: list, version: str | None) -> int:
    found = max_registry.match(args.match, entries)
    hints = [] if found else max_registry.close_names(args.match, entries)
    if args.json:
        cli_support.print_json({
            "max_version": version, "class": args.match, "registered": bool(found),
            "registrations": [registration_row(e) for e in found], "close_names": hints,
        })
    elif found:
        for entry in found:
            flag = " (ModuleV3)" if entry.module_v3 else ""
            print(f"{entry.name}: slug {entry.slug}, task {entry.task or '?'}{flag}")
    else:
        print(f"{args.match} is not registered in MAX {version}.")
        if hints:
            print("Close names: " + ", ".join(hints))
    return 0 if found else 1


def _donors(args: argparse.Namespace, entries: list, version: str | None) -> int:
    donors = max_registry.donors(entries, include_module_v3=args.include_module_v3)
    ports = [p.to_dict() for p in port_layout.verified_ports()]
    if args.json:
        cli_support.print_json({"max_version": version, "measured_on": max_registry.MEASURED_MAX_VERSION,
                                "donors": donors, "verified_ports": ports})
        return 0
    print(f"Text-generation donors in MAX {version} (CPU fp32 status measured on MAX "
          f"{max_registry.MEASURED_MAX_VERSION}; others unmeasured):")
    for donor in donors:
        note = f" ({donor.cpu_fp32_note})" if donor.cpu_fp32 in ("fail", "diverged") else ""
        print(f"  {donor.slug:<20} cpu-fp32: {donor.cpu_fp32}{note}; graph: {donor.graph}; "
              f"classes: {', '.join(donor.names)}")
        print(f"  {'':<20} attention: {donor.attention}; mlp: {donor.mlp}; norm: {donor.norm}")
    print(f"Verified ports (scaffold --start-from <path>; each matched transformers, see its manifest): "
          f"{len(ports) or 'none'}")
    for port in ports:
        verified = port["verified"] or {}
        print(f"  {port['path']:<28} {port['arch_name']} (from {port['donor']}); verified by "
              f"{verified.get('by', '?')}: {verified.get('verdict', '?')}")
        for item in port["implements"]:
            print(f"  {'':<28} implements {item.get('signal', '?')}: {item.get('what', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
