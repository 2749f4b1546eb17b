"""The engine beside what a user would pick instead: transformers + PEFT's mixed-adapter batch.

PEFT (0.21) can run one batch whose rows use different adapters (`generate(adapter_names=...)`):
every prompt padded to the longest, each LoRA layer splitting the batch by adapter. The engine
serves the same requests unpadded, joined and left token by token (S-LoRA, arXiv 2311.03285,
sections 3 and 5). `python serve.py --vs-peft` times both on the real SmolLM2, the same weights
(written by checkpoints.save_hf) and the same PEFT adapter files (written by lora.save_adapter),
counts how many outputs agree, and times the engine's base matmuls in one more run (the bound
they set on the lead). PEFT runs in a child process (peft_worker.py) whose path leaves
out this directory, so that transformers finds the PyPI package `kernels`, not our kernels.py;
the two sides take turns, never running at once.
Simplified: one fixed workload (PeftWorkload); greedy, no end token.
Demo: `python serve.py --vs-peft --repeat 3` (needs transformers and peft, which are not
dependencies of this project: without them it says so and stops).
Letters: H model dim, r rank.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from checkpoints import default_model_path, load_model, save_hf
from engine import Engine, EngineConfig
from lora import LoRAConfig, add_lora, lora_layers, save_adapter
from model import Llama, ModelConfig


@dataclass(frozen=True)
class PeftWorkload:
    """--vs-peft: every request submitted at once, greedy, all new tokens generated (no EOS)."""
    requests: int = 48
    adapters: int = 12
    ranks: tuple = (8, 16, 32, 64)          # adapter i has rank ranks[i % 4], on q, k, v, o
    prompt_len: tuple = (16, 64)            # uniform, inclusive
    new_tokens: int = 32
    seed: int = 0


def write_peft_adapters(cfg: ModelConfig, w: PeftWorkload, directory: str) -> Dict[str, str]:
    """Random adapters written by lora.py in PEFT's format: name -> directory. A model shell on
    the meta device gives the module names; only the LoRA weights are real (A ~ N(0, 1/H) and
    B ~ N(0, 1/r), so that each adapter changes the greedy text)."""
    gen, paths = torch.Generator().manual_seed(w.seed), {}
    for i in range(w.adapters):
        lcfg = LoRAConfig(r=w.ranks[i % len(w.ranks)], alpha=16.0,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        with torch.device("meta"):
            shell = add_lora(Llama(cfg), lcfg)
        for m in lora_layers(shell).values():
            for lin, std in ((m.lora_A, cfg.dim ** -0.5), (m.lora_B, 1 / lcfg.r)):
                lin.to_empty(device="cpu")
                torch.nn.init.normal_(lin.weight, std=std, generator=gen)
        paths[f"adapter-{i}"] = os.path.join(directory, f"adapter-{i}")
        save_adapter(shell, paths[f"adapter-{i}"], lcfg, cfg.name)
    return paths


class PeftSide:
    """transformers + PEFT in a child process (peft_worker.py), whose path leaves out the project's
    directory: transformers 5 imports the PyPI package `kernels`, which this project's kernels.py
    would shadow in this process. Lines of JSON go in and out; `generate` returns the new tokens
    and the child's own time of generate alone."""

    def __init__(self, hf_dir: str, adapters: Dict[str, str], threads: int):
        here = os.path.dirname(os.path.realpath(__file__))
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p and os.path.realpath(p) != here]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "peft_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=tempfile.gettempdir())
        setup = {"hf_dir": hf_dir, "adapters": adapters, "threads": threads}
        self.ready = self._ask(setup)["ready"]

    def _ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"--vs-peft: the PEFT process ended (exit status {self.proc.wait()}); "
                             f"its error is printed above")
        return json.loads(line)

    def generate(self, prompts: List[List[int]], names: List[str], new_tokens: int):
        answer = self._ask({"prompts": prompts, "names": names, "new_tokens": new_tokens})
        return answer["tokens"], answer["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def compare(base: Optional[str], threads: int, repeat: int, e: EngineConfig):
    """The engine against PEFT's own mixed-adapter generate: same weights (save_hf), same PEFT
    adapter files, same threads (PEFT in its child process, PeftSide), each side `repeat` times
    (at least 2) in alternating order; prints the median times, their ratio and how many outputs
    agree."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"--vs-peft needs transformers and peft, which are not dependencies of "
                         f"this project; missing here: {', '.join(missing)}")
    torch.set_num_threads(threads)
    w, (model, _) = PeftWorkload(), load_model(base or default_model_path())
    rng = np.random.default_rng(w.seed)
    prompts = [rng.integers(0, model.config.vocab_size, rng.integers(w.prompt_len[0],
                                                                     w.prompt_len[1] + 1)).tolist()
               for _ in range(w.requests)]
    names = [f"adapter-{i % w.adapters}" for i in range(w.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, os.path.join(tmp, "base"))
        paths = write_peft_adapters(model.config, w, tmp)
        peft = PeftSide(os.path.join(tmp, "base"), paths, threads)
        engine = Engine(model, None, **asdict(e))
        for name, path in paths.items():
            engine.add_adapter(name, path)
        sides = {"engine": lambda: _timed(engine.generate, prompts, names, w.new_tokens),
                 "peft": lambda: peft.generate(prompts, names, w.new_tokens)}
        times, outputs = {"engine": [], "peft": []}, {}
        for k in range(max(2, repeat)):
            for side in (("engine", "peft") if k % 2 == 0 else ("peft", "engine")):
                outputs[side], seconds = sides[side]()
                times[side].append(seconds)
        base_seconds, seconds = base_matmul_seconds(model, sides["engine"])
        peft.close()
    print(f"transformers {peft.ready['transformers']}, peft {peft.ready['peft']} "
          f"(in a child process; its kernels module: {peft.ready['kernels']})")
    _report_vs_peft(w, times, outputs)
    print(f"one more engine run, every nn.Linear timed: base matmuls {base_seconds:.2f} s of "
          f"{seconds:.2f} s ({base_seconds / seconds:.0%}); an engine spending nothing else would "
          f"be {np.median(times['peft']) / base_seconds:.2f}x PEFT")


def base_matmul_seconds(model: Llama, run) -> tuple:
    """(seconds in the model's nn.Linear calls, seconds of the whole call) of one run(), each
    Linear timed by a pair of forward hooks, removed afterwards."""
    spent, started = [0.0], {}

    def before(module, args):
        started[module] = time.perf_counter()

    def after(module, args, out):
        spent[0] += time.perf_counter() - started[module]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [h for m in linears
             for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        _, seconds = run()
    finally:
        for h in hooks:
            h.remove()
    return spent[0], seconds


def _timed(fn, *args):
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _report_vs_peft(w: PeftWorkload, times: Dict[str, List[float]], outputs: Dict[str, list]):
    med = {side: float(np.median(t)) for side, t in times.items()}
    same = sum(a == p for a, p in zip(outputs["engine"], outputs["peft"]))
    print(f"{w.requests} requests over {w.adapters} adapters (ranks {list(w.ranks)}, q,k,v,o), "
          f"prompts of {w.prompt_len[0]}-{w.prompt_len[1]} tokens, {w.new_tokens} new tokens, "
          f"greedy, {torch.get_num_threads()} thread(s), medians of {len(times['engine'])}")
    for side in ("peft", "engine"):
        print(f"{side:>7}: {med[side]:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times[side])})")
    print(f"engine / PEFT speed: {med['peft'] / med['engine']:.2f}x; outputs identical: "
          f"{same}/{w.requests}")
