"""Steady streaming load for the chaos tests: client threads that stream completions to the
routers in turn and record each outcome, checked against the undisturbed greedy output."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.cluster.cluster_helpers import TINY_NAME

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,", "def main():"]
MAX_TOKENS = 64  # long enough that most faults land on a request mid-stream
CLIENTS = 3
MAX_REQUESTS = 20_000  # a bound on the load loop whatever happens


def body(prompt: str) -> dict:
    return {
        "model": TINY_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip


@dataclass
class Outcome:
    router: str
    ok: bool
    error: str
    started: float
    stall_s: float  # longest wait for the next chunk (first one included)
    # A failure in the API's own format: an HTTP error status with an OpenAI error object,
    # or an error event in the stream. Not clean: a dropped connection, a client timeout (a
    # hang), an answer that is not JSON, wrong tokens.
    clean: bool = False


def api_error(text: str) -> bool:
    """Whether ``text`` is an OpenAI-shaped error body: {"error": {"message": ...}}."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


@dataclass
class Load:
    """CLIENTS threads streaming completions to the routers in turn until stopped."""

    urls: list[str]
    expected: dict[str, str]
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._stop.clear()
        self._threads = []
        for i in range(CLIENTS):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop the clients (each finishes the request it is on); ``start`` resumes."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a load client did not finish its request in 120 s"

    def _run(self, client: int) -> None:
        n = client
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0)) as c:
            while not self._stop.is_set() and len(self.outcomes) < MAX_REQUESTS:
                urls = self.urls[:]  # one read: the test thread edits the list meanwhile
                url = urls[n % len(urls)]
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                self._record(self._one(c, url, prompt))

    def _one(self, c: httpx.Client, url: str, prompt: str) -> Outcome:
        started = last = time.monotonic()
        stall = 0.0
        text = ""
        try:
            with c.stream("POST", url + "/v1/completions", json=body(prompt)) as r:
                if r.status_code != 200:
                    r.read()
                    return Outcome(url, False, f"{r.status_code} {r.text[:200]}", started, stall,
                                   clean=r.status_code >= 400 and api_error(r.text))  # fmt: skip
                for line in r.iter_lines():
                    now = time.monotonic()
                    stall, last = max(stall, now - last), now
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Outcome(url, False, str(event["error"]), started, stall,
                                       clean=api_error(line[6:]))  # fmt: skip
                    text += "".join(ch["text"] for ch in event["choices"])
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a chunk that is not JSON
            return Outcome(url, False, f"{type(exc).__name__}: {exc}", started, stall)
        if text != self.expected[prompt]:
            return Outcome(url, False, f"wrong output {text!r}", started, stall)
        return Outcome(url, True, "", started, stall)

    def _record(self, o: Outcome) -> None:
        with self._lock:
            self.outcomes.append(o)

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t]

    def completed_after(self, t: float, count: int, timeout: float) -> None:
        """Wait until ``count`` requests that started after ``t`` finished (the cluster serves)."""
        deadline = time.monotonic() + timeout
        while len(self.since(t)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} requests finished in {timeout:.0f} s")
            time.sleep(0.1)
