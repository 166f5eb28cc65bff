"""ComfyUI entry point, so that this repository works when dropped into ComfyUI/custom_nodes/.

Only when imported as a package (ComfyUI's custom-node loader) does it load the nodes in comfy_nodes/;
a plain import (pytest, scripts) does nothing.
"""

if __package__:
    from .comfy_nodes import *  # noqa: F401,F403
    from .comfy_nodes import __all__  # noqa: F401
