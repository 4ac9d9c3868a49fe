"""The documentation is executed, so that it cannot drift from the code.

``test_examples_run`` runs every fenced ```` ```python ```` block of ``README.md`` and
``docs/*.md``: one test per Markdown file, its blocks in order in one namespace (a fresh
module, as if the file were a script), in a temporary working directory that holds a copy of
the repository's ``configs/``. Paths in the examples (``configs/multidigits.yaml``, ``runs/``)
therefore mean what they mean at the repository root, and every run lands in the temporary
directory. A failure names the file, the block and its line; the traceback points into the
Markdown file itself.

Fence markers (the first words after the opening fence):

- ```` ```python ```` (or ```` ```py ````): executed;
- ```` ```python no-run ````: shown but not executed. Only for code that cannot run in a CPU
  test (a GPU, torchrun); the documentation currently has none.

Other fences (``bash``, ``yaml``, ``text``) are not executed. The other tests keep the
reference pages in line with the code: every key of ``Config`` (and of the grid file) is in the
tables of ``docs/configuration.md`` (``docs/cli.md``) with its actual default, every command and
option of ``polytask --help`` is in ``docs/cli.md``, relative links and anchors resolve, and
the table of every balancing method in ``docs/balancing.md`` names exactly the built-in ones.

Examples register components (backbones, data sets, ...); the registries, PyTorch's global
settings and the random states are restored after each file, so files do not see each
other's registrations and the rest of the suite sees only the built-in components.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

# Importing these packages registers the built-in components before the registries are saved.
from polytask import balancing, data, models  # noqa: F401
from polytask.cli import main as cli_main
from polytask.compare import GridSpec
from polytask.config import Config
from polytask.errors import ConfigError
from polytask.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
NO_RUN = "no-run"
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    language: str
    flags: tuple[str, ...]
    line: int  # 1-based line of the opening fence
    code: str


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of ``path``, in order."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        words = match["info"].split()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            # Markdown removes up to the opening fence's indentation from every line.
            body.append(re.sub(rf"^ {{0,{indent}}}", "", lines[i]))
            i += 1
        else:
            raise AssertionError(f"{path}:{start + 1}: code fence opened here is never closed")
        i += 1
        language = words[0].lower() if words else ""
        blocks.append(Block(language, tuple(words[1:]), start + 1, "\n".join(body) + "\n"))
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path) if b.language in ("python", "py")]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _registries() -> list[Registry[Any]]:
    """Every registry of the loaded polytask modules (built-ins are registered at import)."""
    found: dict[int, Registry[Any]] = {}
    for name, module in list(sys.modules.items()):
        if name == "polytask" or name.startswith("polytask."):
            for value in list(vars(module).values()):
                if isinstance(value, Registry):
                    found[id(value)] = value
    return list(found.values())


@contextlib.contextmanager
def isolated_state() -> Iterator[None]:
    """Undo what examples change globally: registrations, torch settings, random states."""
    # Registry has no public way to unregister: restore its private table.
    registries = {id(r): (r, dict(r._items)) for r in _registries()}
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    # The examples are tiny: one thread is faster than two threads fighting over 2 cores.
    torch.set_num_threads(1)
    try:
        yield
    finally:
        for registry, items in registries.values():
            registry._items.clear()
            registry._items.update(items)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])


def _has_examples(path: Path) -> bool:
    return path.is_file() and any(NO_RUN not in b.flags for b in python_blocks(path))


@pytest.mark.parametrize("path", [p for p in DOC_FILES if _has_examples(p)], ids=_rel)
def test_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in python_blocks(path) if NO_RUN not in b.flags]
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"polytask_docs_{path.stem.replace('-', '_').lower()}")
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with isolated_state():
        for number, block in enumerate(blocks, start=1):
            where = f"{_rel(path)}, python block {number} of {len(blocks)} (line {block.line})"
            # Leading newlines make line numbers in tracebacks those of the Markdown file.
            source = "\n" * block.line + block.code
            failure = None
            try:
                exec(compile(source, str(path), "exec"), module.__dict__)
            except (Exception, SystemExit):
                failure = traceback.format_exc()
            if failure is not None:  # outside `except`, so pytest shows no chained exception
                pytest.fail(
                    f"{where} failed:\n\n{failure}\n--- the block ---\n{block.code}",
                    pytrace=False,
                )


def test_no_run_blocks_say_why() -> None:
    """Blocks that are not executed must say why, in a comment on their first line."""
    for path in DOC_FILES:
        if not path.is_file():
            continue
        for block in python_blocks(path):
            if NO_RUN in block.flags:
                first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
                assert first.startswith("#"), (
                    f"{_rel(path)}:{block.line}: a `python {NO_RUN}` block must start with a "
                    "comment saying why it cannot run (GPU, torchrun)"
                )


# -- reference pages in line with the code ------------------------------------------------


def _tables(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of ``path``: ``(header cells, rows of cells)``."""

    def cells(line: str) -> list[str]:
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]

    tables = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i in range(len(lines) - 1):
        if (
            lines[i].lstrip().startswith("|")
            and re.fullmatch(r"\s*\|[\s:|-]+\|\s*", lines[i + 1])
            and (i == 0 or not lines[i - 1].lstrip().startswith("|"))
        ):
            rows = []
            for line in lines[i + 2 :]:
                if not line.lstrip().startswith("|"):
                    break
                rows.append(cells(line))
            tables.append((cells(lines[i]), rows))
    return tables


