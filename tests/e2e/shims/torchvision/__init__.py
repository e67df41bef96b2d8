"""Import-only stand-in for torchvision, for the end-to-end test's ComfyUI server on CPU torch.

ComfyUI 0.3.75 imports torchvision at start-up (``comfy/ldm/cascade/stage_c_coder.py``) but only uses it for
Stable Cascade, Cosmos and ACE models. No PyPI torchvision loads beside ``torch==2.13.0+cpu`` (its ``_C`` needs the
CUDA libraries), so the test server gets this package on its ``PYTHONPATH`` instead:

* ``import torchvision`` and ``import torchvision.<anything>`` succeed;
* every attribute is a placeholder that raises ``ImportError`` when called, so a model that really needs
  torchvision fails loudly at run time instead of computing something wrong;
* there is no ``dist-info``: ``importlib.metadata`` reports no torchvision distribution. (transformers 5 checks
  only ``find_spec`` and so believes torchvision is there; the server uses transformers for tokenizers only, which
  never touch it.)

Only the test server sees this package (``PYTHONPATH``); it is never installed into the venv.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+e2e.shim"
_MESSAGE = "{name} needs the real torchvision; the end-to-end test server runs with an import-only shim"


class _Missing:
    """Any torchvision object: calling it raises ImportError; its attributes are placeholders too."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise ImportError(_MESSAGE.format(name=self._name))

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Missing(f"{self._name}.{attribute}")

    def __repr__(self) -> str:
        return f"<torchvision shim placeholder {self._name}>"


def _module_getattr(module_name: str):
    def __getattr__(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Missing(f"{module_name}.{attribute}")

    return __getattr__


class _ShimSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import torchvision.x.y`` give a module whose attributes are placeholders."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


__getattr__ = _module_getattr(__name__)
if not any(isinstance(finder, _ShimSubmodules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ShimSubmodules())
