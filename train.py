"""LoRA fine-tuning: the LoRA paper's E2E NLG experiment and its rank study, or your own data.

Hu et al. 2021 (arXiv 2106.09685), section 5.4 and Table 3: GPT-2 adapted to the E2E NLG
challenge (restaurant meaning representations -> one English sentence) with LoRA on W_q and W_v
(r=4, alpha=32, dropout 0.1, label smoothing 0.1, AdamW lr 2e-4, linear schedule, beam 10) beats
full fine-tuning with 0.35M trainable parameters. Section 7.2 (Table 6, and appendix Table 18 on
E2E) varies the rank r and the adapted matrices: `--sweep` runs that grid. Here the recipe runs on
SmolLM2-135M-Instruct on a CPU, with one change: the paper trains 5 epochs of 42k examples (~26k
steps) at lr 2e-4; the default here is 150 steps of 8 examples (a 2-core CPU's budget), where 2e-4
learns too slowly (loss 3.9 against 3.2 with 1e-3 after 30 steps), so the default rate is 1e-3.

E2E: the prompt is "{mr}\\n", the target " {ref}" + end token, the loss on the target only; outputs
are decoded by decode.py (beam search, 4 beams by default; --beam 1 is greedy) and scored with
e2e.py. Your data (`--data FILE.jsonl`, prompt/completion or chat records): sft_data.py.
The training loop (AdamW, schedule, --grad-accum, --max-grad-norm, --save-every / --resume) is
trainer.py; --val-fraction holds examples out for its validation loss.
On a GPU: --device cuda --dtype bfloat16 (autocast; LoRA parameters and AdamW's state float32);
--preset paper sets the paper's whole recipe (Table 11), 5 epochs turned into steps from the data.
Simplified: without trainset.csv the E2E dev split is the training set (said in the output and in
results.json).
Demo: `python train.py` (LoRA on E2E), `python train.py --method full`, `python train.py --adapter
DIR` (score a saved adapter), `python train.py --data my.jsonl --val-fraction 0.1`, `python
train.py --sweep --steps 15 --warmup 3 --eval-limit 40 --no-baseline`.
"""
import argparse
import copy
import json
import math
import os
import resource
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import List, Optional

import torch

import cli
import figures
import multi_train
from checkpoints import Tokenizer, load_model, placement, save_hf
from decode import DecodeConfig, generate_outputs
from e2e import DataError, e2e_metrics, ensure_data, group_refs, read_e2e
from lora import (TARGET_NAMES, AdapterError, LoRAConfig, count_parameters, load_adapter,
                  mark_only_lora_trainable, read_adapter, save_adapter)
from sft_data import RecordError, encode_records, read_records, split_validation
from trainer import LoopConfig, autocast, prepare, target_names, train, write_json

flag = cli.flag


