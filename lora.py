"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

Section 4.1, equation 3: a frozen weight W0 [out, in] gets a trainable low-rank update

    h = W0 x + (alpha / r) * B A x          A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

so at initialisation B A = 0 and the adapted model equals its base exactly. Only A and B train,
which is why checkpoints are tiny and optimizer memory small. For deployment the update can be
merged, W = W0 + (alpha/r) B A, and the model runs with no added latency (section 4.2).
rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead.

Adapters are stored in the Hugging Face PEFT format (adapter_config.json plus
adapter_model.safetensors with keys "base_model.model.<module>.lora_A.weight"), so adapters move
between this project, PEFT and vLLM. Only safetensors is read: nothing is ever unpickled.

Simplified: no bias training, no DoRA, no modules_to_save; a file asking for them is refused.
Demo: `python lora.py` wraps a small linear layer and shows merge/unmerge.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A LoRA adapter file that cannot be used; the message names the file and the problem."""


@dataclass
class LoRAConfig:
    r: int = 8                      # rank of the update
    alpha: float = 16.0             # scale numerator: delta = (alpha / r) B A
    dropout: float = 0.0            # dropout on the input of the LoRA path only
    targets: tuple = ("q_proj", "v_proj")  # attribute names of the nn.Linear layers to adapt
    use_rslora: bool = False        # scale alpha / sqrt(r) instead of alpha / r

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank path (alpha/r) B A."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.base, self.scale, self.merged = base, cfg.scale, False
        base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False)   # weight [r, in]
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False)  # weight [out, r]
        # Kaiming-uniform A and zero B, as in the paper and PEFT: delta W = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.device, base.weight.dtype)
        self.lora_B.to(base.weight.device, base.weight.dtype)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B.weight @ self.lora_A.weight   # [out, r] @ [r, in]

    def forward(self, x):  # x [..., in] -> [..., out]
        h = self.base(x)                                              # W0 x
        if self.merged:
            return h
        return h + self.scale * self.lora_B(self.lora_A(self.dropout(x)))  # + (alpha/r) B A x

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def lora_layers(model: nn.Module) -> dict:
    """{module name as in the base model: LoRALinear}, e.g. 'model.layers.0.self_attn.q_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every nn.Linear whose attribute name is in cfg.targets; freezes nothing else."""
    sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if name in cfg.targets and isinstance(child, nn.Linear)]
    missing = set(cfg.targets) - {name for _, name, _ in sites}
    if missing:
        raise ValueError(f"target modules {sorted(missing)} not found among the model's nn.Linear layers")
    for parent, name, child in sites:
        setattr(parent, name, LoRALinear(child, cfg))
    return model


def merge_lora(model):
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model).values():
        m.unmerge()


def mark_only_lora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def count_parameters(model) -> tuple:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------- adapter files (PEFT format)

def save_adapter(model, path, cfg: LoRAConfig, base_model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"):
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, m in lora_layers(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": sorted(cfg.targets), "bias": "none", "use_rslora": cfg.use_rslora,
              "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter(path) -> tuple:
    """(LoRAConfig, {PEFT key: tensor}) from a PEFT directory, checked on its own (no model)."""
    cfg_file = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, "adapter_model.safetensors")
    for f in (cfg_file, weights):
        if not os.path.isfile(f):
            raise AdapterError(f"{f}: missing (a PEFT adapter directory needs adapter_config.json and "
                               "adapter_model.safetensors; .bin files are not read, they would be unpickled)")
    try:
        with open(cfg_file) as f:
            c = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    unsupported = {"peft_type": (c.get("peft_type", "LORA"), "LORA"), "bias": (c.get("bias", "none"), "none"),
                   "use_dora": (c.get("use_dora", False), False), "modules_to_save": (c.get("modules_to_save"), None),
                   "fan_in_fan_out": (c.get("fan_in_fan_out", False), False),
                   "rank_pattern": (c.get("rank_pattern") or {}, {}), "alpha_pattern": (c.get("alpha_pattern") or {}, {}),
                   "layers_to_transform": (c.get("layers_to_transform"), None), "lora_bias": (c.get("lora_bias", False), False)}
    for key, (got, want) in unsupported.items():
        if got != want:
            raise AdapterError(f"{cfg_file}: {key}={got!r} is not supported here (only {want!r})")
    targets = c.get("target_modules")
    if isinstance(targets, str) or not targets or not isinstance(c.get("r"), int) or c["r"] < 1:
        raise AdapterError(f"{cfg_file}: needs an integer r >= 1 and a list target_modules, got r={c.get('r')!r}, "
                           f"target_modules={targets!r}")
    cfg = LoRAConfig(r=c["r"], alpha=float(c.get("lora_alpha", c["r"])), dropout=float(c.get("lora_dropout", 0.0)),
                     targets=tuple(targets), use_rslora=bool(c.get("use_rslora", False)))
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
    for key, t in tensors.items():
        if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise AdapterError(f"{weights}: unexpected key {key!r} (expected {PEFT_PREFIX}<module>.lora_A/B.weight)")
        module = key[len(PEFT_PREFIX):].rsplit(".", 2)[0].rsplit(".", 1)[-1]
        if module not in cfg.targets:
            raise AdapterError(f"{weights}: key {key!r} adapts {module!r}, not in target_modules {list(cfg.targets)}")
        rank = t.shape[0] if ".lora_A." in key else t.shape[-1]
        if t.dim() != 2 or rank != cfg.r:
            raise AdapterError(f"{weights}: {key} has shape {list(t.shape)}, which disagrees with r={cfg.r}")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{weights}: {key} holds NaN or Inf values")
    return cfg, tensors


def load_adapter(model, path) -> LoRAConfig:
    """Add LoRA layers to `model` and fill them from a PEFT directory. Everything is checked
    before the model is touched, so on any error the model is left exactly as it was."""
    cfg, tensors = read_adapter(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n in linears if n.rsplit(".", 1)[-1] in cfg.targets}
    absent = set(cfg.targets) - {n.rsplit(".", 1)[-1] for n in expected}
    if absent:
        raise AdapterError(f"{path}: target_modules {sorted(absent)} do not exist in this model")
    if lora_layers(model):
        raise AdapterError(f"{path}: the model already has LoRA layers; load into a fresh base model")
    in_file = {k[len(PEFT_PREFIX):].rsplit(".", 2)[0] for k in tensors}
    if in_file - expected:
        raise AdapterError(f"{path}: unknown modules for this model: {sorted(in_file - expected)[:3]}")
    for name in sorted(expected):
        a, b = (tensors.get(f"{PEFT_PREFIX}{name}.{part}.weight") for part in ("lora_A", "lora_B"))
        if a is None or b is None:
            raise AdapterError(f"{path}: missing {PEFT_PREFIX}{name}.lora_A/B.weight")
        lin = linears[name]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            raise AdapterError(f"{path}: {name} expects A [r, {lin.in_features}] and B [{lin.out_features}, r], "
                               f"got {list(a.shape)} and {list(b.shape)}")
    add_lora(model, cfg)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return cfg


if __name__ == "__main__":
    torch.manual_seed(0)
    layer = nn.Sequential()
    layer.q_proj = nn.Linear(16, 16, bias=False)
    add_lora(layer, LoRAConfig(r=2, alpha=4, targets=("q_proj",)))
    nn.init.normal_(layer.q_proj.lora_B.weight)
    x = torch.randn(3, 16)
    y = layer.q_proj(x)
    merge_lora(layer)
    print("trainable/total:", count_parameters(layer))
    print("merged == unmerged:", torch.allclose(layer.q_proj(x), y, atol=1e-5))
