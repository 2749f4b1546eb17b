"""The bridge between HTTP threads and the engine thread (S-LoRA's serving loop, Sheng et al.
2023, section 3), and what the operator lets a client do (NetworkConfig).

The engine is not thread-safe, so one thread steps it (engine.py: schedule -> run -> postprocess)
and HTTP threads only submit, read their request's new tokens and cancel, all under one lock (a
Condition: a submit wakes an idle engine thread at once). After each step `_publish` turns new
token ids into text, a whole character at a time and only the ids not yet decoded, so the cost
of a request is linear in its length; stop strings are found in that text.
Adapters loaded over HTTP come only from the operator's --adapter-dir directories (real paths,
symlinks followed), within the operator's limits on rank, size and count.
Simplified: one lock for everything; the engine's step holds it.
Demo: server.py's, `python serve.py --port 8000`.
"""
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import cli
import pool_view
from lora import AdapterError
from model import SamplingParams
from records import CONTEXT_LENGTH
from tp import TensorParallelError


@dataclass
class NetworkConfig:
    """What a client may do and cost. Every limit has a default; exceeding it is a 4xx or 503."""
    api_key: Optional[str] = cli.flag(None, "require 'Authorization: Bearer KEY' on /v1/* (default: "
                                            "the environment variable SLORA_API_KEY; unset: open)", str)
    open_metrics: bool = cli.flag(False, "serve /metrics without the API key")
    adapter_dir: List[str] = cli.flag([], "directory that POST /v1/load_lora_adapter may read "
                                          "adapters from (repeatable; none: loading over HTTP is off)")
    max_body: int = cli.flag(4 << 20, "largest request body in bytes (413 beyond)")
    header_timeout: float = cli.flag(10.0, "seconds to receive a request line and its headers")
    body_timeout: float = cli.flag(30.0, "seconds to receive a request body")
    max_connections: int = cli.flag(256, "connections served at once (503 beyond)")
    max_waiting: int = cli.flag(1024, "requests waiting for the engine (429 beyond)")
    max_adapters: int = cli.flag(1000, "adapters registered at once (loading beyond: 400)")
    max_rank: int = cli.flag(256, "largest adapter rank loaded over HTTP")
    max_adapter_mb: float = cli.flag(512.0, "largest adapter_model.safetensors loaded over HTTP")

    def key(self) -> Optional[str]:
        return self.api_key or os.environ.get("SLORA_API_KEY") or None


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Completion:
    """One request as the HTTP side sees it; filled by the engine thread."""
    rid: int
    stop: List[str]
    prompt_tokens: int
    ids: List[int] = field(default_factory=list)       # generated token ids
    decoded: int = 0                                    # ids[:decoded] are in text
    text: str = ""                                      # text of ids, whole characters only
    sent: int = 0                                       # characters already streamed
    finish: Optional[str] = None                        # "stop", "length", or an error
    error: Optional[str] = None
    updated: threading.Event = field(default_factory=threading.Event)   # new text or the end
    done: threading.Event = field(default_factory=threading.Event)      # the end

    def streamable(self) -> str:
        """Text that is safe to send: while running, the last characters that could begin a stop
        string are held back (the stop string itself is never sent)."""
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self.text if self.finish is not None or not hold else self.text[:len(self.text) - hold]


