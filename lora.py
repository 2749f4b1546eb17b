"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

Section 4.1, equation 3: a frozen weight W0 [O, I] gets a trainable low-rank update
    h = W0 x + (alpha / r) B A x          A [r, I] random, B [O, r] zeros, r << min(O, I)
PyTorch keeps a batch as rows x [N, I], so the code computes the same equation transposed:
y = x W0^T + (alpha/r) (x A^T) B^T. Only A and B train: r (I + O) numbers per matrix, not O I.

Why B zero and A random: B A is then exactly 0, so step 0 is the base model. Both zero would never
move (the gradient of B is g (A x)^T, that of A is B^T g x^T); with A random, B learns first.
Why alpha / r: B A sums r rank-one terms; dividing by r keeps the update's size when r changes,
so a learning rate tuned at one rank works at another (section 4.1 sets alpha once, untuned).
rsLoRA (Kalajdzievski 2023) divides by sqrt(r), so that large ranks learn as fast as small ones.
Merging (section 4.2): W = W0 + (alpha/r) B A is a plain linear layer with no added latency. It
is impossible when one batch mixes requests for different adapters (one W serves one adapter:
S-LoRA's problem) and while training (A and B must stay separate to get their gradients).
Files: Hugging Face PEFT's (adapter_config.json, adapter_model.safetensors, keys from `peft_key`),
shared with PEFT and vLLM. Only safetensors is read: nothing is ever unpickled. target_modules may
name modules ("q_proj"), path suffixes ("self_attn.q_proj"), full paths listing every layer, or
be "all-linear" (every projection, not lm_head).
Simplified: no bias training, no DoRA, no modules_to_save; a file asking for them is refused.
Demo: `python lora.py` trains a small layer: step 0 equals the base model, merged equals unmerged.
Letters: N rows (tokens), I input features, O output features, r rank.
"""
import json
import math
import numbers
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.(lora_A|lora_B)\.weight")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")      # the layer index in a full module path
FILE_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}     # LoRAConfig -> adapter_config.json


def peft_key(layer: int, module: str, which: str) -> str:
    """The PEFT name of one LoRA tensor, e.g. peft_key(3, "q_proj", "lora_A") ->
    "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (mlp.* for gate/up/down)."""
    block = "mlp" if module in MLP_NAMES else "self_attn"
    return f"{PEFT_PREFIX}model.layers.{layer}.{block}.{module}.{which}.weight"


class AdapterError(ValueError):
    """A LoRA adapter file that cannot be used; the message names the file and the problem."""


@dataclass
class LoRAConfig:
    r: int = 8                      # rank of the update
    alpha: float = 16.0             # scale numerator: delta W = (alpha / r) B A
    dropout: float = 0.0            # dropout on the input of the LoRA path only
    targets: tuple = ("q_proj", "v_proj")  # attribute names of the nn.Linear layers to adapt
    use_rslora: bool = False        # scale alpha / sqrt(r) instead of alpha / r

    def __post_init__(self):        # True is an int in Python, and JSON reads NaN and Infinity
        real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        for name, good, want in (
                ("r", real(self.r) and isinstance(self.r, numbers.Integral) and self.r >= 1,
                 "an integer >= 1"), ("alpha", real(self.alpha), "a finite number"),
                ("dropout", real(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1)"),
                ("use_rslora", isinstance(self.use_rslora, bool), "true or false")):
            if not good:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {want}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank path (alpha/r) B A."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.base, self.scale, self.merged = base, cfg.scale, False
        base.weight.requires_grad_(False)
        like = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, cfg.r, **like)     # weight A [r, I]
        self.lora_B = nn.Linear(cfg.r, base.out_features, **like)    # weight B [O, r]
        # A random (Kaiming-uniform, as PEFT), B zero: B A = 0, so step 0 is the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B.weight @ self.lora_A.weight   # [O, r] @ [r, I] -> [O, I]

    def forward(self, x):  # x [N, I] -> [N, O]
        y = self.base(x)                                              # x W0^T
        if self.merged:
            return y
        return y + self.scale * self.lora_B(self.lora_A(self.dropout(x)))  # + (alpha/r) (x A^T) B^T

    @torch.no_grad()
    def merge(self, merged: bool = True):  # W = W0 + (alpha/r) B A; merged=False: back to W0
        if merged != self.merged:
            self.base.weight.add_(self.delta_weight(), alpha=1 if merged else -1)
            self.merged = merged


def lora_layers(model: nn.Module) -> dict:
    """{module name as in the base model: LoRALinear}, e.g. 'model.layers.0.self_attn.q_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every nn.Linear whose attribute name is in cfg.targets; freezes nothing else."""
    sites = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if name in cfg.targets and isinstance(child, nn.Linear)]
    missing = set(cfg.targets) - {name for _, name, _ in sites}
    if missing:
        raise ValueError(f"target modules {sorted(missing)} are not nn.Linear layers of the model")
    for parent, name, child in sites:
        setattr(parent, name, LoRALinear(child, cfg))
    return model


