"""Config files and overrides that are not clean text, through the real command line.

Each case runs ``polytask train`` / ``compare`` / ``eval`` in a forked process on a recipe,
a grid file, a run directory's config.yaml or an override with one fault (bytes that are not
UTF-8, NUL bytes, syntax errors, duplicate keys, deep nesting, alias bombs, huge files, tags,
odd keys) and checks the contract: exit code 2, one ``polytask: error:`` line naming the file
(and the byte offset, or line and column) and the fault, and nothing written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_harness import assert_refused, assert_unchanged, run_cli, snapshot, write

# imported once here, not again in every forked command
import polytask.api
import polytask.compare  # noqa: F401

#: "FILE" in a fragment stands for the path of the file under test
FILE = "FILE"

RECIPE = "name: tiny\nseed: 0\noutput_dir: {out}\ntrain:\n  epochs: 1\n"

BOMB = (
    "lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"l{i}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))
    + "train:\n  epochs: *i\n"
)
ALIAS_DEPTH = "".join(
    f"a{i}: &a{i} " + "[" * 20 + (f"*a{i - 1}" if i else "1") + "]" * 20 + "\n" for i in range(5)
)

#: (id, file content, fragments of the message)
RECIPE_FAULTS: list[tuple[str, str | bytes, list[str]]] = [
    ("utf-16", "train:\n  epochs: 1\n".encode("utf-16"), [FILE, "byte offset 0", "UTF-16"]),
    ("utf-32", "train: {}\n".encode("utf-32"), [FILE, "byte offset 0", "UTF-32"]),
    ("latin-1", "name: caf\xe9\n".encode("latin-1"), [FILE, "byte offset 9", "0xe9", "not UTF-8"]),
    ("leading-byte", b"\x80name: x\n", [FILE, "byte offset 0", "0x80", "not UTF-8"]),
    ("cut-character", b"seed: 0\nname: caf\xc3", [FILE, "byte offset 17", "line 2", "not UTF-8"]),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [FILE, "byte offset 0", "0x89"]),
    ("nul", b"train:\n  epochs: 1\x00\n", [FILE, "byte offset 18", "line 2, column 12", "NUL"]),
    ("nul-only", b"\x00" * 64, [FILE, "byte offset 0", "NUL"]),
    ("bom-inside", "seed: 0\n\ufeffname: x\n".encode(), [FILE, "byte offset 8", "U+FEFF"]),
    ("bell", b"name: a\x07b\n", [FILE, "byte offset 7", "U+0007"]),
    (
        "unclosed-list",
        "train:\n  epochs: [1\nmodel: {\n",
        [FILE, "line 3, column 6", "not valid YAML", "expected ',' or ']'"],
    ),
    ("tab", "train:\n\tepochs: 1\n", [FILE, "line 2, column 1", "not valid YAML", "\\t"]),
    ("unclosed-quote", 'seed: 0\nname: "tiny\n', [FILE, "line 3, column 1", "not valid YAML"]),
    ("two-values", "name: a: b\n", [FILE, "line 1, column 8", "mapping values are not allowed"]),
    (
        "bad-indent",
        "train:\n  epochs: 1\n lr: 2\n",
        [FILE, "line 3, column 2", "not valid YAML"],
    ),
    ("two-documents", "seed: 0\n---\nseed: 1\n", [FILE, "line 2, column 1", "another document"]),
    ("undefined-alias", "seed: *nope\n", [FILE, "line 1, column 7", "undefined alias"]),
    ("unhashable-key", "? [a, b]\n: 1\n", [FILE, "line 1", "unhashable key"]),
    (
        "duplicate-top",
        "seed: 0\ntrain: {epochs: 1}\nseed: 1\n",
        [FILE, "line 3, column 1", "duplicate key 'seed'", "first given on line 1"],
    ),
    (
        "duplicate-nested",
        "train:\n  epochs: 1\n  epochs: 2\n",
        [FILE, "line 3, column 3", "duplicate key 'epochs'", "line 2"],
    ),
    (
        "duplicate-flow",
        "train: {epochs: 1, epochs: 2}\n",
        [FILE, "line 1, column 20", "duplicate key 'epochs'"],
    ),
    ("deep-flow", "train: " + "[" * 100 + "]" * 100 + "\n", [FILE, "line 1", "deeper than 64"]),
    ("deeper-flow", "[" * 200_000, [FILE, "line 1", "deeper than 64"]),
    (
        "deep-block",
        "".join("  " * i + f"k{i}:\n" for i in range(80)),
        [FILE, "line 65", "deeper than 64"],
    ),
    ("billion-laughs", BOMB, [FILE, "line 6, column 5", "more than 1,000,000 values", "aliases"]),
    ("recursive-alias", "train: &a {x: *a}\n", [FILE, "line 1", "contains it"]),
    ("deep-by-aliases", ALIAS_DEPTH, [FILE, "deeper than 64", "aliases are expanded"]),
    ("huge", "name: " + "x" * 1_100_000 + "\n", [FILE, "larger than 1,000,000 bytes"]),
    ("empty", b"", [FILE, "is empty"]),
    ("comments-only", "# a recipe\n\n", [FILE, "is empty"]),
    ("top-list", "- train\n- model\n", [FILE, "expected a mapping at the top level", "list"]),
    ("top-scalar", "epochs=5\n", [FILE, "expected a mapping at the top level", "str"]),
    (
        "python-tag",
        "seed: !!python/object/apply:os.system [echo]\n",
        [FILE, "line 1, column 7", "!!python/object/apply:os.system", "not allowed"],
    ),
    ("python-name", "seed: !!python/name:os.system\n", [FILE, "line 1", "not allowed"]),
    ("local-tag", "seed: !custom 1\n", [FILE, "line 1, column 7", "!custom", "not allowed"]),
    ("bad-int", "seed: !!int abc\n", [FILE, "line 1, column 7", "cannot be read as int"]),
    ("bad-bool", "train: {progress: !!bool maybe}\n", [FILE, "cannot be read as bool"]),
    ("bad-float", "optim: {lr: !!float x}\n", [FILE, "line 1, column 13", "as float"]),
    ("bad-date", "name: 2001-13-40\n", [FILE, "line 1, column 7", "month must be in 1..12"]),
    ("bad-binary", "name: !!binary {a: 1}\n", [FILE, "line 1, column 7", "expected a scalar"]),
    ("5000-digits", "seed: " + "1" * 5000 + "\n", [FILE, "line 1, column 7", "as int"]),
    ("huge-value", "train: {epochs: [" + "1, " * 3000 + "]}\n", ["train.epochs", " ... "]),
    ("huge-key", "? " + "x" * 20_000 + "\n: 1\n", ["unknown key", " ... "]),
]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [pytest.param(c, f, id=i) for i, c, f in RECIPE_FAULTS],
)
def test_recipe_faults(tmp_path: Path, content: str | bytes, fragments: list[str]) -> None:
    recipe = write(tmp_path / "recipe.yaml", content)
    before = snapshot(tmp_path)
    result = run_cli("train", recipe, f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert_refused(result, *(str(recipe) if f == FILE else f for f in fragments))
    assert_unchanged(before, tmp_path)


def test_recipe_is_a_directory_or_a_fifo(tmp_path: Path) -> None:
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    assert_refused(run_cli("train", folder, cwd=tmp_path), str(folder), "is a directory")
    assert_refused(run_cli("train", fifo, cwd=tmp_path), str(fifo), "not a regular file")
    assert_refused(
        run_cli("train", tmp_path / ("x" * 5000), cwd=tmp_path), "cannot be read", "too long"
    )
    assert_unchanged(before, tmp_path)


def test_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Editors on Windows write one; it is not part of the first key."""
    recipe = write(tmp_path / "recipe.yaml", b"\xef\xbb\xbfseed: 0\nseed: 1\n")
    # the duplicate shows the file was parsed past the mark, with lines counted from it
    assert_refused(run_cli("train", recipe, cwd=tmp_path), "line 2, column 1", "'seed'")


