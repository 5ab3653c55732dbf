r"""Every command line the docs show runs as it is written: a renamed flag, config key or preset,
or a file the repository no longer ships, fails here instead of failing a reader who pastes it.

Where commands are read from:

* README.md and docs/*.md: fenced code blocks (lines continued with `` \`` joined), indented
  code blocks, and inline code spans (a span may wrap onto the next line);
* the docstrings of configs/*.py, read from the source (a ``\`` continuation as written);
* launch/*.sh: comment lines (joined across `` \``), here-documents (the usage texts) and the
  strings its ``echo`` prints.

What is a command: ``python -m guided_jax.X ...``, ``python benchmarks/X.py ...`` (a script of
the repository's own directories) and ``[VAR=value ...] [bash] launch/X.sh ...`` (``X.sh`` alone
where launch/X.sh exists). A command ends at the end of its line (or span), at a shell comment,
or at a control operator (``&&``, ``;``, ``|``, ``)``, ...).

What is checked:

1. ``guided_jax/X.py`` is a command module (it has a ``__main__`` block).
2. Every ``--flag`` (``--noflag`` for a bool, ``--flag=value``, ``--flag value``) is one the
   module defines (``flags.DEFINE_*`` and ``config_flags.DEFINE_config_file`` calls, also inside
   the ``cli`` helpers it calls, read with ast: the command modules cannot all be imported into
   one process) or one of absl's own; a literal value of an integer, float, bool or enum flag
   parses as that flag parses it.
3. Every ``--NAME.a.b=value`` override of a config-file flag ``NAME`` names a key of the config
   the same command line loads with ``--NAME FILE[:ARG]``; a command that names no repository
   config (``CONFIG``, ``my_patterns.py``) is held against the config file that the flag's own
   help names (``configs/finetune.py`` for ``--finetune_config``), else configs/default.py. A
   literal value of an int, float or bool key parses as absl parses it for that key. Overrides
   shown on their own in a code span (``--config.train.steps=1500``) name a key of
   configs/default.py or configs/finetune.py.
4. Every ``configs/X.py[:ARG]`` the texts name (in a command or not) loads with
   ``guided_jax.config.load_config`` (for configs/reference.py: ARG is one of
   ``MODEL_PRESETS``).
5. A repository path must exist: a word (a flag's value, one item of a comma-separated value,
   or an argument) whose first component is one of ``REPO_DIRS``, the repository's own
   directories of shipped files. Everything else is the reader's (``train.txt``, ``runs/...``,
   ``gs://...``), and so are placeholders: a word with ``$``, ``<``, ``...`` or a component in
   capitals (``DIR``, ``CONFIG``).
6. ``launch/X.sh`` exists; its subcommand (tpu_vm.sh) is one its ``case $command`` accepts; its
   options are ones its ``case $option`` blocks accept (for the subcommand they are guarded
   for); ``VAR=value`` before it, or in an ``export`` line, names a setting the script (or what
   it sources) reads as ``${VAR:-...}``; and its CONFIG and the flags after it are checked as
   the command it passes them to (``-m guided_jax.X --config "$config" --workdir "$workdir"``
   in the script).

The flags of an optional group that repeats (``[--config.key=value ...]``) are held to the flag
name only. Every problem is collected, with its file, line and command, and the test fails with
the whole list."""

from __future__ import annotations

import ast
import difflib
import functools
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from absl import flags

from conftest import REPO

# The repository's own directories of shipped files: a path under one of them must exist.
REPO_DIRS = ("benchmarks", "configs", "docs", "guided_jax", "launch", "tests")
PACKAGE = REPO / "guided_jax"
LAUNCH = REPO / "launch"
DEFAULT_CONFIG = "configs/default.py"
# Overrides shown on their own (not in a command) name a key of one of these.
LOOSE_CONFIGS = {"config": ("configs/default.py", "configs/finetune.py")}
LOOSE_CONFIGS["finetune_config"] = ("configs/finetune.py",)

_DIRS = "|".join(REPO_DIRS)
COMMAND_START = re.compile(
    r"(?<![\w./$-])(?:python3? +-m +guided_jax\.\w+"
    rf"|python3? +(?:\./)?(?:{_DIRS})/\S+\.py\b"
    r"|(?:[A-Z_][A-Z0-9_]*=\S* +)*(?:bash +)?(?:launch/)?[\w-]+\.sh(?![\w.]))"
)
CONFIG_SPEC = re.compile(r"(?<![\w./-])(configs/[\w-]+\.py)(?::(\w+))?")
LAUNCH_TOKEN = re.compile(r"(launch/)?([\w-]+\.sh)")
ENV_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")
CAPITALS = re.compile(r"[A-Z][A-Z0-9_]*")
PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}
KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


