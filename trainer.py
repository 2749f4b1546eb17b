"""The LoRA training loop: freeze W0, train B and A, save what --resume needs (Hu et al. 2021,
arXiv 2106.09685, section 4.1 and appendix D: AdamW, linear warm-up and decay, label smoothing).

LoRA's forward is h = W0 x + (alpha/r) B A x (lora.py); training updates only A [r, in] and
B [out, r], so the gradient and AdamW's two moments exist for r (in + out) numbers per adapted
matrix instead of in x out: the memory saving of section 4.2. One optimizer step accumulates the
gradient of --grad-accum micro-batches (the mean loss over all their target tokens, as if they were
one batch), clips it to --max-grad-norm and takes AdamW's step at the schedule's rate.
A checkpoint is the adapter in PEFT format plus AdamW's moments and the random state in
safetensors and the losses in JSON: resuming gives the same losses as an uninterrupted run, and
nothing is ever unpickled.
Simplified: one device; --resume restores the CPU random state only; full fine-tuning (every
weight trainable, --method full) shares the loop but cannot be resumed.
Demo: `python train.py` runs this loop on E2E (train.py composes data, loop, decoding, metrics).
Letters: B batch, T tokens per row, M target positions, V vocabulary.
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import cli
from lora import TARGET_NAMES, LoRAConfig, add_lora, load_adapter, mark_only_lora_trainable, save_adapter
from sft_data import batches, collate

flag = cli.flag


@dataclass
class LoopConfig:
    """The training loop's flags: what is trained (LoRA's r, alpha, targets) and how (AdamW)."""
    method: str = flag("lora", "lora, or full to fine-tune every weight")
    rank: int = flag(4, "LoRA rank r")
    alpha: float = flag(32.0, "LoRA alpha: the update is scaled by alpha / r")
    rslora: bool = flag(False, "scale the update by alpha / sqrt(r) (rsLoRA) instead of alpha / r")
    dropout: float = flag(0.1, "dropout on the input of the LoRA path")
    targets: str = flag("q,v", "adapted projections, comma-separated, from "
                        + ",".join(TARGET_NAMES) + "; or all-linear")
    steps: int = flag(150, "optimizer steps")
    batch_size: int = flag(8, "examples per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step (batch: batch-size x grad-accum)")
    lr: float = flag(1e-3, "peak learning rate of AdamW (the paper: 2e-4 over ~26k steps)")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    warmup: int = flag(15, "linear warm-up steps, then linear decay to 0")
    max_grad_norm: float = flag(0.0, "clip the gradient to this norm (0: no clipping)")
    label_smoothing: float = flag(0.1, "label smoothing of the loss")
    seed: int = flag(0, "random seed (initialisation, data order, dropout, validation split)")
    eval_every: int = flag(20, "validation loss every N steps (and after the last)")
    save_every: int = flag(0, "write a checkpoint-N folder every N steps (0: never)")
    resume: Optional[str] = flag(None, "continue the run saved in this checkpoint folder", str)
    log_every: int = flag(10, "print progress every N steps")
    dtype: str = flag("float32", "float32, or bfloat16: the forward and the loss under "
                      "torch.autocast to bfloat16 (matrix products in bfloat16; the weights, LoRA "
                      "parameters and AdamW's moments stay float32); float16 is refused (it needs "
                      "loss scaling)")


def target_names(targets: str) -> list:
    """'q,v' -> ['q_proj', 'v_proj'], 'all-linear' -> every projection; [] if not a valid list."""
    short = list(TARGET_NAMES) if targets == "all-linear" else targets.split(",")
    valid = short and len(set(short)) == len(short) and set(short) <= set(TARGET_NAMES)
    return [TARGET_NAMES[t] for t in short] if valid else []


def prepare(net, cfg: LoopConfig):
    """LoRA (section 4.1): freeze W0, add (alpha/r) B A on the targets (from the checkpoint when
    resuming); or train every weight."""
    if cfg.method == "full":
        for p in net.parameters():
            p.requires_grad_(True)
        return net, None
    lcfg = LoRAConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.rslora,
                      targets=tuple(target_names(cfg.targets)))
    if cfg.resume:
        load_adapter(net, cfg.resume)
    else:
        add_lora(net, lcfg)
    mark_only_lora_trainable(net)
    return net, lcfg


def autocast(net, dtype: str):
    """--dtype bfloat16: torch.autocast on net's device, so that matrix products run in bfloat16
    while the weights, the LoRA parameters and AdamW's moments stay float32; float32: no change."""
    device = net.lm_head.weight.device.type
    return torch.autocast(device, torch.bfloat16, enabled=dtype == "bfloat16")


def lm_loss(net, tokens, mask, label_smoothing, reduction="mean"):
    """Cross-entropy of the next token at the masked (target) positions, with label smoothing."""
    tokens, mask = tokens.to(net.lm_head.weight.device), mask.to(net.lm_head.weight.device)
    logits = net(tokens[:, :-1], select=mask)                      # [M, V]: the M target positions
    return F.cross_entropy(logits.float(), tokens[:, 1:][mask], label_smoothing=label_smoothing,
                           reduction=reduction)


