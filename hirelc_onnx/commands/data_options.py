"""The data options `evaluate` and `compress` share: how image files become input (--scale ... --layout)
and --input-shape; one definition, so both commands read images the same way."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from hirelc_onnx.errors import UserError

__all__ = ["image_options", "image_option_values", "IMAGE_OPTION_NAMES", "input_shape_option", "parse_input_shapes"]

IMAGE_OPTION_NAMES = ("resize", "center_crop", "scale", "offset", "mean", "std", "channel_order", "layout")
"""The click parameter names image_options adds (ImageOptions fields, evaluate/loaders.py)."""


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as exc:
        raise UserError(f"{name} must be comma-separated numbers, got {value!r}") from exc


def _size(value: str | None, name: str) -> int | tuple[int, int] | None:
    """'256' (shorter side / square) or '224x192' (H x W)."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError as exc:
        raise UserError(f"{name} must be N or HxW, got {value!r}") from exc
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise UserError(f"{name} must be N or HxW with positive sizes, got {value!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def image_options(fn: Callable) -> Callable:
    """Add --resize --center-crop --scale --offset --mean --std --channel-order --layout to a command."""
    options = [
        click.option("--resize", help="Images: N resizes the shorter side, HxW exactly (default: model input size)."),
        click.option("--center-crop", help="Images: crop the middle N or HxW after resizing."),
        click.option("--scale", type=float, help="Images: pixel * scale + offset (default 1/255)."),
        click.option("--offset", type=float, help="Images: added after scale (default 0)."),
        click.option("--mean", help="Images: per-channel mean subtracted after scale/offset, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Images: per-channel std divided after the mean."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), help="Images: channel order (default rgb)."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Images: tensor layout (default from the model)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def image_option_values(params: dict[str, Any]) -> dict[str, Any]:
    """Pop the image options out of a command's parameters, parsed into ImageOptions values (None: not given)."""
    raw = {name: params.pop(name, None) for name in IMAGE_OPTION_NAMES}
    return {
        "resize": _size(raw["resize"], "--resize"),
        "center_crop": _size(raw["center_crop"], "--center-crop"),
        "scale": raw["scale"],
        "offset": raw["offset"],
        "mean": _floats(raw["mean"], "--mean"),
        "std": _floats(raw["std"], "--std"),
        "channel_order": raw["channel_order"],
        "layout": raw["layout"],
    }


def input_shape_option(help_text: str) -> Callable:
    """--input-shape, repeatable: [name=]1x3x224x224, several comma-separated in one value too."""
    return click.option("--input-shape", "input_shape", multiple=True, help=help_text)


def parse_input_shapes(values: Sequence[str], input_names: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """'name=1x3x224x224' per input (repeated or comma-separated), or a bare '1x3x224x224' for a
    single-input model (`input_names` needed then; without it the bare form is refused)."""
    shapes = {}
    for item in (part.strip() for v in values for part in v.split(",") if part.strip()):
        name, _, dims = item.rpartition("=")
        if not name:
            if input_names is None or len(input_names) != 1:
                listed = f"the model has inputs {', '.join(input_names)}: " if input_names else ""
                raise UserError(f"{listed}write --input-shape NAME=DIMS, got {item!r}")
            name = input_names[0]
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError as exc:
            raise UserError(f"--input-shape must look like [name=]1x3x224x224, got {item!r}") from exc
        if not shape or min(shape) < 1:
            raise UserError(f"--input-shape dims must be positive, got {item!r}")
        shapes[name] = shape
    return shapes
