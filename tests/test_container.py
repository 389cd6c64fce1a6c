"""The container files say what they mean: Dockerfile, .dockerignore, docker-compose.yml.

No Docker engine is needed: the Dockerfile is read by a small instruction parser
(continuation lines, exec-form JSON arrays, flags, stages), docker-compose.yml by a
strict parser for the YAML subset it is written in (block mappings and lists, quoted
and plain scalars, JSON-style flow lists; anything else is refused rather than misread),
and the environment both give Herald is run through the real settings loader.
"""

from __future__ import annotations

import ast
import dataclasses
import http.server
import json
import posixpath
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from server.process.supervisor import STOP_GRACE
from server.settings import NON_SETTING_VARIABLES, SECTIONS, Settings, build_settings

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_PYTHON_SLIM = re.compile(r"^(?:docker\.io/)?(?:library/)?python:3\.\d+(?:\.\d+)?-slim(?:-[a-z]+)?$")
RUNTIME_CODE = ("run.py", "server", "handlers", "middlewares")
SERVER_PORT = 8080
TESTS_MARKER = "# tests"  # the line of requirements.txt after which the test-only packages are listed


# --- Dockerfile -------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        return exec_form(self.args)

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """Leading --name=value flags (COPY --from=, HEALTHCHECK --interval=, ...) and what follows."""
        flags: dict[str, str] = {}
        rest = self.args.strip()
        while m := re.match(r"--([\w-]+)(?:=(\S*))?\s*", rest):
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]
        return flags, rest


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            tokens = shlex.split(instruction.args)
            if tokens and "=" not in tokens[0]:  # legacy form: ENV KEY the rest
                values[tokens[0]] = instruction.args.strip()[len(tokens[0]) :].strip()
                continue
            for token in tokens:
                key, sep, value = token.partition("=")
                assert sep, f"line {instruction.line}: ENV {token!r} is not KEY=VALUE"
                values[key] = value
        return values

    def workdir_at(self, instruction: Instruction) -> str:
        """The working directory in effect at an instruction (WORKDIR is cumulative)."""
        workdir = "/"
        for i in self.instructions:
            if i is instruction:
                break
            if i.keyword == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, i.args.strip()))
        return workdir

    def copies(self) -> Iterator[tuple[Instruction, dict[str, str], list[str], str]]:
        """(instruction, flags, sources, absolute destination) for every COPY/ADD."""
        for instruction in self.instructions:
            if instruction.keyword not in ("COPY", "ADD"):
                continue
            flags, rest = instruction.flags_and_rest()
            parts = exec_form(rest) or shlex.split(rest)
            *sources, dest = parts
            yield instruction, flags, sources, posixpath.normpath(posixpath.join(self.workdir_at(instruction), dest))


def exec_form(args: str) -> list[str] | None:
    text = args.strip()
    if not text.startswith("["):
        return None
    value = json.loads(text)
    assert isinstance(value, list), f"{text!r} is not a JSON array"
    assert all(isinstance(v, str) for v in value), f"{text!r} must hold only strings"
    return value


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage; comments dropped, continuation lines joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) are dropped, even inside a continuation
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        keyword, _, args = " ".join(p.strip() for p in pending if p.strip()).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continuation line"
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            _, rest = instruction.flags_and_rest()
            words = rest.split()
            assert len(words) in (1, 3), f"line {instruction.line}: FROM {rest!r}"
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def build(stages: list[Stage], runtime: Stage) -> Stage:
    """The stage the runtime copies its virtualenv from."""
    sources = {flags["from"] for _, flags, _, _ in runtime.copies() if "from" in flags}
    assert len(sources) == 1, f"the runtime stage must copy from exactly one build stage, not {sources}"
    (name,) = sources
    matching = [s for s in stages[:-1] if s.name == name]
    assert matching, f"COPY --from={name} names no earlier stage"
    return matching[0]


def _final_workdir(stage: Stage) -> str:
    assert stage.all("WORKDIR"), "the stage sets no WORKDIR"
    path = "/"
    for i in stage.all("WORKDIR"):
        path = posixpath.normpath(posixpath.join(path, i.args.strip()))
    return path


