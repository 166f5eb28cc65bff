"""HART's pipeline names in diffusers' namespace, without importing diffusers early.

``DiffusionPipeline.from_pretrained`` looks a folder's string ``_class_name`` up as an attribute of the
``diffusers`` module. :func:`register_pipelines` makes those names resolve there, lazily: if diffusers is
already imported its module learns them now; otherwise they are added right after diffusers' own import
(a one-shot import hook), so ``import hart_pipeline`` costs no torch / diffusers import of its own.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Sequence


def _teach(diffusers: ModuleType, package: ModuleType, names: Sequence[str]) -> None:
    """Resolve ``names`` on the ``diffusers`` module from ``package`` on first access."""
    base = type(diffusers)

    class DiffusersWithHART(base):
        def __getattr__(self, name):
            if name in names:
                value = getattr(package, name)
                setattr(self, name, value)
                return value
            if hasattr(base, "__getattr__"):
                return base.__getattr__(self, name)
            return ModuleType.__getattribute__(self, name)

    DiffusersWithHART.__name__ = base.__name__
    diffusers.__class__ = DiffusersWithHART


class _AfterDiffusersImport(importlib.abc.MetaPathFinder):
    def __init__(self, package: ModuleType, names: Sequence[str]):
        self.package, self.names = package, tuple(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec("diffusers")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_teach(module):
            exec_module(module)
            # diffusers' __init__ puts its lazy module object in sys.modules in place of ``module``
            _teach(sys.modules.get("diffusers", module), self.package, self.names)

        spec.loader.exec_module = exec_and_teach
        return spec


def register_pipelines(package: ModuleType, names: Sequence[str]) -> None:
    if "diffusers" in sys.modules:
        _teach(sys.modules["diffusers"], package, names)
    elif not any(isinstance(f, _AfterDiffusersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterDiffusersImport(package, names))
