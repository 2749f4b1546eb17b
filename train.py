"""LoRA fine-tuning on E2E NLG: the LoRA paper's Table 3 experiment and its rank study, on SmolLM2.

Hu et al. 2021 (arXiv 2106.09685), section 6.2 and Table 3: GPT-2 adapted to the E2E NLG
challenge (Novikova et al. 2017: restaurant meaning representations -> one English sentence) with
LoRA on W_q and W_v (r=4, alpha=32, dropout 0.1, label smoothing 0.1, AdamW lr 2e-4, linear
schedule) beats full fine-tuning with 0.35M trainable parameters. Table 6 / Table 18 vary the rank
r and the adapted matrices. Here the same recipe runs on SmolLM2-135M-Instruct on a CPU, with one
change: the paper trains 5 epochs of 42k examples (~26k steps) at lr 2e-4, the default here is 100
steps of 8 examples (a 2-core CPU's budget), where 2e-4 learns too slowly (loss 3.9 against 3.2
with 1e-3 after 30 steps), so the default rate is 1e-3.

Example: the prompt is "{mr}\\n", the target " {ref}" + end token; the loss covers the target only.
Decoding: greedy through Llama.generate (batched, KV cache), or beam search (--beam) with the
paper's length penalty and no-repeat-ngram; the outputs are scored with the E2E metrics (e2e.py).
Simplified: when trainset.csv is missing, the dev split is the training set (said in the output
and the results file).
Run: `python train.py` (LoRA), `python train.py --method full`, `python train.py --adapter DIR` (score
a saved adapter), `python train.py --sweep --steps 15 --warmup 3 --eval-limit 40 --no-baseline`.
Letters: B batch, T tokens per row, V vocabulary, K beams.
"""
import argparse
import copy
import json
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import cli
from checkpoints import Tokenizer, load_model, save_hf
from e2e import DataError, e2e_metrics, ensure_data, group_refs, read_e2e
from lora import (TARGET_NAMES, LoRAConfig, add_lora, count_parameters, load_adapter,
                  mark_only_lora_trainable, save_adapter)
from model import KVCache

flag = cli.flag


@dataclass
class TrainConfig:
    task: str = flag("e2e", "experiment to run: e2e, the LoRA paper's E2E NLG (Table 3), the only one here")
    data: Optional[str] = flag(None, "folder of the E2E CSV files (default $E2E_DATA, else ~/.cache/e2e-nlg); "
                               "the release is downloaded there when testset_w_refs.csv is missing", str)
    base: Optional[str] = flag(None, "base model, .gguf file or Hugging Face folder (default SmolLM2-135M-Instruct "
                               "or $LORA_MODEL_PATH)", str)
    out: str = flag("runs/e2e", "output folder: checkpoint, predictions, results.json")
    method: str = flag("lora", "lora, or full to fine-tune every weight")
    rank: int = flag(4, "LoRA rank r")
    alpha: float = flag(32.0, "LoRA alpha: the update is scaled by alpha / r")
    dropout: float = flag(0.1, "dropout on the input of the LoRA path")
    targets: str = flag("q,v", "adapted projections, comma-separated, from " + ",".join(TARGET_NAMES))
    steps: int = flag(100, "optimizer steps")
    batch_size: int = flag(8, "examples per step")
    seq_len: int = flag(128, "longest example in tokens (longer references are cut)")
    lr: float = flag(1e-3, "peak learning rate of AdamW (the paper: 2e-4 over ~26k steps)")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    warmup: int = flag(10, "linear warm-up steps, then linear decay to 0")
    label_smoothing: float = flag(0.1, "label smoothing of the loss")
    seed: int = flag(0, "random seed (initialisation, data order, dropout)")
    eval_limit: Optional[int] = flag(None, "score the first N test MRs only (default all 630)", int)
    eval_batch: int = flag(48, "prompts per generate call")
    max_new_tokens: int = flag(64, "longest output in tokens")
    beam: int = flag(1, "beam size (1: greedy decoding)")
    length_penalty: float = flag(0.9, "beam search ranks by log p / length^penalty")
    no_repeat_ngram: int = flag(4, "beam search never repeats an n-gram of this length")
    adapter: Optional[str] = flag(None, "score this saved PEFT adapter on the test MRs instead of training", str)
    no_baseline: bool = flag(False, "do not score the base model without adapter")
    baseline_limit: int = flag(100, "score the base model on the first N evaluated MRs only (it never ends "
                               "its outputs, so they all run to --max-new-tokens)")
    sweep: bool = flag(False, "rank study: r in 1,2,4,8,64 x targets q; q,v; q,k,v,o")
    log_every: int = flag(10, "print progress every N steps")


# ------------------------------------------------------------------------------------ data

