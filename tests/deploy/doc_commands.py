"""Read the shell commands out of a Markdown document and list what in them does not exist.

A command in `docs/deploy.md` is checked against the repository without running anything but
`--help`: files it names are present, repo scripts it calls accept the flags and variables shown,
`docker`/`podman build` use targets, build arguments and contexts the Dockerfile has, `tiue`
subcommands after an image parse, `docker compose` profiles exist, and `apt-get install` is
non-interactive. Kept apart from the test so it runs the same way on deliberately broken copies.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import yaml

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# Options whose value is a file or folder of the repository (or of the command's output, see below).
PATH_OPTIONS = {"-r", "--requirement", "-f", "--file", "-k", "--kustomize", "--from-file", "--env-file"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
PREFIXES = {"sudo", "time", "env", "exec", "bash", "sh"}


def code_blocks(markdown: str) -> Iterator[tuple[int, str]]:
    """(first line number, body) of every fenced block whose language is a shell."""
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^(\s*)(```+|~~~+)\s*(\S*)", lines[index])
        if not match:
            index += 1
            continue
        fence, language, start = match.group(2), match.group(3).lower(), index + 1
        index += 1
        body: list[str] = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        index += 1
        if language in SHELL_LANGUAGES:
            yield start + 1, "\n".join(body)


def commands(block: str) -> Iterator[list[str]]:
    """Each simple command of a block as words: continuations joined, comments dropped, split at && ; |."""
    text = re.sub(r"\\\n", " ", block)
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for word in lexer:
            if word in SEPARATORS:
                if words:
                    yield words
                words = []
            else:
                words.append(word)
        if words:
            yield words


def strip_prefixes(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value assignments and sudo/env/bash wrappers removed: (variables, the command)."""
    variables: dict[str, str] = {}
    rest = list(words)
    while rest:
        head = rest[0]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", head):
            name, _, value = head.partition("=")
            variables[name] = value
        elif head in PREFIXES or (head.startswith("-") and words[0] == "sudo" and len(words) > 1):
            pass  # sudo -E and the like
        else:
            break
        rest.pop(0)
    return variables, rest


