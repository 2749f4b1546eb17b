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
paper's length penalty and no-repeat-ngram. Scores are the E2E challenge's metrics:
- BLEU-4 and NIST-5 as mteval-v13a (its tokenisation, corpus level, all references of an MR,
  closest reference length for the brevity penalty). BLEU is case-sensitive, as sacrebleu's
  default; BLEU_lc and NIST are lowercased, as the challenge's script runs mteval (no -c flag).
- ROUGE-L (beta 1.2) and CIDEr as in the MS-COCO caption scorer the challenge uses; its CIDEr is
  the CIDEr-D form (clipped n-gram counts, Gaussian length penalty sigma 6, times 10).
Simplified: METEOR is left out (it needs Java); the COCO scorers' Java PTB tokeniser is replaced by
the 13a tokens, lowercased, without punctuation; when trainset.csv is missing, the dev split is the
training set (said in the output and the results file).
Run: `python train.py` (LoRA), `python train.py --method full`, `python train.py --adapter DIR` (score
a saved adapter), `python train.py --sweep --steps 15 --warmup 3 --eval-limit 40 --no-baseline`.
Letters: B batch, T tokens per row, V vocabulary, K beams.
"""
import argparse
import copy
import csv
import json
import math
import os
import random
import re
import resource
import shutil
import time
import urllib.request
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F

from lora import (TARGET_NAMES, LoRAConfig, add_lora, count_parameters, load_adapter, mark_only_lora_trainable,
                  save_adapter)
from model import KVCache, Tokenizer, load_model, save_hf


def flag(default, help, kind=None):
    """A config field and its command-line help (kind: the parser type of an Optional field)."""
    return field(default=default, metadata={"help": help, "type": kind or type(default)})


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

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_FILES = ("trainset.csv", "devset.csv", "testset_w_refs.csv")


class DataError(RuntimeError):
    """The E2E files are missing or malformed; the message names the files and what to do."""


def http_fetch(url, dest):
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def ensure_data(root, fetch=http_fetch) -> dict:
    """{"train"/"dev"/"test": path or None}; downloads and unpacks the release when the test split
    is missing from `root` (the zip nests the CSVs in a folder, so they are flattened into root)."""
    if not os.path.isfile(os.path.join(root, "testset_w_refs.csv")):
        os.makedirs(root, exist_ok=True)
        zip_path = os.path.join(root, "e2e-dataset.zip")
        try:
            fetch(E2E_URL, zip_path)
            with zipfile.ZipFile(zip_path) as z:
                for member in z.namelist():
                    if os.path.basename(member) in E2E_FILES:
                        with z.open(member) as src, open(os.path.join(root, os.path.basename(member)), "wb") as dst:
                            shutil.copyfileobj(src, dst)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"E2E data not found in {root} (expected {', '.join(E2E_FILES)}) and the download of "
                            f"{E2E_URL} failed: {e}. Unzip that release into {root}, or point --data or E2E_DATA "
                            "at a folder holding the files.") from None
    paths = [os.path.join(root, name) for name in E2E_FILES]
    if not os.path.isfile(paths[2]):
        raise DataError(f"{paths[2]}: missing after unpacking {E2E_URL}")
    return {split: (p if os.path.isfile(p) else None) for split, p in zip(("train", "dev", "test"), paths)}


def read_e2e(path) -> list:
    """[(mr, ref)] from an E2E CSV with columns mr,ref (quoted fields may hold commas)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header with columns mr,ref, got {reader.fieldnames}")
        return [(row["mr"].strip(), row["ref"].strip()) for row in reader]


def group_refs(rows) -> list:
    """[(mr, [ref, ...])], MRs in order of first appearance, every reference of an MR together."""
    groups = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())


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


# ------------------------------------------------------------------------------------ metrics

# mteval-v13a tokenisation: split off the ASCII symbols { | } ~ [ \ ] ^ _ ` ! " # $ % & ( ) * + : ; < = > ? @ /
# always, period and comma unless between digits, and a dash after a digit.
_SYMBOLS = re.compile(r"""([{|}~\[\\\]^_`!"#$%&()*+:;<=>?@/])""")
_PUNCT = set(".,?!:;-'\"`()[]{}")  # dropped by the COCO scorers' tokeniser


def tokenize_13a(text, lowercase=False) -> list:
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for sgml, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(sgml, char)
    text = f" {text.lower() if lowercase else text} "
    text = _SYMBOLS.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def ngrams(words, n) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def max_ref_counts(refs, n) -> Counter:
    """Each n-gram's largest count in any one reference (the clip of modified precision)."""
    out = Counter()
    for r in refs:
        out |= ngrams(r, n)
    return out