def _documented_keys(path: Path) -> dict[str, str]:
    """``{key: default cell}`` from the tables of ``path`` headed key | type | default | meaning."""
    keys: dict[str, str] = {}
    for header, rows in _tables(path):
        if [h.lower() for h in header[:3]] != ["key", "type", "default"]:
            continue
        for row in rows:
            key = row[0].strip("`")
            assert key not in keys, f"{_rel(path)}: key {key!r} is documented twice"
            keys[key] = row[2]
    return keys


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: default}`` of a config dataclass, nested dataclasses flattened."""
    result: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            result[key] = dataclasses.MISSING
            continue
        if dataclasses.is_dataclass(default):
            result.update(_leaf_fields(type(default), f"{key}."))
        else:
            result[key] = default
    return result


def _check_table(path: Path, cls: type) -> None:
    documented = _documented_keys(path)
    expected = _leaf_fields(cls)
    missing = sorted(set(expected) - set(documented))
    unknown = sorted(set(documented) - set(expected))
    assert not missing, f"{_rel(path)} does not document the key(s) {missing} of {cls.__name__}"
    assert not unknown, f"{_rel(path)} documents key(s) {unknown} that {cls.__name__} lacks"
    for key, default in expected.items():
        cell = documented[key]
        if default is dataclasses.MISSING:
            assert cell == "required", f"{_rel(path)}: {key} has no default; write `required`"
            continue
        written = yaml.safe_load(cell.strip("`"))
        assert written == default and type(written) is type(default), (
            f"{_rel(path)}: the default of {key} is {default!r}, the table says {cell}"
        )


def test_config_tables_match_the_dataclasses() -> None:
    _check_table(DOCS / "configuration.md", Config)


def test_grid_table_matches_the_grid_spec() -> None:
    _check_table(DOCS / "cli.md", GridSpec)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_cli_options_documented(capsys: pytest.CaptureFixture[str]) -> None:
    """Every command and option that ``polytask --help`` shows is in docs/cli.md."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands = re.findall(r"^ {4}(\w+) {2,}", _help(["--help"], capsys), flags=re.MULTILINE)
    assert commands, "could not read the commands from `polytask --help`"
    for command in commands:
        assert f"## `polytask {command}" in text, f"docs/cli.md has no section for {command}"
        options = set(re.findall(r"(--[a-z][a-z-]*)", _help([command, "--help"], capsys)))
        for option in sorted(options - {"--help"}):
            assert f"`{option}" in text, f"docs/cli.md does not document {command} {option}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_links_resolve(path: Path) -> None:
    """Relative links point at files that exist, and anchors at headings that exist."""
    text = path.read_text(encoding="utf-8")
    # Code blocks may contain brackets that are not links.
    prose = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{_rel(path)}: link to {target!r}: {linked} does not exist"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", linked.read_text(encoding="utf-8"), re.M)
            slugs = {_slug(h) for h in headings}
            assert anchor in slugs, f"{_rel(path)}: link to {target!r}: no such heading"


