"""User-facing errors: one line that names the problem and the fix.

Anything a user can cause (bad config, data, checkpoint, prompt, missing hub) raises `KTMError`;
the CLI prints `ktm: error: <message>` and exits with code 2 instead of a traceback. Command-line
parse errors of every `ktm` command become such a line too (`OneLineParser`, `parser_error`).
"""

from __future__ import annotations

import argparse
import difflib
import re


class KTMError(Exception):
    """A problem the user can fix. The message says what is wrong and what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -> {fix}" if fix else problem)


def check_choice(setting: str, value, choices, fix: str) -> None:
    """One line when a setting that takes one of a few names has another: `<setting> must be one of ..., got ...`."""
    if value not in choices:
        raise KTMError(f"{setting} must be one of {', '.join(choices)}, got {value!r}", fix)


def check_count(setting: str, value, minimum: int, fix: str, *, allow_none: bool = False) -> None:
    """One line when a count setting is not a whole number >= `minimum` (bools are not counts):
    `<setting> must be a whole number >= <minimum>[ or null], got ...`. `allow_none`: null means "no limit"."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KTMError(f"{setting} must be a whole number >= {minimum}{' or null' if allow_none else ''}, got {value!r}", fix)


def check_share(setting: str, value, fix: str) -> None:
    """One line when a share setting is not a number in [0, 1] (bools are not numbers):
    `<setting> must be a number in [0, 1], got ...`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # NaN fails too
        raise KTMError(f"{setting} must be a number in [0, 1], got {value!r}", fix)


class DiskFullError(KTMError):
    """The disk filled up while writing; the previous version of the file or folder is intact."""


class Interrupted(Exception):
    """Stopped by Ctrl-C (exit 130) or SIGTERM (143); SaveOnInterrupt already said what it saved."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# -- command-line parse errors -------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `ktm: error:` line (not a usage dump); --help still works."""

    def error(self, message: str):
        raise parser_error(message, self, self.prog)


def _known_keys(parser) -> list[str]:
    """Every option of a (jsonargparse) parser, nested groups included, without the leading dashes."""
    keys = []
    for action in getattr(parser, "_actions", []):
        for opt in getattr(action, "option_strings", []):
            if opt.startswith("--"):
                keys.append(opt[2:])
    return keys


def _suggest(name: str, parser) -> str:
    """`did you mean --model.ks? ` for a misspelt key: first among keys of the same section."""
    known = _known_keys(parser) if parser is not None else []
    section, _, leaf = name.rpartition(".")
    same = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    prefixed = sorted((k for k in same if k.startswith(leaf)), key=len) if leaf else []
    close = prefixed[:1] or difflib.get_close_matches(leaf, list(same), n=1, cutoff=0.75)
    if close:
        return f"did you mean --{same[close[0]]}? "
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f"did you mean --{close[0]}? " if close else ""


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "list": "a list like [1, 2]", "dict": "a mapping like {key: value}",
               "bool": "true or false", "str": "text", "NoneType": "null"}


def _expected_types(text: str) -> list[str]:
    out: list[str] = []
    literals: list[str] = []
    for raw in re.findall(r"Expected an? (.+?)(?:\. Got value:.*)?$", text, re.M):
        t = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", raw.strip().rstrip("."))
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
        if literal:  # several Literal alternatives (trainer.precision) read best as one list
            literals += [v for v in (x.strip() for x in literal.group(1).split(",")) if v not in literals]
            continue
        t = _TYPE_WORDS.get(t, t)
        if t not in out:
            out.append(t)
    return ([f"one of {', '.join(literals)}"] if literals else []) + out


def parser_error(message: str, parser=None, command: str = "ktm fit") -> KTMError:
    """Turn a jsonargparse/argparse error (several lines, after a usage dump) into one KTMError line."""
    text = str(message).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else "invalid arguments"
    help_hint = f"`{command} --help` lists every option"
    m = re.match(r"unrecognized arguments: (.+)", first)
    if m:
        unknown = m.group(1).strip()
        names = re.findall(r"--([\w.\-]+)", unknown) or [unknown.split()[0].lstrip("-")]
        return KTMError(f"unknown option {unknown}", f"{_suggest(names[0], parser)}check the spelling; {help_hint}")
    m = re.search(r"does not accept option '([^']+)'", first) or re.search(r'No action for key "([^"]+)"', text)
    if m:  # an unknown key inside a config file
        return KTMError(f"unknown option {m.group(1)} (in a config file)", f"{_suggest(m.group(1), parser)}fix or remove it; {help_hint}")
    m = re.match(r'Parser key "([^"]+)":?\s*(.*)', first)
    if m:
        key, rest = m.group(1), m.group(2)
        if key == "config":
            return KTMError(f"config file problem: {rest or ' '.join(lines[1:])}", "check the path given to --config / --exp")
        given = re.search(r"(?:Given value|Got value):\s*(.*)", text)
        if given is not None:
            want = " or ".join(_expected_types(text)) or "a valid value"
            fix = f"set {key} to {want}" if len(want) <= 60 else f"set {key} to one of the values above"
            return KTMError(f"bad value for {key}: {given.group(1).strip()!r} is not {want}", f"{fix} ({help_hint})")
        detail = "; ".join([rest, *lines[1:]]).strip("; ")
        return KTMError(f"bad value for {key}: {detail[:200]}", f"fix {key} in the config or command line ({help_hint})")
    if first.startswith("Problems parsing config"):
        return KTMError(f"cannot parse the config: {' '.join(lines)[:220]}", "fix the YAML syntax of that file or value")
    return KTMError(" ".join(lines)[:300], f"fix the command line or config ({help_hint})")
