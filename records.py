"""The request table of S-LoRA's engine (Sheng et al. 2023, arXiv 2311.03285, section 3).

The scheduler (scheduler.py) sees a request as integers: its id, lengths, adapter and state. The
engine keeps the rest in one RequestRecord per request: its tokens (prompt, then each generated
token appended), how it samples, which tokens stop it, and why it ended when it did not finish.
validate_request refuses, before a request takes anything, what the model can never serve.
Simplified: the records live until the caller forgets them (the server does at each end).
Demo: `python serve.py --adapters 20 --duration 3 --layers 4` (every request is a record).
"""
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Dict, FrozenSet, List, Optional, Tuple, Union

import torch

from model import SamplingParams
from scheduler import Request, RequestRejected, State


def is_whole(x, low: int) -> bool:
    """x is an int (not a bool) >= low."""
    return isinstance(x, Integral) and not isinstance(x, bool) and x >= low


def is_finite(x, low: float) -> bool:
    """x is a real number (not a bool), finite and >= low."""
    return isinstance(x, Real) and not isinstance(x, bool) and low <= x < math.inf


@dataclass
class Failed:
    """A request that ended without its output: state FAILED or ABORTED, and why."""
    reason: str
    state: State = State.FAILED


@dataclass
class RequestRecord:
    """What the engine keeps of one request; `request` is the scheduler's part (integers only)."""
    request: Request
    tokens: List[int] = field(default_factory=list)   # prompt + generated tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: Optional[torch.Generator] = None       # its own random stream
    stops: FrozenSet[int] = frozenset()               # token ids that end it (EOS, ...)
    reason: Optional[str] = None                      # why it FAILED or was ABORTED
    holds_pages: bool = False                         # its adapter acquired in the pool

    def start(self, prompt: List[int], max_new_tokens: int, adapter: Optional[str],
              params: SamplingParams, stop_ids, eos_id: Optional[int], device):
        """Fill in a validated request (adapter: the pool key of its version)."""
        req = self.request
        req.prompt_len, req.max_new_tokens, req.adapter = len(prompt), max_new_tokens, adapter
        seed = torch.randint(2**62, ()).item() if params.seed is None else params.seed
        self.tokens, self.sampling = list(prompt), params
        self.generator = torch.Generator(device).manual_seed(seed)
        self.stops = frozenset(stop_ids) | ({eos_id} - {None})

    def output(self) -> List[int]:
        return self.tokens[self.request.prompt_len:]


CONTEXT_LENGTH = "This model's maximum context length"   # OpenAI's context_length_exceeded


def validate_request(prompt, max_new_tokens: int, params, stop_ids, vocab_size: int,
                     max_seq_len: int):
    """Raise RequestRejected naming the first problem of a request against the model's limits
    (the registry knows the adapters, the scheduler the pages)."""
    if not isinstance(params, SamplingParams) or params.check():
        raise RequestRejected(params.check() if isinstance(params, SamplingParams) else
                              f"sampling must be a SamplingParams, got {params!r:.40}")
    if not all(is_whole(t, 0) for t in stop_ids):
        raise RequestRejected(f"stop_ids must be token ids, got {stop_ids!r:.40}")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RequestRejected(f"the prompt must be a non-empty list of token ids, "
                              f"got {prompt!r:.40}")
    bad = [t for t in prompt if not is_whole(t, 0) or t >= vocab_size]
    if bad:
        raise RequestRejected(f"token ids must be ints in [0, {vocab_size}), got {bad[:3]!r:.40}")
    if not is_whole(max_new_tokens, 1):
        raise RequestRejected(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r:.40}")
    if len(prompt) + max_new_tokens > max_seq_len:   # OpenAI's wording of the same refusal
        raise RequestRejected(f"{CONTEXT_LENGTH} is {max_seq_len} tokens. "
                              f"However, you requested {len(prompt) + max_new_tokens} tokens "
                              f"({len(prompt)} in the prompt, {max_new_tokens} in the "
                              "completion). Please reduce the prompt or max_tokens.")
    if not is_finite(params.temperature, 0):
        raise RequestRejected(f"temperature must be a number >= 0, got {params.temperature!r:.40}")


class RequestTable(Dict[int, RequestRecord]):
    """request id -> RequestRecord, and what a client reads of a request."""

    def result(self, rid: int) -> Union[List[int], Failed]:
        """The new tokens of a finished request, or a Failed saying why it has none."""
        rec = self[rid]
        if rec.request.state == State.FINISHED:
            return rec.output()
        return Failed(rec.reason or f"request {rid} is {rec.request.state.value}",
                      rec.request.state)

    def progress(self, rid: int) -> Tuple[List[int], str, Optional[str]]:
        """(tokens generated so far, state, why it failed or was aborted): what a stream reads."""
        rec = self[rid]
        return rec.output(), rec.request.state.value, rec.reason

    def failure(self, rid: int) -> Optional[str]:
        """Why the request failed (right after submit: why it was refused), or None."""
        rec = self[rid]
        return rec.reason if rec.request.state == State.FAILED else None

    def stop_ids(self, rid: int) -> FrozenSet[int]:
        return self[rid].stops if rid in self else frozenset()
