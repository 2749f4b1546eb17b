"""Your own fine-tuning data: JSONL records -> token ids and a loss mask, batches of them.

Hu et al. 2021 (arXiv 2106.09685), section 5.4 trains on (context, completion) pairs and takes
the loss on the completion only: the model is conditioned on the prompt, never taught to write it.
A record is one JSON object per line of the file, either
    {"prompt": "...", "completion": "..."}              the loss covers completion + end token
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
the messages rendered with the ChatML template "<|im_start|>{role}\\n{content}<|im_end|>\\n", the
loss covering each assistant turn's content and its <|im_end|>. An example is (token ids,
is_target per token); a batch is tokens [B, T] with mask [B, T-1]: position t predicts a target.
Every record is checked before any model work; the error lists each malformed one with its file,
line and reason.
Simplified: no tool calls or multi-modal content; a record longer than --seq-len is cut.
Demo: `python train.py --data my.jsonl --val-fraction 0.1 --steps 20`.
Letters: B examples per batch, T tokens per row.
"""
import json
import random
from typing import Optional

import torch

ROLES = ("system", "user", "assistant")
CHATML = ("<|im_start|>", "<|im_end|>")


class RecordError(ValueError):
    """A JSONL training file that cannot be used; the message names the file, line and reason."""


def record_problem(rec) -> Optional[str]:
    """Why a parsed JSONL record cannot be trained on, or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if ("messages" in rec) == ("prompt" in rec or "completion" in rec):
        return 'expected "prompt" and "completion", or "messages"'
    if "messages" not in rec:
        if not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)):
            return '"prompt" and "completion" must both be strings'
        return None if rec["completion"] else '"completion" is empty'
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            return f'message {i}: expected {{"role": {"|".join(ROLES)}, "content": a string}}'
    return None if any(m["role"] == "assistant" for m in messages) else 'no "assistant" message'


def read_records(path) -> list:
    """[(line number, record)] of a JSONL file (blank lines skipped); RecordError listing each
    malformed line with its reason."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise RecordError(f"--data {path}: cannot read it ({e.strerror})") from None
    records, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            problem = record_problem(rec)
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg})"
        if problem:
            problems.append(f"{path}, line {n}: {problem}")
        records.append((n, rec))
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise RecordError(f"{len(problems)} malformed records:\n" + "\n".join(problems[:10]) + more)
    if not records:
        raise RecordError(f"{path}: no records")
    return records


def encode_record(tok, rec, seq_len) -> tuple:
    """(token ids, is_target per token), cut to seq_len: prompt + completion + end token, or each
    message in ChatML, targets the assistant's content + <|im_end|>."""
    if "messages" not in rec:
        pieces = [(tok.encode(rec["prompt"]), False),
                  (tok.encode(rec["completion"]) + [tok.eos_id], True)]
    else:
        missing = [s for s in CHATML if s not in tok.special]
        if missing:
            raise RecordError(f"the tokenizer has no {missing[0]} token: use prompt/completion "
                              "records")
        start, end = (tok.special[s] for s in CHATML)
        newline = tok.encode("\n")
        pieces = [piece for m in rec["messages"] for piece in (
            ([start] + tok.encode(f"{m['role']}\n"), False),
            (tok.encode(m["content"]) + [end], m["role"] == "assistant"), (newline, False))]
    ids = [t for part, _ in pieces for t in part]
    return ids[:seq_len], [learn for part, learn in pieces for _ in part][:seq_len]


def encode_records(tok, records, path, seq_len) -> list:
    """Every record encoded; RecordError naming the lines left without a target token."""
    examples = [encode_record(tok, rec, seq_len) for _, rec in records]
    empty = [n for (n, _), (_, is_target) in zip(records, examples) if not any(is_target[1:])]
    if empty:
        raise RecordError(f"{path}, lines {empty[:10]}: no target token within --seq-len {seq_len}")
    return examples


def split_validation(examples, fraction, seed) -> tuple:
    """(training, validation) examples: a seeded random `fraction` held out (at least one)."""
    if not fraction:
        return examples, []
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    n_val = max(1, round(fraction * len(examples)))
    if n_val >= len(examples):
        raise RecordError(f"--val-fraction {fraction} of {len(examples)} examples leaves none to "
                          "train on")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(examples) -> tuple:
    """(tokens [B, T], loss mask [B, T-1], tokens that are not padding); mask[b, t]: position t
    predicts a target token."""
    T = max(len(ids) for ids, _ in examples)
    tokens = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T - 1, dtype=torch.bool)
    for row, (ids, is_target) in enumerate(examples):
        tokens[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids) - 1] = torch.tensor(is_target[1:], dtype=torch.bool)
    return tokens, mask, sum(len(ids) for ids, _ in examples)


def batches(examples, batch_size, rng, skip=0):
    """Endless collated batches; each pool of 32 batches is sorted by length so a batch pads
    little. The first `skip` batches are passed over without being built (a resumed run)."""
    if not examples:
        raise ValueError("no training examples")
    done = 0
    while True:
        order = rng.sample(range(len(examples)), len(examples))
        pool_size = batch_size * 32
        for p in range(0, len(order), pool_size):
            pool = sorted(order[p:p + pool_size], key=lambda i: len(examples[i][0]))
            chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                done += 1
                if done > skip:
                    yield collate([examples[i] for i in chunk])
