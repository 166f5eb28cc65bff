"""Two thin registrations of the same node specs: ComfyUI's ``comfy_api`` (``io.ComfyNode``) and classic."""

from typing import Dict, List, Type

from .nodes import NODE_SPECS, In, NodeSpec


# ------------------------------------------------------------------------------------------------- classic
def classic_input(i: In) -> tuple:
    """``INPUT_TYPES`` entry: ``(type or combo options, {options})``."""
    opts = {"tooltip": i.tooltip}
    if i.is_widget and i.default is not None:  # a file list may be empty: no default, the frontend takes the first
        opts["default"] = i.default
    for key in ("min", "max", "step"):
        if getattr(i, key) is not None:
            opts[key] = getattr(i, key)
    if i.multiline:
        opts["multiline"] = True
    if i.control_after_generate is not None:  # always said, so the frontend's seed convention never guesses
        opts["control_after_generate"] = i.control_after_generate
    if i.type == "COMBO":
        return (i.combo_options(), opts)
    return (i.type, opts)


def classic_node(spec: NodeSpec) -> type:
    def INPUT_TYPES(cls):
        types: Dict[str, dict] = {"required": {}}
        for i in spec.inputs:
            types.setdefault("optional" if i.optional else "required", {})[i.name] = classic_input(i)
        return types

    def run(self, **kwargs):
        return tuple(spec.function(**kwargs))

    return type(spec.node_id, (), {
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(o.type for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in spec.outputs),
        "FUNCTION": "run",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "SEARCH_ALIASES": list(spec.search_aliases),
        "SPEC": spec,
        "run": run,
        "__doc__": spec.description,
        "__module__": __name__,
    })


def classic_mappings():
    classes = {s.node_id: classic_node(s) for s in NODE_SPECS}
    names = {s.node_id: s.display_name for s in NODE_SPECS}
    return classes, names


# ------------------------------------------------------------------------------------------------- comfy_api
def v3_input(io, i: In):
    common = {"tooltip": i.tooltip, "optional": i.optional}
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                            control_after_generate=i.control_after_generate, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=i.combo_options(), default=i.default, **common)
    if i.type == "IMAGE":
        return io.Image.Input(i.name, **common)
    return io.Custom(i.type).Input(i.name, **common)


def v3_output(io, o):
    kind = io.Image if o.type == "IMAGE" else io.Custom(o.type)
    return kind.Output(display_name=o.name, tooltip=o.tooltip)


def v3_node(io, spec: NodeSpec) -> type:
    def define_schema(cls):
        extra = {}
        if "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {}):  # newer ComfyUI
            extra["search_aliases"] = list(spec.search_aliases)
        return io.Schema(node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
                         description=spec.description, inputs=[v3_input(io, i) for i in spec.inputs],
                         outputs=[v3_output(io, o) for o in spec.outputs], **extra)

    def execute(cls, **kwargs):
        return io.NodeOutput(*spec.function(**kwargs))

    return type(spec.node_id, (io.ComfyNode,), {
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "SPEC": spec,
        "__doc__": spec.description,
        "__module__": __name__,
    })


def v3_extension():
    """``(comfy_entrypoint, node classes)`` with ``comfy_api.latest``; raises ImportError without it."""
    from comfy_api.latest import ComfyExtension, io

    nodes: List[Type] = [v3_node(io, s) for s in NODE_SPECS]

    class HARTExtension(ComfyExtension):
        async def get_node_list(self):
            return list(nodes)

    async def comfy_entrypoint():
        return HARTExtension()

    return comfy_entrypoint, nodes
