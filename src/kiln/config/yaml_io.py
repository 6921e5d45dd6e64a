"""Bounded YAML reading for configs and overrides: a hostile file cannot exhaust the machine.

A config is user input, and YAML lets a few hundred bytes describe a huge value: anchors and
aliases share one node many times (an "alias bomb" expands to 10^9 nodes when a consumer walks it
as a tree), deep nesting overflows the recursive composer, and a path may name a FIFO or
``/dev/zero`` that never ends. So a config is read with these limits, each refused as one
:class:`~kiln.config.ConfigError` that names the file:

* only a regular file (no FIFO, device or directory), opened without blocking;
* at most :data:`MAX_BYTES` bytes, decoded as UTF-8 (the bad byte's offset is named);
* at most :data:`MAX_NODES` nodes *counted through aliases* (the size of the tree a consumer
  sees), counted while composing, before any Python object is built;
* at most :data:`MAX_DEPTH` levels of nesting.

Override values (``key=value`` on the command line) are parsed with the same loader and limits.

Example:
    >>> load_text("a: &x [1, 2]\\nb: *x", "inline")
    {'a': [1, 2], 'b': [1, 2]}
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "YamlLimitError", "load_text", "read_file"]

#: Largest config file read (a real config is a few KiB).
MAX_BYTES = 1 << 20
#: Largest number of YAML nodes, counting each alias as the whole subtree it stands for.
MAX_NODES = 100_000
#: Deepest nesting of mappings/sequences (a real config is under 10 levels deep).
MAX_DEPTH = 64


class YamlLimitError(ValueError):
    """A YAML text exceeds one of the limits; the message says which (without the file name)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts expanded nodes and nesting depth while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        # Expanded size of each composed node, keyed by id (nodes live until loading ends).
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlLimitError(f"is nested deeper than {MAX_DEPTH} levels")
        if self.check_event(AliasEvent):
            anchored = self.anchors.get(self.peek_event().anchor)
            if anchored is not None and id(anchored) not in self._sizes:
                raise YamlLimitError("has an alias inside the node it refers to (a cycle)")
        try:
            node = Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return node
        size = self._sizes.get(id(node))
        if size is None:  # an alias returns its anchor's node, whose size is already known
            size = 1
            for child in _children(node):
                size += self._sizes.get(id(child), 1)
            self._sizes[id(node)] = size
        if size > MAX_NODES:
            raise YamlLimitError(
                f"expands to more than {MAX_NODES} values (anchors/aliases repeat a node; "
                "write the config out plainly)"
            )
        return node


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_text(text: str, source: str) -> Any:
    """Parse YAML ``text`` within the limits.

    Args:
        text: the YAML document.
        source: what the text is, for messages ("configs/x.yaml", "override optim.lr").

    Raises:
        YamlLimitError: a limit is exceeded (message without ``source``).
        yaml.YAMLError: the text is not valid YAML.
        ValueError: a scalar cannot be built (an integer of more than 4300 digits).
    """
    if len(text) > MAX_BYTES:
        raise YamlLimitError(f"is longer than {MAX_BYTES} characters")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_file(path: Path) -> str:
    """The text of a regular file of at most :data:`MAX_BYTES` bytes, decoded as UTF-8.

    Raises:
        YamlLimitError: not a regular file, too large, or not UTF-8 (message without the path).
        OSError: the file cannot be opened or read.
    """
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or special file"
            if stat.S_ISDIR(mode):
                kind = "a directory"
            raise YamlLimitError(f"is {kind}, not a regular YAML file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise YamlLimitError(f"is larger than {MAX_BYTES // 1024} KiB; a config is a few KiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlLimitError(
            f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