#: (id, override, fragments)
OVERRIDE_FAULTS: list[tuple[str, str, list[str]]] = [
    (
        "unclosed-list",
        "train.epochs=[1",
        ["override 'train.epochs=[1'", "column 3", "not valid YAML", "\"train.epochs='[1'\""],
    ),
    ("unclosed-mapping", "model.options={a: 1", ["override 'model.options={a: 1'", "quote it"]),
    ("two-values", "name=a: b: c", ["'name=a: b: c'", "mapping values", "\"name='a: b: c'\""]),
    ("quote-in-hint", "name='it", ["override", "quote it", "\"name='''it'\""]),
    ("doubled-dot", "a..b=1", ["override 'a..b=1'", "empty part"]),
    ("leading-dot", ".seed=1", ["override '.seed=1'", "empty part"]),
    ("trailing-dot", "seed.=1", ["override 'seed.=1'", "empty part"]),
    ("no-key", "=1", ["override '=1'", "KEY=VALUE"]),
    ("no-equals", "train.epochs", ["override 'train.epochs'", "KEY=VALUE"]),
    ("into-a-scalar", "seed.value=1", ["seed.value", "'seed' is not a mapping"]),
    ("into-a-deeper-scalar", "train.epochs.x.y=1", ["'train.epochs' is not a mapping"]),
    ("long-key", "a" * 300 + "=1", ["longer than 200 characters"]),
    ("deep-key", ".".join(["a"] * 100) + "=1", ["deeper than 64"]),
    ("space-in-key", "train epochs=1", ["'train epochs'", "space"]),
    ("non-utf8-key", "tra\udce9n.epochs=1", ["override", "\\udce9", "not printable"]),
    ("non-utf8-value", "name=caf\udce9", ["override", "byte offset 3", "byte 0xe9"]),
    ("nul-value", "name=a\x00b", ["override", "byte offset 1", "NUL"]),
    ("duplicate-key", "model.options={a: 1, a: 2}", ["override", "duplicate key 'a'"]),
    ("deep-value", "train.epochs=" + "[" * 100, ["override", "deeper than 64"]),
    (
        "alias-bomb-value",
        "model.options={"
        + "a: &a [x, x, x, x, x, x, x, x, x, x], "
        + ", ".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]"
            for p, c in zip("abcdefg", "bcdefgh", strict=True)
        )
        + "}",
        ["override", "more than 1,000,000 values"],
    ),
    (
        "python-tag",
        "seed=!!python/object/apply:os.system [ls]",
        ["override", "!!python/object/apply:os.system", "not allowed"],
    ),
    ("bad-int", "seed=!!int x", ["override", "cannot be read as int"]),
    ("bad-date", "name=2001-02-30", ["override", "day is out of range"]),
    ("two-documents", "name=a\n---\nb", ["override", "another document"]),
]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [pytest.param(o, f, id=i) for i, o, f in OVERRIDE_FAULTS],
)
def test_override_faults(tmp_path: Path, override: str, fragments: list[str]) -> None:
    recipe = write(tmp_path / "recipe.yaml", RECIPE.format(out=tmp_path / "runs"))
    before = snapshot(tmp_path)
    result = run_cli("train", recipe, override, cwd=tmp_path)
    assert_refused(result, *fragments)
    assert_unchanged(before, tmp_path)