@dataclass
class TrainConfig(LoopConfig, DecodeConfig):
    """The command line: the experiment's flags here, the training loop's from trainer.LoopConfig,
    the decoding flags (--beam, ...) from DecodeConfig."""
    task: str = flag("e2e", "experiment: e2e, the LoRA paper's E2E NLG (Table 3); or --data")
    data: List[str] = flag([], "train on this JSONL file instead of E2E; repeated, one adapter per "
                           "file, all in one batch (FILE:name=N,rank=8,targets=q,v,alpha=,lr=,"
                           "dropout=,seed= sets that adapter's own values)")
    adapters: int = flag(1, "E2E: train this many adapters in one batch, seeds --seed, --seed + 1, "
                            "...; with --bench-multi: how many to time (default 4)")
    plot: bool = flag(False, "draw the loss curves beside results.json (loss.svg) and, with "
                             "--sweep, the rank x targets BLEU table as a heatmap (sweep.svg); "
                             "needs matplotlib")
    bench_multi: bool = flag(False, "time adapters trained in one batch against one after another "
                             "(multi_train.bench) on random E2E-shaped rows, then stop")
    e2e_dir: Optional[str] = flag(None, "folder of the E2E CSV files (default $E2E_DATA, else "
                                  "~/.cache/e2e-nlg, where they are downloaded when missing)", str)
    base: Optional[str] = flag(None, "base model: .gguf file or Hugging Face folder (default "
                               "$LORA_MODEL_PATH, else SmolLM2-135M-Instruct)", str)
    ignore_config_key: List[str] = flag([], "a config.json key unknown to the loader that you know "
                                            "leaves the computation unchanged (repeatable; warns)")
    out: str = flag("runs/e2e", "output folder: adapter, predictions, results.json")
    seq_len: int = flag(128, "longest example in tokens (longer targets are cut)")
    val_fraction: float = flag(0.0, "hold out this fraction of the training examples for a "
                               "validation loss")
    eval_limit: Optional[int] = flag(None, "score the first N test MRs only (default all 630)", int)
    adapter: Optional[str] = flag(None, "score this saved PEFT adapter instead of training", str)
    no_baseline: bool = flag(False, "do not score the base model without adapter")
    baseline_limit: int = flag(100, "score the base model on the first N evaluated MRs only (its "
                               "outputs never end, so each runs to --max-new-tokens)")
    sweep: bool = flag(False, "rank study: r in 1,2,4,8,64 x targets q; q,v; q,k,v,o")
    epochs: Optional[int] = flag(None, "passes over the training set: sets --steps from its size, "
                                 "ceil(epochs x examples / (batch-size x grad-accum))", int)
    device: str = flag("cpu", "cpu or cuda: where the model, the batches and AdamW's state live")
    preset: Optional[str] = flag(None, "paper: the LoRA paper's E2E recipe (Table 11: r=4, alpha "
                                 "32, q,v, AdamW lr 2e-4, 5 epochs of batch 8, warm-up 500, ...) "
                                 "on cuda in bfloat16, for a GPU; flags given on the command "
                                 "line override it", str)


class UsageError(ValueError):
    """A flag that cannot work; the message names the flag."""


