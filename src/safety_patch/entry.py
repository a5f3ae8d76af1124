"""The ``safety-patch`` console script: settle the memory allocator, then run the CLI.

Kept free of heavy imports: ``allocator.reexec_under_mimalloc`` replaces the process before
torch is loaded, so the re-execution costs an interpreter start, not a torch import.
"""

from __future__ import annotations

import sys


def main() -> int:
    from .allocator import reexec_under_mimalloc
    from .errors import SafetyPatchError

    try:
        reexec_under_mimalloc()
    except SafetyPatchError as e:
        print(f"safety-patch: error: {e}", file=sys.stderr)
        return e.exit_code
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