def runtime_user(stage: Stage) -> str:
    user = stage.last("USER")
    assert user is not None, "the runtime stage has no USER: it would run as root"
    return user.args.strip().split(":")[0]


def readme_run_command() -> list[str]:
    """The server part of the README's first command: `... && .venv/bin/python run.py`."""
    first = re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)[0]
    return shlex.split(first.split("&&")[-1].strip())


def test_the_dockerfile_parser_joins_continuations_and_reads_exec_form():
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim AS build\n"
        "RUN a \\\n"
        "# a comment inside the continuation\n"
        "    && b\n"
        "FROM python:3.11-slim\n"
        "ENV A=1 \\\n"
        '    B="two words"\n'
        'CMD ["x", \\\n'
        '     "y z"]\n'
    )
    assert [(s.image, s.name) for s in stages] == [("python:3.11-slim", "build"), ("python:3.11-slim", None)]
    assert stages[0].instructions[0].args == "a && b"
    assert stages[1].env() == {"A": "1", "B": "two words"}
    assert stages[1].instructions[-1].exec_form() == ["x", "y z"]


def test_every_stage_is_an_official_python_slim_image_pinned_by_tag(stages: list[Stage]):
    assert len(stages) >= 2, "a build stage and a runtime stage"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image in names:
            continue  # FROM an earlier stage
        assert OFFICIAL_PYTHON_SLIM.match(stage.image), f"{stage.image} is not an official python:X.Y-slim image"
    # The venv is copied between stages: its interpreter links only hold on the same image.
    assert len({s.image for s in stages}) == 1


def test_dependencies_are_installed_from_requirements_txt_into_the_copied_venv(build: Stage, runtime: Stage):
    copied_venvs = [(sources, dest) for _, flags, sources, dest in runtime.copies() if "from" in flags]
    assert len(copied_venvs) == 1
    (venv_source,), venv_dest = copied_venvs[0]
    build_dir = _final_workdir(build)
    venv_source = posixpath.normpath(posixpath.join(build_dir, venv_source))
    assert venv_source == venv_dest == posixpath.join(_final_workdir(runtime), ".venv"), (
        "the venv lives at WORKDIR/.venv in both stages, where the README's .venv/bin/python expects it"
    )
    requirements_copied = [
        i for i, flags, sources, _ in build.copies() if "from" not in flags and "requirements.txt" in sources
    ]
    assert requirements_copied, "requirements.txt is not copied into the build stage"
    commands = " && ".join(i.args for i in build.all("RUN"))
    assert re.search(rf"python3? -m venv {re.escape(venv_source)}(\s|$)", commands)
    pip = re.search(r"(\S+)/bin/pip install -r requirements\.txt", commands)
    assert pip, "no `<venv>/bin/pip install -r requirements.txt` in the build stage"
    assert posixpath.normpath(posixpath.join(build_dir, pip.group(1))) == venv_source
    first_install = next(i for i in build.all("RUN") if "pip install -r requirements.txt" in i.args)
    assert requirements_copied[0].line < first_install.line


def test_test_only_packages_are_dropped_and_nothing_at_runtime_imports_them(build: Stage):
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert TESTS_MARKER in [line.strip() for line in lines], f"requirements.txt lost its {TESTS_MARKER!r} line"
    commands = " && ".join(i.args for i in build.all("RUN"))
    assert f"/^{TESTS_MARKER}/,$p" in commands
    assert "pip uninstall -y -r" in commands
    test_only = lines[[line.strip() for line in lines].index(TESTS_MARKER) + 1 :]
    modules = {re.split(r"[=<>!~\[; ]", line.strip())[0].lower().replace("-", "_") for line in test_only}
    modules.discard("")
    modules = {m for m in modules if not m.startswith("#")}
    assert {"pytest", "playwright"} <= modules
    modules |= {"tests", "bench"}  # .dockerignore leaves both out of the image
    for path in runtime_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in modules, f"{path.relative_to(ROOT)} imports {name}, not in the image"


