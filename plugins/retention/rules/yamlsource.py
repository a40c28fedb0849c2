"""Read a YAML document and remember the line of every key and list item.

Validation errors name ``file:line``; PyYAML's node tree has the marks, so we compose
the tree ourselves and keep a map from data paths to lines. Two YAML traps are closed
on the way: duplicate keys (PyYAML silently keeps the last) and YAML 1.1 booleans
(``NO``, ``on``, ``yes`` would otherwise turn a country code or a status into a bool).
Three more keep any file, however broken, a located problem rather than a crash:
date-looking scalars stay strings (no rule field wants a YAML timestamp, and
``2024-02-30`` made the timestamp constructor raise), explicit tags are refused,
and nesting is bounded (a 5,000-deep document exhausted the recursion limit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists a rule file may use (real rules use under 20)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false are bools) and no aliases.

    Aliases are refused: a rule is read by reviewers line by line, and an alias can
    make a small file expand without bound (or refer to itself). Explicit tags
    (``!!timestamp``, ``!!binary``) are refused too: every rule value is a plain string,
    number, boolean, list or mapping, and a tag only asks a constructor for something else.
    """

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YamlProblem(
                f"aliases (*{event.anchor}) are not allowed in rule files: write the value out",
                event.start_mark.line + 1,
            )
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!":
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise YamlProblem(
                f"YAML tags ({shown}) are not allowed in rule files: write the plain value, quoted if need be",
                event.start_mark.line + 1,
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            # The composer recurses once per level: refuse before Python's stack runs out.
            if self._depth >= MAX_DEPTH:
                raise YamlProblem(
                    f"nested more than {MAX_DEPTH} levels deep; a rule file needs far fewer",
                    event.start_mark.line + 1,
                )
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    def construct_object(self, node, deep=False):
        # Tags are refused above, so this should not fail; if a constructor still raises,
        # it is a problem at this node's line, never a traceback.
        try:
            return super().construct_object(node, deep)
        except (YamlProblem, yaml.YAMLError):
            raise
        except Exception as exc:
            raise YamlProblem(f"cannot read this value: {exc}", node.start_mark.line + 1) from None


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


class YamlProblem(Exception):
    """The text is not YAML we accept; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None, path: Path = ()):
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


@dataclass
class LocatedDocument:
    """A parsed document and the 1-based line of each path inside it."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """Line of the longest prefix of ``path`` that exists in the document."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def load_located(text: str) -> LocatedDocument:
    """Parse one YAML document, keeping line numbers; raise :class:`YamlProblem`."""
    loader = None
    try:
        loader = _Loader(text)  # the reader checks every character here
        node = loader.get_single_node()
        if node is None:
            raise YamlProblem("the file is empty", 1)
        lines: dict[Path, int] = {(): node.start_mark.line + 1}
        _collect_lines(node, (), lines)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        # The context mark is where the broken construct began (an unclosed bracket);
        # the problem mark is where the parser gave up, often lines later.
        problem = exc.problem or str(exc)
        if exc.context_mark is not None and exc.problem_mark is not None and (
            exc.context_mark.line != exc.problem_mark.line
        ):
            problem += f" ({exc.context} on line {exc.context_mark.line + 1}, noticed on line {exc.problem_mark.line + 1})"
        unclosed = exc.context_mark is not None and any(
            word in (exc.context or "") for word in ("flow", "quoted scalar")
        )
        mark = exc.context_mark if unclosed else (exc.problem_mark or exc.context_mark)
        line = mark.line + 1 if mark is not None else None
        raise YamlProblem(f"not valid YAML: {problem}", line) from None
    except yaml.reader.ReaderError as exc:
        # Control characters (NUL, form feeds from a binary paste) are refused by the reader.
        line = text[: exc.position].count("\n") + 1
        raise YamlProblem(f"not valid YAML: character #x{exc.character:04x} is not allowed in a YAML file"
                          if isinstance(exc.character, int) else f"not valid YAML: {exc.reason}", line) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {exc}", None) from None
    finally:
        if loader is not None:
            loader.dispose()
    return LocatedDocument(data, lines)


def _collect_lines(node: yaml.Node, path: Path, lines: dict[Path, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlProblem(
                    f"key {key!r} appears twice (first on line {seen[key]}); YAML would keep only the last",
                    line,
                    path + (key,),
                )
            seen[key] = line
            lines[path + (key,)] = line
            _collect_lines(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _collect_lines(item, path + (index,), lines)