class EngineLoop:
    """The engine behind a lock: one thread steps it, HTTP threads submit, read and cancel."""

    def __init__(self, engine, tokenizer, base_id: str, net: Optional[NetworkConfig] = None):
        self.engine, self.tok, self.base_id, self.net = engine, tokenizer, base_id, net or NetworkConfig()
        self.lock = threading.Condition()
        self.live: dict = {}                 # request id -> Completion
        self.running, self.accepting, self.fatal = False, True, None   # fatal: why it stopped
        self.idle_wait_s = 1.0              # an idle engine thread's nap; submit notifies it
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.running = True
        self.thread.start()

    def shutdown(self, grace_s: float = 10.0):
        """Stop accepting; let running requests finish for grace_s, then cancel the rest."""
        with self.lock:
            self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.live and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            for c in list(self.live.values()):
                self._end(c, "cancelled", "the server is shutting down")
            self.running = False
            self.lock.notify_all()
        self.thread.join(timeout=5)

    def submit(self, prompt: List[int], adapter: Optional[str], max_tokens: int,
               sampling: SamplingParams, stop: List[str], stop_ids=()) -> Completion:
        with self.lock:
            if not self.accepting:
                raise ApiError(503, "the server is shutting down", "unavailable")
            if len(self.engine.scheduler.waiting) >= self.net.max_waiting:
                raise ApiError(429, f"{self.net.max_waiting} requests are already waiting "
                                    "(--max-waiting); retry later", "too_many_requests")
            rid = self.engine.submit(prompt, adapter, max_tokens, sampling=sampling, stop_ids=stop_ids)
            reason = self.engine.records.failure(rid)
            if reason is not None:
                self.engine.forget(rid)
                raise ApiError(400, reason, "context_length_exceeded"
                               if reason.startswith(CONTEXT_LENGTH) else "invalid_request_error")
            c = self.live[rid] = Completion(rid, stop, len(prompt))
            self.lock.notify_all()
            return c

    def cancel(self, c: Completion):
        with self.lock:
            if c.rid in self.live:
                self._end(c, "cancelled", "the client disconnected")

    def adapter_of(self, model) -> Optional[str]:
        """The request's `model`: the base model's id (None: no adapter) or an adapter's name."""
        if model == self.base_id:
            return None
        with self.lock:
            if not isinstance(model, str) or not self.engine.has_adapter(model):
                raise ApiError(404, f"model {model!r} does not exist (see /v1/models)", "model_not_found")
        return model

    def encode(self, prompt, chat: bool) -> tuple:
        """(token ids, ids that end the request): text is encoded, a list of ids passes as is."""
        stop_ids = {self.tok.eos_id} | ({self.tok.special["<|im_end|>"]} if chat else set())
        if isinstance(prompt, str) and prompt:
            return self.tok.encode(prompt, allow_special=chat), stop_ids
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in prompt):
            return prompt, stop_ids
        raise ApiError(400, "prompt must be a non-empty string or a non-empty list of token ids")

    def load_adapter(self, name, path):
        if not isinstance(name, str) or not name or name == self.base_id or not isinstance(path, str):
            raise ApiError(400, "lora_name (not the base model's id) and lora_path must be strings")
        path = self.allowed_path(name, path)
        with self.lock:
            if len(self.engine.adapter_names()) >= self.net.max_adapters and not self.engine.has_adapter(name):
                raise ApiError(400, f"adapter {name!r}: {self.net.max_adapters} adapters are "
                                    "registered (--max-adapters); unload one first", "too_many_adapters")
        self._check_size(name, path)
        with self.lock:
            try:
                self.engine.add_adapter(name, path)
            except AdapterError as e:
                raise ApiError(400, str(e), "invalid_adapter") from None
            except OSError as e:
                raise ApiError(400, f"adapter {name!r}: cannot read it: {e.strerror}", "invalid_adapter") from None

    def allowed_path(self, name: str, path: str) -> str:
        """The real path (symlinks followed) of lora_path if it lies inside an --adapter-dir; a
        relative path is taken inside the first. The same refusal whether or not it exists."""
        dirs = [os.path.realpath(d) for d in self.net.adapter_dir]
        if not dirs:
            raise ApiError(403, f"adapter {name!r}: loading adapters over HTTP is off; start the "
                                "server with --adapter-dir DIR to allow loading from DIR",
                           "permission_denied")
        real = os.path.realpath(os.path.join(dirs[0], path))   # join keeps an absolute path
        if not any(os.path.commonpath([real, d]) == d for d in dirs):
            raise ApiError(403, f"adapter {name!r}: lora_path is outside the directories that "
                                "--adapter-dir allows", "permission_denied")
        return real

    def _check_size(self, name: str, path: str):
        """The operator's limits on rank and file size, before the adapter is read."""
        weights = os.path.join(path, "adapter_model.safetensors")
        size = os.path.getsize(weights) if os.path.isfile(weights) else 0
        if size > self.net.max_adapter_mb * 2 ** 20:
            raise ApiError(413, f"adapter {name!r}: {size / 2 ** 20:.1f} MiB of weights, over "
                                f"--max-adapter-mb {self.net.max_adapter_mb}", "adapter_too_large")
        try:
            with open(os.path.join(path, "adapter_config.json")) as f:
                c = json.load(f)
            ranks = [c.get("r")] + list((c.get("rank_pattern") or {}).values())
        except (OSError, ValueError, AttributeError, TypeError):
            return                   # adapters.py names what is wrong with the files
        big = max((r for r in ranks if isinstance(r, int)), default=0)
        if big > self.net.max_rank:
            raise ApiError(400, f"adapter {name!r}: rank {big} is over --max-rank "
                                f"{self.net.max_rank}", "adapter_too_large")

    def unload_adapter(self, name) -> str:
        """Unregister now; pages in use are freed only when the last request using them ends."""
        with self.lock:
            if not isinstance(name, str) or not self.engine.has_adapter(name):
                raise ApiError(404, f"adapter {name!r} is not loaded", "model_not_found")
            users = self.engine.remove_adapter(name)
        return (f"deferred: {users} running requests finish with it, its pages are freed after "
                "the last" if users else "unloaded, its pages freed")

    def models(self) -> dict:
        with self.lock:
            names = self.engine.adapter_names()
        card = lambda i, parent: {"id": i, "object": "model", "owned_by": "local",   # noqa: E731
                                  **({"parent": parent} if parent else {})}
        return {"object": "list", "data": [card(self.base_id, None)] + [card(n, self.base_id) for n in names]}

    def metrics(self) -> str:
        with self.lock:
            return prometheus_text(self.engine.metrics(), self.engine.registry.where())

    def pool_page(self) -> str:
        """GET /pool (pool_view.py): read under the lock, drawn after it while the engine steps."""
        engine = self.engine
        with self.lock:
            data = pool_view.page_owners(engine.pool), engine.registry.where(), engine.metrics()
        return pool_view.html(*data)

    def _run(self):
        while True:
            with self.lock:
                if not self.running:
                    return
                try:
                    ran = self.engine.step()
                except TensorParallelError as e:   # the group is gone: no step can run again
                    return self._stop_for_good(f"{type(e).__name__}: {e}")
                except Exception as e:   # the engine failed the step's requests; report and go on
                    ran = True
                    print(f"engine step failed: {type(e).__name__}: {e}", flush=True)
                self._publish()
                if not ran and not self.engine.pending():
                    self.lock.wait(timeout=self.idle_wait_s)   # submit wakes it at once
            time.sleep(0)   # between steps, HTTP threads waiting for the lock get it

    def _stop_for_good(self, error: str):
        """Every live request fails with the error, new ones get 503, and `fatal` says why."""
        print(f"engine stopped: {error}", flush=True)
        self.fatal, self.accepting, self.running = error, False, False
        for c in list(self.live.values()):
            self._end(c, "failed", f"the engine stopped: {error}")

    def _publish(self):
        """New tokens -> whole characters of text; finished or failed requests end."""
        for c in list(self.live.values()):
            ids, state, reason = self.engine.records.progress(c.rid)
            c.ids = ids
            before = len(c.text)
            extend_text(c, self.tok, self.engine.records.stop_ids(c.rid), state == "running")
            hold = max((len(s) - 1 for s in c.stop), default=0)
            hit = [i for i in (c.text.find(s, max(0, before - hold)) for s in c.stop) if i >= 0]
            if hit:
                c.text = c.text[:min(hit)]             # cut before the HTTP thread can see it
            if len(c.text) != before or hit:
                c.updated.set()
            if hit:
                self.engine.cancel(c.rid)
                self._end(c, "stop")
            elif state == "finished":
                self._end(c, "stop" if ids and ids[-1] in self.engine.records.stop_ids(c.rid) else "length")
            elif state in ("failed", "aborted", "cancelled"):
                self._end(c, state, reason)

    def _end(self, c: Completion, finish: str, error: Optional[str] = None):
        if finish == "cancelled":
            self.engine.cancel(c.rid)
        c.finish, c.error = finish, error
        del self.live[c.rid]
        self.engine.forget(c.rid)
        c.updated.set()
        c.done.set()


