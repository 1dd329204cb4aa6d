"""The vLLM server's r4b plugins (r4b_core/assets: r4b_vllm_serving.py, r4b_thinking.py) imported
in the platform environment for tests, under the module names the server imports them by (the
assets folder is the server's PYTHONPATH, not a package)."""

from __future__ import annotations

import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "r4b_core" / "assets"
if str(ASSETS) not in sys.path:
    sys.path.append(str(ASSETS))   # appended: assets/sitecustomize.py must not shadow anything

import r4b_thinking as THINKING  # noqa: E402
import r4b_vllm_serving as PLUGIN  # noqa: E402

__all__ = ["PLUGIN", "THINKING"]
