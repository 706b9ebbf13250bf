"""Reading YAML that other people wrote (recipes, lm-eval task folders): bounded, safe, never running code.

A recipe or a task folder is a file people share. :func:`load_yaml_bounded` parses with ``yaml.SafeLoader`` (no
Python objects), refuses a document whose anchors and aliases expand to more than ``max_values`` values or refer to
themselves (a 2 KB "billion laughs" file stands for billions of values: any code that walks it, validates it or
formats it into a message would never finish), and a document nested too deeply to be data. ``tags`` adds
constructors for the application tags a format allows (lm-eval's ``!function``), which see the tag's text only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from moecompress.errors import MoECompressError


def load_yaml_bounded(text: str, *, max_values: int, where: str, error: type[MoECompressError],
                      tags: dict[str, Callable[[str], Any]] | None = None) -> Any:
    """The data of the YAML ``text``; ``error`` naming ``where`` for invalid YAML, an alias expansion above
    ``max_values``, a self-referring alias, or nesting deeper than Python can follow."""

    class Loader(yaml.SafeLoader):
        def construct_document(self, node):
            expanded_size(node, max_values, where, error)
            return super().construct_document(node)

    for tag, build in (tags or {}).items():
        Loader.add_constructor(tag, lambda loader, node, build=build: build(str(loader.construct_scalar(node))))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as problem:
        raise error(f"{where} is not valid YAML: {problem}") from None
    except RecursionError:
        raise error(f"{where} nests its values too deeply to be a recipe or task file; check the brackets") from None


def expanded_size(root: yaml.Node, limit: int, where: str, error: type[MoECompressError]) -> int:
    """The number of values ``root`` stands for once every alias is expanded, counted on the composed node graph
    (each node once, so a bomb is measured in microseconds); ``error`` above ``limit`` or for a cycle."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > limit:
                raise error(f"{where}: its YAML anchors and aliases expand to more than {limit} values (line "
                            f"{node.start_mark.line + 1}); write the values out, or use fewer nested aliases")
            continue
        if key in on_path:
            raise error(f"{where}: the YAML alias at line {node.start_mark.line + 1} refers to itself; remove the "
                        "cycle")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]