def prometheus_text(values: dict, where: dict) -> str:
    """/metrics: the engine's counters, and per adapter name its tier and its requests."""
    lines = []
    for name, (help, value) in values.items():
        lines += [f"# HELP slora_{name} {help}", f"# TYPE slora_{name} gauge", f"slora_{name} {value}"]
    lines += ["# HELP slora_adapter_resident where an adapter's weights are: tier pool, host or "
              "disk", "# TYPE slora_adapter_resident gauge"]
    lines += [f'slora_adapter_resident{{name="{_label(n)}",tier="{t}"}} 1'
              for n, (t, _, _) in where.items()]
    lines += ["# HELP slora_adapter_requests requests using an adapter",
              "# TYPE slora_adapter_requests gauge"]
    lines += [f'slora_adapter_requests{{name="{_label(n)}"}} {u}' for n, (_, u, _) in where.items()]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def extend_text(c: Completion, tok, stop_ids, running: bool):
    """Append the text of the ids not yet decoded, unless (while running) they end inside a UTF-8
    character: byte-level BPE decodes a concatenation as the concatenation of the decodings
    whenever the first part ends on a whole character."""
    piece = tok.decode([t for t in c.ids[c.decoded:] if t not in stop_ids])
    if running and piece.endswith("\ufffd"):
        return                                        # never half a UTF-8 character
    c.text, c.decoded = c.text + piece, len(c.ids)