GRID = """\
name: g
output_dir: OUTDIR
base: recipe.yaml
seeds: [0]
cells:
  stl: {model.architecture: single_task}
  hps: {model.architecture: hps}
"""

#: (id, grid file content, recipe content or None for the good one, fragments); "BASE" in a
#: fragment stands for the recipe's path
GRID_FAULTS: list[tuple[str, str | bytes, str | bytes | None, list[str]]] = [
    ("utf-16", GRID.encode("utf-16"), None, [FILE, "byte offset 0", "UTF-16"]),
    ("latin-1", b"name: caf\xe9\n", None, [FILE, "byte offset 9", "not UTF-8"]),
    ("nul", GRID.replace("seeds: [0]", "seeds: [0\x00]"), None, [FILE, "line 4", "NUL"]),
    (
        "syntax",
        GRID.replace("seeds: [0]", "seeds: [0"),
        None,
        [FILE, "line 5, column 6", "not valid YAML"],
    ),
    (
        "duplicate-cell",
        GRID + "  stl: {model.architecture: mtan}\n",
        None,
        [FILE, "line 8, column 3", "duplicate key 'stl'", "first given on line 6"],
    ),
    (
        "duplicate-top",
        GRID + "seeds: [1]\n",
        None,
        [FILE, "line 8, column 1", "duplicate key 'seeds'", "line 4"],
    ),
    ("deep", GRID + "config: " + "[" * 80 + "\n", None, [FILE, "line 8", "deeper than 64"]),
    ("bomb", GRID + BOMB.replace("train:", "x:"), None, [FILE, "more than 1,000,000 values"]),
    ("huge", GRID + "# " + "x" * 1_000_000 + "\n", None, [FILE, "larger than 1,000,000"]),
    ("empty", b"", None, [FILE, "is empty"]),
    ("top-list", "- a\n", None, [FILE, "expected a mapping at the top level"]),
    ("tag", GRID + "protocol: !!python/name:os.system\n", None, [FILE, "line 8", "not allowed"]),
    ("int-config-key", GRID + "config: {1: 2}\n", None, ["key 1", "not a dotted name"]),
    ("empty-key-part", GRID + "config: {train..epochs: 2}\n", None, ["train..epochs", "empty"]),
    (
        "cell-key-into-scalar",
        GRID.replace("single_task}", "single_task, seed.x: 1}"),
        None,
        ["cell 'stl'", "'seed' is not a mapping"],
    ),
    ("base-non-utf8", GRID, b"seed: 0\nname: caf\xe9\n", ["BASE", "byte offset 17", "not UTF-8"]),
    (
        "base-duplicate",
        GRID,
        "seed: 0\ntrain: {epochs: 1, epochs: 2}\n",
        ["BASE", "line 2, column 20", "duplicate key 'epochs'"],
    ),
    ("base-empty", GRID, "", ["BASE", "is empty"]),
]


