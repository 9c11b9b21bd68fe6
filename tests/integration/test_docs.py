"""The docs run: every command README.md and docs/*.md show is executed or checked here.

Each Markdown file is a script: its fenced blocks run top to bottom, in order, against
one fresh broker (the ``server`` fixture; the working directory holds its data
directory as ``data``), so a later block sees what an earlier one made, as a reader
following the page would. A fence's info string says what the block is:

- ``console``: a terminal session. ``$ CMD`` lines run; the lines after one, up to
  the next ``$``, are its expected stdout then stderr, compared after normalizing
  times, epoch milliseconds and durations (``<time>``, ``<ms>``, ``<dur>``) and runs of
  blanks; a line ``...`` stands for any number of lines. ``streamd ...`` runs
  in-process through ``main(argv)`` (``streamd serve`` as a child process, stopped
  once it printed what the block shows), ``printf ... | streamd ...`` feeds stdin,
  ``NAME=VALUE`` prefixes set the environment, ``echo $?`` prints the last exit
  code. A command whose comment says ``Ctrl-C`` (it tails forever) is only parsed.
- ``python``: executed (one namespace per file). ``python fragment``: compiled only
  (it needs what the page cannot give, e.g. your handler).
- ``sh``: commands that cannot run here (make, docker, kubectl): each is checked:
  a make target exists, the repository paths it names exist, an image tag is the
  one deploy/ builds, and a ``streamd`` command line parses.
- ``toml``: parses; ``toml config`` is a valid ``--config`` file, ``toml auth`` a
  valid auth file. ``yaml``: parses.
- ``text``: not meant to run (diagrams, excerpts of output).

Placeholders: ``127.0.0.1:50051`` is the test broker's address (in commands, code
and output alike); ``<sha256 of the token>`` is 64 hex digits.

Besides the blocks, the reference tables are checked against the code: every
``BrokerConfig`` setting and its default (docs/configuration.md), every ``streamd
serve`` flag, and every exported metric (docs/operations.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.request import urlopen

import pytest
import yaml

from streamd.auth import Authority
from streamd.cli.main import SERVE_ALIASES, SERVE_FLAGS, build_parser, main
from streamd.config import BrokerConfig
from tests.conftest import bounded

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_ADDRESS = "127.0.0.1:50051"
DOC_METRICS = "127.0.0.1:9464"
PLACEHOLDERS = {"<sha256 of the token>": "0" * 64}
KINDS = {"console", "python", "sh", "toml", "yaml", "text"}
BLOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    kind: str
    modifiers: tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    found, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        start, info = i, fence.group(2).split()
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence.group(1)):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{doc.name}:{start + 1}: unclosed fence"
        kind = info[0] if info else ""
        found.append(Block(doc, start + 1, kind, tuple(info[1:]), "\n".join(body) + "\n"))
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


# -- output matching ---------------------------------------------------------------
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)?")
EPOCH_MS = re.compile(r"(?<!\d)1\d{12}(?!\d)")
DURATION = re.compile(r"(?<![\w.])\d+(\.\d+)?(s|ms)(?!\w)")


def normalized(line: str) -> str:
    line = ISO_TIME.sub("<time>", line)
    line = EPOCH_MS.sub("<ms>", line)
    line = DURATION.sub("<dur>", line)
    return " ".join(line.split())


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` (normalized; ``...`` = any lines) covers all of ``actual``."""
    memo: dict[tuple[int, int], bool] = {}

    def go(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(expected):
                memo[i, j] = j == len(actual)
            elif expected[i] == "...":
                memo[i, j] = go(i + 1, j) or (j < len(actual) and go(i, j + 1))
            else:
                memo[i, j] = j < len(actual) and expected[i] == actual[j] and go(i + 1, j + 1)
        return memo[i, j]

    return go(0, 0)


# -- a session: the blocks of one file against one broker ---------------------------
class Session:
    def __init__(self, server, workdir: Path, monkeypatch) -> None:
        self.server = server
        self.workdir = workdir
        self.monkeypatch = monkeypatch
        self.namespace: dict = {"__name__": "__docs__"}
        self.last_code = 0
        self.serves = 0
        monkeypatch.chdir(workdir)
        monkeypatch.setenv("STREAMD_SERVER", server.address)

    def address(self, text: str) -> str:
        return text.replace(DOC_ADDRESS, self.server.address)

    def run(self, block: Block) -> None:
        kind = block.kind
        if kind == "console":
            self.console(block)
        elif kind == "python":
            self.python(block)
        else:
            check_static(block)

    def python(self, block: Block) -> None:
        code = compile(self.address(block.text), block.where, "exec")
        if "fragment" in block.modifiers:
            return
        bounded(BLOCK_TIMEOUT_S, lambda: exec(code, self.namespace), what=block.where)

    def console(self, block: Block) -> None:
        for command, expected in console_steps(block):
            if "Ctrl-C" in command:
                parses(shlex.split(command, comments=True), block)
                continue
            out = bounded(BLOCK_TIMEOUT_S, lambda command=command, expected=expected: self.shell(command, expected),
                          what=f"{block.where}: $ {command}")
            actual = [normalized(line.replace(self.server.address, DOC_ADDRESS)) for line in out.splitlines()]
            want = [normalized(line) for line in expected]
            assert matches(want, actual), (
                f"{block.where}: `$ {command}` printed:\n" + out + "\nthe docs show:\n" + "\n".join(expected))

    def shell(self, command: str, expected: list[str]) -> str:
        stages = [s.strip() for s in command.split(" | ")]
        stdin = b""
        if len(stages) == 2:
            assert stages[0].startswith("printf "), f"only `printf ... | streamd ...` pipes are run: {command}"
            stdin = subprocess.run(["sh", "-c", stages[0]], capture_output=True, check=True).stdout
        assert len(stages) <= 2, f"one pipe at most: {command}"
        argv = shlex.split(stages[-1], comments=True)
        env = {}
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
            name, value = argv.pop(0).split("=", 1)
            env[name] = value
        if argv == ["echo", "$?"]:
            return f"{self.last_code}\n"
        assert argv and argv[0] == "streamd", f"console blocks run streamd commands only: {command}"
        argv = [self.address(a) for a in argv[1:]]
        if argv and argv[0] == "serve":
            return self.serve(argv, env, len(expected))
        return self.streamd(argv, env, stdin)

    def streamd(self, argv: list[str], env: dict, stdin: bytes) -> str:
        out, err = io.StringIO(), io.StringIO()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        stdin_saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    self.last_code = main(argv)
                except SystemExit as exc:
                    self.last_code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdin = stdin_saved
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return out.getvalue() + err.getvalue()

    def serve(self, argv: list[str], env: dict, lines_wanted: int) -> str:
        """``streamd serve`` as a child process in a directory of its own; its first
        ``lines_wanted`` lines of output (or all, if it exits), then SIGTERM."""
        self.serves += 1
        cwd = self.workdir / f"serve-{self.serves}"
        cwd.mkdir()
        listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        if "--print-config" not in argv:  # flags win over the environment and the file
            argv = [*argv, "--listen", listen, "--metrics-listen", metrics]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
        proc = subprocess.Popen([sys.executable, "-m", "streamd", *argv], cwd=cwd, env={**child_env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] and None, daemon=True)
        reader.start()
        got: list[str] = []
        try:
            while len(got) < lines_wanted:
                try:
                    got.append(lines.get(timeout=BLOCK_TIMEOUT_S / 2))
                except queue.Empty:
                    break
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                self.last_code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.last_code = proc.wait(10)
            reader.join(10)
            proc.stdout.close()
        while not lines.empty() and len(got) < lines_wanted:
            got.append(lines.get())
        # The child listened where the test put it; the docs show the default addresses.
        return "".join(got).replace(listen, DOC_ADDRESS).replace(metrics, DOC_METRICS)


def console_steps(block: Block) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block.where}: console output before any `$ ` command"
            steps[-1][1].append(line)
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- checks for what cannot run here --------------------------------------------------
def parses(argv: list[str], block: Block) -> None:
    """A ``streamd`` command line is valid for the parser (as ``--help`` would see it)."""
    assert argv and argv[0] == "streamd", f"{block.where}: not a streamd command: {argv}"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's usage error
        raise AssertionError(f"{block.where}: `{shlex.join(argv)}` does not parse") from exc


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def image_tag() -> str:
    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["streamd"]["image"]


