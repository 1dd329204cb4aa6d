"""Imported at start-up by every Python process of the vLLM server (it is put on PYTHONPATH by
r4b_core/rollout/vllm_server.py; nothing in site-packages is modified).

vLLM's Llava module imports `transformers.models.pixtral.image_processing_pixtral`, which imports
torchvision. The vLLM environment has no torchvision (PyPI's builds are CUDA builds that break on
CPU), so every Llava model would fail at start-up. vLLM only needs a helper function from that
module, and the PIL variant of the module defines the same names: when torchvision is absent, an
import hook serves the PIL module under the torchvision module's name.
"""

import importlib
import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.models.pixtral.image_processing_pixtral"
_PIL_TWIN = "transformers.models.pixtral.image_processing_pil_pixtral"


class _PilTwinLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # a fresh module object; filled from the PIL twin below

    def exec_module(self, module):
        twin = importlib.import_module(_PIL_TWIN)
        module.__dict__.update({k: v for k, v in vars(twin).items() if not k.startswith("__")})
        module.__doc__ = f"{_PIL_TWIN}, served as {_TARGET} (r4b sitecustomize: no torchvision)"


class _PilTwinFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        return importlib.util.spec_from_loader(fullname, _PilTwinLoader())


if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _PilTwinFinder())
