"""``python -m millstream.task SPEC.json``: run one attempt in a fresh interpreter."""

from __future__ import annotations

import json
import sys

from millstream.task.runner import run_spec
from millstream.task.spec import EXIT_INFRA_FAILURE, TaskSpec


def main(argv: list[str]) -> int:
    """Read the spec file named on the command line and run it."""
    if len(argv) != 1:
        print("usage: python -m millstream.task SPEC.json", file=sys.stderr)
        return EXIT_INFRA_FAILURE
    with open(argv[0], encoding="utf-8") as f:
        spec = TaskSpec.from_dict(json.load(f))
    return run_spec(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
