"""Command-line flags, checked before any work: one spelling (``--batch_size`` = ``--batch-size``), unknown flags
refused with the closest real one, and help pages built from each command's signature and docstring."""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import textwrap

WIDTH = 118


class UsageError(ValueError):
    """A command line that names a flag the command does not have."""


def normalise(argv: list[str]) -> list[str]:
    """``--a-b[=v]`` -> ``--a_b[=v]`` for every flag before a bare ``--``."""
    out, done = [], False
    for arg in argv:
        if not done and arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = f"--{name.replace('-', '_')}{sep}{value}"
        done = done or arg == "--"
        out.append(arg)
    return out


def parse_script_args(parser) -> object:
    """Parse a job's or benchmark's arguments as the CLI takes flags: ``--a_b`` or ``--a-b``, and ``--mirror``
    (default $FEATX_MIRROR), which is passed on to featx through $FEATX_MIRROR."""
    from featx.mirror import MIRROR_ENV

    parser.add_argument("--mirror", default=None,
                        help=f"offline mirror of weights and datasets (default: ${MIRROR_ENV})")
    parser.allow_abbrev = False  # a prefix of a flag is a misspelling, not that flag
    args = parser.parse_args(normalise(sys.argv[1:]))
    if args.mirror:
        os.environ[MIRROR_ENV] = os.path.abspath(args.mirror)
    return args


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def closest(name: str, names) -> str | None:
    """The one of ``names`` that ``name`` most likely misspells, or None."""
    found = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return found[0] if found else None


def check(command: str, known: dict[str, object], argv: list[str]) -> None:
    """Raise ``UsageError`` for the first flag of ``argv`` (normalised) that is not in ``known`` (name ->
    default); ``--noNAME`` is accepted for a boolean flag, as fire reads it."""
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("--"):
            name = arg[2:].partition("=")[0]
            if name in known or (name.startswith("no") and isinstance(known.get(name[2:]), bool)):
                continue
            close = closest(name, known)
            hint = f"did you mean --{close}?" if close else f"see `featx {command} --help`"
            raise UsageError(f"{command} has no flag --{name}; {hint}")
        if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            raise UsageError(f"{command}: short flags such as {arg} are not taken; spell the flag out "
                             f"(`featx {command} --help`)")


def documented(function) -> tuple[str, dict[str, str]]:
    """(description, {argument: text}) from a Google-style docstring with an ``Args:`` section."""
    doc = inspect.getdoc(function) or ""
    description, _, args = doc.partition("\nArgs:\n")
    entries: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        match = re.match(r"    (\w+): (.*)", line)
        if match:
            name, text = match.groups()
            entries[name] = text
        elif name and line.startswith("        "):
            entries[name] += " " + line.strip()
    return description.strip(), entries


def signature_flags(function) -> tuple[list[str], dict[str, object]]:
    """(positional names, {flag: default}) of a command function."""
    positional, flags = [], {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL or parameter.default is parameter.empty:
            if parameter.kind is not parameter.VAR_KEYWORD:
                positional.append(parameter.name)
        else:
            flags[parameter.name] = parameter.default
    return positional, flags


def help_page(command: str, function, extra: dict[str, object]) -> str:
    """The ``--help`` text: usage, description, arguments, and every flag with its default."""
    description, entries = documented(function)
    positional, flags = signature_flags(function)
    flags = {**flags, **extra}
    usage = " ".join(p.upper() + ("..." if p == "inputs" else "") for p in positional)
    lines = [f"usage: featx {command} {usage} [flags]".replace("  ", " "), "", description, ""]
    if positional:
        lines.append("arguments:")
        lines += [_item(name.upper(), entries.get(name, "")) for name in positional]
        lines.append("")
    lines.append("flags (--name VALUE or --name=VALUE; --name-with-hyphens works too; --noNAME for False):")
    for name, default in flags.items():
        shown = "" if default is None else f" (default: {default})"
        lines.append(_item(f"--{name}", entries.get(name, "") + shown))
    return "\n".join(lines)


def _item(label: str, text: str) -> str:
    indent = " " * 24
    first = f"  {label:<21} " if len(label) < 22 else f"  {label}\n{indent}"
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=indent) if text else first.rstrip()
