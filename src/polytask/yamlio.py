"""Reading YAML that a user wrote: recipes, grid files, run directories' ``config.yaml`` and
the values of ``key=value`` overrides.

Every way such input can be wrong ends in one :class:`~polytask.errors.ConfigError` of one
line that says where (file, byte offset or line and column) and what:

- a file that is missing, not a regular file, unreadable or larger than :data:`MAX_BYTES`;
- bytes that are not UTF-8 (a UTF-16 or UTF-32 file included), NUL bytes and other
  characters YAML does not allow; a UTF-8 byte-order mark at the very start is accepted;
- YAML syntax errors, with the line and column of the problem;
- a key given twice in one mapping (PyYAML would silently keep the last one);
- nesting deeper than :data:`MAX_DEPTH` lists or mappings, counted through aliases;
- more than :data:`MAX_NODES` values once aliases are expanded (a "billion laughs" file),
  and aliases that refer to themselves: the document is measured before it is built, so
  nothing is ever expanded;
- tags outside plain data (``!!python/object`` ...) and values a tag cannot read
  (``!!int x``, a 13th month in a date, an integer of 5000 digits).

Values never appear in a message at more than :data:`MAX_REPR` characters (:func:`short`).
"""

from __future__ import annotations

import inspect
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_REPR",
    "load_bytes",
    "load_file",
    "load_text",
    "read_mapping",
    "short",
    "show_path",
]

#: the largest YAML file read, in bytes (recipes and grid files are a few kilobytes)
MAX_BYTES = 1_000_000
#: the deepest nesting of lists and mappings
MAX_DEPTH = 64
#: the most values (scalars, lists, mappings) a document may hold, every alias counted as
#: the full value it refers to
MAX_NODES = 1_000_000
#: the longest representation of a value in an error message
MAX_REPR = 200

_MERGE_TAG = "tag:yaml.org,2002:merge"
# what YAML 1.1 allows in a stream (PyYAML's reader), and no byte-order mark after the start
_NOT_ALLOWED = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)
_TAG = re.compile(r"could not determine a constructor for the tag '(.*)'")
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = MAX_REPR
_repr.maxother = MAX_REPR
_repr.maxlong = 60
for _attr in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_repr, _attr, 12)


def short(value: Any, limit: int = MAX_REPR) -> str:
    """``repr(value)`` of at most ``limit`` characters (``...`` where it was cut); never
    expands a large or deeply nested value in full."""
    try:
        text = _repr.repr(value)
    except Exception:  # a value whose repr fails must not hide the message it is in
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_path(path: str | Path, limit: int = 300) -> str:
    """A path as it can be printed on one line: unprintable characters (a newline, bytes that
    were not UTF-8) escaped, and at most ``limit`` characters."""
    text = str(path)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Refused(Exception):
    """A document that is readable YAML but breaks one of the limits."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys and nesting deeper than :data:`MAX_DEPTH`
    while it composes (so that the recursive composer never nears the recursion limit)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        nested = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    f"lists and mappings nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Any] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            first: Any = seen.setdefault((key.tag, key.value), key.start_mark)
            if first is not key.start_mark:
                raise _Refused(
                    f"duplicate key {short(key.value)} (first given on line {first.line + 1}); "
                    "a key may appear once in a mapping",
                    key.start_mark,
                )
        return node


def _guarded(tag: str, construct: Callable[..., Any]) -> Callable[..., Any]:
    """``construct`` with the errors of a value it cannot read (``!!int x``, a 13th month)
    turned into a refusal at the value's position."""

    def guarded(loader: _Loader, node: Node) -> Any:
        try:
            return construct(loader, node)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            name = tag.rsplit(":", 1)[-1]
            why = f": {_one_line(str(exc), 120)}" if str(exc) and name != "bool" else ""
            raise _Refused(
                f"{short(node.value)} cannot be read as {name}{why}", node.start_mark
            ) from None

    return guarded


for _tag, _construct in list(yaml.SafeLoader.yaml_constructors.items()):
    if _tag is not None and not inspect.isgeneratorfunction(_construct):
        _Loader.add_constructor(_tag, _guarded(_tag, _construct))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _measure(root: Node) -> None:
    """Refuse a node graph whose expansion (every alias counted in full) is too deep or too
    large, or that contains itself; without recursion and without expanding anything."""
    done: dict[int, tuple[int, int]] = {}  # id -> (values, depth) once expanded
    open_: set[int] = set()  # nodes whose children are being measured
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_.discard(key)
            count = 1 + sum(done[id(c)][0] for c in children)
            depth = max((done[id(c)][1] for c in children), default=0)
            depth += not isinstance(node, ScalarNode)
            if count > MAX_NODES:
                raise _Refused(
                    f"more than {MAX_NODES:,} values once its aliases are expanded (anchors "
                    "and aliases that multiply); write the values out instead",
                    node.start_mark,
                )
            if depth > MAX_DEPTH:
                raise _Refused(
                    f"lists and mappings nested deeper than {MAX_DEPTH} levels "
                    "once its aliases are expanded",
                    node.start_mark,
                )
            done[key] = (count, depth)
        elif key in open_:
            raise _Refused("an alias refers to a value that contains it", node.start_mark)
        elif key not in done:
            open_.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in done)