@dataclass(frozen=True)
class Snippet:
    """Text that may hold commands: a code line (continuations joined) or a code span."""

    file: str
    line: int
    text: str
    span: bool = False


@dataclass(frozen=True)
class Flag:
    kind: str  # bool, int, float, enum, str or config (a config file with overrides)
    choices: tuple[str, ...] | None = None  # an enum's values, where the source lists them
    config: str = DEFAULT_CONFIG  # a config flag: the file its help names (checked keys)


@dataclass
class Launcher:
    """What a launch script accepts, read from its source."""

    subcommands: set[str] = field(default_factory=set)
    options: dict[str, tuple[bool, str | None]] = field(default_factory=dict)  # takes value, for
    env: set[str] = field(default_factory=set)
    module: str | None = None  # the guided_jax command its CONFIG and extra flags go to
    config_subcommand: str | None = None  # the subcommand that takes CONFIG ("" without any)
    positionals: int = 1  # CONFIG, or CONFIG WORKDIR


# --- where commands are -------------------------------------------------------------------------


def _joined(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Lines continued with a trailing backslash joined into one, with the first one's number."""
    start, parts = 0, []
    for number, line in lines:
        if not parts:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(parts)
        parts = []
    if parts:
        yield start, " ".join(parts)


def markdown_snippets(text: str, file: str) -> list[Snippet]:
    """Code lines of fenced and indented blocks, and the inline code spans of the prose."""
    code: list[tuple[int, str]] = []
    prose: list[str] = []  # the text outside code blocks, code lines blanked
    fenced, previous_blank = False, True
    for number, line in enumerate(text.splitlines(), 1):
        after_code = bool(code) and code[-1][0] == number - 1
        indented = line.startswith("    ") and (previous_blank or after_code)
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
        elif fenced or indented:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
        previous_blank = not line.strip()
    snippets = [Snippet(file, number, line) for number, line in _joined(code)]
    for start, paragraph in _paragraphs(prose):
        for match in re.finditer(r"`([^`]+)`", paragraph):
            line = start + paragraph.count("\n", 0, match.start())
            snippets.append(Snippet(file, line, " ".join(match[1].split()), span=True))
    return snippets


def _paragraphs(lines: list[str]) -> Iterator[tuple[int, str]]:
    start, block = 1, []
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield start, "\n".join(block)
            block = []


def docstring_snippets(source: str, file: str) -> list[Snippet]:
    """The lines of every docstring of a Python file as written (continuations joined), and its
    ````--flag ...```` spans."""
    snippets = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
            continue
        if not isinstance(first.value.value, str):
            continue
        raw = ast.get_source_segment(source, first.value) or ""
        lines = list(enumerate(raw.splitlines(), first.lineno))
        snippets += [Snippet(file, n, t) for n, t in _joined(lines)]
        for match in re.finditer(r"``(--.+?)``", raw, flags=re.S):  # overrides on their own
            line = first.lineno + raw.count("\n", 0, match.start())
            snippets.append(Snippet(file, line, " ".join(match[1].split()), span=True))
    return snippets


def shell_snippets(source: str, file: str) -> list[Snippet]:
    """What a launch script shows its reader: its comments (continuations joined), its
    here-documents and the strings it echoes."""
    comments, snippets = [], []
    heredoc_end = None
    for number, line in enumerate(source.splitlines(), 1):
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            else:
                snippets.append(Snippet(file, number, line))
            continue
        if start := re.search(r"(?<!<)<<(?!<)-?\s*'?(\w+)'?", line):
            heredoc_end = start[1]
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith(("#!", "# shellcheck")):
            comments.append((number, stripped[1:]))
        for string in re.findall(r'\becho "([^"]*)"', line):
            snippets.append(Snippet(file, number, string))
    return [Snippet(file, n, t) for n, t in _joined(comments)] + snippets


def document_snippets(path: Path) -> list[Snippet]:
    name = str(path.relative_to(REPO))
    text = path.read_text()
    if path.suffix == ".md":
        return markdown_snippets(text, name)
    if path.suffix == ".py":
        return docstring_snippets(text, name)
    return shell_snippets(text, name)


def documents() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "configs").glob("*.py")),
        *sorted(LAUNCH.glob("*.sh")),
    ]