def runtime_sources() -> list[Path]:
    files = []
    for name in RUNTIME_CODE:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    assert len(files) > 10
    return files


def test_the_runtime_stage_runs_as_a_non_root_user(runtime: Stage):
    user = runtime_user(runtime)
    assert user not in ("root", "0", ""), f"USER {user} is root"
    assert runtime.instructions.index(runtime.last("USER")) < runtime.instructions.index(runtime.last("CMD"))
    creates = " ".join(i.args for i in runtime.all("RUN"))
    if user.isdigit():
        assert re.search(rf"useradd\b.*--uid {user}\b", creates), f"uid {user} is not created in the image"
    else:
        assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", creates), f"user {user} is not created in the image"


def test_var_is_writable_by_that_user(runtime: Stage):
    """The static build, generated secrets (and an embedded database) are written under var/."""
    user = runtime_user(runtime)
    base = _final_workdir(runtime)
    defaults = Settings()
    needed = [defaults.server.static_build_dir, defaults.auth.secrets_dir, defaults.database.data_dir]
    owned = []
    for instruction in runtime.all("RUN"):
        for owner, target in re.findall(r"chown (?:-R )?(\S+) (\S+)", instruction.args):
            if owner.split(":")[0] == user:
                owned.append(posixpath.normpath(posixpath.join(runtime.workdir_at(instruction), target)))
    for path in needed:
        absolute = posixpath.normpath(posixpath.join(base, path))
        assert any(absolute == d or absolute.startswith(d + "/") for d in owned), f"{absolute} is not the user's"


def test_the_runtime_listens_on_every_interface_on_8080_and_stops_on_sigterm(runtime: Stage):
    env = runtime.env()
    assert env.get("HERALD_SERVER_HOST") == "0.0.0.0"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert "HERALD_SERVER_WORKERS" not in env, 'workers stay "auto": one per core the container may use'
    exposed = {port.split("/")[0] for i in runtime.all("EXPOSE") for port in i.args.split()}
    assert exposed == {str(SERVER_PORT)}
    assert env.get("HERALD_SERVER_PORT", str(Settings().server.port)) == str(SERVER_PORT)
    stop = runtime.last("STOPSIGNAL")
    assert stop is not None
    assert stop.args.strip() == "SIGTERM"


def test_cmd_is_the_readmes_run_command_in_exec_form(runtime: Stage):
    cmd = runtime.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    assert argv is not None, "CMD must be in exec form, so the server is PID 1 and gets SIGTERM"
    program, *args = readme_run_command()
    assert posixpath.basename(argv[0]) == posixpath.basename(program) == "python"
    assert argv[1:] == args == ["run.py"]
    base = _final_workdir(runtime)
    assert posixpath.normpath(posixpath.join(base, argv[0])) == posixpath.normpath(posixpath.join(base, program))
    assert runtime.last("ENTRYPOINT") is None
    code_copied = [dest for _, flags, sources, dest in runtime.copies() if "from" not in flags and sources == ["."]]
    assert code_copied == [base], "the code (run.py) is copied into WORKDIR"


def test_healthcheck_asks_healthz_with_the_venvs_python(runtime: Stage):
    check = runtime.last("HEALTHCHECK")
    assert check is not None
    flags, rest = check.flags_and_rest()
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    word, _, command = rest.partition(" ")
    assert word.upper() == "CMD"
    argv = exec_form(command)
    assert argv is not None, "HEALTHCHECK CMD in exec form"
    assert posixpath.normpath(posixpath.join(_final_workdir(runtime), argv[0])).endswith("/.venv/bin/python")
    assert "/healthz" in argv[-1]
    assert_healthcheck_works(argv, {"HERALD_SERVER_PORT": "{port}"})


