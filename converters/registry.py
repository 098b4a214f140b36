"""One converter module per family: how to recognise its state dicts and infer its architecture.

The key map itself is generic (`converters/keymap.py`); a family converter only adds what the
weights alone cannot say.
"""

from converters import alexnet, densenet, mobilenetv2, resnet, vgg

CONVERTERS = {m.FAMILY: m for m in (resnet, vgg, mobilenetv2, densenet, alexnet)}