def _words(text: str) -> list[str]:
    """Shell words up to a comment or a control operator (``&&``, ``;``, ``|``, ``)``...)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for word in lexer:
        if set(word) <= set("();<>|&"):
            break
        words.append(word)
    return words


def commands_in(snippet: Snippet) -> list[list[str]]:
    """The commands of a snippet, each as its shell words (environment assignments first)."""
    commands = []
    for match in COMMAND_START.finditer(snippet.text):
        try:
            words = _words(snippet.text[match.start() :])
        except ValueError:  # an unclosed quote: reported by check_command
            words = [snippet.text[match.start() :]]
        if _is_command(words):
            commands.append(words)
    return commands


def _is_command(words: list[str]) -> bool:
    """A bare ``X.sh`` is a command only where launch/X.sh exists (not ``tpu_vm.sh:``)."""
    script = _launch_word(words)
    if script is None:
        return words[0].startswith("python")
    prefixed, name = LAUNCH_TOKEN.fullmatch(script).groups()
    return bool(prefixed) or (LAUNCH / name).is_file()


def _launch_word(words: list[str]) -> str | None:
    for word in words:
        if ENV_ASSIGNMENT.match(word) or word == "bash":
            continue
        return word if LAUNCH_TOKEN.fullmatch(word) else None
    return None


# --- what the code defines ----------------------------------------------------------------------


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def command_modules() -> set[str]:
    """The package's modules that run as ``python -m guided_jax.X``."""
    return {
        path.stem for path in PACKAGE.glob("*.py") if '__name__ == "__main__"' in path.read_text()
    }


def _module_value(tree: ast.Module, name: str) -> ast.expr | None:
    """What a module binds ``name`` to: its own assignment, or one in the guided_jax module it
    imports the name from."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node.value
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("guided_jax."):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = REPO.joinpath(*node.module.split(".")).with_suffix(".py")
                    return _module_value(_tree(source), alias.name) if source.is_file() else None
    return None


def _choices(tree: ast.Module, node: ast.expr | None) -> tuple[str, ...] | None:
    """An enum flag's values where the source spells them: a literal, ``NAME`` or
    ``list(NAME)`` of a tuple, list or dict literal."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.Name):
        node = _module_value(tree, node.id)
    items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
    if items is None or not all(isinstance(i, ast.Constant) for i in items):
        return None
    return tuple(str(i.value) for i in items)


def _flag(tree: ast.Module, call: ast.Call) -> Flag:
    kind = call.func.attr.removeprefix("DEFINE_")
    if kind in ("bool", "boolean"):
        return Flag("bool")
    if kind in ("integer", "float"):
        return Flag("float" if kind == "float" else "int")
    if kind == "enum":
        values = call.args[2] if len(call.args) > 2 else None
        return Flag("enum", _choices(tree, values))
    if kind == "config_file":
        texts = [
            getattr(a, "value", None) for a in [*call.args[2:3], *(k.value for k in call.keywords)]
        ]
        named = re.findall(r"configs/\w+\.py", " ".join(t for t in texts if isinstance(t, str)))
        return Flag("config", config=named[0] if named else DEFAULT_CONFIG)
    return Flag("str")


def _defines(tree: ast.Module) -> dict[str, Flag]:
    """The flags a module's ``*.DEFINE_*`` calls define, and those of the ``cli`` helpers it
    calls (``cli.define_print_config()``)."""
    defined = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr.startswith("DEFINE_") and node.args:
            if isinstance(node.args[0], ast.Constant):
                defined[node.args[0].value] = _flag(tree, node)
        elif isinstance(node.func.value, ast.Name) and node.func.value.id == "cli":
            helper = _function(_tree(PACKAGE / "cli.py"), node.func.attr)
            if helper is not None:
                defined |= _defines(ast.Module(body=[helper], type_ignores=[]))
    return defined


def _function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


@functools.cache
def absl_flags() -> dict[str, Flag]:
    """absl's own flags, which every command accepts: --help and its kin, logging, --flagfile."""
    from absl import app
    from absl import logging as _logging  # noqa: F401  (defines the logging flags)

    defined = {"flagfile": Flag("str"), "undefok": Flag("str")}
    for help_flag in (app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag, app.HelpXMLFlag):
        defined[help_flag().name] = Flag("bool")
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("absl."):
            for flag in module_flags:
                defined[flag.name] = Flag("bool" if flag.boolean else "str")
    return defined


@functools.cache
def module_flags(module: str) -> dict[str, Flag] | None:
    """The flags ``python -m guided_jax.MODULE`` accepts; None if it is no command."""
    if module not in command_modules():
        return None
    return absl_flags() | _defines(_tree(PACKAGE / f"{module}.py"))


@functools.cache
def script_flags(path: Path) -> dict[str, Flag]:
    """The flags of a repository script: argparse ``--options`` and absl ``DEFINE_*`` calls."""
    tree = _tree(path)
    defined = _defines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            given = {k.arg: k.value for k in node.keywords}
            action = getattr(given.get("action"), "value", "")
            kind = getattr(given.get("type"), "id", "str")
            kind = "bool" if str(action).startswith("store_") else kind
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    defined[arg.value[2:]] = Flag(kind)
    return defined


