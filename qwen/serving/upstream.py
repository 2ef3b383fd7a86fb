"""An engine that sends raw-prompt completions to an upstream OpenAI-compatible server (e.g.
`vllm serve` on a Qwen2 export, or another `openai_api.py`), for deployments beyond one machine.

It has the Engine's interface (`submit`, `stats`, `shutdown`, `tokenizer`, `max_context`), so the
API server keeps the Qwen-specific work (chat format, ReAct tool calls, stop words, usage, auth,
limits) and only the forward passes move. Prompts go as token ids, with vLLM's `stop_token_ids`
and `repetition_penalty` / `top_k` extensions; text arrives as streamed deltas.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from .engine import RequestStream
from .params import EngineBusy, Output, RequestError, SamplingParams


class UpstreamEngine:
    def __init__(self, url: str, tokenizer, *, model: str | None = None, api_key: str | None = None,
                 max_context: int | None = None, max_running: int = 64, max_waiting: int = 256, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        try:
            models = self._client.get(f"{self.url}/models").raise_for_status().json()["data"]
        except Exception as exc:  # noqa: BLE001  (connection refused, bad JSON, 401, ...)
            raise ValueError(f"upstream {self.url} does not answer GET /v1/models: {exc}") from exc
        if not models:
            raise ValueError(f"upstream {self.url} serves no model")
        entry = next((m for m in models if m.get("id") == model), models[0]) if model else models[0]
        self.upstream_model = entry["id"]
        self.model_name = self.upstream_model
        self.max_context = max_context or entry.get("max_model_len") or entry.get("max_context") or 8192
        self.max_running, self.max_waiting = max_running, max_waiting
        self.counters = Counter()
        self.observers: list = []
        self._active = 0
        self._lock = threading.Lock()

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestStream:
        params = (params or SamplingParams()).check()
        prompt = list(prompt_ids)
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.max_context} tokens",
                "max_tokens",
            )
        if params.logits_processors or params.logprobs is not None:
            raise RequestError("logprobs and constrained decoding are not available with an upstream engine", "logprobs")
        with self._lock:
            if self._active >= self.max_running + self.max_waiting:
                raise EngineBusy("too many requests in flight to the upstream; try again later")
            self._active += 1
            self.counters["requests_total"] += 1
            self.counters["prompt_tokens_total"] += len(prompt)
        stream = RequestStream(self, len(prompt))
        threading.Thread(target=self._run, args=(stream, prompt, params), daemon=True).start()
        return stream

    def _body(self, prompt, params: SamplingParams) -> dict:
        body = {
            "model": self.upstream_model,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        extras = {"top_k": params.top_k or -1, "repetition_penalty": params.repetition_penalty,
                  "stop_token_ids": list(params.stop_token_ids), "seed": params.seed}
        body.update({k: v for k, v in extras.items() if v is not None})
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _run(self, stream: RequestStream, prompt, params: SamplingParams) -> None:
        start = last = time.perf_counter()
        finish, completion = None, 0
        try:
            with self._client.stream("POST", f"{self.url}/completions", json=self._body(prompt, params)) as response:
                if response.status_code != 200:
                    response.read()
                    raise RuntimeError(f"upstream answered {response.status_code}: {response.text[:500]}")
                for line in response.iter_lines():
                    if stream.cancelled:
                        break  # closing the response drops the upstream request
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    usage = chunk.get("usage") or {}
                    completion = usage.get("completion_tokens", completion)
                    for choice in chunk.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        if choice.get("text"):
                            now = time.perf_counter()
                            name = "time_to_first_token" if last == start else "inter_token_latency"
                            for observer in self.observers:
                                observer(name, now - last)
                            last = now
                            stream._push(Output([], choice["text"], prompt_tokens=len(prompt)))
            reason = "cancelled" if stream.cancelled else finish or "stop"
            self.counters["generation_tokens_total"] += completion
            stream._push(Output([], "", finish_reason=reason, prompt_tokens=len(prompt), completion_tokens=completion))
        except Exception as exc:  # noqa: BLE001  (network errors reach the client as the stream's error)
            stream._push(RuntimeError(f"upstream request failed: {exc}"))
        finally:
            with self._lock:
                self._active -= 1

    def _wake(self) -> None:  # RequestStream.cancel(): the worker checks `cancelled` per chunk
        pass

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._active, "waiting": 0, **self.counters}

    def shutdown(self) -> None:
        self._client.close()
