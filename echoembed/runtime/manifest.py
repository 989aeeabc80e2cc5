"""Old location of the artifact contract, kept importable: it moved to ``echoembed.artifact`` in
0.3.0 (import from there). This name is the same module object as ``echoembed.artifact.manifest``.
``check_target``/``install_dir`` are gone: use ``echoembed.artifact.staged_dir``."""

from __future__ import annotations

import sys

from echoembed.artifact import manifest as _manifest

sys.modules[__name__] = _manifest
