"""Pixel synthesis and end-to-end detection in eager PyTorch: the same work as kdd_jax's engine.

The student is the `converters.torch_reference` module (torchvision names) loaded from the same
`model.safetensors` + `config.json` a student directory holds, in eval mode (BatchNorm normalises
with its running statistics) with every parameter frozen (`requires_grad_(False)`: gradients
flow to the probes only). Forward hooks on every `nn.BatchNorm2d` capture the batch statistics of
the layer's input while the model runs, DeepInversion-style.

Per step, on normalised NCHW probes x (kdd_jax.synthesis.pixel, same defaults):

    L = bn_weight * sum_l (||mu_l(x) - mu_l^run||^2 + ||sqrt(var_l(x) + 1e-8) - sqrt(var_l^run + 1e-8)||^2)
      + ce_weight * mean_n(-sum_c w_nc log_softmax(f(x))_nc)           (mixed-label soft targets w)
      + tv_weight * (mean |x[.., 1:, :] - x[.., :-1, :]| + mean |x[.., :, 1:] - x[.., :, :-1]|)
      + l2_weight * mean(x^2)

then one `torch.optim.Adam` step (lr 0.05 by default, betas/eps as optax.adam) and a clamp to the
per-channel bounds that preprocessing.value_range maps to. Variance is the biased one (as BN
itself uses), computed per channel over (N, H, W).

`sc` arguments are `kdd_jax.synthesis.SynthesisConfig` objects (or anything with the same
fields); this module itself never imports jax.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.reference_torch.scores import log_probs_from, neg_kl_scores

BN_EPS_SQRT = 1e-8  # inside the square roots of the BN-statistics loss (kdd_jax.synthesis.losses)
DEFAULT_LR = 0.05  # kdd_jax pixel synthesis default when sc.lr is None


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else config


# ----------------------------------------------------------------------------- students


def load_torch_student(path: str | Path, config: dict | None = None) -> tuple[nn.Module, dict]:
    """(model, config dict) from a student directory (model.safetensors + config.json): the
    torchvision-named reference module, float32, eval mode, parameters frozen."""
    from safetensors.torch import load_file

    from converters.torch_reference import build_torch_model

    path = Path(path)
    cfg = config if config is not None else json.loads((path / "config.json").read_text())
    model = build_torch_model(cfg)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return frozen(model), cfg


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def save_student(model: nn.Module, config: dict, directory: str | Path) -> Path:
    """Publish a torch model as a student directory (model.safetensors + config.json)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    return d


# ----------------------------------------------------------------------------- loss


class BNStatisticsHooks:
    """Forward hooks on every BatchNorm2d: each call adds that layer's term of the BN-statistics
    loss (batch mean / std of its input vs its running statistics) to a list; `pop()` returns their
    sum and clears it. Reads the module's running stats at call time, so it also works under
    `torch.func.functional_call` (stacked weights substituted in)."""

    def __init__(self, model: nn.Module):
        self._terms: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.count = len(self._handles)

    def _hook(self, module, inputs, output):
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), correction=0)
        self._terms.append((mean - module.running_mean).square().sum()
                           + (torch.sqrt(var + BN_EPS_SQRT) - torch.sqrt(module.running_var + BN_EPS_SQRT)).square().sum())

    def pop(self) -> torch.Tensor:
        total = torch.stack(self._terms).sum() if self._terms else torch.zeros(())
        self._terms.clear()
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """NCHW: mean |vertical differences| + mean |horizontal differences|."""
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def synthesis_loss(logits, bn_term, x, targets, weights) -> torch.Tensor:
    """weights: (bn, ce, tv, l2)."""
    w_bn, w_ce, w_tv, w_l2 = weights
    return (w_bn * bn_term + w_ce * soft_cross_entropy(logits, targets) + w_tv * total_variation(x)
            + w_l2 * x.square().mean())


def _weights(sc) -> tuple[float, float, float, float]:
    return (sc.bn_weight, sc.ce_weight, sc.tv_weight, sc.l2_weight)