# --- .dockerignore ----------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a matching directory takes its contents."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def test_dockerignore_keeps_local_state_out_and_what_runs_in():
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", "var", "var/static", "tests/artifacts", "bench/results", ".pytest_cache", ".env"):
        assert ignored(path, patterns), f"{path} would be sent to the build"
    assert ignored("server/__pycache__/app.cpython-311.pyc", patterns)
    for path in ("run.py", "settings.toml", "requirements.txt", "static", "server/storage/migrations", "handlers"):
        assert (ROOT / path).exists()
        assert not ignored(path, patterns), f"{path} is needed in the image"
    for path in runtime_sources():
        assert not ignored(str(path.relative_to(ROOT)), patterns)
    for path in (ROOT / "static").iterdir():
        assert not ignored(f"static/{path.name}", patterns)


# --- docker-compose.yml -----------------------------------------------------------------


class UnsupportedYaml(ValueError):
    pass


def parse_yaml_subset(text: str) -> Any:
    """Block mappings and lists of scalars; quoted/plain scalars (kept as strings); JSON-style
    flow lists. Anchors, aliases, tags, block scalars, flow mappings: refused, not misread."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        content = raw.strip()
        if not content or content.startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if raw[indent:].startswith("\t"):
            raise UnsupportedYaml(f"line {number}: tab indentation")
        lines.append((indent, content, number))
    if not lines:
        return None
    value, end = _yaml_block(lines, 0, lines[0][0])
    if end != len(lines):
        raise UnsupportedYaml(f"line {lines[end][2]}: unexpected indentation")
    return value


def _yaml_block(lines: list[tuple[int, str, int]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1] == "-" or lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1] == "-" or lines[i][1].startswith("- ")):
            item = lines[i][1][1:].strip()
            if not item or re.match(r"^[\w.-]+:(\s|$)", item):
                raise UnsupportedYaml(f"line {lines[i][2]}: only scalars in lists")
            items.append(_yaml_scalar(item, lines[i][2]))
            i += 1
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        _, content, number = lines[i]
        m = re.match(r"^([\w.-]+):(?:\s+(.*))?$", content)
        if not m:
            raise UnsupportedYaml(f"line {number}: {content!r} is not `key: value`")
        key, rest = m.group(1), m.group(2)
        if key in mapping:
            raise UnsupportedYaml(f"line {number}: duplicate key {key}")
        i += 1
        if rest is not None and not rest.startswith("#"):
            mapping[key] = _yaml_scalar(rest, number)
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("- "))):
            mapping[key], i = _yaml_block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    return mapping, i


def _yaml_scalar(text: str, number: int) -> Any:
    if text[0] in "&*!|>{%@`":
        raise UnsupportedYaml(f"line {number}: {text!r} is outside the supported subset")
    if text[0] == "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise UnsupportedYaml(f"line {number}: flow lists must be JSON arrays of strings") from None
        if not all(isinstance(v, str) for v in value):
            raise UnsupportedYaml(f"line {number}: flow lists must be JSON arrays of strings")
        return value
    if text[0] == '"':
        m = re.match(r'^"((?:[^"\\]|\\.)*)"\s*(?:#.*)?$', text)
        if not m:
            raise UnsupportedYaml(f"line {number}: bad double-quoted scalar")
        return json.loads(f'"{m.group(1)}"')
    if text[0] == "'":
        m = re.match(r"^'((?:[^']|'')*)'\s*(?:#.*)?$", text)
        if not m:
            raise UnsupportedYaml(f"line {number}: bad single-quoted scalar")
        return m.group(1).replace("''", "'")
    value = re.split(r"\s+#", text, maxsplit=1)[0].strip()
    if ": " in value:
        raise UnsupportedYaml(f"line {number}: {value!r}: quote a plain scalar holding ': '")
    return value


class Unset(LookupError):
    pass


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR, $$."""

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2) or "", m.group(3) or ""
        current = environ.get(name)
        missing = current is None or (op.startswith(":") and current == "")
        if op.endswith("?") and missing:
            raise Unset(f"{name}: {arg}")
        if op.endswith("-") and missing:
            return arg
        if op.endswith("+"):
            return "" if missing else arg
        return current or ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$(\w+)", substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return parse_yaml_subset((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


