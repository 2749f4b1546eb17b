"""The HTTP server over tensor parallelism: one schedule, W devices (S-LoRA section 6; tp.py).

tp.py's ShardedEngine keeps W devices in lockstep when every device is given the same submissions
(the benchmark replays one trace on all). A server is given them on rank 0 only, by HTTP threads,
at any moment. ReplicatedEngine makes the other ranks follow. On rank 0 each call that changes the
engine (submit, cancel, forget, add_adapter, remove_adapter) runs at once and is recorded with
every reading of the clock it makes and whether it raised; at the start of the next step rank 0
broadcasts the record (JSON bytes: token ids, names, numbers; nothing is unpickled) and every
other rank replays it, reading rank 0's clock from the record, before all step together. The
engine is deterministic, so every rank holds the same requests, pages and adapters, and the
step's batch (token ids, positions, page tables, adapter slots) is the same everywhere without
being sent; inside a step every clock reading is rank 0's, broadcast (tp.ShardedEngine.now).
Each rank reads an adapter's files itself and keeps its own shard, so a path loaded over HTTP must
exist on every node. A rank whose replay differs from rank 0's (the file missing there) stops the
group; a rank that dies makes the next collective fail on the others. Either way the step raises
TensorParallelError, the server fails its requests, reports the error and exits (never a hang).
EngineLoop steps at least every idle_wait_s, so an idle rank 0 still reaches its followers about
once a second, well within the collectives' timeout.
Simplified: greedy sampling only (tp.py); the adapter files are read on every node.
Demo: `torchrun --standalone --nproc-per-node 2 serve.py --port 8000 --tp 2 --adapter a=DIR`.
"""
import json
import signal
from collections import deque
from dataclasses import asdict

import torch

from engine import Engine
from model import SamplingParams
from tp import ShardedEngine, TensorParallelError

STOP = "stop"


class ReplicatedEngine(ShardedEngine):
    """A ShardedEngine whose rank 0 takes the calls and whose other ranks replay them."""

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.log, self.tape, self.readings = [], deque(), []
        self.in_step = self.stopped = False

    def now(self) -> float:
        if self.in_step:
            return super().now()                  # every rank is in the step: broadcast
        if self.comm.rank == 0:
            t = Engine.now(self)
            self.readings.append(t)
            return t
        return self.tape.popleft()                # rank 0's reading, from the record

    # the calls that change the engine: run on rank 0, recorded, replayed on the others
    def submit(self, prompt, adapter, max_new_tokens, arrival=None, temperature=0.0,
               sampling=None, stop_ids=()):
        sampling = SamplingParams(temperature) if sampling is None else sampling
        return self._do("submit", [list(prompt), adapter, max_new_tokens, asdict(sampling),
                                   sorted(stop_ids), arrival])

    def cancel(self, rid):
        return self._do("cancel", [rid])

    def forget(self, rid):
        return self._do("forget", [rid])

    def add_adapter(self, name, path):
        return self._do("add_adapter", [name, str(path)])

    def remove_adapter(self, name):
        return self._do("remove_adapter", [name])

    def _do(self, op: str, args: list):
        if self.in_step or self.comm.rank != 0:   # inside a step every rank does it anyway
            return self._apply(op, args)
        self.readings = []
        try:
            result = self._apply(op, args)
        except Exception as e:
            self.log.append([op, args, self.readings, type(e).__name__])
            raise
        self.log.append([op, args, self.readings, None])
        return result

    def _apply(self, op: str, args: list):
        parent = super(ReplicatedEngine, self)
        if op == "submit":
            prompt, adapter, n, sampling, stop_ids, arrival = args
            return parent.submit(prompt, adapter, n, arrival, sampling=SamplingParams(**sampling),
                                 stop_ids=set(stop_ids))
        return getattr(parent, op)(*args)

    # the step: rank 0's record to every rank, the replay, then the step itself
    def step(self) -> bool:
        try:
            entries = self._exchange()
            if self.comm.rank != 0:
                self._replay(entries)
            if self.stopped:
                return False
            self.in_step = True
            try:
                return super().step()
            finally:
                self.in_step = False
        except TensorParallelError:
            raise
        except RuntimeError as e:        # a collective failed: a peer is gone or failed first
            raise TensorParallelError(f"rank {self.comm.rank}: the tensor-parallel group failed "
                                      f"in a step: {e}") from e

    def stop(self):
        """Rank 0: tell every rank to stop following (they return from `follow`)."""
        self.log.append([STOP, [], [], None])
        self.stopped = True
        self.step()                               # the record goes out; no step runs

    def _exchange(self) -> list:
        """Rank 0's record since the last step, on every rank: its length, then its bytes."""
        data = json.dumps(self.log).encode() if self.comm.rank == 0 else b""
        self.log = []
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.comm.device)
        n = int(self.comm.broadcast(n, "control"))
        if n == 0:
            return []
        if self.comm.rank == 0:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.comm.device)
        return json.loads(bytes(self.comm.broadcast(buf, "control").cpu().tolist()))

    def _replay(self, entries: list):
        """Rank 0's calls in its order, with its clock; an outcome unlike rank 0's stops all."""
        for op, args, readings, raised in entries:
            if op == STOP:
                self.stopped = True
                return
            self.tape.extend(readings)
            try:
                self._apply(op, args)
                mine, why = None, ""
            except Exception as e:
                mine, why = type(e).__name__, f": {e}"
            if mine != raised or self.tape:
                here = f"raised {mine}{why}" if mine else "succeeded"
                there = f"raised {raised}" if raised else "succeeded"
                raise TensorParallelError(f"rank {self.comm.rank}: {op} {args[0]!r:.40} {here} "
                                          f"here, but {there} on rank 0: the ranks would diverge")


def follow(engine: ReplicatedEngine):
    """A rank other than 0: step with rank 0 until it says stop. Ctrl-C and SIGTERM are rank
    0's to handle (it finishes the running requests, then says stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not engine.stopped:
        engine.step()
