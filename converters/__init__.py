"""PyTorch safetensors -> Flax converters, one per model family, with strict verification.

    from converters import convert_student
    result = convert_student("students/resnet20-kd")   # model.safetensors + config.json
    logits = result.model(x_nhwc)

Torch is only imported by `converters.verify` and `converters.torch_reference`, on demand.
"""

from converters.convert import ConversionResult, convert_student
from converters.keymap import KEYMAP_VERSION, ConversionError
from converters.student import StudentSource, discover

__all__ = ["KEYMAP_VERSION", "ConversionError", "ConversionResult", "StudentSource", "convert_student", "discover"]