def merge_lora(model, merged: bool = True):
    for m in lora_layers(model).values():
        m.merge(merged)


def unmerge_lora(model):
    merge_lora(model, merged=False)


def mark_only_lora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def count_parameters(model) -> tuple:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------- adapter files (PEFT format)

def _site_key(name: str, which: str) -> str:
    """The PEFT key of a module: 'model.layers.3.mlp.up_proj' -> peft_key(3, 'up_proj', which)."""
    return peft_key(int(name.split(".")[2]), name.rsplit(".", 1)[-1], which)


def save_adapter(model, path, cfg: LoRAConfig, base_model_name=None, layers=None):
    """PEFT files; base_model_name: the checkpoint the adapter was trained on (model.config.name);
    layers: {module name: object with .lora_A, .lora_B} (default lora_layers(model))."""
    os.makedirs(path, exist_ok=True)
    layers = lora_layers(model) if layers is None else layers
    tensors = {_site_key(name, which): getattr(m, which).weight.detach().float().contiguous()
               for name, m in layers.items() for which in ("lora_A", "lora_B")}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "base_model_name_or_path": base_model_name, "lora_dropout": cfg.dropout,
              "target_modules": sorted(cfg.targets), "bias": "none", "use_rslora": cfg.use_rslora,
              "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# PEFT options this project does not implement, and the one value accepted (None also for {})
ONLY = {"peft_type": "LORA", "bias": "none", "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "lora_bias": False}


def config_from_json(c, where) -> LoRAConfig:
    """The LoRAConfig of a parsed adapter_config.json; AdapterError naming `where` if unusable."""
    if not isinstance(c, dict):
        raise AdapterError(f"{where}: expected a JSON object, got a {type(c).__name__}")
    for key, want in ONLY.items():
        if c.get(key, want) not in (want, None if want == {} else want):
            raise AdapterError(f"{where}: {key}={c[key]!r} is not supported here (only {want!r})")
    targets = module_names(c.get("target_modules"), where)
    try:
        return LoRAConfig(r=c.get("r"), alpha=c.get("lora_alpha", c.get("r")), targets=targets,
                          dropout=c.get("lora_dropout", 0.0), use_rslora=c.get("use_rslora", False))
    except ValueError as e:                      # named as in the file: alpha -> lora_alpha
        field = str(e).split("=")[0]
        raise AdapterError(f"{where}: {FILE_NAMES.get(field, field)}{str(e)[len(field):]}") from None


def module_names(targets, where) -> tuple:
    """PEFT's target_modules -> module names: "all-linear" is every projection; "self_attn.q_proj"
    and "model.layers.0.self_attn.q_proj" are q_proj, full paths only if they list every layer."""
    if targets == "all-linear":
        return tuple(TARGET_NAMES.values())
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{where}: target_modules={targets!r} must be a non-empty list of "
                           "module names, or \"all-linear\"")
    layers = {}                                  # module name -> the layers listed, None: all
    for t in targets:
        name, at = t.rsplit(".", 1)[-1], LAYER.search(t)
        if at is None or (name in layers and layers[name] is None):
            layers[name] = None
        else:
            layers.setdefault(name, set()).add(int(at[1]))
    for name, listed in layers.items():
        if listed is not None and listed != set(range(max(listed) + 1)):
            raise AdapterError(f"{where}: target_modules names {name} in layers {sorted(listed)} "
                               "only: an adapter on some layers is not supported here")
    return tuple(layers)


def check_tensors(tensors: dict, cfg: LoRAConfig, where):
    """Keys as peft_key writes them, for the targets; A [r, I] and B [O, r], finite; every layer
    the same shapes for one module (the engine stacks the layers)."""
    shapes = {}                                                 # (module, which) -> (shape, key)
    for key, t in sorted(tensors.items()):
        site = KEY.fullmatch(key)                               # (layer, module, lora_A or lora_B)
        if not (site and peft_key(int(site[1]), site[2], site[3]) == key and site[2] in cfg.targets):
            example = peft_key(0, cfg.targets[0], "lora_A")
            raise AdapterError(f"{where}: unexpected key {key!r} (expected keys like {example}, "
                               f"for target_modules {list(cfg.targets)})")
        module, which = site[2], site[3]
        if t.dim() != 2 or t.shape[0 if which == "lora_A" else 1] != cfg.r:
            raise AdapterError(f"{where}: {key} has shape {list(t.shape)}, not of rank r={cfg.r}")
        first_shape, first_key = shapes.setdefault((module, which), (t.shape, key))
        if t.shape != first_shape:
            raise AdapterError(f"{where}: {key} is {list(t.shape)}, {first_key} {list(first_shape)} "
                               "(every layer's must be the same)")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{where}: {key} holds NaN or Inf values")