def test_docs_exist() -> None:
    expected = {
        "index.md",
        "getting-started.md",
        "concepts.md",
        "bring-your-own.md",
        "cli.md",
        "configuration.md",
    }
    assert expected <= {p.name for p in DOCS.glob("*.md")}


# -- the table of every balancing method ---------------------------------------------------

GLANCE_HEADER = ["name", "method and paper", "levels", "cost per step", "state in checkpoints"]
GLANCE_TASKS = ("a", "b", "c")


def _builtin_balancers() -> set[str]:
    """The registered balancing methods that polytask itself defines (tests may register
    others for a while)."""
    registry = balancing.BALANCERS
    return {
        name
        for name in registry.names()
        if getattr(registry.get(name), "__module__", "").startswith("polytask.")
    }


def _glance_rows() -> dict[str, list[str]]:
    """``{method name: row}`` of the table of every method in docs/balancing.md."""
    path = DOCS / "balancing.md"
    tables = [rows for header, rows in _tables(path) if header == GLANCE_HEADER]
    assert len(tables) == 1, f"docs/balancing.md: expected one table headed {GLANCE_HEADER}"
    found: dict[str, list[str]] = {}
    for row in tables[0]:
        match = re.fullmatch(r"`([a-z0-9_]+)`", row[0])
        assert match, f"docs/balancing.md: a row names {row[0]!r}, not one `method`"
        assert match[1] not in found, f"docs/balancing.md: {match[1]} has two rows"
        assert len(row) == len(GLANCE_HEADER) and all(row), f"docs/balancing.md: {row}"
        found[match[1]] = row
    return found


def test_balancing_table_names_every_method() -> None:
    """The table has one row per built-in balancing method, and no other row."""
    written, registered = set(_glance_rows()), _builtin_balancers()
    assert registered, "no balancing method is registered"
    missing, extra = sorted(registered - written), sorted(written - registered)
    assert not missing, f"docs/balancing.md's table of every method lacks {missing}"
    assert not extra, f"docs/balancing.md's table of every method names unknown {extra}"


def test_balancing_table_levels_and_state() -> None:
    """Each row's levels are those the method accepts (default first; `loss` for a loss
    weighting), its cost names only those levels, and "none" is the state of exactly the
    methods whose state dict holds nothing (rows of unknown names fail the test above)."""
    rows = _glance_rows()
    for name in sorted(rows.keys() & _builtin_balancers()):
        row = rows[name]
        factory = balancing.BALANCERS.get(name)
        method = factory(tasks=GLANCE_TASKS)
        levels, cost, state = row[2], row[3], row[4]
        if isinstance(method, balancing.GradientBalancer):
            accepted = []
            for level in ("parameter", "feature"):
                try:
                    factory(tasks=GLANCE_TASKS, level=level)
                except (ConfigError, TypeError):
                    continue
                accepted.append(level)
            expected = [method.level, *(lv for lv in accepted if lv != method.level)]
            assert re.findall(r"`(\w+)`", levels) == expected, (name, levels, expected)
            assert ("only" in levels) == (len(expected) == 1), (name, levels)
            for level in ("parameter", "feature"):
                assert f"({level})" not in cost or level in accepted, (name, cost)
        else:
            assert levels == "`loss`", (name, levels)
            assert cost.startswith("1 backward"), (name, cost)
        saved = method.state_dict()
        stateless = all(key.endswith("_extra_state") and not v for key, v in saved.items())
        assert (state == "none") == stateless, (name, state, sorted(saved))
