"""A small Dockerfile reader for the static checks: instructions, stages, ARG defaults, .dockerignore matching.

Enough of the Dockerfile grammar for this project's file: comments, parser directives, backslash line
continuations, JSON-array (exec) and shell forms, `FROM ... AS name`, `${VAR}` / `$VAR` substitution of ARGs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # everything after the keyword, continuations joined
    line: int  # 1-based line of the keyword

    def words(self) -> list[str]:
        """Exec-form JSON arrays as their elements; shell form split like a shell would."""
        text = self.value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
                return parsed
        return shlex.split(text, comments=False)


@dataclass
class Stage:
    name: str
    base: str  # the FROM image, ARGs substituted; another stage's name when it builds on one
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stages a target is built from, outermost base first (`serve` -> [base, serve])."""
        chain: list[Stage] = []
        stage = self.stages[target]
        while True:
            chain.insert(0, stage)
            if stage.base not in self.stages:
                return chain
            stage = self.stages[stage.base]


def substitute(text: str, args: dict[str, str]) -> str:
    return _VAR.sub(lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse(path: Path) -> Dockerfile:
    """Parse a Dockerfile; raise ValueError naming the line on anything this reader does not understand."""
    lines = path.read_text(encoding="utf-8").splitlines()
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue  # comments and parser directives (`# syntax=...`)
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        text = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, value = text.partition(" ")
        if not re.fullmatch(r"[A-Za-z]+", keyword):
            raise ValueError(f"{path}:{start}: not an instruction: {text[:60]!r}")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    if buffer:
        raise ValueError(f"{path}:{start}: line continuation runs past the end of the file")

    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in instructions:
        if ins.keyword == "ARG" and current is None:
            name, _, default = ins.value.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif ins.keyword == "FROM":
            words = ins.value.split()
            if len(words) == 3 and words[1].upper() == "AS":
                name = words[2]
            elif len(words) == 1:
                name = str(len(stages))
            else:
                raise ValueError(f"{path}:{ins.line}: cannot read FROM {ins.value!r}")
            current = Stage(name=name, base=substitute(words[0], global_args))
            stages[name] = current
        elif current is None:
            raise ValueError(f"{path}:{ins.line}: {ins.keyword} before the first FROM")
        else:
            current.instructions.append(ins)
    return Dockerfile(global_args=global_args, stages=stages)


def copy_sources(ins: Instruction) -> list[str]:
    """The build-context paths a COPY/ADD reads (not `--from=` copies, which read another stage)."""
    words = [w for w in ins.words()]
    if any(w.startswith("--from=") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def dockerignore_patterns(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def is_ignored(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `relpath` (or any folder above it) out of the build context.

    Docker's rules in the subset used here: patterns are relative to the context root, `**` matches any number of
    folders, a pattern that names a folder excludes everything inside it, `!pattern` re-includes, last match wins.
    """
    parts = Path(relpath).parts
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = fnmatch.translate(body).replace(".*.*/", "(?:.*/)?")
        # The path itself or any of its ancestors matching the pattern counts (excluding a folder excludes its files).
        if any(re.match(regex, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored
