"""int8 adapter pages against float ones on a real adapter: how far the logits move, and the E2E
BLEU the adapter keeps when the engine serves it both ways (S-LoRA, arXiv 2311.03285, closes by
naming the quantization of adapters as future work; quant.Int8Rows implements it).

The kernels are exact on the dequantized rows (test_all.py:
test_int8_rows_equal_the_float_path_on_the_dequantized_adapter, and the engine test beside it),
so the int8 engine's logits are the model's logits with the adapter replaced by its dequantized
copy; logit_gap measures them with the dense forward, at every position of each test MR's prompt
and first reference (teacher forcing). bleu_both_ways serves every test MR greedily through
engine.Engine once with float rows and once with int8 rows, the same requests in the same order.
Demo: `python int8_bench.py --adapter runs/e2e/r4_qv/adapter` (the base model from --base or
LORA_MODEL_PATH, the E2E test set from --e2e-dir or E2E_DATA; `--limit 100` for a quicker run).
"""
import copy
import os
import time
from dataclasses import dataclass, replace
from typing import List, Optional

import torch

import cli
import lora
from adapters import HostAdapter
from checkpoints import load_model
from decode import clean_output
from e2e import e2e_metrics, ensure_data, group_refs, read_e2e
from engine import Engine
from quant import quantize_rows


@dataclass
class Int8BenchConfig:
    adapter: Optional[str] = cli.flag(None, "PEFT directory of an adapter trained on E2E "
                                            "(train.py writes runs/e2e/<run>/adapter)", str)
    base: Optional[str] = cli.flag(None, "GGUF file or HF directory (default: $LORA_MODEL_PATH, "
                                         "else the real SmolLM2)", str)
    e2e_dir: Optional[str] = cli.flag(None, "folder of the E2E CSV files (default $E2E_DATA, "
                                            "else ~/.cache/e2e-nlg, downloaded)", str)
    limit: Optional[int] = cli.flag(None, "the first this many test MRs (default: all 630)", int)
    max_new_tokens: int = cli.flag(64, "longest output in tokens")
    threads: int = cli.flag(2, "torch CPU threads")
    pool_pages: int = cli.flag(1200, "pages of the pool whose adapter capacity is counted")


def dequantized(ad: HostAdapter) -> HostAdapter:
    """The adapter as int8 pool rows hold it: each row's quantize_rows, multiplied back."""
    rows = {t: quantize_rows(w) for t, w in ad.weights.items()}                # [L, rows, H]
    return replace(ad, weights={t: q.float() * s[..., None] for t, (q, s) in rows.items()})


def with_adapter(model, path: str, host: Optional[HostAdapter] = None):
    """A copy of model with the PEFT adapter at path; host: its A and B taken from this packed
    copy instead (dequantized)."""
    net = copy.deepcopy(model)
    lora.load_adapter(net, path)
    if host is not None:
        with torch.no_grad():
            for name, m in lora.lora_layers(net).items():    # model.layers.{i}.self_attn.q_proj
                layer, target = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
                m.lora_A.weight.copy_(host.a(target)[layer])                          # [r, I]
                m.lora_B.weight.copy_(host.bt(target)[layer].T)                       # [O, r]
    return net.eval()


@torch.no_grad()
def logit_gap(float_net, int8_net, sequences: List[List[int]], batch: int = 32) -> dict:
    """max and mean |logits_int8 - logits_float| over every position, and the share of positions
    whose argmax differs. Right padding: a causal model's real positions do not see it."""
    worst, total, count, flips = 0.0, 0.0, 0, 0
    for i in range(0, len(sequences), batch):
        chunk = sequences[i:i + batch]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)       # [B, T]
        for row, s in enumerate(chunk):
            x[row, :len(s)] = torch.tensor(s)
        real = torch.arange(x.shape[1])[None, :] < torch.tensor(list(map(len, chunk)))[:, None]
        a, b = float_net(x)[real].float(), int8_net(x)[real].float()              # [n, V]
        gap = (a - b).abs()
        worst, total = max(worst, float(gap.max())), total + float(gap.mean(-1).sum())
        count, flips = count + a.shape[0], flips + int((a.argmax(-1) != b.argmax(-1)).sum())
    return {"max_logit_diff": worst, "mean_logit_diff": total / count,
            "argmax_differs": flips / count, "positions": count}


def serve_all(model, tok, path: str, adapter_dtype: str, prompts, max_new_tokens: int) -> list:
    """Every prompt through the engine, greedy, the adapter in adapter_dtype rows; output texts."""
    engine = Engine(model, tok.eos_id, adapter_dtype=adapter_dtype)
    engine.add_adapter("e2e", path)
    ids, start, shown = [engine.submit(p, "e2e", max_new_tokens) for p in prompts], time.time(), 0
    while engine.step() or engine.pending():
        if time.time() - start > shown + 30:
            shown += 30
            done = sum(i not in engine.live for i in ids)
            print(f"  {adapter_dtype}: {done}/{len(ids)} requests done, {shown} s", flush=True)
    outs = [engine.records.result(i) for i in ids]
    bad = [o for o in outs if not isinstance(o, list)]
    if bad:
        raise SystemExit(f"int8_bench.py: {len(bad)} requests failed, the first: {bad[0].reason}")
    return [clean_output(tok, o) for o in outs]


def capacity(model, host: HostAdapter, pool_pages: int) -> dict:
    """How many copies of the adapter (under other names) a pool of pool_pages pages holds at once,
    float rows against int8 rows: each engine loads them until the pool is full."""
    held = {}
    for kind in ("float", "int8"):
        engine = Engine(model, None, pool_pages=pool_pages, adapter_dtype=kind)
        names = [f"copy-{i}" for i in range(pool_pages)]          # more than fit
        for name in names:
            engine.registry.register(replace(host, name=name))
        held[kind] = len(engine.pool.prefetch(names))
    return held


def main(cfg: Int8BenchConfig):
    if not cfg.adapter:
        raise SystemExit("int8_bench.py: --adapter DIR is required (a PEFT adapter trained on E2E)")
    torch.set_num_threads(cfg.threads)
    folder = cfg.e2e_dir or os.environ.get("E2E_DATA") or os.path.expanduser("~/.cache/e2e-nlg")
    groups = group_refs(read_e2e(ensure_data(folder)["test"]))[:cfg.limit]
    model, tok = load_model(cfg.base)
    host = HostAdapter.from_dir("e2e", cfg.adapter, model.config.n_layers, model.config.dim)
    prompts = [tok.encode(f"{mr}\n") for mr, _ in groups]
    sequences = [p + tok.encode(f" {refs[0]}") for p, (_, refs) in zip(prompts, groups)]
    gap = logit_gap(with_adapter(model, cfg.adapter), with_adapter(model, cfg.adapter,
                                                                   dequantized(host)), sequences)
    print(f"logits over {gap['positions']} positions of {len(groups)} MRs + first reference: max "
          f"|int8 - float| {gap['max_logit_diff']:.4f}, mean {gap['mean_logit_diff']:.5f}, argmax "
          f"differs at {100 * gap['argmax_differs']:.2f}%", flush=True)
    held = capacity(model, host, cfg.pool_pages)
    print(f"pages per adapter: {host.n_pages} float32, {-(-host.n_pages // 4)} int8; a pool of "
          f"{cfg.pool_pages} pages holds {held['float']} copies of it in float rows, "
          f"{held['int8']} in int8 rows ({held['int8'] / held['float']:.2f}x)", flush=True)
    refs, scores = [r for _, r in groups], {}
    for kind in ("float", "int8"):
        start = time.time()
        outs = serve_all(model, tok, cfg.adapter, kind, prompts, cfg.max_new_tokens)
        scores[kind] = e2e_metrics(outs, refs)
        print(f"{kind} rows: BLEU {scores[kind]['BLEU']:.2f} (NIST {scores[kind]['NIST']:.2f}, "
              f"ROUGE-L {scores[kind]['ROUGE_L']:.2f}) in {time.time() - start:.0f} s", flush=True)
    print(f"BLEU int8 - float: {scores['int8']['BLEU'] - scores['float']['BLEU']:+.2f} on "
          f"{len(groups)} MRs")
    return gap, held, scores


if __name__ == "__main__":
    main(cli.parse([Int8BenchConfig], "int8 adapter pages against float ones on a real "
                                      "adapter.")[0])