@pytest.mark.parametrize(
    ("content", "recipe", "fragments"),
    [pytest.param(c, r, f, id=i) for i, c, r, f in GRID_FAULTS],
)
def test_grid_faults(
    tmp_path: Path, content: str | bytes, recipe: str | bytes | None, fragments: list[str]
) -> None:
    out = tmp_path / "grids"
    base = write(tmp_path / "recipe.yaml", RECIPE.format(out=tmp_path / "runs"))
    if recipe is not None:
        write(base, recipe)
    if isinstance(content, str):
        content = content.replace("OUTDIR", str(out))
    grid = write(tmp_path / "grid.yaml", content)
    before = snapshot(tmp_path)
    result = run_cli("compare", grid, "--quiet", cwd=tmp_path)
    names = {FILE: str(grid), "BASE": str(base)}
    assert_refused(result, *(names.get(f, f) for f in fragments))
    assert_unchanged(before, tmp_path)
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        pytest.param("train.epochs=[1", ["override 'train.epochs=[1'", "quote it"], id="syntax"),
        pytest.param("a..b=1", ["empty part"], id="empty-part"),
        pytest.param("seed=\x00", ["NUL"], id="nul"),
    ],
)
def test_grid_with_bad_overrides(tmp_path: Path, override: str, fragments: list[str]) -> None:
    write(tmp_path / "recipe.yaml", RECIPE.format(out=tmp_path / "runs"))
    grid = write(tmp_path / "grid.yaml", GRID.replace("OUTDIR", str(tmp_path / "grids")))
    before = snapshot(tmp_path)
    assert_refused(run_cli("compare", grid, override, "--quiet", cwd=tmp_path), *fragments)
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param(b"seed: 0\nname: caf\xe9\n", ["byte offset 17", "not UTF-8"], id="latin-1"),
        pytest.param(b"seed: 0\x00\n", ["byte offset 7", "NUL"], id="nul"),
        pytest.param("seed: 0\nseed: 1\n", ["line 2, column 1", "duplicate key"], id="dup"),
        pytest.param("train: [1\n", ["not valid YAML"], id="syntax"),
    ],
)
def test_damaged_run_configuration(
    tmp_path: Path, content: str | bytes, fragments: list[str]
) -> None:
    run = tmp_path / "run"
    config = write(run / "config.yaml", content)
    before = snapshot(tmp_path)
    result = run_cli("eval", run, cwd=tmp_path)
    assert_refused(result, str(config), *fragments)
    assert_unchanged(before, tmp_path)
