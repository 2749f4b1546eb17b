"""The OpenAI-compatible HTTP front end of the S-LoRA engine: real clients, one adapter per request.

S-LoRA (Sheng et al. 2023) serves many adapters from one batch; here the batch is filled by
concurrent HTTP clients. The request's `model` names the adapter (or the base model), as in vLLM,
LoRAX and SGLang. One engine thread steps the engine, HTTP threads submit and read
(engine_loop.EngineLoop).

    POST /v1/completions         prompt (text or token ids) -> text; stream: Server-Sent Events
    POST /v1/chat/completions    messages rendered with ChatML (SmolLM2's template)
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}: register (or replace) a PEFT adapter
    POST /v1/unload_lora_adapter {"lora_name"}: deferred while requests use it (they finish)
    GET  /v1/models, /health, /metrics (Prometheus text), /pool (the pool drawn, pool_view.py)

Streaming sends one chunk per decoded piece of text, never half a UTF-8 character: each step
decodes only the ids not yet turned into text, and holds them back until they end in a whole
character, so the pieces concatenate to the non-streamed text at a cost linear in its length.
Stop strings are found in the text; the request is then cancelled and its pages return to the
pool. Errors are OpenAI's JSON {"error": {"message", "type", "code"}}.
On a network (NetworkConfig): an API key for /v1/* (compared in constant time), adapters loaded
over HTTP only from the operator's directories, a cap on the body, deadlines on reading a
request, a bound on connections served at once (the next one gets 503 without a thread), and
limits on waiting requests, registered adapters and an adapter's rank and size.
Simplified: n = 1; no logprobs, echo, best_of, penalties or logit bias (refused by name).
Demo: `python serve.py --port 8000`, then
`curl localhost:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Hello"}'`.
"""
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from engine_loop import ApiError, Completion, EngineLoop, NetworkConfig
from model import SamplingParams

# Request fields that are accepted only at the value that changes nothing here.
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
           "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None}
SAMPLING = {"temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "stream", "user",
            "stream_options", "max_completion_tokens"}
CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"


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
    t = body.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and not 0 <= t <= 2:
        raise ApiError(400, f"temperature={t!r} must be between 0 and 2 (OpenAI's range)")
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
                  "/metrics": lambda: self._text(200, self.server.loop.metrics()),
                  "/pool": lambda: self._send(200, self.server.loop.pool_page().encode(),
                                              "text/html; charset=utf-8")}
        self._route(routes)

    def do_POST(self):
        routes = {"/v1/completions": lambda: self._complete(chat=False),
                  "/v1/chat/completions": lambda: self._complete(chat=True),
                  "/v1/load_lora_adapter": self._load, "/v1/unload_lora_adapter": self._unload}
        self._route(routes)

    def handle_one_request(self):
        """Read the request line and headers within --header-timeout (a slow client is cut off)."""
        self.server.deadlines.arm(self.connection, self.server.net.header_timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.connection)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.deadlines.disarm(self.connection)   # the headers are in
        return ok

    def _route(self, routes):
        try:
            self._authorize()
            if self.path not in routes:
                raise ApiError(404, f"no route {self.command} {self.path}", "not_found")
            routes[self.path]()
        except ApiError as e:
            self._json(e.status, {"error": {"message": e.message, "type": "invalid_request_error"
                                            if e.status < 500 else "server_error", "code": e.code}})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            print(f"client {self.client_address[0]} went away during {self.command} {self.path}",
                  flush=True)

    def _authorize(self):
        """With an API key, every route but /health (and /metrics, /pool if opened) needs it."""
        key, given = self.server.net.key(), self.headers.get("Authorization", "")
        if key is None or self.path == "/health" or (self.path in ("/metrics", "/pool")
                                                     and self.server.net.open_metrics):
            return
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect API key provided" if given else "You didn't provide an "
                           "API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key")

    def _body(self) -> dict:
        """The JSON body: Content-Length bytes, at most --max-body, within --body-timeout."""
        net, length = self.server.net, self.headers.get("Content-Length")
        self.close_connection = True            # until the body is read whole
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not read: send Content-Length", "length_required")
        if length is None:
            raise ApiError(411, "the request needs a Content-Length header", "length_required")
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, f"Content-Length {length[:20]!r} is not a non-negative integer")
        if int(length) > net.max_body:
            raise ApiError(413, f"the body is {length} bytes, over the limit of {net.max_body} "
                                "(--max-body)", "request_too_large")
        n = int(length)
        self.server.deadlines.arm(self.connection, net.body_timeout)
        try:
            raw = self.rfile.read(n)
        finally:
            self.server.deadlines.disarm(self.connection)
        if len(raw) < n:
            raise ApiError(400, f"the body ended after {len(raw)} of its {n} bytes")
        self.close_connection = False
        try:
            return json.loads(raw or b"null")
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
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.server.loop.cancel(c)     # the client left: its pages go back to the pool
            print(f"client {self.client_address[0]} went away mid-stream: request cancelled", flush=True)
        self.close_connection = True

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _usage(c: Completion) -> dict:
    n = len(c.ids)
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n, "total_tokens": c.prompt_tokens + n}


class Deadlines:
    """Connections that must finish reading by a time; one thread shuts down the late ones (the
    blocked read then ends and the handler's thread is free)."""

    def __init__(self):
        self.due, self.lock = {}, threading.Lock()

    def arm(self, conn, seconds: float):
        with self.lock:
            self.due[conn] = time.monotonic() + seconds

    def disarm(self, conn):
        with self.lock:
            self.due.pop(conn, None)

    def watch(self, period: float = 0.1):
        while True:
            time.sleep(period)
            with self.lock:
                late = [c for c, t in self.due.items() if t < time.monotonic()]
                for c in late:
                    del self.due[c]
            for c in late:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_BUSY = json.dumps({"error": {"message": "too many connections (--max-connections); retry later",
                               "type": "server_error", "code": "unavailable"}}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY))


class Server(ThreadingHTTPServer):
    """One thread per connection, at most net.max_connections at once (the next one is answered
    503 and closed without a thread); a listen backlog for many clients arriving at once."""
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, net: NetworkConfig):
        super().__init__(address, Handler)
        self.net, self.deadlines = net, Deadlines()
        self.active, self.count_lock = 0, threading.Lock()

    def process_request(self, request, client_address):
        with self.count_lock:
            full = self.active >= self.net.max_connections
            self.active += not full
        if full:
            try:
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.active -= 1

    def handle_error(self, request, client_address):
        """One line per failed connection instead of the standard library's traceback."""
        err = sys.exc_info()[1]
        print(f"client {client_address[0]}: {type(err).__name__}: {err}", flush=True)


def start_server(engine, tokenizer, base_id: str, host: str = "127.0.0.1", port: int = 8000,
                 net: Optional[NetworkConfig] = None):
    """Start the engine thread and the HTTP server (in a thread); returns the server. Stop it with
    stop_server."""
    net = net or NetworkConfig()
    httpd = Server((host, port), net)
    httpd.loop = EngineLoop(engine, tokenizer, base_id, net)
    httpd.loop.start()
    threading.Thread(target=httpd.deadlines.watch, name="deadlines", daemon=True).start()
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd


def stop_server(httpd, grace_s: float = 10.0):
    """Stop accepting, let running requests finish (up to grace_s), cancel the rest, close."""
    httpd.loop.shutdown(grace_s)
    httpd.shutdown()
    httpd.server_close()
