"""YAML a user hands us (mergekit recipes, lm-eval task files), read with bounds: the bytes under a
size cap (io/fs.read_bounded), and the document refused before it is built when its aliases would
expand past a node limit (a few lines of aliases can expand to gigabytes)."""

from __future__ import annotations

import os

from surgeon.errors import SurgeonError
from surgeon.io.fs import read_bounded

MAX_NODES = 1_000_000  # far more values than any recipe or task config holds


def expanded_nodes(root) -> int:
    """How many values a composed YAML document holds once its aliases are expanded (an alias is the
    same node object again), counted without expanding: each node's size once, by identity."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a node inside itself (a recursive alias) counts as nothing more
            children = node.value if isinstance(node.value, list) else []
            items = [c for pair in children for c in pair] if children and isinstance(children[0], tuple) else children
            sizes[id(node)] = 1 + sum(size(c) for c in items)
        return sizes[id(node)]

    return size(root) if root is not None else 0


def excerpt(text: str, limit: int = 200) -> str:
    """A message's quote of user text: whitespace folded, at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_yaml_file(path: str | os.PathLike, what: str, limit: int, env: str, *, loader=None,
                   max_nodes: int = MAX_NODES):
    """The document of the YAML file at `path`, read as `what` (for messages) with at most `limit`
    bytes (`env` raises it). `loader`: a yaml Loader class (default SafeLoader; a subclass may know
    more tags). Every problem is one SurgeonError line naming the file."""
    import yaml

    loader = loader or yaml.SafeLoader
    raw = read_bounded(path, what, limit, env)
    try:
        text = raw.decode("utf-8")
        nodes = expanded_nodes(yaml.compose(text, Loader=loader))
        if nodes > max_nodes:
            raise SurgeonError(f"{path}: its YAML aliases expand to {nodes:,} values, more than a {what} has "
                               f"(at most {max_nodes:,}); refused before expanding them")
        return yaml.load(text, Loader=loader)  # noqa: S506 -- a safe loader, or a subclass of one
    except UnicodeDecodeError as e:
        raise SurgeonError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise SurgeonError(f"{path}: not valid YAML ({excerpt(str(e))})") from None
    except RecursionError:
        raise SurgeonError(f"{path}: YAML nested too deeply to be a {what}") from None