def accumulate(net, micro_batches, cfg: LoopConfig) -> tuple:
    """The gradient of one optimizer step: the mean loss over every target token of its
    micro-batches, as if they were one batch, clipped to --max-grad-norm. (loss, norm before
    clipping)."""
    n_targets = sum(int(mask.sum()) for _, mask, _ in micro_batches)
    loss = 0.0
    for tokens, mask, _ in micro_batches:
        with autocast(net, cfg.dtype):
            part = lm_loss(net, tokens, mask, cfg.label_smoothing, "sum") / n_targets
        part.backward()
        loss += part.item()
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
    return loss, norm.item()


def make_optimizer(net, cfg: LoopConfig):
    """AdamW over the trainable parameters (LoRA's A and B, or every weight)."""
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def train_step(net, opt, micro_batches, step, cfg: LoopConfig) -> tuple:
    """One optimizer step (step counts from 0): the schedule's rate, the accumulated gradient,
    AdamW's update. (loss, gradient norm before clipping)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss, norm = accumulate(net, micro_batches, cfg)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm


@torch.no_grad()
def validation_loss(net, examples, batch_size, dtype="float32") -> float:
    """Mean cross-entropy (no label smoothing) over every target token of held-out examples."""
    training, total, count = net.training, 0.0, 0
    net.eval()
    for s in range(0, len(examples), batch_size):
        tokens, mask, _ = collate(examples[s:s + batch_size])
        with autocast(net, dtype):
            total += lm_loss(net, tokens, mask, 0.0, "sum").item()
        count += int(mask.sum())
    net.train(training)
    return total / count


def lr_at(step, cfg: LoopConfig) -> float:
    """The paper's schedule: linear warm-up over --warmup steps, then linear decay to 0 at --steps;
    `step` counts from 0."""
    warm, decay = (step + 1) / max(cfg.warmup, 1), (cfg.steps - step) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * min(warm, decay)


def save_checkpoint(net, lcfg, opt, history, cfg: LoopConfig, out_dir) -> str:
    """checkpoint-{step}: the adapter (PEFT files), AdamW's state and the RNG (safetensors), the
    step, config and losses so far (trainer_state.json): everything --resume needs."""
    step = len(history["losses"])
    path = os.path.join(out_dir, f"checkpoint-{step}")
    save_adapter(net, path, lcfg, net.config.name)
    save_file({**optimizer_tensors(opt), "torch_rng": torch.get_rng_state()},
              os.path.join(path, "optimizer.safetensors"))
    write_json({"config": asdict(cfg), **history}, os.path.join(path, "trainer_state.json"))
    return path


def restore_checkpoint(opt, path) -> dict:
    """Load AdamW's state and the RNG saved by save_checkpoint; the history (losses) so far."""
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    load_optimizer(opt, tensors)
    return read_history(path)


def optimizer_tensors(opt) -> dict:
    """AdamW's state as flat safetensors entries, '{parameter index}.{exp_avg, ...}'."""
    return {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def load_optimizer(opt, tensors: dict):
    """AdamW's state back from optimizer_tensors' entries."""
    state = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def read_history(path) -> dict:
    """The losses so far of a checkpoint (trainer_state.json)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    return {"losses": saved["losses"], "val_losses": saved["val_losses"]}


def train(net, examples, cfg: LoopConfig, log=print, val=(), lcfg=None, out_dir=None) -> dict:
    """AdamW, --grad-accum micro-batches per step; validation loss every --eval-every steps; with
    lcfg, a checkpoint in out_dir every --save-every steps. Prints progress with an ETA."""
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(net, cfg)
    history = restore_checkpoint(opt, cfg.resume) if cfg.resume else {"losses": [], "val_losses": []}
    first = len(history["losses"])
    data = batches(examples, cfg.batch_size, random.Random(cfg.seed), skip=first * cfg.grad_accum)
    net.train()
    start, n_tokens = time.time(), 0
    for step in range(first + 1, cfg.steps + 1):
        micro = [next(data) for _ in range(cfg.grad_accum)]
        loss, norm = train_step(net, opt, micro, step - 1, cfg)
        history["losses"].append(loss)
        n_tokens += sum(n for _, _, n in micro)
        if val and (step % cfg.eval_every == 0 or step == cfg.steps):
            loss_now = validation_loss(net, val, cfg.batch_size, cfg.dtype)
            history["val_losses"].append([step, loss_now])
            log(f"step {step}: validation loss {history['val_losses'][-1][1]:.3f}")
        if lcfg and cfg.save_every and step % cfg.save_every == 0:
            log(f"saved {save_checkpoint(net, lcfg, opt, history, cfg, out_dir)}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(progress(step, history["losses"], norm, opt, n_tokens, time.time() - start, first, cfg))
    net.eval()
    elapsed = time.time() - start
    return {**history, "train_time_s": elapsed, "step_s": elapsed / max(cfg.steps - first, 1),
            "tokens_per_s": n_tokens / max(elapsed, 1e-9)}


def progress(step, losses, norm, opt, n_tokens, elapsed, first, cfg: LoopConfig) -> str:
    recent, done = losses[-cfg.log_every:], step - first
    return (f"step {step}/{cfg.steps}  loss {sum(recent) / len(recent):.3f}  grad norm {norm:.2f}  "
            f"lr {opt.param_groups[0]['lr']:.2e}  tok/s {n_tokens / elapsed:.0f}  elapsed "
            f"{elapsed / 60:.1f} min  remaining {elapsed / done * (cfg.steps - step) / 60:.1f} min")


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