class Checker:
    """Checks commands against one repository checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top_level = {path.name for path in root.iterdir()} - {".git", ".venv", "venv"}

    # ------------------------------------------------------------------ helpers
    def repo_path(self, word: str) -> str | None:
        """The word as a repository-relative path when it looks like one of ours, else None."""
        word = word.removeprefix("./")
        if not re.fullmatch(r"[\w.-]+(/[\w.*-]+)*/?", word) or "://" in word:
            return None
        return word if word.split("/", 1)[0] in self.top_level else None

    def exists(self, relative: str) -> bool:
        return (
            any(self.root.glob(relative.rstrip("/"))) if "*" in relative else (self.root / relative).exists()
        )

    @cache  # noqa: B019 - one checker per test session
    def help_text(self, script: str) -> tuple[int, str]:
        result = subprocess.run(
            ["bash", str(self.root / script), "--help"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.returncode, result.stdout

    @cache  # noqa: B019
    def dockerfile(self) -> tuple[set[str], set[str]]:
        """(stage names, ARG names) of the Dockerfile."""
        text = (self.root / "Dockerfile").read_text()
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
        args = set(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.M))
        return stages, args

    # ------------------------------------------------------------------ checks
    def check(self, words: list[str], made: set[str]) -> list[str]:
        """What is wrong with one command; `made` holds paths that earlier commands create."""
        variables, command = strip_prefixes(words)
        problems: list[str] = []
        if not command:
            return problems
        program = command[0].removeprefix("./")
        # kubectl's KIND/NAME (deploy/tiue-serve) are objects, not files: only its -k/-f values are
        problems += self.check_paths(command, made, positional=program != "kubectl")
        if self.repo_path(program) and program.endswith((".sh", ".py")):
            problems += self.check_script(program, command[1:], variables)
        elif program in {"docker", "podman"} and len(command) > 1:
            problems += self.check_container_tool(command[1:])
        elif program == "apt-get" and "install" in command and not {"-y", "--yes", "-qy"} & set(command):
            problems.append("apt-get install without -y stops to ask (not copy-pasteable)")
        elif program == "tiue":
            problems += self.check_tiue(command[1:])
        return problems

    def check_paths(self, command: list[str], made: set[str], positional: bool = True) -> list[str]:
        problems = []
        for position, word in enumerate(command):
            previous = command[position - 1] if position else ""
            option, _, value = word.partition("=") if word.startswith("-") else ("", "", word)
            candidates = [value]
            if previous in PATH_OPTIONS or option in PATH_OPTIONS:
                # an option that takes a file: it must exist, ours or made by an earlier command
                name = value.removeprefix("./").rstrip("/")
                if (
                    value
                    and not value.startswith(("/", "$", "-"))
                    and name not in made
                    and not self.exists(name)
                ):
                    problems.append(f"{word!r}: no {name} in the repository")
                continue
            if not positional:
                continue
            if "=" in value:
                candidates.append(value.split("=", 1)[1])
            for candidate in candidates:
                relative = self.repo_path(candidate)
                if relative and not self.exists(relative):
                    problems.append(f"{candidate!r}: not in the repository")
        return problems

    def check_script(self, script: str, arguments: list[str], variables: dict[str, str]) -> list[str]:
        path = self.root / script
        if not path.is_file():
            return [f"{script}: no such script"]
        if script.endswith(".sh"):
            if not path.stat().st_mode & 0o111:
                return [f"{script}: not executable"]
            code, usage = self.help_text(script)
            if code != 0:
                return [f"{script} --help exits {code}"]
            problems = [
                f"{script}: {name} is not among its documented settings"
                for name in variables
                if not re.search(rf"\b{name}\b", usage)
            ]
            # The script parses its arguments in order and stops at --help: 0 means it accepts them all.
            result = subprocess.run(
                ["bash", str(path), *arguments, "--help"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if result.returncode != 0:
                problems.append(f"{script} rejects {' '.join(arguments)}: {result.stderr.strip()}")
            return problems
        return []

    def check_container_tool(self, arguments: list[str]) -> list[str]:
        problems: list[str] = []
        while arguments and arguments[0].startswith("-"):  # global options: podman --runtime runc build
            arguments = arguments[1:] if "=" in arguments[0] else arguments[2:]
        if not arguments:
            return problems
        if arguments[0] == "compose":
            return self.check_compose(arguments[1:])
        if arguments[0] in {"build", "buildx"}:
            stages, build_args = self.dockerfile()
            pairs = zip(arguments, arguments[1:] + [""], strict=True)
            for option, value in pairs:
                if option == "--target" and value not in stages:
                    problems.append(f"--target {value}: no such stage in the Dockerfile")
                elif option == "--build-arg" and value.split("=", 1)[0] not in build_args:
                    problems.append(
                        f"--build-arg {value}: the Dockerfile has no ARG {value.split('=', 1)[0]}"
                    )
                elif option == "--build-context" and value.split("=", 1)[0] not in stages:
                    problems.append(f"--build-context {value}: the Dockerfile has no stage to replace")
        elif arguments[0] == "run":
            image = next((i for i, word in enumerate(arguments) if word.startswith("tiue-serve:")), None)
            if image is not None and arguments[image + 1 :]:
                problems += self.check_tiue(arguments[image + 1 :])
        return problems

    def check_tiue(self, arguments: list[str]) -> list[str]:
        from service.cli import build_parser

        try:
            build_parser().parse_args(arguments)
        except SystemExit as exc:
            if exc.code:
                return [f"tiue {' '.join(arguments)}: the CLI rejects it"]
        return []

    def check_compose(self, arguments: list[str]) -> list[str]:
        compose = yaml.safe_load((self.root / "docker-compose.yml").read_text())
        services = compose.get("services", {})
        profiles = {profile for service in services.values() for profile in service.get("profiles", [])}
        problems = []
        for option, value in zip(arguments, arguments[1:] + [""], strict=True):
            if option == "--profile" and value not in profiles:
                problems.append(f"docker compose --profile {value}: no service has that profile")
        if "up" in arguments:
            named = [word for word in arguments[arguments.index("up") + 1 :] if not word.startswith("-")]
            problems += [
                f"docker compose up {name}: no such service" for name in named if name not in services
            ]
        return problems

    def problems(self, markdown: str) -> list[str]:
        """Every problem of every shell block, as 'line N: `command`: what is wrong'."""
        found = []
        for line, block in code_blocks(markdown):
            made: set[str] = set()
            for words in commands(block):
                for problem in self.check(words, made):
                    found.append(f"block at line {line}: `{shlex.join(words)}`: {problem}")
                made |= outputs(words)
        return found


def outputs(words: list[str]) -> set[str]:
    """Paths a command creates that later commands of its block may name (a download folder, a file)."""
    made = set()
    for option, value in zip(words, words[1:] + [""], strict=True):
        if option in {"-d", "--dest", "-o", "--output"}:
            made.add(value.removeprefix("./").rstrip("/"))
    program = next((word for word in words if not re.match(r"^[A-Z_]+=|^sudo$", word)), "")
    if program.endswith("download_wheels.sh"):
        made |= {
            word.removeprefix("./").rstrip("/")
            for word in words[words.index(program) + 1 :]
            if not word.startswith("-")
        }
    return made