def bleu(hyps, refs, lowercase=False, max_n=4) -> float:
    """Corpus BLEU (Papineni 2002) in [0, 100]: exp(mean_n log p_n) * min(1, exp(1 - r/c)), p_n the
    clipped n-gram precision over the corpus, r the sum of closest reference lengths (ties: shorter)."""
    match, total, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for h, rs in zip(hyps, refs):
        h, rs = tokenize_13a(h, lowercase), [tokenize_13a(r, lowercase) for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            match[n - 1] += sum((ngrams(h, n) & max_ref_counts(rs, n)).values())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / max_n
    return 100 * math.exp(log_p + min(0.0, 1 - ref_len / hyp_len))


def nist(hyps, refs, max_n=5) -> float:
    """NIST (Doddington 2002): sum_n [sum of Info over matched n-grams / hypothesis n-grams] times
    exp(beta log^2 min(1, c / r_avg)), Info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all
    references, beta such that the penalty is 0.5 at c / r_avg = 2/3. Lowercased, as mteval."""
    toks = [(tokenize_13a(h, True), [tokenize_13a(r, True) for r in rs]) for h, rs in zip(hyps, refs)]
    counts = Counter()                       # reference n-gram counts; () counts reference words
    for _, rs in toks:
        for r in rs:
            counts[()] += len(r)
            for n in range(1, max_n + 1):
                counts.update(ngrams(r, n))
    gain, total, hyp_len, ref_len = [0.0] * max_n, [0] * max_n, 0, 0.0
    for h, rs in toks:
        hyp_len, ref_len = hyp_len + len(h), ref_len + sum(map(len, rs)) / len(rs)
        for n in range(1, max_n + 1):
            hits = ngrams(h, n) & max_ref_counts(rs, n)
            gain[n - 1] += sum(c * math.log2(counts[g[:-1]] / counts[g]) for g, c in hits.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    beta = math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(beta * math.log(min(1.0, hyp_len / ref_len)) ** 2) if hyp_len else 0.0
    return penalty * sum(g / max(t, 1) for g, t in zip(gain, total))


def coco_tokens(text) -> list:
    return [w for w in tokenize_13a(text, lowercase=True) if not set(w) <= _PUNCT]


def lcs(a, b) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0                                 # row[j-1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hyps, refs, beta=1.2) -> float:
    """Mean over MRs of F_beta(max_refs precision, max_refs recall) of the longest common
    subsequence (Lin 2004), as the COCO scorer; in [0, 100]."""
    scores = []
    for h, rs in zip(hyps, refs):
        h, rs = coco_tokens(h), [coco_tokens(r) for r in rs]
        common = [lcs(h, r) for r in rs]
        p = max(c / len(h) if h else 0.0 for c in common)
        rec = max(c / len(ref) if ref else 0.0 for c, ref in zip(common, rs))
        scores.append((1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if p and rec else 0.0)
    return 100 * sum(scores) / len(scores)


def cider(hyps, refs, max_n=4, sigma=6.0) -> float:
    """CIDEr-D (Vedantam 2015) as the COCO scorer: per n, TF-IDF vectors g (IDF from the MRs'
    references), clipped cosine sum_k min(g_h, g_r) g_r / (|g_h| |g_r|) times exp(-(l_h - l_r)^2 /
    2 sigma^2), averaged over n and references, times 10, averaged over MRs."""
    toks = [(coco_tokens(h), [coco_tokens(r) for r in rs]) for h, rs in zip(hyps, refs)]
    df = Counter(g for _, rs in toks for g in {g for r in rs for n in range(1, max_n + 1) for g in ngrams(r, n)})
    log_n = math.log(len(toks))

    def vectors(words):
        vec = [{g: c * (log_n - math.log(max(1, df[g]))) for g, c in ngrams(words, n).items()}
               for n in range(1, max_n + 1)]
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]

    scores = []
    for h, rs in toks:
        vh, nh = vectors(h)
        total = 0.0
        for r in rs:
            vr, nr = vectors(r)
            penalty = math.exp(-(len(h) - len(r)) ** 2 / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                total += penalty * dot / (nh[n] * nr[n]) / max_n if nh[n] and nr[n] else 0.0
        scores.append(10 * total / len(rs))
    return sum(scores) / len(scores)


def e2e_metrics(hyps, refs) -> dict:
    return {"BLEU": bleu(hyps, refs), "BLEU_lc": bleu(hyps, refs, lowercase=True), "NIST": nist(hyps, refs),
            "ROUGE_L": rouge_l(hyps, refs), "CIDEr": cider(hyps, refs)}


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
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(name, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(name, type=f.metadata["type"], default=f.default,
                                help=f.metadata["help"] + ("" if f.default is None else f" (default {f.default})"))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.task != "e2e":
        parser.error(f"--task {cfg.task!r}: only e2e is implemented")
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as e:
        raise SystemExit(f"error: {e}")