def _case_arms(block: str) -> Iterator[tuple[list[str], str]]:
    """The arms of a shell ``case`` body: each one's patterns and its commands."""
    for chunk in block.split(";;"):
        match = re.match(r"\s*([^()]+?)\)(.*)", chunk, flags=re.S)
        if match:
            yield [p.strip() for p in match[1].split("|")], match[2]


@functools.cache
def launcher(name: str) -> Launcher:
    """A launch script's subcommands, options, variables and where it sends CONFIG."""
    text = (LAUNCH / name).read_text().replace("\\\n", " ")
    found = Launcher()
    sourced = re.findall(r'^\s*\. "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/([\w.]+)"', text, re.M)
    for script in [name, *sourced]:
        # the settings read from the environment: ${NAME:-default}, ${NAME-...}, ${NAME:=...}
        read = re.findall(r"\$\{([A-Z][A-Z0-9_]*):?[-=]", (LAUNCH / script).read_text())
        found.env |= set(read)
    for block in re.findall(r"case \$command in(.*?)\besac\b", text, flags=re.S):
        for patterns, _ in _case_arms(block):
            found.subcommands |= {p for p in patterns if "*" not in p}
    for block in re.findall(r"case \$option in(.*?)\besac\b", text, flags=re.S):
        for patterns, body in _case_arms(block):
            guard = re.search(r"\$command == (\w+)", body)
            for pattern in patterns:
                if pattern.startswith("-") and "*" not in pattern:
                    takes_value, only_for = found.options.get(pattern, (False, None))
                    found.options[pattern] = (
                        takes_value or "shift 2" in body,
                        only_for or (guard[1] if guard else None),
                    )
    passes = re.search(r'-m guided_jax\.(\w+) --config "\$config" --workdir "\$workdir"', text)
    reads = re.search(r"^\s*config=\$1\b", text, flags=re.M)
    if passes and reads:
        found.module = passes[1]
        guards = re.findall(r"\$command == (\w+)", text[: reads.start()])
        found.config_subcommand = guards[-1] if found.subcommands and guards else ""
        found.positionals = 2 if re.search(r"^\s*workdir=\$2\b", text, flags=re.M) else 1
    return found


@functools.cache
def load(spec: str):
    """``configs/X.py[:ARG]`` loaded as ``--config`` loads it."""
    from guided_jax.config import load_config

    path, _, arg = spec.partition(":")
    return load_config(str(REPO / path) + (f":{arg}" if arg else ""))


# --- the checks ---------------------------------------------------------------------------------


def placeholder(word: str) -> bool:
    """A value the reader fills in: ``FILE``, ``N``, ``$VAR``, ``<step>``, ``...``, ``OUT/x``."""
    parts = re.split(r"[/:,=]", word.strip("[]\"'"))
    return (
        any(mark in word for mark in ("$", "<", "...", "…"))
        or any(CAPITALS.fullmatch(part) for part in parts if part)
        or word == ""
    )


