"""Where id2face keeps what it can rebuild but should not have to rebuild every job:
``$ID2FACE_CACHE``, default ``~/.cache/id2face`` (trained oracles; the compiled kernels of
``id2face anonymize --compile``). A home folder outlives a cluster job; a node's /tmp often does not."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    return Path(os.environ.get("ID2FACE_CACHE", "~/.cache/id2face")).expanduser().joinpath(*parts)