HERALDS = ("herald-1", "herald-2")
SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "pg-password",
    "HERALD_JWT_SECRET": "jwt-secret-jwt-secret-jwt-secret",
    "HERALD_SESSION_SECRET": "session-secret-session-secret",
    "HERALD_ADMIN_PASSWORD": "admin password 1",
}


def environment(service: dict[str, Any], environ: Mapping[str, str] = SAMPLE_ENV) -> dict[str, str]:
    return {key: interpolate(value or "", environ) for key, value in service.get("environment", {}).items()}


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"{duration!r} is not a duration"
    assert parts, "an empty duration"
    return sum(float(n) * units[u] for n, u in parts)


def test_the_yaml_subset_parser_reads_what_it_supports_and_refuses_the_rest():
    text = 'a:\n  b: "x: y"  # c\n  l:\n    - \'it\'\'s\'\n    - plain:colon\n  f: ["CMD", "z"]\n  e:\nk: v\n'
    assert parse_yaml_subset(text) == {
        "a": {"b": "x: y", "l": ["it's", "plain:colon"], "f": ["CMD", "z"], "e": None},
        "k": "v",
    }
    for bad in ("a: &anchor x\n", "a:\n  <<: *x\n", "a: |\n  x\n", "a: {b: c}\n", "a:\n  - b: c\n", "a: 1\na: 2\n"):
        with pytest.raises(UnsupportedYaml):
            parse_yaml_subset(bad)


def test_compose_interpolation_matches_composes_rules():
    assert interpolate("${A:-d}|${B-d}|$$|$C", {"B": "", "C": "c"}) == "d||$|c"
    with pytest.raises(Unset):
        interpolate("${A:?set A}", {"A": ""})


def test_compose_runs_postgres_and_two_herald_replicas(services: dict[str, Any], compose: dict[str, Any]):
    assert {"db", *HERALDS} <= set(services)
    db = services["db"]
    assert db["image"] == "postgres:16"
    volumes = [v.split(":") for v in db["volumes"]]
    assert ["pgdata", "/var/lib/postgresql/data"] in [v[:2] for v in volumes]
    assert "pgdata" in compose["volumes"], "a named volume, declared at the top level"
    assert "pg_isready" in db["healthcheck"]["test"]
    assert "ports" not in db, "PostgreSQL is reachable only from the compose network"
    for name in ("db", *HERALDS):
        assert services[name]["restart"] == "unless-stopped"


def test_herald_replicas_are_built_here_wait_for_a_healthy_db_and_check_healthz(services: dict[str, Any]):
    host_ports = []
    for name in HERALDS:
        service = services[name]
        build_spec = service["build"]
        context = build_spec if isinstance(build_spec, str) else build_spec["context"]
        assert context == "."
        assert isinstance(build_spec, str) or build_spec.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
        (port,) = service["ports"]
        host, container = port.rsplit(":", 1)
        assert container == str(SERVER_PORT)
        host_ports.append(host.rsplit(":", 1)[-1])
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        assert test[1] == "/app/.venv/bin/python"
        assert f"127.0.0.1:{SERVER_PORT}/healthz" in test[-1]
        assert_healthcheck_works(test[1:], {}, replace=f":{SERVER_PORT}/")
    assert sorted(host_ports) == ["8081", "8082"], "each replica on its own host port"


def test_replicas_reach_the_db_service_with_its_credentials(services: dict[str, Any]):
    db_env = environment(services["db"])
    for name in HERALDS:
        url = urlsplit(environment(services[name])["DATABASE_URL"])
        assert url.scheme == "postgresql"
        assert url.hostname == "db"
        assert url.username == db_env["POSTGRES_USER"]
        assert url.password == db_env["POSTGRES_PASSWORD"] == SAMPLE_ENV["POSTGRES_PASSWORD"]
        assert url.path == f"/{db_env['POSTGRES_DB']}"


