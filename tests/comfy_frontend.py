"""What ComfyUI's frontend (ComfyUI_frontend 1.27, the version ComfyUI's requirements pin) does with a node
definition from ``/object_info``, reduced to the rules the HART workflows depend on:

* every widget input (INT, FLOAT, STRING, BOOLEAN, a combo list) becomes a widget, required inputs first
  then optional ones, in ``input_order`` (else dict) order;
* an INT input gets a second "control_after_generate" widget (default value "randomize") when its options
  say ``control_after_generate: true``, or when they do not say it at all and the input is named
  ``seed`` or ``noise_seed`` (``useIntWidget``: ``inputSpec.control_after_generate ?? ['seed',
  'noise_seed'].includes(inputSpec.name)``);
* a combo with ``image_upload`` (LoadImage) gets an "upload" button widget after it;
* a saved workflow stores ``widgets_values`` in widget order, the control and upload widgets included, and
  the prompt sent to ``/prompt`` holds the widget values without them (``serialize: false``).
"""

from typing import Dict, List, Tuple

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL = "control_after_generate"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD = "upload"


def ordered_inputs(node_info: dict) -> List[Tuple[str, tuple]]:
    """(name, (type, options)) of every input, required then optional, as the frontend walks them."""
    inputs = node_info["input"]
    order = node_info.get("input_order", {})
    out = []
    for group in ("required", "optional"):
        names = order.get(group, list(inputs.get(group, {})))
        out.extend((name, tuple(inputs[group][name])) for name in names)
    return out


def is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == "COMBO"


def has_control(name: str, spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    if spec[0] != "INT":
        return bool(options.get(CONTROL, False))
    return bool(options.get(CONTROL, name in ("seed", "noise_seed")))


def combo_options(spec: tuple) -> list:
    """A combo's choices: ``[[choices], {...}]`` (classic) or ``["COMBO", {"options": [...]}]`` (comfy_api)."""
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1]["options"])


def widget_names(node_info: dict) -> List[str]:
    """The widgets the frontend creates, in order (control widgets named ``control_after_generate``)."""
    names = []
    for name, spec in ordered_inputs(node_info):
        if is_widget(spec):
            names.append(name)
            if has_control(name, spec):
                names.append(CONTROL)
            if len(spec) > 1 and spec[1].get("image_upload"):
                names.append(UPLOAD)
    return names


def socket_names(node_info: dict) -> List[str]:
    return [name for name, spec in ordered_inputs(node_info) if not is_widget(spec)]


def prompt_inputs(node_info: dict, widgets_values: list) -> Dict[str, object]:
    """The widget part of a node's ``/prompt`` inputs from its saved ``widgets_values``."""
    names = widget_names(node_info)
    if len(names) != len(widgets_values):
        raise AssertionError(f"{len(widgets_values)} widget values for the widgets {names}")
    return {n: v for n, v in zip(names, widgets_values) if n not in (CONTROL, UPLOAD)}


def ui_to_api(workflow: dict, object_info: Dict[str, dict]) -> Dict[str, dict]:
    """A saved UI workflow -> the API prompt the frontend queues (links become [node id, output slot])."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        inputs = prompt_inputs(info, list(node.get("widgets_values", [])))
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
