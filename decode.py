"""Decoding a fine-tuned model: greedy, or batched beam search as the LoRA paper decodes E2E.

Hu et al. 2021 (arXiv 2106.09685), section 5.4 and appendix D.3: E2E outputs come from beam search
(beam 10, length penalty 0.9, no repeated 4-gram). Greedy decoding is Llama.generate (model.py).
Beam search here decodes P prompts at once: their K beams are the R = P K rows of one batch, one
forward per step; after each step every row of the KV cache is replaced by the row of the beam it
continues (only the rows that change hands are copied). A prompt leaves the batch once K of its
hypotheses have ended and its best live one, ranked at its present length, cannot beat them
(transformers' early_stopping=False); stopping at the first K ended ones favours short outputs.
    score(hypothesis) = sum of log p(token) / length^penalty
Simplified: no sampling; a hypothesis's end token is not kept; ties break by torch.topk's order.
Demo: `python train.py --beam 4 --eval-limit 8 --steps 20` decodes E2E test MRs with beams of 4.
Letters: P prompts, K beams, R rows (P K while every prompt decodes), V vocabulary, T0 prompt
width, S cache positions, L layers, nkv KV heads, hd head dim.
"""
import math
import time
from dataclasses import dataclass

import torch

import cli
from model import KVCache

flag = cli.flag


@dataclass
class DecodeConfig:
    eval_batch: int = flag(48, "prompts per decoding call (times --beam rows)")
    max_new_tokens: int = flag(64, "longest output in tokens")
    beam: int = flag(4, "beam size (1: greedy decoding)")
    length_penalty: float = flag(1.0, "beam search ranks by log p / length^penalty (the paper: 0.9)")
    no_repeat_ngram: int = flag(4, "beam search never repeats an n-gram of this length (0: off)")


def clean_output(tok, ids) -> str:
    """Decoded text up to the end token, first non-empty line only (a reference is one line; the
    base model, which never learnt the format, starts its answers with a line break)."""
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    return tok.decode(ids).strip().split("\n")[0].strip()


@torch.no_grad()
def generate_outputs(net, tok, prompts, cfg: DecodeConfig, log=print) -> list:
    """One output text per prompt text. Prompts are sorted by length so each call pads little."""
    net.eval()
    prompts = [tok.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs, start = [""] * len(prompts), time.time()
    for s in range(0, len(order), cfg.eval_batch):
        if s:
            log(f"decoded {s}/{len(order)} prompts, {time.time() - start:.0f} s")
        chunk = [prompts[i] for i in order[s:s + cfg.eval_batch]]
        if cfg.beam > 1:
            new = beam_search(net, chunk, cfg, tok.eos_id)
        else:
            new = net.generate(chunk, cfg.max_new_tokens, eos_id=tok.eos_id)
        for i, ids in zip(order[s:s + cfg.eval_batch], new):
            outs[i] = clean_output(tok, ids)
    return outs


def repeated_ngram_ban(seq, n) -> set:
    """Tokens that would complete an n-gram already present in seq (no_repeat_ngram_size)."""
    if n < 1 or len(seq) < n - 1:
        return set()
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix}


class Beams:
    """The K hypotheses of every prompt still decoding: row r of the batch is beam r % K of prompt
    live[r // K]; finished[p] collects (score / length^penalty, tokens) of ended hypotheses."""

    def __init__(self, n_prompts, K, length_penalty, device):
        self.K, self.penalty, self.live = K, length_penalty, list(range(n_prompts))
        self.seqs = [[] for _ in range(n_prompts * K)]
        self.scores = torch.full((n_prompts * K,), -math.inf, device=device)
        self.scores[::K] = 0.0                         # the K beams of a prompt start identical
        self.finished = [[] for _ in range(n_prompts)]

    def close(self, p, rows):
        """Prompt p stops: its live hypotheses join its finished ones."""
        self.finished[p] += [(self.scores[r].item() / max(len(self.seqs[r]), 1) ** self.penalty,
                              self.seqs[r]) for r in rows if self.scores[r] > -math.inf]

    def settled(self, p, best_live, length) -> bool:
        """Prompt p is done once it holds K ended hypotheses and its best live one, ranked at its
        present length, no longer beats the worst of those K (transformers' early_stopping=False)."""
        ended = sorted(score for score, _ in self.finished[p])[-self.K:]
        return len(ended) >= self.K and best_live / length ** self.penalty <= ended[0]

    def step(self, logp, eos_id) -> list:
        """Extend every live prompt's beams by the best 2K of its K x V candidates (logp [R, V],
        scores included); ended ones finish. The rows the new beams continue, [] when all done."""
        K, V = self.K, logp.shape[1]
        top = logp.view(len(self.live), K * V).topk(2 * K, dim=1)          # [P, 2K] over K*V
        rows, toks, scores, live = [], [], [], []
        for i, p in enumerate(self.live):
            chosen = []
            for val, flat in zip(top.values[i].tolist(), top.indices[i].tolist()):
                row, t = i * K + flat // V, flat % V
                if val == -math.inf:
                    break
                if t == eos_id:
                    ended = self.seqs[row]                      # its end token is not kept
                    self.finished[p].append((val / (len(ended) + 1) ** self.penalty, ended))
                elif len(chosen) < K:
                    chosen.append((row, t, val))
            if not chosen or self.settled(p, chosen[0][2], len(self.seqs[chosen[0][0]]) + 1):
                self.close(p, range(i * K, i * K + K))
                continue
            chosen += [(chosen[0][0], chosen[0][1], -math.inf)] * (K - len(chosen))   # K rows each
            live.append(p)
            rows += [row for row, _, _ in chosen]
            toks += [t for _, t, _ in chosen]
            scores += [val for _, _, val in chosen]
        self.seqs = [self.seqs[r] + [t] for r, t in zip(rows, toks)]
        self.scores = torch.tensor(scores, device=self.scores.device)
        self.live, self.tokens = live, toks
        return rows

    def best(self) -> list:
        for i, p in enumerate(self.live):
            self.close(p, range(i * self.K, i * self.K + self.K))
        return [max(f, key=lambda h: h[0])[1] if f else [] for f in self.finished]


