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


def take(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """``argv`` without the flag ``--name`` (``--name=v`` or ``--name v``, before a bare ``--``), and its value."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return rest + argv[i:], value
        if arg == f"--{name}" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return rest, value


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


BOOLEAN_WORDS = ("true", "false")  # what a switch may be given: --overwrite=false


def check(command: str, positional: list[str], known: dict[str, object], argv: list[str]) -> None:
    """Raise ``UsageError`` for the first problem of ``argv`` (normalised), before any work: a flag not in
    ``known`` (name -> default; ``--noNAME`` is accepted for a boolean flag, as fire reads it), a flag that needs a
    value and has none, a switch given another value than true/false, a missing argument, or one too many
    (``positional``: the argument names; one ending in ``...`` takes any number)."""
    arguments, index = [], 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            break
        if not arg.startswith("--"):
            if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
                raise UsageError(f"{command}: short flags such as {arg} are not taken; spell the flag out "
                                 f"(`featx {command} --help`)")
            arguments.append(arg)
            continue
        name, has_value, value = arg[2:].partition("=")
        switch = name.startswith("no") and isinstance(known.get(name[2:]), bool)
        if name not in known and not switch:
            close = closest(name, known)
            hint = f"did you mean --{close}?" if close else f"see `featx {command} --help`"
            raise UsageError(f"{command} has no flag --{name}; {hint}")
        if not has_value and index < len(argv) and (not argv[index].startswith("-") or _is_number(argv[index])):
            has_value, value = True, argv[index]  # fire reads the next word as the flag's value
            index += 1
        if switch or isinstance(known.get(name), bool):
            if has_value and value.lower() not in BOOLEAN_WORDS:
                raise UsageError(f"--{name} is a switch: give it alone (or --{name}=false), not {value!r}")
        elif not has_value:
            raise UsageError(f"--{name} needs a value (`featx {command} --help`)")
    names = [p for p in positional if not p.endswith("...")]
    if len(arguments) < len(names):
        missing = " ".join(n.upper() for n in names[len(arguments):])
        raise UsageError(f"{command} needs {missing} (`featx {command} --help`)")
    if len(arguments) > len(names) and len(names) == len(positional):
        raise UsageError(f"{command} takes {' '.join(n.upper() for n in names)}; {arguments[len(names)]!r} is one "
                         "argument too many (flags are written --name value)")


def first_sentence(function) -> str:
    """The first sentence of a command's description, on one line (its entry in ``featx --help``)."""
    paragraph = " ".join(documented(function)[0].split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.;])\s", paragraph, maxsplit=1)[0]
    return sentence[:-1] + "." if sentence.endswith(";") else sentence


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
    """(positional names, {flag: default}) of a command function; a ``*args`` name ends in ``...``."""
    positional, flags = [], {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            positional.append(parameter.name + "...")
        elif parameter.default is parameter.empty:
            if parameter.kind is not parameter.VAR_KEYWORD:
                positional.append(parameter.name)
        else:
            flags[parameter.name] = parameter.default
    return positional, flags


def help_page(command: str, function, extra: dict[str, object], extra_documented_by=None) -> str:
    """The ``--help`` text: usage, description, arguments, and every flag with its default (the ``extra`` flags
    described by ``extra_documented_by``'s docstring where ``function``'s does not)."""
    description, entries = documented(function)
    if extra_documented_by is not None:
        entries = {**documented(extra_documented_by)[1], **entries}
    positional, flags = signature_flags(function)
    flags = {**flags, **extra}
    usage = " ".join(p.upper() for p in positional)
    lines = [f"usage: featx {command} {usage} [flags]".replace("  ", " "), "", description, ""]
    if positional:
        lines.append("arguments:")
        lines += [_item(name.upper(), entries.get(name.removesuffix("..."), "")) for name in positional]
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
