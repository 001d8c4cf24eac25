"""The client library: talks to a running pdserve server over its native msgpack API.

Light on purpose (httpx and msgpack only; no torch, no Ray), so any machine can use it::

    with Client("http://head-node:8000") as client:
        print(client.generate("The capital of France is", max_tokens=8)["text"])  # raw text
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        print(client.chat(chat, max_tokens=32)["text"])  # the model's chat template
        job = client.submit_job("prompts.jsonl", max_tokens=64)
        job.wait(progress=True)
        for result in job.results():  # in submission order
            ...
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
import msgpack

from pdserve.engine import envs

if TYPE_CHECKING:
    from pdserve.cluster.client_jobs import Job

PREFIX = "/pdserve/v1"
MSGPACK = "application/x-msgpack"
MAX_FRAME_BYTES = 64 << 20
Prompt = str | list[int]
Message = Mapping[str, str]  # {"role": ..., "content": ...}


class PdserveError(RuntimeError):
    """The server refused or failed a call: ``status_code`` (None when it was not reached) and
    the server's ``message``; ``retry_after`` (seconds) on 429."""

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message if status_code is None else f"HTTP {status_code}: {message}")
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file: each line ``{"prompt": ...}`` or a bare JSON string (or list of
    token ids); blank lines are skipped. Raises ValueError naming the line to fix."""
    prompts: list[Prompt] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not UTF-8 text (byte {e.start}): save the file as UTF-8"
                ) from None
            if line.strip():
                prompts.append(_parse_line(line, f"{path}:{n}"))
    if not prompts:
        raise ValueError(f"{path} holds no prompts: write one JSON prompt per line")
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if isinstance(item, dict):
        if set(item) != {"prompt"}:
            raise ValueError(
                f'{where}: a line holds only {{"prompt": ...}}, found keys {sorted(item)}; '
                "sampling settings apply to the whole job (submit_job keywords / CLI flags)"
            )
        item = item["prompt"]
    if isinstance(item, str) or (
        isinstance(item, list)
        and item
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
    ):
        return item
    raise ValueError(f"{where}: a prompt is a string or a non-empty list of token ids (ints >= 0)")


def _error_message(resp: httpx.Response) -> str:
    """The server's message from an OpenAI-style error, FastAPI's detail, or the raw text."""
    body: Any = None
    with contextlib.suppress(ValueError):
        body = resp.json()
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", body["error"]))
    elif isinstance(body, dict) and "detail" in body:
        message = str(body["detail"])
    else:
        message = resp.text[:500] or resp.reason_phrase
    if resp.status_code == 401:
        message += " (pass api_key= to Client, --api-key, or set PDSERVE_API_KEY)"
    return message


def _check(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    retry = resp.headers.get("retry-after")
    raise PdserveError(_error_message(resp), resp.status_code, float(retry) if retry else None)


class Client:
    """A connection to a pdserve server (see the module docstring). ``api_key`` defaults to
    $PDSERVE_API_KEY. Sampling keywords are SamplingParams fields (max_tokens, temperature...)."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600
    ) -> None:
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else envs.api_key()
        headers = {"content-type": MSGPACK, "accept": MSGPACK}
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._http = httpx.Client(base_url=self.url + PREFIX, headers=headers, timeout=timeout)

    def generate(self, prompt: Prompt, *, request_id: str | None = None, **sampling: Any) -> dict:
        """One raw completion: {request_id, text, token_ids, finish_reason, metrics}."""
        out: dict = self._call("POST", "/generate", _request(prompt, None, request_id, sampling))
        return out

    def chat(
        self, messages: Sequence[Message], *, request_id: str | None = None, **sampling: Any
    ) -> dict:
        """One chat reply (the model's chat template applied, stopping at its end of turn),
        shaped as ``generate``'s."""
        body = _request(None, messages, request_id, sampling)
        out: dict = self._call("POST", "/generate", body)
        return out

    def stream(
        self, prompt: Prompt, *, request_id: str | None = None, **sampling: Any
    ) -> Iterator[dict]:
        """Deltas {request_id, text, token_ids, finish_reason, ...} as they are generated; the
        last has finish_reason and metrics. Leaving the loop early aborts the request."""
        return self._stream(_request(prompt, None, request_id, sampling))

    def stream_chat(
        self, messages: Sequence[Message], *, request_id: str | None = None, **sampling: Any
    ) -> Iterator[dict]:
        """``stream`` for a chat: deltas of the reply to ``messages``."""
        return self._stream(_request(None, messages, request_id, sampling))

    def _stream(self, request: dict[str, Any]) -> Iterator[dict]:
        body = _pack(request)
        with self._errors(), self._http.stream("POST", "/stream", content=body) as resp:
            if not resp.is_success:
                resp.read()
                _check(resp)
            frames = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME_BYTES)
            for chunk in resp.iter_bytes():
                frames.feed(chunk)
                for frame in frames:
                    if "error" in frame:
                        raise PdserveError(frame["error"]["message"], 500)
                    yield frame

    def cancel(self, request_id: str) -> bool:
        """Abort a running generate/stream; False when it was not running (any more)."""
        return bool(self._call("POST", f"/cancel/{request_id}")["cancelled"])

    def submit_job(
        self, prompts: Sequence[Prompt] | str | Path, name: str | None = None, **sampling: Any
    ) -> Job:
        """Start a batch job on the cluster; ``prompts`` is a list or a JSONL file's path."""
        if isinstance(prompts, (str, Path)):
            prompts = read_prompts(prompts)
        info = self._call(
            "POST",
            "/jobs",
            {"prompts": list(prompts), "sampling": _sampling(sampling), "name": name},
        )
        from pdserve.cluster.client_jobs import Job

        return Job(self, info["id"])

    def list_jobs(self) -> list[dict]:
        """Every job the server knows, oldest first (JobInfo maps)."""
        jobs: list[dict] = self._call("GET", "/jobs")
        return jobs

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (PdserveError 404 if there is none)."""
        from pdserve.cluster.client_jobs import Job

        job = Job(self, job_id)
        job.status()
        return job

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        content = None if body is None else _pack(body)
        with self._errors():
            resp = self._http.request(method, path, content=content, params=params)
        _check(resp)
        return msgpack.unpackb(resp.content, raw=False)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as e:
            raise PdserveError(f"no answer from {self.url} in time ({e!r}): raise timeout=") from e
        except httpx.TransportError as e:
            raise PdserveError(
                f"cannot reach pdserve at {self.url} ({e}): is `pdserve up` running there?"
            ) from e


def _pack(body: Any) -> bytes:
    """The body as msgpack; a value msgpack cannot carry is a ValueError naming the fix."""
    try:
        return bytes(msgpack.packb(body))
    except UnicodeEncodeError as e:
        raise ValueError(
            f"a string in the request is not valid Unicode ({e.reason}, e.g. a lone surrogate "
            "such as '\\ud800'): send text that encodes as UTF-8"
        ) from None
    except (TypeError, OverflowError, ValueError) as e:
        raise ValueError(
            f"the request holds a value msgpack cannot send ({e}): use str, int, float, bool, "
            "None, lists and dicts with str keys"
        ) from None


def _sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling keywords for the wire: logit_bias's token-id keys as strings (msgpack maps from
    clients have str keys)."""
    bias = sampling.get("logit_bias")
    if isinstance(bias, Mapping):
        sampling = {**sampling, "logit_bias": {str(k): v for k, v in bias.items()}}
    return sampling


def _request(
    prompt: Prompt | None,
    messages: Sequence[Message] | None,
    request_id: str | None,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sampling": _sampling(sampling),
        "request_id": request_id or uuid.uuid4().hex,
    }
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
    else:
        body["prompt"] = prompt
    return body