FLAG_RULES = {  # flag: (test, what it must be), checked before any data or model work
    "task": (lambda v: v == "e2e", "e2e (the only built-in experiment)"),
    "method": (lambda v: v in ("lora", "full"), "lora or full"),
    "targets": (target_names, f"names without repeats from {','.join(TARGET_NAMES)}, or all-linear"),
    "alpha": (math.isfinite, "a finite number"),
    "length_penalty": (math.isfinite, "a finite number"),
    "lr": (lambda v: 0 < v < math.inf, "a positive number"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "max_grad_norm": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    **{name: (lambda v: 0 <= v < 1, "in [0, 1)") for name in ("dropout", "label_smoothing", "val_fraction")},
    "seq_len": (lambda v: v >= 2, "at least 2 (a prompt token and a target token)"),
    "eval_limit": (lambda v: v is None or v >= 1, "at least 1"),
    "adapters": (lambda v: v >= 1, "at least 1"),
    "epochs": (lambda v: v is None or v >= 1, "at least 1"),
    "device": (lambda v: v in ("cpu", "cuda"), "cpu or cuda"),
    "dtype": (lambda v: v in ("float32", "bfloat16"),
              "float32 or bfloat16 (float16 training needs loss scaling, not implemented)"),
    "preset": (lambda v: v is None or v in PRESETS, "paper (the only preset)"),
    **{name: (lambda v: v >= 1, "at least 1") for name in (
        "rank", "steps", "batch_size", "grad_accum", "eval_batch", "eval_every", "max_new_tokens",
        "beam", "baseline_limit", "log_every")},
    **{name: (lambda v: v >= 0, "at least 0") for name in ("warmup", "no_repeat_ngram",
                                                           "save_every")},
}
# flags a resumed run must share with the run it continues
RESUMED = ("data", "e2e_dir", "method", "rank", "alpha", "rslora", "dropout", "targets", "steps",
           "batch_size", "grad_accum", "seq_len", "lr", "weight_decay", "warmup", "max_grad_norm",
           "label_smoothing", "seed", "val_fraction", "epochs")
# The LoRA paper's E2E recipe for GPT-2 (Hu et al. 2021, appendix D.3, Table 11): training
# (optimizer AdamW, linear schedule) and decoding; 5 epochs become steps once the data is read.
PRESETS = {"paper": dict(rank=4, alpha=32.0, targets="q,v", lr=2e-4, epochs=5, batch_size=8,
                         grad_accum=1, warmup=500, label_smoothing=0.1, weight_decay=0.01,
                         dropout=0.1, beam=10, length_penalty=0.9, no_repeat_ngram=4,
                         device="cuda", dtype="bfloat16")}


def check_flags(cfg: TrainConfig):
    """UsageError naming the first flag that cannot work: its value, the adapter or checkpoint it
    names, the output folder, or a combination that does not go together."""
    for name, (ok, what) in FLAG_RULES.items():
        if not ok(getattr(cfg, name)):
            raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {getattr(cfg, name)!r}")
    if cfg.method == "full" and (cfg.save_every or cfg.resume):
        raise UsageError("--save-every and --resume work with --method lora only")
    try:
        placement(cfg.device, cfg.dtype)
    except ValueError as e:
        hint = f" (--preset {cfg.preset} sets --device cuda; --device cpu overrides it)"
        raise UsageError(f"{e}{hint if cfg.preset else ''}") from None
    if cfg.data and (cfg.sweep or cfg.adapter):
        raise UsageError(f"--{'sweep' if cfg.sweep else 'adapter'} belongs to the E2E experiment, "
                         "not to --data")
    try:
        if cfg.plot:
            figures.require_matplotlib("--plot")
    except SystemExit as e:
        raise UsageError(str(e)) from None
    try:
        if is_multi(cfg) and not cfg.bench_multi:
            return multi_train.check_flags(cfg)
    except multi_train.SpecError as e:
        raise UsageError(str(e)) from None
    try:
        if cfg.adapter or cfg.resume:
            read_adapter(cfg.adapter or cfg.resume)
    except AdapterError as e:
        raise UsageError(f"--{'adapter' if cfg.adapter else 'resume'}: {e}") from None
    if cfg.resume:
        check_resumable(cfg)
    existing = os.path.abspath(cfg.out)           # the folder is made later: its nearest existing
    while not os.path.exists(existing):           # ancestor must be a folder we may write to
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {cfg.out}: cannot write there ({existing} is not a writable folder)")


def is_multi(cfg: TrainConfig) -> bool:
    """Several adapters in one batch (multi_train.py): --adapters N, several --data, or options."""
    return (cfg.adapters > 1 or len(cfg.data) > 1
            or any(multi_train.parse_spec(d)[1] for d in cfg.data))


def check_resumable(cfg: TrainConfig):
    path = os.path.join(cfg.resume, "trainer_state.json")
    try:
        with open(path) as f:
            saved = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--resume: {path} is missing or unreadable ({e})") from None
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {getattr(cfg, k)!r} here"
              for k in RESUMED if saved.get(k) != getattr(cfg, k)
              and not (k == "steps" and cfg.epochs)]          # --epochs: steps follow from the data
    if differ:
        raise UsageError(f"--resume {cfg.resume}: the run differs: " + "; ".join(differ))


# ------------------------------------------------------------------------------------ data

def encode_example(tok, mr, ref, seq_len) -> tuple:
    """E2E: (token ids, is_target per token): prompt "{mr}\\n", target " {ref}" + end token, the
    target cut so that the example fits seq_len."""
    prompt = tok.encode(f"{mr}\n")
    target = (tok.encode(f" {ref}") + [tok.eos_id])[:max(seq_len - len(prompt), 1)]
    return prompt + target, [False] * len(prompt) + [True] * len(target)