def sh_commands(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def check_sh(block: Block) -> None:
    for argv in sh_commands(block.text):
        if not argv:
            continue
        tool, where = argv[0], f"{block.where}: `{shlex.join(argv)}`"
        if tool == "make":
            assert argv[1] in make_targets(), f"{where}: no such make target"
        elif tool == "streamd":
            parses(argv, block)
        elif tool in ("docker", "kubectl"):
            for arg in argv:
                if re.match(r"(deploy|tests|proto)/", arg):
                    assert (ROOT / arg).exists(), f"{where}: {arg} does not exist"
                if re.fullmatch(r"streamd:[\w.]+", arg):
                    assert arg == image_tag(), f"{where}: deploy/ builds {image_tag()}"
            if tool == "docker" and argv[1:2] == ["exec"]:
                parses(argv[3:], block)  # docker exec NAME streamd ...
        else:
            raise AssertionError(f"{where}: test_docs does not know how to check {tool!r}: mark the block ```text "
                                 "or teach check_sh")


def check_static(block: Block) -> None:
    text = block.text
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    if block.kind == "sh":
        check_sh(block)
    elif block.kind == "toml":
        doc = tomllib.loads(text)
        if "config" in block.modifiers:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "streamd.toml"
                path.write_text(text)
                BrokerConfig.load(flags={}, env={}, file=path)  # ConfigError names what is wrong
        if "auth" in block.modifiers:
            Authority.parse(doc, source=block.where)
    elif block.kind == "yaml":
        assert yaml.safe_load(text) is not None
    else:
        assert block.kind == "text", f"{block.where}: unknown block kind {block.kind!r}"


# -- the tests ----------------------------------------------------------------------
def test_every_block_says_what_it_is():
    unknown = [f"{b.where}: ```{b.kind}" for b in all_blocks() if b.kind not in KINDS]
    assert not unknown, "fenced blocks need a kind (```text if not meant to run):\n" + "\n".join(unknown)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_runs(doc, server, tmp_path, monkeypatch):
    session = Session(server, tmp_path, monkeypatch)
    for block in blocks(doc):
        session.run(block)
    session.namespace.clear()


# -- reference tables against the code ------------------------------------------------
def table_rows(doc: Path, first_header: str) -> list[list[str]]:
    """The rows of the Markdown table whose first header cell is ``first_header``."""
    rows, inside = [], False
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")] if line.startswith("|") else None
        if cells is None:
            if inside:
                break
            continue
        if not inside:
            inside = cells[0] == first_header
            continue
        if not set(line) <= set("|- "):
            rows.append(cells)
    assert rows, f"{doc.name}: no table headed {first_header!r}"
    return rows


def names_in(cell: str) -> list[str]:
    return re.findall(r"`([a-z_][a-z0-9_]*)`", cell)


DAY_MS, MiB = 24 * 3600 * 1000, 1024 * 1024


def parsed_default(cell: str):
    cell = cell.replace(",", "")
    if m := re.fullmatch(r"(-?\d+) days?", cell):
        return int(m.group(1)) * DAY_MS
    if m := re.fullmatch(r"(\d+) MiB", cell):
        return int(m.group(1)) * MiB
    if re.fullmatch(r"-?\d+", cell):
        return int(cell)
    if re.fullmatch(r"-?\d+\.\d+", cell):
        return float(cell)
    if m := re.fullmatch(r"`([^`]*)`", cell):
        return m.group(1)
    if cell == "none":
        return ""
    raise AssertionError(f"docs/configuration.md: cannot read the default {cell!r}")


def test_configuration_table_lists_every_setting_with_its_default():
    defaults = BrokerConfig()
    documented: dict[str, object] = {}
    for cells in table_rows(ROOT / "docs" / "configuration.md", "setting"):
        settings, values = names_in(cells[0]), [v.strip() for v in cells[1].split(",")]
        if len(values) != len(settings):
            values = values * len(settings)
        documented.update(zip(settings, values, strict=False))
    assert set(documented) == {f.name for f in fields(BrokerConfig)}
    for name, cell in documented.items():
        want = getattr(defaults, name)
        want = str(want) if isinstance(want, Path) else want
        got = parsed_default(cell)
        if name == "data_dir":
            got = str(Path(got))
        assert got == want, f"docs/configuration.md: {name} defaults to {want!r}, the table says {cell}"


def test_configuration_lists_every_serve_flag():
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("<!-- serve flags -->")[1].split("<!-- /serve flags -->")[0]
    documented = set(re.findall(r"`(--[a-z][a-z-]*)", section))
    flags = {"--" + n.replace("_", "-") for n in SERVE_FLAGS} | {a for al in SERVE_ALIASES.values() for a in al}
    flags |= {"--config", "--print-config"}
    assert documented == flags


def subcommand(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the subcommand ``argv`` names (``["groups", "describe", ...]``)."""
    parser, path = build_parser(), []
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        parser, path = subs[0].choices[token], [*path, token]
    return parser, path


def test_every_flag_an_inline_command_shows_exists():
    """`streamd SUBCOMMAND ... --flag` spans in the prose name flags that subcommand has."""
    global_flags = set(build_parser()._option_string_actions)
    wrong = []
    for doc in DOCS:
        for span in re.findall(r"`(streamd [^`]+)`", doc.read_text()):
            parser, path = subcommand(span.split()[1:])
            if not path:
                continue
            known = set(parser._option_string_actions) | global_flags
            wrong += [f"{doc.name}: `{span}`: {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", span)
                      if flag not in known]
    assert not wrong, "flags the CLI does not have:\n" + "\n".join(wrong)


def test_metrics_table_names_every_exported_metric(server):
    """Every metric docs/operations.md lists is exported, and every one exported is listed."""
    listed = set()
    for cells in table_rows(ROOT / "docs" / "operations.md", "metric"):
        listed |= set(names_in(cells[0]))
    scrape = urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    families = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", scrape, re.M):
        families[name + ("_total" if kind == "counter" and not name.endswith("_total") else "")] = kind
    ours = {n for n in families if n.startswith(("streamd_", "grpc_server_"))}
    assert listed - ours == set(), "listed but not exported"
    assert ours - listed == set(), "exported but not listed"


def test_error_table_lists_every_reason_under_its_code():
    """docs/wire.md's error table has a row per status code naming every reason the
    broker's one error table can answer with it."""
    import inspect

    from streamd.service import errors as error_table

    rows = {cells[0]: cells[1] for cells in table_rows(ROOT / "docs" / "wire.md", "code")}
    missing = []
    for cls, code in error_table.STATUS_CODES.items():
        reason = getattr(cls, "reason", None)
        if isinstance(reason, str) and f"`{reason}`" not in rows.get(code.name, ""):
            missing.append(f"{code.name} {reason} ({cls.__name__})")
    documented = " ".join(rows.values())
    # Reasons the table derives from the error rather than from its class.
    for reason in re.findall(r'return "([A-Z_]+)"', inspect.getsource(error_table)):
        if f"`{reason}`" not in documented:
            missing.append(reason)
    assert not missing, "docs/wire.md does not list:\n" + "\n".join(missing)


def test_every_path_and_link_the_docs_name_exists():
    """Repository paths in code spans (`streamd/auth.py`, `deploy/k8s`) and relative links
    resolve, so a moved module or page shows up here."""
    missing = []
    for doc in [*DOCS, ROOT / "bench" / "README.md", ROOT / "deploy" / "README.md", ROOT / "CHANGELOG.md"]:
        text = doc.read_text()
        for path in re.findall(r"`((?:streamd|segments|consumer_groups|tests|deploy|bench|proto|docs)/[\w./-]*)`", text):
            if not (ROOT / path.rstrip("/.")).exists() and "<" not in path:
                missing.append(f"{doc.relative_to(ROOT)}: `{path}`")
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            if not (doc.parent / link).exists():
                missing.append(f"{doc.relative_to(ROOT)}: ({link})")
    assert not missing, "the docs name paths that do not exist:\n" + "\n".join(missing)


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", doc.read_text(), re.M)}


def test_every_anchor_a_link_names_exists():
    broken = []
    for doc in [*DOCS, ROOT / "bench" / "README.md"]:
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", doc.read_text()):
            page = (doc.parent / target) if target else doc
            if page.exists() and anchor not in anchors(page):
                broken.append(f"{doc.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)
