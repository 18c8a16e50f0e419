"""YAML as every fedkit config is read: safe types only, no duplicate keys, and (for what a stranger sends)
no aliases.

PyYAML keeps the last of two equal keys without a word, so `role: member` then `role: project_admin` in
project.yml gave an admin project_admin, and a second `participants:` block silently replaced the first.
In a policy file (job_policy.yml, privacy.yml, authorization.yml) that is a setting the reader never sees
take effect. A duplicate key is refused, with its line, as any other YAML error.

Aliases (`*name`) are refused where `aliases=False`: nested aliases are how a few hundred bytes expand to
gigabytes (a "billion laughs"), and a job config has no use for them.

Numbers in exponent form are numbers, as in YAML 1.2 and JSON: YAML 1.1 (PyYAML) reads `1e-3`, `1e9` and
`1.0e5` as text, so `lr: 1e-3` reached a learner as the string '1e-3' and `epochs: 1e9` failed every site.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class AliasRefused(yaml.YAMLError):
    """The text uses an alias where they are refused."""


class _StrictLoader(yaml.SafeLoader):
    allow_aliases = True

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if not self.allow_aliases and self.check_event(yaml.AliasEvent):
            raise AliasRefused("YAML aliases (*name) are not allowed here")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base` may be overridden by the mapping's own keys
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the safe constructor refuses it with its own message
                    continue
                if duplicate:
                    raise ConstructorError("while reading a mapping", node.start_mark,
                                           f"found duplicate key '{key}'", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats that YAML 1.1 leaves as text: an exponent, with or without a decimal point
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


class _NoAliasLoader(_StrictLoader):
    allow_aliases = False


def load(text: str, aliases: bool = True) -> Any:
    """yaml.safe_load that refuses duplicate keys (and aliases with `aliases=False`); raises yaml.YAMLError
    (AliasRefused for an alias)."""
    loader = (_StrictLoader if aliases else _NoAliasLoader)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, in one line: 'at line 7: found duplicate key 'role''."""
    mark = getattr(error, "problem_mark", None)
    at = f"at line {mark.line + 1}: " if mark is not None else ""
    return at + (getattr(error, "problem", None) or str(error).splitlines()[0])
