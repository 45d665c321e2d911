"""A scripted loopback HTTP server speaking the Anthropic Messages and OpenAI Chat Completions wire formats, for
judge tests. Started on 127.0.0.1 with an OS-chosen port, in a daemon thread.

Behaviour is scripted per request: ``plan`` maps a marker substring (looked for in the request's user message) to a
list of actions applied on the 1st, 2nd, ... request carrying that marker; once the list is used up (or for requests
without a marker) the server answers ``good``. Actions: ``good``; ``malformed`` (reply text without a verdict);
``badscore`` (score 150); ``oversplit`` (an attempt per sentence); ``429:<secs>`` (429 with Retry-After);
``429ms:<millis>`` (429 with only ``retry-after-ms``); ``stubborn`` (a temperature-0 judge: malformed unless the
request carries a corrective follow-up turn); ``proseverdict`` (reasoning that mentions the tag before the verdict); ``cut`` (a verdict cut off at max_tokens);
``noattempts`` (a valid verdict with an empty attempts list); any status code (``500``, ``503``, ``529``, ``404``,
``403``, ...); ``stall:<secs>`` (sleep, then answer good); ``badbody`` (200 with a non-JSON body); ``401echo`` (401
whose body echoes the API key).

``wait_idle()`` returns once every connection a client opened has been served and closed, so a test can count the
hits of one run without a later straggler from a cancelled request landing in the next run's count."""

from __future__ import annotations

import hashlib
import json
import re
import select
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from esr.judge.segmentation import PATTERNS_ONLY, split_attempts

_ANSWER = re.compile(r"Chatbot's answer: (.*)\nDistracting concept: ", re.DOTALL)


@dataclass
class Hit:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    user: str
    action: str


@dataclass
class ScriptedServer:
    plan: dict[str, list[str]] = field(default_factory=dict)
    delay_s: float = 0.0
    hits: list[Hit] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    _open: int = 0  # connections accepted and not yet finished

    def _opened(self, delta: int) -> None:
        with self._lock:
            self._open += delta

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> ScriptedServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def finish(self):
                try:
                    super().finish()
                finally:
                    server._opened(-1)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server._handle(self, body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 drops connects of a burst: the client then times out

            def process_request(self, request, client_address):  # counted at accept, before the thread starts
                server._opened(+1)
                super().process_request(request, client_address)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Block until no connection is open or waiting to be accepted, twice in a row 50 ms apart (a client that
        closed its pool can leave a request only in such a connection); raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        quiet = 0
        while quiet < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server still has {self._open} open connection(s) after {timeout_s} s")
            pending = select.select([self._httpd.socket], [], [], 0)[0]
            quiet = quiet + 1 if self._open == 0 and not pending else 0
            time.sleep(0.05)

    def count(self, marker: str) -> int:
        """Hits whose user message carries ``marker``."""
        return sum(marker in h.user for h in self.hits)

    @property
    def root(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---------------------------------------------------------------------------------------------- behaviour
    def _action(self, user: str) -> str:
        with self._lock:
            for marker, actions in self.plan.items():
                if marker in user:
                    n = self._seen.get(marker, 0)
                    self._seen[marker] = n + 1
                    return actions[n] if n < len(actions) else "good"
        return "good"

    def _handle(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        messages = body.get("messages", [])
        user = next((m["content"] for m in messages if m.get("role") == "user"), "")
        action = self._action(user)
        if action == "stubborn":  # same request, same reply; a corrective turn changes the request
            action = "good" if sum(m.get("role") == "user" for m in messages) > 1 else "malformed"
        with self._lock:
            self.hits.append(Hit(handler.path, {k.lower(): v for k, v in handler.headers.items()}, body, user, action))
        if self.delay_s:
            time.sleep(self.delay_s)
        kind, _, arg = action.partition(":")
        if kind == "stall":
            time.sleep(float(arg))
            kind = "good"
        try:
            if kind in ("good", "malformed", "badscore", "oversplit", "proseverdict", "noattempts"):
                self._reply(handler, 200, self._wire(handler.path, self._text(kind, user)))
            elif kind == "cut":
                self._reply(handler, 200, self._wire(handler.path, self._text("good", user)[:60], cut=True))
            elif kind == "badbody":
                self._reply(handler, 200, b"<html>not json</html>", "text/html")
            elif kind == "429":
                self._reply(handler, 429, {"error": "rate limited"}, headers={"Retry-After": arg or "1"})
            elif kind == "429ms":
                self._reply(handler, 429, {"error": "rate limited"}, headers={"retry-after-ms": arg or "1000"})
            elif kind == "401echo":
                key = handler.headers.get("x-api-key") or handler.headers.get("authorization", "")
                self._reply(handler, 401, {"error": f"invalid key {key}"})
            else:
                self._reply(handler, int(kind), {"error": f"status {kind}"})
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall tests)
            pass

    @staticmethod
    def _text(kind: str, user: str) -> str:
        if "Descriptions (a JSON array):" in user:
            labels = json.loads(user.split("Descriptions (a JSON array):", 1)[1])
            if kind == "malformed":
                return "I cannot rate these."
            return json.dumps([{"label": lab, "reason": "x", "rating": 90 if "dog" in lab else 10} for lab in labels])
        if kind == "malformed":
            return 'Reasoning: fine answer. <json>{"attempts": [{"attempt_text": "x", "score": }]}</json>'
        if kind == "noattempts":
            return 'No attempt at the question. <json>{"attempts": []}</json>'
        m = _ANSWER.search(user)
        answer = m.group(1) if m else ""
        pieces = split_attempts(answer, detector=PATTERNS_ONLY) or [answer or "empty"]
        if kind == "oversplit":  # a judge that splits at every sentence, restart language or not
            pieces = [p.strip() + "." for p in answer.split(". ") if p.strip()]
        scores = [10.0] * (len(pieces) - 1) + [150.0 if kind == "badscore" else 90.0]
        verdict = {"attempts": [{"attempt_text": p, "score": s} for p, s in zip(pieces, scores)]}
        if kind == "proseverdict":
            return f"I put the verdict in <json> tags below {{as asked}}.\n<json>{json.dumps(verdict)}</json>"
        return f"The answer looks fine.\n<json>{json.dumps(verdict)}</json>"

    @staticmethod
    def _wire(path: str, text: str, cut: bool = False) -> dict[str, Any]:
        if path.endswith("/v1/messages"):
            return {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "m",
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens" if cut else "end_turn",
            }
        return {
            "id": "c1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if cut else "stop",
                }
            ],
        }

    @staticmethod
    def _reply(handler, status: int, payload, content_type: str = "application/json", headers=None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)


