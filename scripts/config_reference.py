#!/usr/bin/env python
"""Print the README's config reference (markdown) from the schema; --check compares."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_train.config import (RESUME_CLASSES, _default_of, _yaml_scalar, iter_keys,  # noqa: E402
                                 type_name)

PIPE = "\\|"  # a literal pipe inside a markdown table cell
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def reference() -> str:
    rows = ["| key | type | default | on resume | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for key, tp, f in iter_keys():
        default = _yaml_scalar(_default_of(f)).replace("|", PIPE)
        kind = type_name(tp).replace("|", " " + PIPE + " ")
        resume = RESUME_CLASSES[f.metadata["resume"]].label
        rows.append(f"| `{key}` | {kind} | `{default}` | {resume} | {f.metadata['help']} |")
    legend = ["", "On resume (a checkpoint's stored config against the new one):", ""]
    legend += [f"- **{c.label}**: {c.meaning}" for c in RESUME_CLASSES.values()]
    return "\n".join(rows + legend)


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
