"""Reading a YAML file of a user's (deploy spec, experiment file) with bounds: a file of at most
``MAX_YAML_BYTES``, UTF-8 text, and a document whose aliases expand to at most
``MAX_YAML_NODES`` nodes, so a billion-laughs file is refused in milliseconds instead of
exhausting memory in whatever walks it next (pydantic, an error message)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class YamlInputError(ValueError):
    """The file cannot be read as bounded YAML; the message says why, never quoting it whole."""


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "a key must be a plain value, not a list or mapping",
                    key_node.start_mark,
                )
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (again on line {line}); keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_text(path: Path) -> str:
    """The file as UTF-8 text, at most MAX_YAML_BYTES; OSError as from open, else
    YamlInputError naming the problem."""
    with path.open("rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise YamlInputError(f"over {MAX_YAML_BYTES >> 10} KiB: a spec is a short YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlInputError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): save it as UTF-8"
        ) from None


def load_bounded(text: str) -> Any:
    """Plain data from YAML text; yaml.YAMLError for bad YAML, YamlInputError when aliases
    expand past MAX_YAML_NODES nodes."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        size = expanded_size(node)
        if size > MAX_YAML_NODES:
            raise YamlInputError(
                f"its aliases (*name) expand to over {MAX_YAML_NODES} values: write the "
                "document out plainly, without nested anchors"
            )
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is copied out: each node's size is
    counted once (aliases share the node object), so this is linear in the file, not in the
    expansion. Capped just past MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids = _children(node)
        if children_done or not kids:
            total = 1 + sum(sizes.get(id(k), 0) for k in kids)
            sizes[id(node)] = min(total, MAX_YAML_NODES + 1)
            visiting.discard(id(node))
            continue
        if id(node) in visiting:
            raise YamlInputError("an alias (*name) refers to a node that contains it: remove it")
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