# ---------------------------------------------------------------------------------------------- crash tests


def body_hash(body) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class CountingServer(ScriptedServer):
    """The scripted judge server, also tracking which request bodies are being answered right now (in flight)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.in_flight: dict[str, int] = {}
        self.completed: list[str] = []

    def _handle(self, handler, body):
        h = body_hash(body)
        with self._lock:
            self.in_flight[h] = self.in_flight.get(h, 0) + 1
        try:
            super()._handle(handler, body)
        finally:
            with self._lock:
                self.in_flight[h] -= 1
                self.completed.append(h)

    def snapshot_in_flight(self) -> set[str]:
        with self._lock:
            return {h for h, n in self.in_flight.items() if n > 0}

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for hit in self.hits:
                h = body_hash(hit.body)
                out[h] = out.get(h, 0) + 1
            return out


_GRADED = re.compile(r"Chatbot's answer: (.*)\nDistracting concept: (.*)\Z", re.DOTALL)


def answered_not_stored(hits, cache_dir: Path) -> set[str]:
    """Bodies among ``hits`` whose (answer, latent label) has no entry in the judge cache: a client killed between
    receiving the reply and writing it (``Judge._finish``) loses that answer. Everything else the server answered
    must be in the cache and is therefore never sent again."""
    stored = set()
    for p in cache_dir.glob("*/*.json"):
        try:
            req = json.loads(p.read_text())["inputs"]["request"]
        except (OSError, ValueError, KeyError):
            continue
        stored.add((req["response"].strip(), req["latent_label"].strip()))
    out = set()
    for h in hits:
        m = _GRADED.search(h.user)
        if m is None or (m.group(1).strip(), m.group(2).strip()) not in stored:
            out.add(body_hash(h.body))
    return out