def normalised_bounds(config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds [1, C, 1, 1] of valid pixels in normalised space."""
    pre = _config_dict(config)["preprocessing"]
    mean = torch.tensor(pre["mean"], dtype=torch.float32)
    std = torch.tensor(pre["std"], dtype=torch.float32)
    lo, hi = pre.get("value_range", [0.0, 1.0])
    return ((lo - mean) / std).view(1, -1, 1, 1), ((hi - mean) / std).view(1, -1, 1, 1)


def mixed_label_targets(n: int, num_classes: int, generator: torch.Generator, mix: bool = True) -> torch.Tensor:
    """lambda e_i + (1 - lambda) e_j for random classes i != j, lambda ~ U(0, 1) (one-hot round robin
    without `mix`)."""
    if not mix:
        return F.one_hot(torch.arange(n) % num_classes, num_classes).float()
    first = torch.randint(0, num_classes, (n,), generator=generator)
    second = (first + torch.randint(1, max(num_classes, 2), (n,), generator=generator)) % num_classes
    lam = torch.rand(n, 1, generator=generator)
    return lam * F.one_hot(first, num_classes).float() + (1 - lam) * F.one_hot(second, num_classes).float()


def initial_probes(config, sc) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 normalised NCHW, soft targets) from torch's RNG, distributed as kdd_jax's init."""
    cfg = _config_dict(config)
    pre = cfg["preprocessing"]
    g = torch.Generator().manual_seed(sc.seed)
    lo, hi = normalised_bounds(cfg)
    x = torch.randn(sc.n_probes, pre["channels"], *pre["input_size"], generator=g) * sc.init_scale
    if getattr(sc, "init", "zero") == "low":
        x = lo + x.abs()
    x = torch.maximum(torch.minimum(x, hi), lo)
    return x, mixed_label_targets(sc.n_probes, cfg["arch"]["num_classes"], g, sc.mix_labels)


def _check_supported(sc) -> None:
    if getattr(sc, "restarts", 1) != 1 or getattr(sc, "jitter", 0) or getattr(sc, "flip", False):
        raise NotImplementedError("the torch reference covers restarts=1, jitter=0, flip=False (kdd_jax's defaults)")


# ----------------------------------------------------------------------------- pixel synthesis


def synthesize_pixels_torch(model: nn.Module, config, sc, *, x0: torch.Tensor | None = None,
                            targets: torch.Tensor | None = None, use_bn: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Optimise sc.n_probes probes for sc.steps Adam steps through the frozen `model`.
    Returns (probes normalised NCHW, targets, loss history [steps]). x0 / targets default to
    `initial_probes(config, sc)`; pass kdd_jax's to replay exactly the same optimisation."""
    _check_supported(sc)
    if x0 is None or targets is None:
        x_init, t_init = initial_probes(config, sc)
        x0 = x_init if x0 is None else x0
        targets = t_init if targets is None else targets
    lo, hi = (b.to(x0.device) for b in normalised_bounds(config))  # the model's device (x0 is put there)
    weights = _weights(sc)
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=sc.lr if sc.lr is not None else DEFAULT_LR)
    history = []
    with BNStatisticsHooks(model if use_bn else nn.Identity()) as hooks:  # BN-free: no hooks at all
        if use_bn and hooks.count == 0:
            raise ValueError("the BN-statistics loss needs a student with BatchNorm layers")
        for _ in range(sc.steps):
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = synthesis_loss(logits, hooks.pop() if use_bn else 0.0, x, targets, weights)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            history.append(loss.detach())  # read back once at the end: no device sync per step on a GPU
    hist = torch.stack(history).cpu().numpy() if history else np.zeros(0)
    return x.detach(), targets, np.asarray(hist, np.float32)


def synthesize_pixels_torch_vmap(models: list[nn.Module], config, sc, x0s: torch.Tensor, targets: torch.Tensor,
                                 *, use_bn: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """The same synthesis for S students of one architecture at once: `torch.func.vmap` over their
    weights stacked by `torch.func.stack_module_state` (one functional_call of a weightless copy).
    x0s [S, N, C, H, W], targets [S, N, classes]. One Adam over the stacked probes equals S
    independent Adams (Adam is element-wise and the summed loss separates by student).
    Returns (probes [S, N, C, H, W], loss history [steps, S])."""
    from torch.func import functional_call, stack_module_state, vmap

    _check_supported(sc)
    params, buffers = stack_module_state(list(models))
    base = copy.deepcopy(models[0]).to("meta")
    lo, hi = (b.to(x0s.device) for b in normalised_bounds(config))
    weights = _weights(sc)
    history = []
    with BNStatisticsHooks(base) as hooks:
        def one(p, b, x, t):
            logits = functional_call(base, (p, b), (x,))
            bn = hooks.pop()
            return synthesis_loss(logits, bn if use_bn else 0.0, x, t, weights)

        batched = vmap(one)
        xs = x0s.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([xs], lr=sc.lr if sc.lr is not None else DEFAULT_LR)
        for _ in range(sc.steps):
            opt.zero_grad(set_to_none=True)
            losses = batched(params, buffers, xs, targets)
            losses.sum().backward()
            opt.step()
            with torch.no_grad():
                xs.clamp_(lo, hi)
            history.append(losses.detach().clone())
    return xs.detach(), torch.stack(history).cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- detection


class TorchTeacher:
    """A local torch model behind a black-box API: raw NCHW pixels in its value range in,
    class probabilities out (normalisation inside, as a served model would)."""

    def __init__(self, name: str, model: nn.Module, config: dict):
        pre = config["preprocessing"]
        self.name, self.model, self.config = name, frozen(model), config
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.input_size = tuple(pre["input_size"])
        self.channels = pre["channels"]
        self.value_range = tuple(pre.get("value_range", [0.0, 1.0]))
        self.num_classes = config["arch"]["num_classes"]

    @torch.no_grad()
    def query(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.model((raw - self.mean) / self.std), dim=-1)


# ITU-R BT.601 luma (kdd_jax.synthesis.mapping)
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def map_probes(raw: torch.Tensor, src_range, teacher: TorchTeacher) -> torch.Tensor:
    """Student raw pixels -> the teacher's input space: value range, channels, size (antialiased bilinear)."""
    x = (raw - src_range[0]) / (src_range[1] - src_range[0])
    if x.shape[1] != teacher.channels:
        x = x.repeat(1, teacher.channels, 1, 1) if x.shape[1] == 1 else torch.einsum("nchw,c->nhw", x, _LUMA)[:, None]
    if tuple(x.shape[2:]) != teacher.input_size:
        x = F.interpolate(x, size=teacher.input_size, mode="bilinear", antialias=True, align_corners=False)
    lo, hi = teacher.value_range
    return x.clamp(0.0, 1.0) * (hi - lo) + lo


def detect_torch(student: nn.Module, config, teachers: list[TorchTeacher], sc, *, n_bootstrap: int = 1000,
                 confidence: float = 0.95, x0=None, targets=None) -> dict:
    """Synthesise probes from the student, query every teacher (probabilities), score -KL per
    probe, decide by the mean with a paired bootstrap over probes (as kdd_jax.detect.detect with
    score "neg_kl", temperature 1). Returns winner, scores, p-value, intervals and stage timings."""
    cfg = _config_dict(config)
    pre = cfg["preprocessing"]
    timings = {}
    t0 = time.perf_counter()
    x, targets, history = synthesize_pixels_torch(student, cfg, sc, x0=x0, targets=targets)
    timings["synthesis"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    vr = tuple(pre.get("value_range", [0.0, 1.0]))
    raw = (x * std + mean).clamp(*vr)
    with torch.no_grad():
        s_logits = student(x)
        logps = [log_probs_from("probs", t.query(map_probes(raw, vr, t)), cfg["arch"]["num_classes"]) for t in teachers]
    timings["queries"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_probe = neg_kl_scores(s_logits.expand(len(teachers), -1, -1), torch.stack(logps))  # [K, N]
    n = per_probe.shape[1]
    full = per_probe.mean(-1)
    g = torch.Generator().manual_seed(sc.seed)
    idx = torch.randint(0, n, (n_bootstrap, n), generator=g)
    boot = per_probe[:, idx].mean(-1).T  # [B, K]
    order = torch.argsort(-full, stable=True)
    w = int(order[0])
    a = (1 - confidence) / 2
    q = torch.quantile(boot, torch.tensor([a, 1 - a]), dim=0).T  # [K, 2]
    if len(teachers) > 1:
        r = int(order[1])
        p = float((1 + (boot[:, w] - boot[:, r] <= 0).sum()) / (1 + n_bootstrap))
        margin = float(full[w] - full[r])
    else:
        p = margin = math.nan
    timings["scoring"] = time.perf_counter() - t0
    return {"winner": teachers[w].name, "scores": full.tolist(), "intervals": q.tolist(), "p_value": p,
            "margin": margin, "per_probe": per_probe.numpy(), "probes": x, "loss_history": history, "timings": timings}