def test_replicas_share_their_secrets_and_take_them_from_the_environment(services: dict[str, Any]):
    shared = ("HERALD_AUTH_JWT_SECRET", "HERALD_AUTH_SESSION_SECRET", "DATABASE_URL")
    raw = [services[name]["environment"] for name in HERALDS]
    for key in shared:
        assert raw[0][key] == raw[1][key], f"{key} differs between the replicas"
    for key, variable in (
        ("HERALD_AUTH_JWT_SECRET", "HERALD_JWT_SECRET"),
        ("HERALD_AUTH_SESSION_SECRET", "HERALD_SESSION_SECRET"),
    ):
        assert re.fullmatch(rf"\$\{{{variable}:\?[^}}]+\}}", raw[0][key]), f"{key} must be a required variable"
        without = {k: v for k, v in SAMPLE_ENV.items() if k != variable}
        with pytest.raises(Unset):
            environment(services["herald-1"], without)
    with pytest.raises(Unset):
        environment(services["db"], {})
    for name in ("db", *HERALDS):
        for key, value in services[name]["environment"].items():
            if re.search(r"PASSWORD|SECRET", key):
                assert value.startswith("${"), f"{name}: {key} is written in the file"


def test_every_herald_variable_is_a_real_setting_and_the_result_loads(services: dict[str, Any], runtime: Stage):
    raw = tomllib.loads((ROOT / "settings.toml").read_text())
    for name in HERALDS:
        env = runtime.env() | environment(services[name])
        for variable in env:
            if not variable.startswith("HERALD_") or variable in NON_SETTING_VARIABLES:
                continue
            section, _, key = variable[len("HERALD_") :].lower().partition("_")
            assert section in SECTIONS, f"{variable}: no settings section {section!r}"
            assert key in {f.name for f in dataclasses.fields(SECTIONS[section])}, f"{variable}: no setting {key!r}"
        settings = build_settings(raw, env)
        assert settings.server.host == "0.0.0.0"
        assert settings.server.port == SERVER_PORT
        assert settings.server.workers == "auto"
        assert settings.auth.jwt_secret == SAMPLE_ENV["HERALD_JWT_SECRET"]
        assert settings.auth.session_secret == SAMPLE_ENV["HERALD_SESSION_SECRET"]
        assert urlsplit(settings.database.url).hostname == "db"


def test_stop_grace_covers_the_drain(services: dict[str, Any]):
    settings = build_settings(tomllib.loads((ROOT / "settings.toml").read_text()), {})
    for name in HERALDS:
        assert seconds(services[name]["stop_grace_period"]) > settings.server.shutdown_timeout + STOP_GRACE


def test_database_connections_fit_postgres_max_connections(services: dict[str, Any]):
    """Per replica: one worker per CPU, each with pool_size pooled plus one LISTEN connection."""
    settings = build_settings(tomllib.loads((ROOT / "settings.toml").read_text()), {})
    command = " ".join(services["db"].get("command") or [])
    m = re.search(r"max_connections=(\d+)", command)
    max_connections = int(m.group(1)) if m else 100
    needed = 0
    for name in HERALDS:
        cpus = float(interpolate(services[name]["cpus"], SAMPLE_ENV))
        workers = max(1, int(cpus))
        needed += workers * (settings.database.pool_size + 1) + 2  # + the start-up pool (admin, migrations)
    assert needed <= max_connections - 3, f"{needed} connections; PostgreSQL reserves 3 of {max_connections}"


# --- running a healthcheck command against a stand-in server ----------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def assert_healthcheck_works(argv: list[str], env: dict[str, str], replace: str | None = None) -> None:
    """The healthcheck's `python -c` exits 0 on a 200 from /healthz and non-zero on a 503."""
    assert argv[1] == "-c"
    for status, ok in ((200, True), (503, False)):
        handler = type("Health", (_Health,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            code = argv[2] if replace is None else argv[2].replace(replace, f":{port}/")
            child_env = {k: v.format(port=port) for k, v in env.items()}
            result = subprocess.run(
                [sys.executable, "-c", code], env=child_env, capture_output=True, timeout=30, check=False
            )
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        assert (result.returncode == 0) == ok, result.stderr.decode()
