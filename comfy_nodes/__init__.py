"""ComfyUI nodes for HART (hart_pipeline), stage by stage.

Registration: with ComfyUI's ``comfy_api.latest`` importable, the pack exposes ``comfy_entrypoint`` (a
``ComfyExtension`` of ``io.ComfyNode`` classes) and ``NODE_CLASS_MAPPINGS = None`` (ComfyUI's loader takes
the classic mappings first when they are not None); otherwise the classic ``NODE_CLASS_MAPPINGS``.
``HART_COMFY_API=classic`` forces the classic registration. Both are built from the same specs
(``nodes.NODE_SPECS``); ``CLASSIC_NODE_CLASS_MAPPINGS`` is always available. The node ids are also listed in
the repository's ``node_list.json``, which ComfyUI-Manager's scanner reads (the classes are built in code).
"""

import os
import sys

try:
    import hart_pipeline  # noqa: F401
except ImportError:  # the repository dropped into custom_nodes/ without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import hart_pipeline  # noqa: F401

from . import runtime
from .handles import HART_CONDITIONING, HART_MODEL, HART_TOKENS, HARTConditioning, HARTModel, HARTTokenHandle
from .nodes import NODE_SPECS, SPECS_BY_ID
from .registration import classic_mappings

runtime.register_model_folder()
runtime.install_example_inputs()

# Served by ComfyUI under /extensions/<pack>/: docs/<node id>.md are the nodes' help pages in the frontend.
WEB_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")

CLASSIC_NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = classic_mappings()
NODE_CLASS_MAPPINGS = CLASSIC_NODE_CLASS_MAPPINGS
API = "classic"

if os.environ.get("HART_COMFY_API", "").lower() != "classic":
    try:
        from .registration import v3_extension

        comfy_entrypoint, V3_NODES = v3_extension()
        NODE_CLASS_MAPPINGS = None
        API = "comfy_api.latest"
    except ImportError:
        pass

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "CLASSIC_NODE_CLASS_MAPPINGS", "NODE_SPECS",
           "SPECS_BY_ID", "HART_MODEL", "HART_CONDITIONING", "HART_TOKENS", "HARTModel", "HARTConditioning",
           "HARTTokenHandle", "API"] + (["comfy_entrypoint"] if API != "classic" else [])
