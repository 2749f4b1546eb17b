"""The OpenAI-compatible HTTP front end of the S-LoRA engine: real clients, one adapter per request.

S-LoRA (Sheng et al. 2023) serves many adapters from one batch; here the batch is filled by
concurrent HTTP clients. The request's `model` names the adapter (or the base model), as in vLLM,
LoRAX and SGLang. One engine thread runs steps (engine.py: schedule -> batch -> forward ->
sample); HTTP threads only submit, read their request's new tokens and cancel, under one lock.

    POST /v1/completions         prompt (text or token ids) -> text; stream: Server-Sent Events
    POST /v1/chat/completions    messages rendered with ChatML (SmolLM2's template)
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}: register (or replace) a PEFT adapter
    POST /v1/unload_lora_adapter {"lora_name"}: deferred while requests use it (they finish)
    GET  /v1/models, /health, /metrics (Prometheus text)

Streaming sends one chunk per decoded piece of text, never half a UTF-8 character: the generated
ids are decoded whole each step and only text that ends in a complete character is sent, so the
pieces concatenate to the non-streamed text. Stop strings are found in the text; the request is
then cancelled and its pages return to the pool. Errors are OpenAI's JSON
{"error": {"message", "type", "code"}}: 400 for bad fields, 404 for an unknown model.
Simplified: n = 1; no logprobs, echo, best_of, penalties or logit bias (refused by name).
Demo: `python serve.py --port 8000`, then
`curl localhost:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Hello"}'`.
"""
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from lora import AdapterError
from model import SamplingParams

# Request fields that are accepted only at the value that changes nothing here.
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
           "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None}
SAMPLING = {"temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "stream", "user",
            "stream_options", "max_completion_tokens"}
CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"


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

    def __init__(self, engine, tokenizer, base_id: str):
        self.engine, self.tok, self.base_id = engine, tokenizer, base_id
        self.lock = threading.Condition()
        self.live: dict = {}                 # request id -> Completion
        self.running, self.accepting = False, True
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
            rid = self.engine.submit(prompt, adapter, max_tokens, sampling=sampling, stop_ids=stop_ids)
            reason = self.engine.records.failure(rid)
            if reason is not None:
                self.engine.forget(rid)
                raise ApiError(400, reason)
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
        with self.lock:
            try:
                self.engine.add_adapter(name, path)
            except (AdapterError, OSError) as e:
                raise ApiError(400, str(e), "invalid_adapter") from None

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
            values = self.engine.metrics()
        lines = []
        for name, (help, value) in values.items():
            lines += [f"# HELP slora_{name} {help}", f"# TYPE slora_{name} gauge", f"slora_{name} {value}"]
        return "\n".join(lines) + "\n"

    def _run(self):
        while True:
            with self.lock:
                if not self.running:
                    return
                try:
                    ran = self.engine.step()
                except Exception as e:   # the engine failed the step's requests; report and go on
                    ran = True
                    print(f"engine step failed: {type(e).__name__}: {e}", flush=True)
                self._publish()
                if not ran and not self.engine.pending():
                    self.lock.wait(timeout=0.05)
            time.sleep(0)   # between steps, HTTP threads waiting for the lock get it

    def _publish(self):
        """New tokens -> whole characters of text; finished or failed requests end."""
        for c in list(self.live.values()):
            ids, state, reason = self.engine.records.progress(c.rid)
            c.ids = ids
            text = self.tok.decode([t for t in ids if t not in self.engine.records.stop_ids(c.rid)])
            if text.endswith("\ufffd") and state == "running":
                text = c.text                          # never half a UTF-8 character
            hit = [text.find(s) for s in c.stop if s in text]
            text = text[:min(hit)] if hit else text    # cut before the HTTP thread can see it
            if text != c.text:
                c.text = text
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


# ---------------------------------------------------------------------- requests -> engine calls

def _check_fields(body: dict, allowed: set):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in NEUTRAL:
            if value not in (NEUTRAL[name], None) and value != {}:
                raise ApiError(400, f"{name}={value!r} is not supported (only {NEUTRAL[name]!r})")
        elif name not in allowed | SAMPLING:
            raise ApiError(400, f"unknown field {name!r}")


def _sampling(body: dict) -> SamplingParams:
    params = SamplingParams(body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k"),
                            body.get("seed"))
    reason = params.check()
    if reason:
        raise ApiError(400, reason)
    return params