def _position(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_characters(text: str, where: str, *, offset: int = 0) -> None:
    bad = _NOT_ALLOWED.search(text)
    if bad is None:
        return
    i = bad.start()
    char = bad.group()
    at = offset + len(text[:i].encode("utf-8"))
    line = text.count("\n", 0, i) + 1
    column = i - (text.rfind("\n", 0, i) + 1) + 1
    if char == "\x00":
        what = "a NUL byte (is it a binary file?)"
    elif char == "\ufeff":
        what = "a byte-order mark (U+FEFF) after the start"
    elif "\udc80" <= char <= "\udcff":
        what = f"byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8"
    else:
        what = f"the character U+{ord(char):04X}, which YAML does not allow"
    raise ConfigError(f"{where}: byte offset {at} (line {line}, column {column}): {what}.")


def load_text(text: str, where: str, *, syntax_hint: str = "") -> Any:
    """The value of one YAML document, read under the rules of this module; ``None`` for an
    empty document. ``where`` starts every message (a file name, ``override 'a=b'``);
    ``syntax_hint`` ends the message of a syntax error."""
    _check_characters(text, where)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(f"{where}, {_position(exc.mark)}: {exc.message}.") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = _one_line(exc.problem or exc.context or "unreadable")
        if exc.context and exc.problem and exc.context_mark is not None:
            problem += f" ({_one_line(exc.context, 100)} on line {exc.context_mark.line + 1})"
        tag = _TAG.search(problem)
        if tag is not None:
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            problem = (
                f"the tag {short(name)} is not allowed: a config file holds plain data "
                "(mappings, lists, strings, numbers, true/false, null)"
            )
        at = f", {_position(mark)}" if mark is not None else ""
        raise ConfigError(f"{where}{at}: not valid YAML: {problem}.{syntax_hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(str(exc))}.") from None
    finally:
        loader.dispose()


def load_file(path: str | Path, *, what: str = "config file") -> Any:
    """The YAML value in the file ``path`` (``None`` if it holds no document)."""
    path = Path(path)
    shown = show_path(path)
    try:
        if not path.exists():
            raise ConfigError(f"{what} not found: {shown} (give the path to a YAML file).")
        if path.is_dir():
            raise ConfigError(f"{shown} is a directory; give the path to a YAML {what}.")
        if not path.is_file():
            raise ConfigError(f"{shown} is not a regular file; give the path to a YAML {what}.")
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(
            f"{shown} cannot be read: {_one_line(exc.strerror or str(exc))}."
        ) from None
    except ValueError:  # a NUL character in the path
        raise ConfigError(f"{what} not found: {shown} (the path is not valid).") from None
    return load_bytes(data, shown, what=what)


def load_bytes(data: bytes, where: str, *, what: str = "config file") -> Any:
    """The YAML value in the bytes of a file (``None`` if they hold no document); ``where``
    (the file's name) starts every message."""
    if len(data) > MAX_BYTES:
        raise ConfigError(
            f"{where} is larger than {MAX_BYTES:,} bytes, the limit for a YAML {what}; "
            "is it the right file?"
        )
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise ConfigError(
                f"{where}: byte offset 0: a {encoding} byte-order mark; the file is {encoding} "
                "text: save it as UTF-8."
            )
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = start + exc.start
        line = data.count(b"\n", 0, at) + 1
        raise ConfigError(
            f"{where}: byte offset {at} (line {line}): byte 0x{data[at]:02x} is not UTF-8; "
            "save the file as UTF-8 text."
        ) from None
    _check_characters(text, where, offset=start)
    return load_text(text, where)


def read_mapping(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """The mapping at the top level of the YAML file ``path``; a file without one (empty,
    comments only, a list, a string) is refused."""
    data = load_file(path, what=what)
    shown = show_path(path)
    if data is None:
        raise ConfigError(
            f"{shown} is empty (or holds only comments): expected a mapping at the top level, "
            "e.g. `train: {epochs: 5}` (write `{}` for all defaults)."
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{shown}: expected a mapping at the top level, found {type(data).__name__} "
            f"{short(data, 80)}."
        )
    return data
