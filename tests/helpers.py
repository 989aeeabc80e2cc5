"""Shared test helpers: data paths, the heavy-import blocker, sample texts.

Test modules import these from here (never from each other or from ``conftest``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STSB_DEV = SHARED_DATA / "stsb" / "dev.tsv"
STSB_TEST = SHARED_DATA / "stsb" / "test.tsv"

# Five short English sentences of different lengths (the reference and bnb tests embed them).
SAMPLE_TEXTS = [
    "A man is playing the guitar.",
    "Hello world",
    "The stock market fell sharply after the announcement of new tariffs on steel imports.",
    "Kids play.",
    "A woman slices an onion in the kitchen while listening to the radio.",
]

# Prepended to a child interpreter's code: importing torch, transformers or optimum then fails.
BLOCK_HEAVY = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "optimum"}:
                raise ImportError(f"blocked import of {name} (test)")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def run_blocked(code: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``BLOCK_HEAVY`` installed first.

    ``timeout`` only guards against a hang (a passing run takes seconds).
    """
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