# ------------------------------------------------------------------------------------ experiments

def evaluate(net, tok, groups, cfg: TrainConfig, log=print) -> tuple:
    """(outputs, metrics with eval_time_s) on the MR groups [(mr, [refs])]."""
    start = time.time()
    with autocast(net, cfg.dtype):
        outs = generate_outputs(net, tok, [f"{mr}\n" for mr, _ in groups], cfg, log)
    metrics = e2e_metrics(outs, [refs for _, refs in groups])
    return outs, {**metrics, "eval_time_s": time.time() - start}


def write_lines(lines, path):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def folder_mb(path) -> float:
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names]
    return sum(sizes) / 2 ** 20


def fine_tune(base, tok, examples, val, cfg: TrainConfig, out_dir, log=print) -> tuple:
    """(trained copy of base, the row of its numbers): prepare, train, save the adapter (or model)."""
    torch.manual_seed(cfg.seed)
    net, lcfg = prepare(copy.deepcopy(base), cfg)
    trainable, total = count_parameters(net)
    what = f"lora r={cfg.rank} targets={cfg.targets}" if lcfg else "full fine-tuning"
    log(f"{what}: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")
    stats = train(net, examples, cfg, log, val, lcfg, out_dir)
    ckpt = os.path.join(out_dir, "adapter" if lcfg else "model")
    if lcfg:
        save_adapter(net, ckpt, lcfg, net.config.name)
    else:
        save_hf(net, ckpt, tok if isinstance(tok, Tokenizer) else None)   # the test tokenizer has no file
    row = {"method": cfg.method, "rank": cfg.rank if lcfg else None,
           "targets": cfg.targets if lcfg else "all", "trainable": trainable,
           "trainable_pct": 100 * trainable / total,
           "final_loss": sum(stats["losses"][-10:]) / len(stats["losses"][-10:]),
           **{k: stats[k] for k in ("train_time_s", "step_s", "tokens_per_s", "losses", "val_losses")},
           "checkpoint": ckpt, "checkpoint_mb": folder_mb(ckpt),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return net, row


def run_one(base, tok, examples, groups, cfg: TrainConfig, out_dir, log=print, runs=None) -> dict:
    """Fine-tune a copy of `base` as cfg says, save it, decode the test MRs and score them. The row
    joins `runs` once trained, so that a failing evaluation still leaves the training's numbers."""
    net, row = fine_tune(base, tok, examples, (), cfg, out_dir, log)
    (runs if runs is not None else []).append(row)
    outs, metrics = evaluate(net, tok, groups, cfg, log)
    write_lines(outs, os.path.join(out_dir, "predictions.txt"))
    row.update(metrics)
    return row


def score_adapter(net, lcfg: LoRAConfig, tok, groups, cfg: TrainConfig, log=print, runs=None) -> dict:
    """Decode and score with the adapter loaded from cfg.adapter (no training)."""
    mark_only_lora_trainable(net)
    targets = ",".join(k for k, v in TARGET_NAMES.items() if v in lcfg.targets)
    row = {"method": "lora (loaded)", "rank": lcfg.r, "targets": targets,
           "trainable": count_parameters(net)[0], "checkpoint": cfg.adapter,
           "checkpoint_mb": folder_mb(cfg.adapter)}
    (runs if runs is not None else []).append(row)
    outs, metrics = evaluate(net, tok, groups, cfg, log)
    write_lines(outs, os.path.join(cfg.out, "predictions.txt"))
    row.update(metrics)
    return row


SWEEP_RANKS, SWEEP_TARGETS = (1, 2, 4, 8, 64), ("q", "q,v", "q,k,v,o")   # section 7.2: Tables 6, 18
COLUMNS = ("method", "rank", "targets", "trainable", "trainable_pct", "BLEU", "BLEU_lc", "NIST",
           "ROUGE_L", "CIDEr", "train_time_s", "step_s", "tokens_per_s", "peak_rss_mb", "checkpoint_mb")


def table(rows) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(COLUMNS), "-+-".join("-" * w for w in widths), *map(line, cells)])


