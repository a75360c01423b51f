#!/usr/bin/env python
"""Print the README's config reference (markdown) from the schema; --check compares."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_train.config import _default_of, _yaml_scalar, iter_keys, type_name  # noqa: E402

PIPE = "\\|"  # a literal pipe inside a markdown table cell
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def reference() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, f in iter_keys():
        default = _yaml_scalar(_default_of(f)).replace("|", PIPE)
        kind = type_name(tp).replace("|", " " + PIPE + " ")
        rows.append(f"| `{key}` | {kind} | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def main() -> int:
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    text = open(readme, encoding="utf-8").read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{reference()}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("README.md config reference is stale: run scripts/config_reference.py --write")
            return 1
        return 0
    if "--write" in sys.argv:
        open(readme, "w", encoding="utf-8").write(new)
    else:
        print(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