def _stop_strings(body: dict) -> List[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of them")
    return stop


def _max_tokens(body: dict) -> int:
    n = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {n!r}")
    return n


def render_chat(messages, tok) -> str:
    """ChatML, SmolLM2's chat template: <|im_start|>role\\ncontent<|im_end|>\\n ... assistant\\n."""
    if not {"<|im_start|>", "<|im_end|>"} <= set(tok.special):
        raise ApiError(400, "this model's chat template cannot be rendered (no ChatML tokens)")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] must be {{'role': system|user|assistant, "
                                "'content': a string}")
        out.append(CHATML.format(**m))
    return "".join(out) + "<|im_start|>assistant\n"


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; `self.server.loop` is the EngineLoop."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):   # quiet: one line per request would drown the output
        pass

    def do_GET(self):
        routes = {"/health": lambda: self._json(200, {"status": "ok"}),
                  "/v1/models": lambda: self._json(200, self.server.loop.models()),
                  "/metrics": lambda: self._text(200, self.server.loop.metrics())}
        self._route(routes)

    def do_POST(self):
        routes = {"/v1/completions": lambda: self._complete(chat=False),
                  "/v1/chat/completions": lambda: self._complete(chat=True),
                  "/v1/load_lora_adapter": self._load, "/v1/unload_lora_adapter": self._unload}
        self._route(routes)

    def _route(self, routes):
        try:
            if self.path not in routes:
                raise ApiError(404, f"no route {self.command} {self.path}", "not_found")
            routes[self.path]()
        except ApiError as e:
            self._json(e.status, {"error": {"message": e.message, "type": "invalid_request_error"
                                            if e.status < 500 else "server_error", "code": e.code}})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", 0))
            return json.loads(self.rfile.read(n) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None

    def _send(self, status: int, body: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _text(self, status: int, text: str):
        self._send(status, text.encode(), "text/plain; version=0.0.4")

    def _load(self):
        body = self._body()
        _check_fields(body, {"lora_name", "lora_path"})
        self.server.loop.load_adapter(body.get("lora_name"), body.get("lora_path"))
        self._json(200, {"status": "ok", "lora_name": body["lora_name"]})

    def _unload(self):
        body = self._body()
        _check_fields(body, {"lora_name"})
        note = self.server.loop.unload_adapter(body.get("lora_name"))
        self._json(200, {"status": "ok", "lora_name": body["lora_name"], "note": note})

    def _complete(self, chat: bool):
        loop, body = self.server.loop, self._body()
        _check_fields(body, {"model", "messages"} if chat else {"model", "prompt"})
        adapter = loop.adapter_of(body.get("model"))
        prompt, stop_ids = loop.encode(render_chat(body.get("messages"), loop.tok) if chat
                                       else body.get("prompt"), chat)
        c = loop.submit(prompt, adapter, _max_tokens(body), _sampling(body), _stop_strings(body),
                        stop_ids)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model")}
        if body.get("stream"):
            return self._stream(c, head, chat)
        c.done.wait()
        if c.error is not None:   # the engine failed it (500), or it was cancelled or aborted
            raise ApiError(500 if c.finish == "failed" else 503, c.error, c.finish)
        choice = {"index": 0, "finish_reason": c.finish}
        choice.update({"message": {"role": "assistant", "content": c.text}} if chat
                      else {"text": c.text, "logprobs": None})
        self._json(200, {**head, "choices": [choice], "usage": _usage(c)})

    def _stream(self, c: Completion, head: dict, chat: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        piece = (lambda t: {"delta": {"content": t}}) if chat else (lambda t: {"text": t})
        try:
            if chat:
                self._event({**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                  "finish_reason": None}]})
            while True:
                c.updated.wait(timeout=1.0)
                c.updated.clear()
                finish = c.finish
                text = c.streamable()
                if len(text) > c.sent:
                    self._event({**head, "choices": [{"index": 0, **piece(text[c.sent:]),
                                                      "finish_reason": None}]})
                    c.sent = len(text)
                if finish is not None:
                    break
            if c.error is not None:
                self._event({"error": {"message": c.error, "type": "server_error", "code": c.finish}})
            else:
                self._event({**head, "choices": [{"index": 0, **piece(""), "finish_reason": c.finish}],
                             "usage": _usage(c)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.loop.cancel(c)     # the client left: its pages go back to the pool
        self.close_connection = True

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _usage(c: Completion) -> dict:
    n = len(c.ids)
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n, "total_tokens": c.prompt_tokens + n}


class Server(ThreadingHTTPServer):
    """One thread per connection; a listen backlog for many clients arriving at once (the
    standard library's default of 5 resets the connections beyond it)."""
    daemon_threads = True
    request_queue_size = 256


def start_server(engine, tokenizer, base_id: str, host: str = "127.0.0.1", port: int = 8000):
    """Start the engine thread and the HTTP server (in a thread); returns the server. Stop it with
    stop_server."""
    httpd = Server((host, port), Handler)
    httpd.loop = EngineLoop(engine, tokenizer, base_id)
    httpd.loop.start()
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd


def stop_server(httpd, grace_s: float = 10.0):
    """Stop accepting, let running requests finish (up to grace_s), cancel the rest, close."""
    httpd.loop.shutdown(grace_s)
    httpd.shutdown()
    httpd.server_close()
