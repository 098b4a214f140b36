"""PyTorch safetensors -> Flax converters, one per model family, with strict verification.

    from converters import convert_student
    result = convert_student("students/resnet20-kd")   # model.safetensors + config.json
    logits = result.model(x_nhwc)

diffusers UNet2DModel folders (class-conditional diffusion students) convert with `convert_unet`.

Torch is only imported by `converters.verify` and `converters.torch_reference`, on demand.
"""

from converters.convert import ConversionResult, convert_student
from converters.diffusers_unet import UNetConversionResult, convert_unet
from converters.keymap import KEYMAP_VERSION, ConversionError
from converters.student import StudentSource, discover

__all__ = ["KEYMAP_VERSION", "ConversionError", "ConversionResult", "StudentSource", "UNetConversionResult",
           "convert_student", "convert_unet", "discover"]
