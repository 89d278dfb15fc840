"""The commands in README.md and docs/*.md run as written: every console script named exists, every
option it is given is one its parser knows, every ``--section.key=value`` override names a config
key, and every ``scripts/`` file named exists. Relative links point at files and headings that exist.

Only fenced code blocks of shell (```bash, ```sh, ```console, ```shell) or no language are read.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from volumetric.cli import parser_for
from volumetric.config import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "console", "shell"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@cache
def console_scripts() -> frozenset[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return frozenset(line.split("=")[0].strip() for line in lines if line.strip())


@cache
def known_options(script: str) -> frozenset[str]:
    return frozenset(parser_for(script)._option_string_actions)


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a shell or unlabelled fenced block."""
    lines, inside, language = [], False, ""
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match and not inside:
            inside, language = True, match.group(1).lower()
        elif line.strip() == "```" and inside:
            inside = False
        elif inside and language in SHELL_LANGUAGES:
            lines.append((number, line))
    return lines


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join lines continued with a trailing backslash; drop a leading ``$ `` prompt."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        text = line.strip()
        if pending is None and text.startswith("$ "):
            text = text[2:]
        if pending is not None:
            number, text = pending[0], pending[1] + " " + text
        if text.endswith("\\"):
            pending = (number, text[:-1])
            continue
        pending = None
        joined.append((number, text))
    if pending is not None:
        joined.append(pending)
    return joined


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at &&, ||, |, ; and &, comments dropped."""
    line = re.sub(r"\$\(\s*which\s+(\S+?)\s*\)", r"\1", line)  # torchrun $(which volumetric-x)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    result: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            result.append([])
        else:
            result[-1].append(token)
    return [command for command in result if command]


def launched(command: list[str]) -> tuple[str, list[str]] | None:
    """(what runs, its arguments) for a command of interest: a console script (also behind
    ``torchrun`` or ``python -m volumetric``), ``scripts/*.sh`` or ``python scripts/*.py``."""
    while command and ASSIGNMENT.match(command[0]):
        command = command[1:]  # VAR=value before the command
    if not command:
        return None
    head, rest = command[0], command[1:]
    if head == "torchrun":
        for i, token in enumerate(rest):
            if token == "-m":
                return launched(["python", *rest[i:]])
            if not token.startswith("-"):
                return launched(rest[i:])
        return None
    if head in ("python", "python3"):
        if rest[:2] == ["-m", "volumetric"] and len(rest) > 2:
            return f"volumetric-{rest[2]}", rest[3:]
        if rest and rest[0].endswith(".py") and "scripts/" in rest[0]:
            return rest[0], rest[1:]
        return None
    if head == "bash" and rest:
        return launched(rest)
    if head.startswith("volumetric-") or re.match(r"^(\./)?scripts/\S+\.(sh|py)$", head):
        return head, rest
    return None


def check_command(script: str, arguments: list[str]) -> list[str]:
    """What is wrong with running ``script arguments`` as the documentation writes it."""
    if script.startswith(("scripts/", "./scripts/")):
        return [] if (ROOT / script.removeprefix("./")).is_file() else [f"{script} does not exist"]
    if script not in console_scripts():
        return [f"{script} is not a console script of setup.cfg"]
    problems = []
    options = known_options(script)
    for argument in arguments:
        if not argument.startswith("-") or re.match(r"^-\d", argument) or argument == "-":
            continue
        name, _, value = argument.partition("=")
        if "." in name and name.startswith("--") and value:
            problems += check_override(script, name[2:])
        elif name not in options:
            problems.append(f"{script} has no option {name}")
    return problems


TAKES_OVERRIDES = ("volumetric-train", "volumetric-pretrain")


def check_override(script: str, key: str) -> list[str]:
    if script not in TAKES_OVERRIDES:
        return [f"{script} takes no config override --{key}=..."]
    section, _, field = key.partition(".")
    if section not in SECTIONS:
        return [f"--{key}: no config section {section!r} (known: {', '.join(SECTIONS)})"]
    if field not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        return [f"--{key}: the {section} section has no key {field!r}"]
    return []


def check_text(text: str, source: str) -> list[str]:
    """Every problem with the commands in the shell blocks of one Markdown text."""
    problems = []
    for number, line in logical_lines(shell_blocks(text)):
        try:
            parsed = commands(line)
        except ValueError as error:  # unbalanced quotes: complain only about a command line
            if re.search(r"(^|\s)(volumetric-|torchrun|\./scripts/|python)", line):
                problems.append(f"{source}:{number}: cannot parse {line!r} ({error})")
            continue
        for command in parsed:
            found = launched(command)
            if found is not None:
                where = f"{source}:{number}: "
                problems += [where + problem for problem in check_command(*found)]
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist(path: Path) -> None:
    assert check_text(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


def test_the_docs_show_commands_at_all() -> None:
    """The extraction finds the README's commands (a broken extractor would pass everything)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = {
        launched(command)[0]
        for _, line in logical_lines(shell_blocks(text))
        for command in commands(line)
        if launched(command) is not None
    }
    assert {"./scripts/demo.sh", "./scripts/test.sh", "volumetric-train"} <= found


def test_wrong_commands_are_reported() -> None:
    readme = """
Some prose with volumetric-train --not-checked outside a block.

```bash
volumetric-train data/ --output-dir RUN --no-such-option --train.epochs=5   # a comment --ignored
$ volumetric-evaluate RUN/best.pt DATA --output-dir out && volumetric-infer RUN/best.pt x.nii.gz --mapz m/
torchrun --nproc_per_node=2 -m volumetric train DATA --output-dir RUN \\
    --train.epoch=5 --modle.depth=2
volumetric-trian DATA
./scripts/no_such_script.sh --flag
python scripts/no_such_script.py
VOLUMETRIC_CPU_ALLOCATOR=system volumetric-export RUN/best.pt --format onnx --outptu m.onnx
```

```python
volumetric-train --ignored-in-python
```
"""
    problems = check_text(readme, "README.md")
    expected = [
        "README.md:5: volumetric-train has no option --no-such-option",
        "README.md:6: volumetric-infer has no option --mapz",
        "README.md:7: --train.epoch: the train section has no key 'epoch'",
        "README.md:7: --modle.depth: no config section 'modle' (known: model, data, train, pretrain)",
        "README.md:9: volumetric-trian is not a console script of setup.cfg",
        "README.md:10: ./scripts/no_such_script.sh does not exist",
        "README.md:11: scripts/no_such_script.py does not exist",
        "README.md:12: volumetric-export has no option --outptu",
    ]
    assert problems == expected


def test_right_commands_pass() -> None:
    good = """
```console
$ volumetric-train DATA --config configs/demo.yaml --output-dir RUN --train.epochs=5 --model.pool=max
$ torchrun --nproc_per_node=4 $(which volumetric-train) DATA --output-dir RUN --resume
$ python -m volumetric infer RUN/best.pt scan.nii.gz --tta 4 --output p.csv | tail -n 1
$ ./scripts/test.sh -m "not slow"
```
"""
    assert check_text(good, "good.md") == []


# ---------------------------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@cache
def anchors(path: Path) -> frozenset[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, - for space)."""
    found, inside = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return frozenset(found)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert broken == []
