"""Real trained checkpoints (the `ccexam` package, MIT: MNIST/USPS/SVHN CNNs, two with BatchNorm),
converted from their PyTorch pickles and from safetensors, checked against ccexam's OWN model
classes: a reference written by someone else."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import convert_student
from converters.verify import probe_inputs, verify_conversion

CCEXAM = importlib.util.find_spec("ccexam")
pytestmark = pytest.mark.skipif(CCEXAM is None, reason="pip install --no-deps ccexam==1.0.0 (see README test command)")

PRE = {
    "mnist": {"input_size": [28, 28], "channels": 1, "mean": [0.1307], "std": [0.3081]},
    "usps": {"input_size": [16, 16], "channels": 1, "mean": [0.2471], "std": [0.2994]},
    "svhn": {"input_size": [32, 32], "channels": 3, "mean": [0.4377, 0.4438, 0.4728], "std": [0.198, 0.201, 0.197]},
}
ARCH = {
    "mnist": {"cfg": [32, "M", 64, "M"], "batch_norm": False, "avgpool": None, "classifier_hidden": [128], "dropout": "none", "in_channels": 1, "num_classes": 10},
    "usps": {"cfg": [32, "M", 64, "M"], "batch_norm": True, "avgpool": None, "classifier_hidden": [128], "dropout": "before_linear", "dropout_p": 0.3, "in_channels": 1, "num_classes": 10},
    "svhn": {"cfg": [32, 32, "M", 64, 64, "M", 128, 128, "M"], "batch_norm": True, "nested_blocks": True, "avgpool": None, "classifier_hidden": [256], "dropout": "before_linear", "dropout_p": 0.3, "in_channels": 3, "num_classes": 10},
}
CLASSES = {"mnist": ("MNISTNet", {"input_size": 28}), "usps": ("USPSNet", {"input_size": 16}), "svhn": ("SVHNNet", {"input_size": 32})}


def ccexam_dir() -> Path:
    return Path(CCEXAM.submodule_search_locations[0])


def ccexam_model(name):
    # Load ccexam/models.py alone: the package's other modules import torchvision.
    spec = importlib.util.spec_from_file_location("ccexam_models", ccexam_dir() / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cls, kwargs = CLASSES[name]
    model = getattr(mod, cls)(**kwargs)
    model.load_state_dict(torch.load(ccexam_dir() / "weights" / f"{name}.pth", map_location="cpu", weights_only=True))
    return model.eval()


def config(name):
    return {"format_version": 1, "family": "vgg", "arch": ARCH[name], "preprocessing": PRE[name]}


@pytest.mark.parametrize("name", ["mnist", "usps", "svhn"])
def test_real_checkpoint_matches_its_own_pytorch_class(name, tmp_path):
    ref = ccexam_model(name)
    d = tmp_path / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config(name)))
    result = convert_student(d)
    x = probe_inputs(result.config, 16, seed=0)
    with torch.no_grad():
        t_logits = ref(torch.from_numpy(x)).numpy()
    j_logits = np.asarray(result.model(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(j_logits, t_logits, rtol=1e-5, atol=1e-4)
    assert (j_logits.argmax(-1) == t_logits.argmax(-1)).all()
    v = verify_conversion(result)  # and against our own reference, input-gradients included
    assert v["ok"], v


@pytest.mark.parametrize("name", ["usps", "svhn"])
def test_real_pickle_needs_opt_in_then_loads_weights_only(name, tmp_path):
    pth = tmp_path / name / "weights.pth"
    pth.parent.mkdir()
    pth.write_bytes((ccexam_dir() / "weights" / f"{name}.pth").read_bytes())
    (pth.parent / "config.json").write_text(json.dumps(config(name)))
    with pytest.raises(ValueError, match="pickle-based checkpoint refused"):
        convert_student(pth.parent)
    result = convert_student(pth.parent, allow_pickle=True)
    assert result.report["source"]["format"] == "pickle(weights_only)"
    x = probe_inputs(result.config, 8, seed=1)
    with torch.no_grad():
        t_logits = ccexam_model(name)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(result.model(x.transpose(0, 2, 3, 1))), t_logits, rtol=1e-5, atol=1e-4)


def test_real_checkpoint_architecture_is_inferred_without_config(tmp_path):
    """The SVHN net's nested VGG layout and input size are recovered from its keys and shapes."""
    ref = ccexam_model("svhn")
    d = tmp_path / "svhn"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(d / "model.safetensors"))
    result = convert_student(d)
    arch = result.config.arch
    assert list(arch.cfg) == ARCH["svhn"]["cfg"] and arch.nested_blocks and arch.dropout == "before_linear"
    assert list(result.config.preprocessing.input_size) == [32, 32]