def encode_example(tok, mr, ref, seq_len) -> tuple:
    """(token ids, number of prompt tokens); the target is cut so that the example fits seq_len."""
    prompt = tok.encode(f"{mr}\n")
    target = (tok.encode(f" {ref}") + [tok.eos_id])[:max(seq_len - len(prompt), 1)]
    return prompt + target, len(prompt)


def batches(examples, batch_size, rng):
    """Endless (tokens [B, T], loss mask [B, T-1], tokens that are not padding) batches. Each pool
    of 32 batches is sorted by length so a batch pads little; mask[b, t]: position t predicts a
    target token."""
    while True:
        order = rng.sample(range(len(examples)), len(examples))
        pool_size = batch_size * 32
        for p in range(0, len(order), pool_size):
            pool = sorted(order[p:p + pool_size], key=lambda i: len(examples[i][0]))
            chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                T = max(len(examples[i][0]) for i in chunk)
                tokens = torch.zeros(len(chunk), T, dtype=torch.long)
                mask = torch.zeros(len(chunk), T - 1, dtype=torch.bool)
                for row, i in enumerate(chunk):
                    ids, n_prompt = examples[i]
                    tokens[row, :len(ids)] = torch.tensor(ids)
                    mask[row, n_prompt - 1:len(ids) - 1] = True
                yield tokens, mask, sum(len(examples[i][0]) for i in chunk)


# ------------------------------------------------------------------------------------ training

def prepare(net, cfg: TrainConfig):
    """LoRA (section 4.1): freeze W0, add (alpha/r) B A on the targets; or train every weight."""
    if cfg.method == "full":
        for p in net.parameters():
            p.requires_grad_(True)
        return net, None
    unknown = set(cfg.targets.split(",")) - set(TARGET_NAMES)
    if cfg.method != "lora" or unknown:
        raise ValueError(f"--method must be lora or full (got {cfg.method!r}); unknown targets {sorted(unknown)}")
    lcfg = LoRAConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                      targets=tuple(TARGET_NAMES[t] for t in cfg.targets.split(",")))
    add_lora(net, lcfg)
    mark_only_lora_trainable(net)
    return net, lcfg


def lm_loss(net, tokens, mask, label_smoothing):
    """Cross-entropy of the next token at the masked (target) positions, with label smoothing."""
    logits = net(tokens[:, :-1], select=mask)                      # [M, V]: the M target positions
    return F.cross_entropy(logits, tokens[:, 1:][mask], label_smoothing=label_smoothing)