def read_adapter(path) -> tuple:
    """(LoRAConfig, {PEFT key: tensor}) from a PEFT directory, checked on its own (no model)."""
    cfg_file = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, "adapter_model.safetensors")
    for f in (cfg_file, weights):
        if not os.path.isfile(f):
            raise AdapterError(f"{f}: missing (a PEFT adapter directory needs adapter_config.json "
                               "and adapter_model.safetensors; .bin files would be unpickled: not read)")
    try:
        with open(cfg_file) as f:
            c = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = config_from_json(c, cfg_file)
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors has its own error types for truncated or malformed files
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
    check_tensors(tensors, cfg, weights)
    return cfg, tensors


def load_adapter(model, path) -> LoRAConfig:
    """Add LoRA layers to `model` and fill them from a PEFT directory. Everything is checked
    before the model is touched, so on any error the model is left exactly as it was."""
    cfg, tensors = read_adapter(path)
    if lora_layers(model):
        raise AdapterError(f"{path}: the model has LoRA layers already; load into a fresh one")
    sites = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in cfg.targets}
    absent = set(cfg.targets) - {n.rsplit(".", 1)[-1] for n in sites}
    if absent:
        raise AdapterError(f"{path}: target_modules {sorted(absent)} do not exist in this model")
    check_every_layer(tensors, sites, path)
    expected = {_site_key(n, which) for n in sites for which in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        lacks, missing = sorted(set(tensors) - expected)[:2], sorted(expected - set(tensors))[:2]
        raise AdapterError(f"{path}: modules this model lacks {lacks}, missing {missing}")
    for name, lin in sites.items():
        a, b = tensors[_site_key(name, "lora_A")], tensors[_site_key(name, "lora_B")]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:   # A [r, I], B [O, r]
            wrong = "lora_A input" if a.shape[1] != lin.in_features else "lora_B output"
            raise AdapterError(f"{path}: {name}'s {wrong} width disagrees with the model: A {list(a.shape)}"
                               f", B {list(b.shape)}, the layer [{lin.out_features}, {lin.in_features}]")
    add_lora(model, cfg)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_A.weight.copy_(tensors[_site_key(name, "lora_A")])
            m.lora_B.weight.copy_(tensors[_site_key(name, "lora_B")])
    return cfg


def check_every_layer(tensors: dict, sites: dict, path):
    """AdapterError naming a module the adapter holds in some of the model's layers only."""
    held, layers = {}, {}                                  # module -> layer indices
    for key in tensors:
        site = KEY.fullmatch(key)
        held.setdefault(site[2], set()).add(int(site[1]))
    for name in sites:
        layers.setdefault(name.rsplit(".", 1)[-1], set()).add(int(name.split(".")[2]))
    for module, have in held.items():
        if have < layers.get(module, set()):
            raise AdapterError(f"{path}: {module} is adapted in layers {sorted(have)} of the "
                               f"model's {len(layers[module])}: an adapter on some layers only "
                               "is not supported here")


def demo(steps=150):
    """Learn a rank-2 change of a 16 x 16 layer: step 0 is the base; merged equals unmerged."""
    torch.manual_seed(0)
    block, x = nn.Module(), torch.randn(64, 16)                             # x [N, I]
    block.q_proj = nn.Linear(16, 16, bias=False)
    base_out = block.q_proj(x).detach()
    target = base_out + x @ torch.randn(16, 2) @ torch.randn(2, 16)         # + a rank-2 change
    add_lora(block, LoRAConfig(r=2, alpha=4, targets=("q_proj",)))
    mark_only_lora_trainable(block)
    print("step 0, adapted == base:", torch.equal(block.q_proj(x), base_out))
    opt = torch.optim.Adam([p for p in block.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        loss = ((block.q_proj(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"after {steps} steps: loss {loss.item():.5f}; trainable, total", count_parameters(block))
    with torch.no_grad():
        unmerged = block.q_proj(x)
        merge_lora(block)
        print("merged == unmerged:", torch.allclose(block.q_proj(x), unmerged, atol=1e-5))


if __name__ == "__main__":
    demo()
