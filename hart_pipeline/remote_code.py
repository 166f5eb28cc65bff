"""HART's code travelling with a saved pipeline folder or Hub repo (diffusers' custom pipeline/components).

``save_pretrained`` (and so ``push_to_hub`` and ``hart convert``) writes one generated Python file, the
*bundle*, at the folder root as ``pipeline_hart.py`` and in every HART component folder
(``modeling_hart.py`` / ``scheduling_hart.py``), and points ``model_index.json`` at them::

    "_class_name": ["pipeline_hart", "HARTPipeline"],
    "transformer": ["modeling_hart", "HARTTransformer"], ...

That is diffusers' layout for custom code, so ``DiffusionPipeline.from_pretrained(folder_or_repo,
trust_remote_code=True)`` works where this package is not installed. The bundle holds the sources of the
package's inference modules (one escaped string per module, so diffusers' import scan sees no relative
imports) and serves them as an in-memory package named after their hash: every copy of one bundle yields
the same classes, and bundles of different versions coexist in one process.

``HARTPipeline.from_pretrained`` reads such folders with the installed package instead (no remote code):
:func:`to_installed_index` maps the bundle names back to ``hart_pipeline``.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict

PIPELINE_FILE = "pipeline_hart"
MODULAR_FILE = "modular_hart"  # Hub custom blocks (HARTBlocks.save_pretrained)
COMPONENT_FILES = {"vae": "modeling_hart", "transformer": "modeling_hart", "residual_head": "modeling_hart",
                   "scheduler": "scheduling_hart"}
# the package modules inference needs (training, the CLI, the converter and the built-in model stay out)
EXCLUDED = ("training", "default_model", "cli.py", "convert.py", "__main__.py")

BUNDLE_TEMPLATE = '''"""HART (Hybrid Autoregressive Transformer) inference code, bundled by hart_pipeline {version}.

Written by ``HARTPipeline.save_pretrained`` so that this folder loads without the package:
``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)``. SOURCES maps each module of
the package to its source; they are imported as the in-memory package {package!r}.
"""

import importlib
import importlib.abc
import importlib.util
import linecache
import sys

PACKAGE = {package!r}
SOURCES = {{
{sources}}}


class _BundleLoader(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        relative = name[len(PACKAGE):].lstrip(".").replace(".", "/")
        is_package = (relative + "/__init__.py" if relative else "__init__.py") in SOURCES
        if not is_package and relative + ".py" not in SOURCES:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=is_package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        relative = module.__name__[len(PACKAGE):].lstrip(".").replace(".", "/")
        key = (relative + "/__init__.py" if relative else "__init__.py") if hasattr(module, "__path__") else relative + ".py"
        filename = f"<{{PACKAGE}}/{{key}}>"
        # inspect.getsource (Triton's @jit needs it) finds in-memory sources through linecache
        linecache.cache[filename] = (len(SOURCES[key]), None, SOURCES[key].splitlines(True), filename)
        module.__bundle_sources__ = SOURCES  # lets a pipeline loaded from here save this same code again
        exec(compile(SOURCES[key], filename, "exec"), module.__dict__)


if not any(getattr(finder, "bundle_package", None) == PACKAGE for finder in sys.meta_path):
    _loader = _BundleLoader()
    _loader.bundle_package = PACKAGE
    sys.meta_path.append(_loader)

_package = importlib.import_module(PACKAGE)
{exports}
'''

EXPORTS = ("HARTBlocks", "HARTPipeline", "HARTImg2ImgPipeline", "HARTInpaintPipeline", "HARTTransformer", "HARTHybridTokenizer", "HARTResidualHead", "HARTResidualScheduler")
# the module defining each component class (diffusers looks the load method's base class up in it)
COMPONENT_MODULES = {"HARTTransformer": "models.transformer", "HARTHybridTokenizer": "models.tokenizer",
                     "HARTResidualHead": "models.residual_head", "HARTResidualScheduler": "scheduler"}


def package_sources() -> Dict[str, str]:
    """Relative path -> source of every module the bundle carries (a bundle re-saves its own sources)."""
    if "__bundle_sources__" in globals():
        return dict(globals()["__bundle_sources__"])
    root = Path(__file__).resolve().parent
    sources = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] in EXCLUDED or "__pycache__" in relative:
            continue
        sources[relative] = path.read_text()
    return sources


def bundle_source() -> str:
    """The generated bundle file (deterministic: same package sources, same file)."""
    from . import __version__

    sources = package_sources()
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:12]
    package = f"hart_bundle_{digest}"
    lines = "".join(f"    {name!r}: {source!r},\n" for name, source in sources.items())
    exports = "\n".join(f"{name} = _package.{name}" for name in EXPORTS)
    return BUNDLE_TEMPLATE.format(version=__version__, package=package, sources=lines, exports=exports)


def write_remote_code(folder: str) -> None:
    """Write the bundle files into a saved pipeline ``folder`` and point ``model_index.json`` at them."""
    source = bundle_source()
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    with open(os.path.join(folder, PIPELINE_FILE + ".py"), "w") as f:
        f.write(source)
    index["_class_name"] = [PIPELINE_FILE, "HARTPipeline"]
    for component, module in COMPONENT_FILES.items():
        entry = index.get(component)
        if not entry or entry[1] not in COMPONENT_MODULES or not os.path.isdir(os.path.join(folder, component)):
            continue
        with open(os.path.join(folder, component, module + ".py"), "w") as f:
            f.write(source)
        index[component] = [module, entry[1]]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def to_installed_index(index: dict, package: str = "hart_pipeline") -> dict:
    """A ``model_index.json`` dict with the bundle's names replaced by ``package`` (the importing one)."""
    index = dict(index)
    if isinstance(index.get("_class_name"), list) and index["_class_name"][0] == PIPELINE_FILE:
        index["_class_name"] = index["_class_name"][1]
    for component, module in COMPONENT_FILES.items():
        entry = index.get(component)
        if isinstance(entry, list) and entry[0] == module and entry[1] in COMPONENT_MODULES:
            index[component] = [f"{package}.{COMPONENT_MODULES[entry[1]]}", entry[1]]
    return index