def train(net, examples, cfg: TrainConfig, log=print) -> dict:
    """AdamW with linear warm-up and linear decay (the paper's schedule); prints progress."""
    torch.manual_seed(cfg.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ramp = lambda s: min((s + 1) / max(cfg.warmup, 1), max(cfg.steps - s, 0) / max(cfg.steps - cfg.warmup, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    data, losses, n_tokens = batches(examples, cfg.batch_size, random.Random(cfg.seed)), [], 0
    net.train()
    start = time.time()
    for step in range(1, cfg.steps + 1):
        tokens, mask, n_real = next(data)
        loss = lm_loss(net, tokens, mask, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        n_tokens += n_real
        elapsed = time.time() - start
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.3f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  tok/s {n_tokens / elapsed:.0f}  "
                f"elapsed {elapsed / 60:.1f} min  remaining {elapsed / step * (cfg.steps - step) / 60:.1f} min")
    net.eval()
    return {"losses": losses, "train_time_s": time.time() - start, "tokens_per_s": n_tokens / (time.time() - start)}


# ------------------------------------------------------------------------------------ decoding

def clean_output(tok, ids) -> str:
    """Decoded text up to the end token, first non-empty line only (a reference is one line; the
    base model, which never learnt the format, starts its answers with a line break)."""
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    return tok.decode(ids).strip().split("\n")[0].strip()


@torch.no_grad()
def generate_outputs(net, tok, mrs, cfg: TrainConfig, log=print) -> list:
    """One output per MR. Prompts are sorted by length so each generate call pads little."""
    net.eval()
    prompts = [tok.encode(f"{mr}\n") for mr in mrs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs, start = [""] * len(prompts), time.time()
    for s in range(0, len(order), cfg.eval_batch):
        if s:
            log(f"decoded {s}/{len(order)} MRs, {time.time() - start:.0f} s")
        idx = order[s:s + cfg.eval_batch]
        if cfg.beam > 1:
            new = [beam_search(net, prompts[i], cfg, tok.eos_id) for i in idx]
        else:
            new = net.generate([prompts[i] for i in idx], cfg.max_new_tokens, eos_id=tok.eos_id)
        for i, ids in zip(idx, new):
            outs[i] = clean_output(tok, ids)
    return outs


def repeated_ngram_ban(seq, n) -> set:
    """Tokens that would complete an n-gram already present in seq (no_repeat_ngram_size)."""
    if n < 1 or len(seq) < n - 1:
        return set()
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix}


@torch.no_grad()
def beam_search(net, prompt, cfg: TrainConfig, eos_id) -> list:
    """Beam search over one prompt with a KV cache: K beams, final score logp / length^penalty,
    n-gram repeats (in the generated tokens) forbidden; stops once K hypotheses have ended."""
    K, V = cfg.beam, net.config.vocab_size
    w = net.lm_head.weight
    cache = KVCache(net.config, K, len(prompt) + cfg.max_new_tokens, w.dtype, w.device)
    logits = net(torch.tensor([prompt] * K), cache=cache)[:, -1]                # [K, V]
    seqs, scores = [[] for _ in range(K)], torch.full((K,), -math.inf)
    scores[0] = 0.0                                                             # beams start identical
    finished = []
    for _ in range(cfg.max_new_tokens):
        logp = torch.log_softmax(logits.float(), -1) + scores[:, None]          # [K, V]
        for k, seq in enumerate(seqs):
            logp[k, list(repeated_ngram_ban(seq, cfg.no_repeat_ngram))] = -math.inf
        top = logp.view(-1).topk(2 * K)                                         # [2K] over K*V
        rows, toks, new_scores = [], [], []
        for val, flat in zip(top.values.tolist(), top.indices.tolist()):
            k, t = divmod(flat, V)
            if val == -math.inf:
                break
            if t == eos_id:
                finished.append((val / (len(seqs[k]) + 1) ** cfg.length_penalty, seqs[k]))
            elif len(rows) < K:
                rows, toks, new_scores = rows + [k], toks + [t], new_scores + [val]
        if len(finished) >= K or not rows:
            break
        rows += [rows[0]] * (K - len(rows))                                     # keep K rows in the cache
        toks += [toks[0]] * (K - len(toks))
        new_scores += [-math.inf] * (K - len(new_scores))
        seqs, scores = [seqs[k] + [t] for k, t in zip(rows, toks)], torch.tensor(new_scores)
        cache.k, cache.v = cache.k[:, rows], cache.v[:, rows]                   # [L, K, nkv, S, hd]
        logits = net(torch.tensor(toks)[:, None], cache=cache)[:, -1]
    finished += [(s / max(len(q), 1) ** cfg.length_penalty, q) for s, q in zip(scores.tolist(), seqs) if s > -math.inf]
    return max(finished, key=lambda f: f[0])[1] if finished else []


# ------------------------------------------------------------------------------------ experiments

def evaluate(net, tok, groups, cfg: TrainConfig, log=print) -> tuple:
    """(outputs, metrics with eval_time_s) on the MR groups [(mr, [refs])]."""
    start = time.time()
    outs = generate_outputs(net, tok, [mr for mr, _ in groups], cfg, log)
    return outs, {**e2e_metrics(outs, [refs for _, refs in groups]), "eval_time_s": time.time() - start}


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def folder_mb(path) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2 ** 20


def run_one(base, tok, examples, groups, cfg: TrainConfig, out_dir, log=print) -> dict:
    """Fine-tune a copy of `base` as cfg says, save it, decode the test MRs and score them."""
    torch.manual_seed(cfg.seed)
    net, lcfg = prepare(copy.deepcopy(base), cfg)
    trainable, total = count_parameters(net)
    what = f"lora r={cfg.rank} targets={cfg.targets}" if lcfg else "full fine-tuning"
    log(f"{what}: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")
    stats = train(net, examples, cfg, log)
    ckpt = os.path.join(out_dir, "adapter" if lcfg else "model")
    if lcfg:
        save_adapter(net, ckpt, lcfg)
    else:
        save_hf(net, ckpt, tok if isinstance(tok, Tokenizer) else None)   # the test tokenizer has no file form
    outs, metrics = evaluate(net, tok, groups, cfg, log)
    with open(os.path.join(out_dir, "predictions.txt"), "w") as f:
        f.write("\n".join(outs) + "\n")
    return {"method": cfg.method, "rank": cfg.rank if lcfg else None, "targets": cfg.targets if lcfg else "all",
            "trainable": trainable, "trainable_pct": 100 * trainable / total, **metrics,
            "train_time_s": stats["train_time_s"], "step_s": stats["train_time_s"] / cfg.steps,
            "tokens_per_s": stats["tokens_per_s"],
            "final_loss": sum(stats["losses"][-10:]) / len(stats["losses"][-10:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "checkpoint_mb": folder_mb(ckpt)}


def score_adapter(base, tok, groups, cfg: TrainConfig, log=print) -> dict:
    """Decode and score with a saved adapter (no training): the row of a finished run's checkpoint."""
    net = copy.deepcopy(base)
    lcfg = load_adapter(net, cfg.adapter)
    mark_only_lora_trainable(net)
    outs, metrics = evaluate(net, tok, groups, cfg, log)
    with open(os.path.join(cfg.out, "predictions.txt"), "w") as f:
        f.write("\n".join(outs) + "\n")
    targets = ",".join(k for k, v in TARGET_NAMES.items() if v in lcfg.targets)
    return {"method": "lora (loaded)", "rank": lcfg.r, "targets": targets, **metrics,
            "trainable": count_parameters(net)[0], "checkpoint_mb": folder_mb(cfg.adapter)}


SWEEP_RANKS, SWEEP_TARGETS = (1, 2, 4, 8, 64), ("q", "q,v", "q,k,v,o")   # Table 6 / Table 18 of the paper
COLUMNS = ("method", "rank", "targets", "trainable", "trainable_pct", "BLEU", "BLEU_lc", "NIST", "ROUGE_L", "CIDEr",
           "train_time_s", "step_s", "tokens_per_s", "peak_rss_mb", "checkpoint_mb")


def table(rows) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(COLUMNS), "-+-".join("-" * w for w in widths), *map(line, cells)])


def load_splits(cfg: TrainConfig, log=print) -> tuple:
    """(training rows, name of the training split, test MR groups limited to eval_limit)."""
    paths = ensure_data(cfg.data or os.environ.get("E2E_DATA") or os.path.expanduser("~/.cache/e2e-nlg"))
    split = "train" if paths["train"] else "dev"
    if split == "dev":
        log(f"trainset.csv not found next to {paths['test']}: training on the dev split (devset.csv) instead")
    groups = group_refs(read_e2e(paths["test"]))
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise ValueError(f"--eval-limit must be at least 1, got {cfg.eval_limit}")
    return read_e2e(paths[split]), split, groups if cfg.eval_limit is None else groups[:cfg.eval_limit]


def main(cfg: TrainConfig, log=print) -> dict:
    rows, split, groups = load_splits(cfg, log)
    base, tok = load_model(cfg.base)
    examples = [encode_example(tok, mr, ref, cfg.seq_len) for mr, ref in rows]
    log(f"{len(examples)} training examples ({split} split), {len(groups)} test MRs, "
        f"{sum(map(len, (r for _, r in groups)))} references")
    os.makedirs(cfg.out, exist_ok=True)
    results = {"config": asdict(cfg), "train_split": split, "test_mrs": len(groups), "runs": [],
               "note": "BLEU is case-sensitive (sacrebleu's default), BLEU_lc lowercased (the E2E scorer); METEOR "
                       "omitted (needs Java); CIDEr is the COCO scorer's CIDEr-D form"
                       + ("; trained on devset.csv because trainset.csv is absent" if split == "dev" else "")}
    if not cfg.no_baseline:
        outs, metrics = evaluate(base, tok, groups[:cfg.baseline_limit], cfg, log)
        with open(os.path.join(cfg.out, "predictions_base.txt"), "w") as f:
            f.write("\n".join(outs) + "\n")
        results["baseline"] = {"method": f"base, {len(outs)} MRs", "trainable": 0, **metrics}
        log(f"base model on {len(outs)} MRs: BLEU {metrics['BLEU']:.2f}, {metrics['eval_time_s']:.0f} s")
    if cfg.adapter:
        results["runs"].append(score_adapter(base, tok, groups, cfg, log))
    grid = [(r, t) for t in SWEEP_TARGETS for r in SWEEP_RANKS] if cfg.sweep else [(cfg.rank, cfg.targets)]
    for rank, targets in [] if cfg.adapter else grid:
        run_cfg = TrainConfig(**{**asdict(cfg), "rank": rank, "targets": targets})
        out_dir = os.path.join(cfg.out, f"r{rank}_{targets.replace(',', '')}") if cfg.sweep else cfg.out
        os.makedirs(out_dir, exist_ok=True)
        results["runs"].append(run_one(base, tok, examples, groups, run_cfg, out_dir, log))
        log(table(results["runs"][-1:]))
        write_json(results, os.path.join(cfg.out, "results.json"))      # after every run: a sweep can be cut short
    write_json(results, os.path.join(cfg.out, "results.json"))
    log(f"\ntrained on the {split} split; evaluated on {len(groups)} test MRs\n"
        + table(results["runs"] + ([results["baseline"]] if "baseline" in results else [])))
    return results


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cfg, = cli.parse([TrainConfig], "", argv, parser)
    if cfg.task != "e2e":
        parser.error(f"--task {cfg.task!r}: only e2e is implemented")
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as e:
        raise SystemExit(f"error: {e}")