def load_splits(cfg: TrainConfig, log=print) -> tuple:
    """(training rows, or None when scoring an adapter; the training split's name; the test MR
    groups up to --eval-limit); DataError naming the folder, or the file and line."""
    folder = cfg.e2e_dir or os.environ.get("E2E_DATA") or os.path.expanduser("~/.cache/e2e-nlg")
    paths = ensure_data(folder)
    groups = group_refs(read_e2e(paths["test"]))[:cfg.eval_limit]
    if cfg.adapter:
        return None, None, groups
    split = "train" if paths["train"] else "dev"
    if not paths[split]:
        raise DataError(f"{folder}: no training split (trainset.csv or devset.csv) beside "
                        "testset_w_refs.csv")
    if split == "dev":
        log(f"trainset.csv not found next to {paths['test']}: training on the dev split "
            "(devset.csv) instead")
    return read_e2e(paths[split]), split, groups


def check_fits(net, prompts, cfg: TrainConfig):
    """The longest prompt plus --max-new-tokens, and --seq-len, within the model's context."""
    context, longest = net.config.max_seq_len, max(map(len, prompts), default=0)
    if longest + cfg.max_new_tokens > context:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens}: the longest test prompt "
                         f"({longest} tokens) plus that many exceeds the model's context of {context}")
    if cfg.seq_len > context:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's context of {context} tokens")


def score_baseline(base, tok, groups, cfg: TrainConfig, log=print) -> dict:
    """The base model without adapter, decoded greedily: it never emits the end token, so every
    output runs to --max-new-tokens, and beams would multiply that cost for a reference row."""
    outs, metrics = evaluate(base, tok, groups[:cfg.baseline_limit], replace(cfg, beam=1), log)
    write_lines(outs, os.path.join(cfg.out, "predictions_base.txt"))
    log(f"base model on {len(outs)} MRs: BLEU {metrics['BLEU']:.2f}, {metrics['eval_time_s']:.0f} s")
    return {"method": f"base, {len(outs)} MRs, greedy", "trainable": 0, **metrics}


NOTE = ("BLEU is case-sensitive (sacrebleu's default), BLEU_lc lowercased (the E2E scorer); METEOR "
        "omitted (needs Java); CIDEr is the COCO scorer's CIDEr-D form")


def run_e2e(cfg: TrainConfig, results: dict, log=print):
    """The E2E experiment: base model, then each run (or the --adapter) trained and scored;
    results.json rewritten after each run."""
    rows, split, groups = load_splits(cfg, log)
    base, tok = load_model(cfg.base, ignore_keys=cfg.ignore_config_key)
    base.to(cfg.device)
    check_fits(base, [tok.encode(f"{mr}\n") for mr, _ in groups], cfg)
    adapted = copy.deepcopy(base) if cfg.adapter else None
    lcfg = load_adapter(adapted, cfg.adapter) if cfg.adapter else None   # refused before any scoring
    examples = [encode_example(tok, mr, ref, cfg.seq_len) for mr, ref in rows or []]
    examples, val = split_validation(examples, cfg.val_fraction, cfg.seed)
    log(f"{len(examples)} training examples ({split or 'no'} split), {len(groups)} test MRs, "
        f"{sum(len(refs) for _, refs in groups)} references")
    cfg = steps_from_epochs(cfg, len(examples), results, log)
    results.update(train_split=split, test_mrs=len(groups), runs=[])
    results["note"] = NOTE + ("; trained on devset.csv: trainset.csv is absent" if split == "dev" else "")
    if not cfg.no_baseline:
        results["baseline"] = score_baseline(base, tok, groups, cfg, log)
    if adapted is not None:
        score_adapter(adapted, lcfg, tok, groups, cfg, log, results["runs"])
    grid = [(r, t) for t in SWEEP_TARGETS for r in SWEEP_RANKS] if cfg.sweep else [(cfg.rank, cfg.targets)]
    for rank, targets in [] if cfg.adapter else grid:   # the sweep: section 7.2
        run_cfg = TrainConfig(**{**asdict(cfg), "rank": rank, "targets": targets})
        out_dir = os.path.join(cfg.out, f"r{rank}_{targets.replace(',', '')}") if cfg.sweep else cfg.out
        os.makedirs(out_dir, exist_ok=True)
        run_one(base, tok, examples, groups, run_cfg, out_dir, log, results["runs"])
        log(table(results["runs"][-1:]))
        write_json(results, os.path.join(cfg.out, "results.json"))     # a sweep can be cut short
    log(f"\n{f'trained on the {split} split; ' if split else ''}evaluated on {len(groups)} test MRs\n"
        + table(results["runs"] + ([results["baseline"]] if "baseline" in results else [])))