def reorder_cache(cache, rows):
    """Row i of the KV cache becomes old row rows[i]: the beams each new hypothesis continues. Only
    the filled positions are copied, a layer at a time (3x faster than one indexing of all layers);
    while the row count holds only the rows that change hands, else (prompts done) into new rows."""
    n, same = cache.length, len(rows) == cache.k.shape[1]
    moved = (rows != torch.arange(len(rows), device=rows.device)).nonzero()[:, 0] if same else None
    for name in ("k", "v"):
        old = getattr(cache, name)                                      # [L, R, nkv, S, hd]
        new = old if same else old.new_empty(old.shape[0], len(rows), *old.shape[2:])
        for layer, out in zip(old, new):
            if same:                                    # a beam that continues itself stays
                out[:, :, :n].index_copy_(0, moved, layer[:, :, :n].index_select(0, rows[moved]))
            else:                                       # positions >= n are written before read
                out[:, :, :n] = layer[:, :, :n].index_select(0, rows)
        setattr(cache, name, new)


@torch.no_grad()
def beam_search(net, prompts, cfg: DecodeConfig, eos_id) -> list:
    """Beam search for P prompts (token lists) at once, left-padded as Llama.generate pads; the
    prompt is run once, then copied to its K rows. Returns each prompt's best tokens."""
    K, device = cfg.beam, net.lm_head.weight.device
    T0 = max(len(p) for p in prompts)
    total = T0 + cfg.max_new_tokens
    tokens = torch.zeros(len(prompts), T0, dtype=torch.long, device=device)
    key_mask = torch.ones(len(prompts), total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T0 - len(p):] = torch.tensor(p)
        key_mask[i, :T0 - len(p)] = False
    positions = (key_mask[:, :T0].cumsum(1) - 1).clamp(min=0)            # pads do not count
    cache = KVCache(net.config, len(prompts), total, net.lm_head.weight.dtype, device)
    logits = net(tokens, positions, cache, key_mask)[:, -1]              # [P, V]: prefill once
    rows = torch.arange(len(prompts), device=device).repeat_interleave(K)   # then K rows per prompt
    logits, key_mask, pos = logits[rows], key_mask[rows], positions[rows, -1:] + 1
    cache.k, cache.v = cache.k[:, rows], cache.v[:, rows]                # [L, R, nkv, S, hd]
    beams = Beams(len(prompts), K, cfg.length_penalty, device)
    for _ in range(cfg.max_new_tokens):
        logp = torch.log_softmax(logits.float(), -1) + beams.scores[:, None]    # [R, V]
        banned = [(r, t) for r, seq in enumerate(beams.seqs)
                  for t in repeated_ngram_ban(seq, cfg.no_repeat_ngram)]       # one write for all
        if banned:
            logp[tuple(torch.tensor(banned, device=device).T)] = -math.inf
        rows = beams.step(logp, eos_id)
        if not rows:
            break
        rows = torch.tensor(rows, device=device)
        reorder_cache(cache, rows)
        key_mask, pos = key_mask[rows], pos[rows]
        logits = net(torch.tensor(beams.tokens, device=device)[:, None], pos, cache, key_mask)[:, -1]
        pos = pos + 1
    return beams.best()