def config_spec_problem(path: str, arg: str | None) -> str | None:
    """Why ``configs/X.py[:ARG]`` does not name a config that loads, or None."""
    from guided_jax.config import MODEL_PRESETS

    if not (REPO / path).is_file():
        return f"no config file {path}"
    if path == "configs/reference.py" and arg and arg not in MODEL_PRESETS:
        close = difflib.get_close_matches(arg, sorted(MODEL_PRESETS), n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (presets: {sorted(MODEL_PRESETS)})"
        return f"{path}:{arg}: no model preset {arg!r}{hint}"
    try:
        load(f"{path}:{arg}" if arg else path)
    except Exception as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        return f"{path}{':' + arg if arg else ''} does not load: {last}"
    return None


def path_problems(word: str) -> list[str]:
    """A repository path (first component one of REPO_DIRS) that does not exist."""
    problems = []
    for item in word.split(","):
        item = item.strip("[]").removeprefix("./").rstrip("/")
        if item.split("/")[0] not in REPO_DIRS or "/" not in item or placeholder(item):
            continue
        if CONFIG_SPEC.fullmatch(item):
            continue  # configs/X.py[:ARG]: checked as a config
        if any(c in item for c in "*?[") and not any(REPO.glob(item)):
            problems.append(f"{item} matches no file of the repository")
        elif not any(c in item for c in "*?[") and not (REPO / item).exists():
            problems.append(f"no file {item} in the repository")
    return problems


def key_problem(spec: str, name: str, key: str, value: str | None) -> str | None:
    """Why ``--name.key[=value]`` does not fit the config ``spec`` loads, or None (also for a
    placeholder key: ``--config.KEY=VALUE``)."""
    if placeholder(key):
        return None
    node, parts = load(spec), key.split(".")
    for depth, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            keys = [".".join([*parts[:depth], k]) for k in getattr(node, "keys", list)()]
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"; did you mean --{name}.{close[0]}?" if close else ""
            return f"{spec} has no key {key}{hint}"
        parent, node = node, node[part]
    kind = parent.get_type(parts[-1])
    if value is None or placeholder(value) or kind not in PARSERS:
        return None
    try:
        PARSERS[kind].parse(value)
    except ValueError:
        return f"expected {KIND_NAMES[kind]} ({spec})"
    return None


def _override(name: str, key: str, value: str | None) -> str:
    return f"--{name}.{key}" + ("" if value is None else f"={value}")


def _templates(words: list[str]) -> set[int]:
    """Indices of words inside an optional group that repeats: ``[--config.key=value ...]``."""
    inside, start, group = set(), None, []
    for index, word in enumerate(words):
        if word.startswith("[") and start is None:
            start, group = index, []
        if start is not None:
            group.append(word)
            if word.endswith("]"):
                if any("..." in w for w in group):
                    inside |= set(range(start, index + 1))
                start = None
    return inside


def _flag_value_problem(name: str, flag: Flag, value: str) -> str | None:
    if placeholder(value):
        return None
    if flag.kind == "enum" and flag.choices and value not in flag.choices:
        return f"--{name} {value}: expected one of {list(flag.choices)}"
    kind = {"bool": bool, "int": int, "float": float}.get(flag.kind)
    try:
        if kind is not None:
            PARSERS[kind].parse(value)
    except ValueError:
        return f"--{name}={value}: expected {KIND_NAMES[kind]}"
    return None


def _is_bool(defined: dict[str, Flag], name: str) -> bool:
    return name in defined and defined[name].kind == "bool"


def _is_config(defined: dict[str, Flag], name: str) -> bool:
    return name in defined and defined[name].kind == "config"


@dataclass
class ReadFlags:
    """A command's flags as read: problems found, config files named, overrides given."""

    problems: list[str] = field(default_factory=list)
    specs: dict[str, str] = field(default_factory=dict)  # config flag -> FILE[:ARG]
    overrides: list[tuple[str, str, str | None]] = field(default_factory=list)  # flag, key, value


def check_flags(words: list[str], defined: dict[str, Flag], owner: str) -> list[str]:
    """Problems of the flags and arguments after a command's name: unknown flags, values that
    do not parse, unknown config keys and missing repository paths."""
    read = _read_flags(words, defined, owner)
    for base, key, value in read.overrides:
        spec = read.specs.get(base, "")
        path, _, arg = spec.partition(":")
        named = path.split("/")[0] in REPO_DIRS and not placeholder(spec)
        if not named or config_spec_problem(path, arg or None):  # the latter reported apart
            spec = defined[base].config  # no loadable repository config named: the flag's own
        if problem := key_problem(spec, base, key, value):
            read.problems.append(f"{_override(base, key, value)}: {problem}")
    return read.problems


def _read_flags(words: list[str], defined: dict[str, Flag], owner: str) -> ReadFlags:
    read, templates, index = ReadFlags(), _templates(words), 0
    while index < len(words):
        word, position = words[index].strip("[]"), index
        index += 1
        if not word.startswith("--"):
            read.problems += path_problems(word)
            continue
        name, equals, value = word[2:].partition("=")
        value = value if equals else None
        follows = index < len(words) and not words[index].startswith("--")
        if "." in name:  # --NAME.key[=value], --noNAME.key
            base, _, key = name.partition(".")
            negated = not _is_config(defined, base) and _is_config(defined, base[2:])
            base = base[2:] if negated else base
            if not _is_config(defined, base):
                read.problems.append(f"--{name}: {owner} defines no config flag --{base}")
                continue
            if value is None and not negated and follows:
                value, index = words[index].strip("[]"), index + 1
            if position not in templates:
                read.overrides.append((base, key, value))
        elif name not in defined:
            if not (name.startswith("no") and _is_bool(defined, name[2:])):
                close = difflib.get_close_matches(name, sorted(defined), n=1)
                hint = f"; did you mean --{close[0]}?" if close else ""
                read.problems.append(f"--{name}: {owner} defines no such flag{hint}")
            continue
        else:
            if value is None and not _is_bool(defined, name) and index < len(words):
                value, index = words[index].strip("[]"), index + 1
            if value is not None and _is_config(defined, name):
                read.specs[name] = value
            elif value is not None and (problem := _flag_value_problem(name, defined[name], value)):
                read.problems.append(problem)
        read.problems += path_problems(value) if value is not None else []
    return read


def check_launch(words: list[str]) -> list[str]:
    """Problems of ``[VAR=value ...] [bash] launch/X.sh ...``."""
    problems = []
    start = next(i for i, w in enumerate(words) if LAUNCH_TOKEN.fullmatch(w))
    name = LAUNCH_TOKEN.fullmatch(words[start])[2]
    if not (LAUNCH / name).is_file():
        return [f"no script launch/{name}"]
    script = launcher(name)
    for word in words[:start]:
        variable = word.split("=")[0]
        if variable != "bash" and variable not in script.env:
            problems.append(f"{variable}=: launch/{name} reads no variable {variable}")
    rest = words[start + 1 :]
    subcommand = None
    if script.subcommands and rest:
        subcommand, rest = rest[0].strip("[]"), rest[1:]
        if placeholder(subcommand):
            return problems
        if subcommand not in script.subcommands:
            close = difflib.get_close_matches(subcommand, sorted(script.subcommands), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            return [*problems, f"launch/{name} has no subcommand {subcommand!r}{hint}"]
    while rest and rest[0].strip("[]").startswith("-"):
        option, equals, _ = rest.pop(0).strip("[]").partition("=")
        if option not in script.options:
            problems.append(f"{option}: launch/{name} has no such option")
            continue
        takes_value, only_for = script.options[option]
        if only_for and subcommand != only_for:
            problems.append(f"{option}: launch/{name} takes it for {only_for} only")
        if takes_value and not equals and rest:
            rest.pop(0)
    if script.module is None:
        return problems
    if subcommand is not None and subcommand != script.config_subcommand:
        unexpected = [w for w in rest if not placeholder(w)]
        if unexpected:
            problems.append(f"launch/{name} {subcommand} takes no arguments: {unexpected}")
        return problems
    if not rest:
        return problems
    config, passed = rest[0], rest[script.positionals :]
    problems += [p for w in rest[1 : script.positionals] for p in path_problems(w)]
    owner = f"guided_jax/{script.module}.py (launch/{name} passes them on)"
    return problems + check_flags(["--config", config, *passed], _launched(script.module), owner)


def _launched(module: str) -> dict[str, Flag]:
    defined = module_flags(module)
    assert defined is not None, f"a launch script runs guided_jax.{module}, no command module"
    return defined


def check_command(words: list[str]) -> list[str]:
    """Problems of one documented command (its shell words)."""
    if len(words) == 1 and " " in words[0]:
        return ["does not parse as a shell command (an unclosed quote?)"]
    if _launch_word(words) is not None:
        return check_launch(words)
    if words[1] == "-m":
        module = re.match(r"guided_jax\.(\w+)", words[2])[1]
        if placeholder(module):
            return []
        defined = module_flags(module)
        if defined is None:
            return [f"no command module guided_jax/{module}.py (with a __main__ block)"]
        return check_flags(words[3:], defined, f"guided_jax/{module}.py")
    path = words[1].removeprefix("./")
    if not (REPO / path).is_file():
        return [f"no script {path}"]
    return check_flags(words[2:], script_flags(REPO / path), path)


def check_loose_overrides(snippet: Snippet) -> list[str]:
    """``--config.a.b=value`` shown on its own: a key of a config it may be meant for."""
    try:
        words = _words(snippet.text)
    except ValueError:
        return []
    problems = []
    for word in words:
        name, equals, value = word.removeprefix("--").partition("=")
        base, _, key = name.partition(".")
        if not word.startswith("--") or base not in LOOSE_CONFIGS or not key:
            continue
        value = value if equals else None
        found = [key_problem(spec, base, key, value) for spec in LOOSE_CONFIGS[base]]
        if all(found):
            problems.append(f"{_override(base, key, value)}: {'; '.join(found)}")
    return problems


def exported_problems(snippet: Snippet) -> list[str]:
    """``export NAME=value ...`` shown for the launchers: every NAME is a setting one of them
    reads (in launch/X.sh, one X.sh reads)."""
    own = LAUNCH_TOKEN.fullmatch(snippet.file)
    runnable = [p.name for p in sorted(LAUNCH.glob("*.sh")) if p.read_text().startswith("#!")]
    scripts = [own[2]] if own else runnable
    settings = set().union(*(launcher(name).env for name in scripts))
    names = [w.split("=")[0] for w in _words(snippet.text)[1:] if ENV_ASSIGNMENT.match(w)]
    where = " or ".join(f"launch/{name}" for name in scripts)
    return [f"export {n}=: {where} reads no variable {n}" for n in names if n not in settings]


def snippet_problems(snippets: list[Snippet]) -> tuple[list[str], int]:
    """Every problem of the snippets' commands, config names and loose overrides, and how many
    commands they hold."""
    problems, count = [], 0
    for snippet in snippets:
        where = f"{snippet.file}:{snippet.line}"
        commands = commands_in(snippet)
        count += len(commands)
        for words in commands:
            shown = shlex.join(words)
            shown = shown if len(shown) <= 90 else shown[:87] + "..."
            problems += [f"{where}: {shown}: {p}" for p in check_command(words)]
        if snippet.span and snippet.text.startswith("--"):
            problems += [f"{where}: {p}" for p in check_loose_overrides(snippet)]
        if snippet.text.strip().startswith("export "):
            problems += [f"{where}: {p}" for p in exported_problems(snippet)]
        if not snippet.file.endswith(".md") and not snippet.span:  # Markdown: scanned whole
            problems += [f"{where}: {p}" for p in _config_spec_problems(snippet.text)]
    return problems, count


def _config_spec_problems(text: str) -> list[str]:
    return [
        problem
        for match in CONFIG_SPEC.finditer(text)
        if not (match[2] and placeholder(match[2]))  # configs/reference.py:PRESET
        if (problem := config_spec_problem(match[1], match[2]))
    ]


def markdown_problems(text: str, file: str) -> tuple[list[str], int]:
    """The problems of a Markdown text: its commands, and every config it names anywhere."""
    problems, count = snippet_problems(markdown_snippets(text, file))
    for number, line in enumerate(text.splitlines(), 1):
        problems += [f"{file}:{number}: {p}" for p in _config_spec_problems(line)]
    return problems, count


def document_problems(path: Path) -> tuple[list[str], int]:
    if path.suffix == ".md":
        return markdown_problems(path.read_text(), str(path.relative_to(REPO)))
    return snippet_problems(document_snippets(path))


# --- the tests ----------------------------------------------------------------------------------


def test_every_documented_command_runs_as_written():
    problems = []
    for path in documents():
        problems += document_problems(path)[0]
    assert problems == [], "\n".join(problems)


# At least this many commands per file, so that the scan cannot pass by finding nothing.
# docs/DESIGN.md shows no command; it is scanned all the same.
MINIMUM_COMMANDS = {
    "README.md": 40,
    "docs/REPRODUCING.md": 4,
    "docs/TPU.md": 1,
    "configs/benchmark.py": 3,
    "configs/default.py": 1,
    "configs/finetune.py": 2,
    "configs/reference.py": 3,
    "configs/tiny.py": 1,
    "launch/ag_vs_baseline.sh": 2,
    "launch/slurm.sh": 3,
    "launch/tpu_vm.sh": 12,
}


def test_the_scan_finds_the_commands_of_every_file():
    found = {str(p.relative_to(REPO)): document_problems(p)[1] for p in documents()}
    assert "docs/DESIGN.md" in found
    short = {f: (found.get(f), least) for f, least in MINIMUM_COMMANDS.items()}
    assert all(n is not None and n >= least for n, least in short.values()), short


def test_the_repository_directories_exist():
    assert all((REPO / d).is_dir() for d in REPO_DIRS), REPO_DIRS


SNIPPET = """\
# Demo

```bash
python -m guided_jax.main --config configs/default.py --work_dir runs/a
python -m guided_jax.main --config configs/default.py --workdir runs/b \\
    --config.train.stepz=10
python -m guided_jax.main --config configs/reference.py:roberta_99 --workdir runs/c
python -m guided_jax.lower --config configs/tiny.py --platform tpu \\
    --config.data.train_files=tests/fixtures/no_such_corpus.txt
```
"""


def test_the_check_finds_a_renamed_flag_a_bad_key_a_bad_preset_and_a_missing_file():
    problems, count = markdown_problems(SNIPPET, "README.md")
    assert count == 4
    assert len(problems) == 4, "\n".join(problems)
    for culprit in ("--work_dir", "train.stepz", "roberta_99", "no_such_corpus.txt"):
        assert sum(culprit in p for p in problems) == 1, (culprit, problems)
    assert all(p.startswith("README.md:") for p in problems)


GOOD = """\
```bash
python -m guided_jax.benchmark --config configs/benchmark.py:tiny --nohf --steps 1 \\
    --results benchmarks/RESULTS.md   # a comment's 'quote
NODES=2 bash launch/slurm.sh --nodes 4 configs/reference.py:roberta_12 /shared/r \\
    --config.mesh.fsdp=8
bash launch/tpu_vm.sh train --detach --zone z configs/tiny.py --config.model.dtype=bfloat16
python -m guided_jax.reproduce --config CONFIG --finetune_config=configs/finetune.py \\
    --finetune_config.epochs=1 --config.train.steps=5
python -m guided_jax.hf_interop --workdir runs/a --out x [--step 200]
python -m guided_jax.lower --config my_config.py --topology "$T" [--config.key=value ...]
python benchmarks/tpu_fit.py --max_batch 4 --no_compile
```
`python -m guided_jax.NAME`, `--config.learning_rates=1e-4`, `launch/tpu_vm.sh
stop`, `configs/finetune.py:reference`, `configs/reference.py:PRESET`, `--config.KEY=VALUE`
"""


def test_the_right_forms_pass():
    problems, count = markdown_problems(GOOD, "README.md")
    assert problems == [], "\n".join(problems)
    assert count == 9


@pytest.mark.parametrize(
    ("line", "culprit"),
    [
        ("python -m guided_jax.trainer --config configs/default.py", "guided_jax/trainer.py"),
        ("python -m guided_jax.main --config configs/nothing.py", "configs/nothing.py"),
        ("python -m guided_jax.main --config configs/default.py --distributed=maybe", "maybe"),
        ("python -m guided_jax.lower --config configs/tiny.py --platform gpu", "gpu"),
        ("python -m guided_jax.anaphora --count many", "--count=many"),
        ("python -m guided_jax.main --config configs/tiny.py --config.train.steps=1.5", "1.5"),
        ("python -m guided_jax.main --config configs/tiny.py --config.data.train=x", "has no key"),
        ("python -m guided_jax.main --nodistributed --noworkdir", "--noworkdir"),
        ("python -m guided_jax.finetune --config CONFIG --config.train.steps=1", "finetune.py"),
        ("python -m guided_jax.reproduce --finetune_config.epoch=1", "finetune_config.epoch"),
        ("python benchmarks/tpu_fit.py --max-batch 4", "--max-batch"),
        ("python benchmarks/no_such.py", "benchmarks/no_such.py"),
        ("bash launch/tpu_vm.sh start", "'start'"),
        ("bash launch/tpu_vm.sh create --detach", "--detach"),
        ("bash launch/tpu_vm.sh train --nodetach configs/tiny.py", "--nodetach"),
        ("bash launch/tpu_vm.sh logs runs/x", "takes no arguments"),
        ("bash launch/tpu_vm.sh train configs/tiny.py --config.train.stepz=1", "train.stepz"),
        ("NODE=2 bash launch/slurm.sh configs/tiny.py runs/x", "NODE"),
        ("bash launch/slurm.sh configs/tiny.py runs/x --workdri y", "--workdri"),
        ("bash launch/ag_vs_baseline.sh configs/tiny.py:x runs/x", "configs/tiny.py:x"),
        ("bash launch/no_such.sh", "launch/no_such.sh"),
        ('python -m guided_jax.visualize --text "unclosed', "does not parse"),
        ("python -m guided_jax.main --config configs/tiny.py --workdir docs/gone/", "docs/gone"),
    ],
)
def test_each_kind_of_stale_command_is_one_problem(line, culprit):
    problems, count = markdown_problems(f"```bash\n{line}\n```\n", "README.md")
    assert count == 1
    assert len(problems) == 1 and culprit in problems[0], problems


def test_what_is_named_outside_a_command():
    """Overrides and configs named on their own, and the variables exported for a launcher."""
    text = (
        "`--config.train.stepz=9`, `--config.seeds=1,2`, `configs/benchmark.py:gpu`\n\n"
        "```bash\nexport TPU_NAME=a ZONES=b   # the TPU VM's settings\n```\n"
    )
    problems, count = markdown_problems(text, "docs/X.md")
    assert count == 0
    assert len(problems) == 3, problems
    for problem, culprit in zip(
        problems, ("ZONES", "train.stepz", "benchmark.py:gpu"), strict=True
    ):
        assert culprit in problem, problems
    header = "#   export TPU_NAME=ag ACCELERATOR_TYPE=v5e-64 BUCKETS=b\n"
    problems = snippet_problems(shell_snippets(header, "launch/tpu_vm.sh"))[0]
    assert len(problems) == 1 and "launch/tpu_vm.sh reads no variable BUCKETS" in problems[0]


def test_overrides_of_a_config_that_does_not_load_are_held_to_the_flags_own():
    line = "python -m guided_jax.finetune --config configs/finetun.py --config.epoch=1"
    problems, _ = markdown_problems(f"```bash\n{line}\n```\n", "README.md")
    assert len(problems) == 2, problems
    assert "no config file configs/finetun.py" in problems[1]
    assert "configs/finetune.py has no key epoch; did you mean --config.epochs?" in problems[0]