def run_data(cfg: TrainConfig, results: dict, log=print):
    """Your data: every record checked before the model loads; train with the validation split,
    save the adapter (PEFT) in --out/adapter."""
    path, = cfg.data
    records = read_records(path)
    base, tok = load_model(cfg.base, ignore_keys=cfg.ignore_config_key)
    base.to(cfg.device)
    check_fits(base, [], cfg)
    examples, val = split_validation(encode_records(tok, records, path, cfg.seq_len),
                                     cfg.val_fraction, cfg.seed)
    log(f"{len(examples)} training and {len(val)} validation examples from {path}")
    cfg = steps_from_epochs(cfg, len(examples), results, log)
    results.update(train_examples=len(examples), val_examples=len(val), runs=[])
    _, row = fine_tune(base, tok, examples, val, cfg, cfg.out, log)
    results["runs"].append(row)


def run_multi(cfg: TrainConfig, results: dict, log=print):
    """Several adapters in one batch (multi_train.py): one per --data file, or --adapters N on
    E2E; each saved in --out/<name>/adapter (PEFT) and, on E2E, decoded and scored."""
    read = multi_train.read_specs(cfg.data)                 # every file checked before the model
    rows, _, groups = (None, None, None) if cfg.data else load_splits(cfg, log)
    base, tok = load_model(cfg.base, ignore_keys=cfg.ignore_config_key)
    base.to(cfg.device)
    if groups:
        check_fits(base, [tok.encode(f"{mr}\n") for mr, _ in groups], cfg)
        encoded = [encode_example(tok, mr, ref, cfg.seq_len) for mr, ref in rows]
        examples, val = split_validation(encoded, cfg.val_fraction, cfg.seed)
        jobs = multi_train.seed_jobs(cfg.adapters, examples, val, cfg, "e2e")
    else:
        check_fits(base, [], cfg)
        jobs = multi_train.data_jobs(read, tok, cfg, cfg.seq_len, cfg.val_fraction)
    log(f"{len(jobs)} adapters in one batch: " + ", ".join(
        f"{j.name} (r={j.cfg.rank} {j.cfg.targets}, {len(j.examples)} examples)" for j in jobs))
    multi, hist = multi_train.train_together(base, jobs, cfg.out, cfg.resume, log)
    results["runs"] = []
    for job in jobs:
        path = os.path.join(cfg.out, job.name, "adapter")
        multi.save(job.name, path)
        h = hist[job.name]
        trainable = sum(p.numel() for p in multi.parameters(job.name))
        row = {"name": job.name, "method": f"lora {job.name}", "rank": job.cfg.rank,
               "targets": job.cfg.targets, "seed": job.cfg.seed, "trainable": trainable,
               "final_loss": sum(h["losses"][-10:]) / len(h["losses"][-10:]),
               **h, "checkpoint": path, "checkpoint_mb": folder_mb(path),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if groups:
            multi.set_segments([multi_train.Segment(job.name)])    # every row: this adapter
            outs, metrics = evaluate(multi.net, tok, groups, cfg, log)
            write_lines(outs, os.path.join(cfg.out, job.name, "predictions.txt"))
            row.update(metrics)
        results["runs"].append(row)
        write_json(results, os.path.join(cfg.out, "results.json"))
    log(table(results["runs"]))


def run_bench_multi(cfg: TrainConfig, results: dict, log=print):
    base = load_model(cfg.base, ignore_keys=cfg.ignore_config_key)[0].to(cfg.device)
    results["bench_multi"] = multi_train.bench(base, cfg.adapters if cfg.adapters > 1 else 4, cfg,
                                               log=log)


def steps_from_epochs(cfg: TrainConfig, n_examples: int, results: dict, log=print) -> TrainConfig:
    """With --epochs: the config with --steps = ceil(epochs x examples / (batch-size x
    grad-accum)), also in results["config"]; else cfg unchanged."""
    if not cfg.epochs:
        return cfg
    steps = math.ceil(cfg.epochs * n_examples / (cfg.batch_size * cfg.grad_accum))
    log(f"--epochs {cfg.epochs} of {n_examples} examples at {cfg.batch_size * cfg.grad_accum} "
        f"per step: {steps} steps")
    results["config"]["steps"] = steps
    return replace(cfg, steps=steps)


def main(cfg: TrainConfig, log=print) -> dict:
    """Check every flag, then run E2E or --data; results.json is written at the end and, with the
    error, when anything fails after the checks."""
    check_flags(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    results = {"config": asdict(cfg)}
    try:
        run = (run_bench_multi if cfg.bench_multi else run_multi if is_multi(cfg)
               else run_data if cfg.data else run_e2e)
        run(cfg, results, log)
        if cfg.plot:
            figures.training_plots(cfg.out, results.get("runs", []), cfg.sweep, log)
    except BaseException as e:                       # KeyboardInterrupt too: keep what was done
        results["failed"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        write_json(results, os.path.join(cfg.out, "results.json"))
    return results


def given_flags(argv=None) -> set:
    """The config fields set on the command line (argv, or sys.argv), whatever their value."""
    probe, unset = argparse.ArgumentParser(add_help=False), object()   # a default no flag gives
    cli.add_flags(probe, TrainConfig)
    probe.set_defaults(**{f.name: None if f.default is MISSING else unset   # lists: append to None
                          for f in fields(TrainConfig)})
    return {k for k, v in vars(probe.parse_known_args(argv)[0]).items() if v is not unset
            and v is not None}


def apply_preset(cfg: TrainConfig, given: set) -> TrainConfig:
    """cfg with --preset's values for every flag not in `given` (flags given on the command line
    win); an explicit --steps also replaces the preset's epochs."""
    if cfg.preset is None:
        return cfg
    if cfg.preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    values = {k: v for k, v in PRESETS[cfg.preset].items() if k not in given}
    if "steps" in given and "epochs" not in given:
        values.pop("epochs", None)
    return replace(cfg, **values)


def parse_args(argv=None) -> TrainConfig:
    """The config from the command line, --preset applied under the flags given; a flag that
    cannot work is a usage error (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cfg, = cli.parse([TrainConfig], "", argv, parser)
    try:
        given = given_flags(argv)
        if "epochs" in given and "steps" in given:
            raise UsageError("--epochs and --steps both given: --epochs sets the steps, give one")
        cfg = apply_preset(cfg, given)
        check_flags(cfg)
    except UsageError as e:
        parser.error(str(e))
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, RecordError, UsageError, AdapterError, multi_train.SpecError) as e:
        raise SystemExit(f"error: {e}")
