"""``Job``: the client's handle on a batch job (``Client.submit_job``, ``Client.job``).

A job lives on the server, which keeps its input and results on disk: a job cut off by a server
restart is ``interrupted`` until the next server resumes it, so ``wait`` keeps waiting through a
restart (up to ``reconnect_s`` without an answer) rather than stopping there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pdserve.cluster.client import PdserveError

if TYPE_CHECKING:
    from pdserve.cluster.client import Client

TERMINAL_STATES = ("completed", "cancelled", "failed")
RECONNECT_S = 300.0  # how long wait() rides out a server that does not answer (a restart)


class JobFailedError(PdserveError):
    """``wait(check=True)``: the job ended other than completed, or some of its prompts failed;
    ``info`` is its last status."""

    def __init__(self, info: dict) -> None:
        super().__init__(summary(info))
        self.info = info


def summary(info: dict) -> str:
    """One line on how a job ended: state, ok and failed prompts, and why it stopped."""
    done = info["completed"] + info["failed"]
    text = f"job {info['id']} {info['state']}: {info['completed']} ok, {info['failed']} failed"
    if done < info["total"]:
        text += f", {info['total'] - done} not run"
    if info.get("resumed"):
        text += f" (resumed {info['resumed']}x after a server restart)"
    return text + (f"; {info['error']}" if info.get("error") else "")


def succeeded(info: dict) -> bool:
    return info["state"] == "completed" and info["failed"] == 0


class Job:
    """A batch job running on the cluster; its results stay there until fetched (any number of
    times, from any client)."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> dict:
        """{id, name, state, total, completed, failed, created, finished, error, resumed}."""
        info: dict = self.client._call("GET", f"/jobs/{self.id}")
        return info

    def wait(
        self,
        progress: bool = False,
        poll_s: float = 0.5,
        timeout: float | None = None,
        reconnect_s: float = RECONNECT_S,
        check: bool = False,
    ) -> dict:
        """Block until the job is completed, cancelled or failed (an interrupted job is waited
        for: the next server resumes it); a tqdm bar if ``progress``. TimeoutError after
        ``timeout`` seconds; PdserveError when the server has not answered for ``reconnect_s``.
        With ``check``, JobFailedError unless it completed with no failed prompt."""
        from tqdm.auto import tqdm  # only for callers who want a bar

        deadline = None if timeout is None else time.monotonic() + timeout
        info = self.status()
        with tqdm(total=info["total"], unit="prompt", desc=self.id, disable=not progress) as bar:
            while info["state"] not in TERMINAL_STATES:
                bar.update(info["completed"] + info["failed"] - bar.n)
                bar.set_postfix(failed=info["failed"], state=info["state"], refresh=False)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {info['state']} after {timeout} s")
                time.sleep(poll_s)
                info = self._status_through_restarts(reconnect_s)
            bar.update(info["completed"] + info["failed"] - bar.n)
        if check and not succeeded(info):
            raise JobFailedError(info)
        return info

    def _status_through_restarts(self, reconnect_s: float) -> dict:
        """The status; a server that cannot be reached is asked again until ``reconnect_s``."""
        give_up = time.monotonic() + reconnect_s
        while True:
            try:
                return self.status()
            except PdserveError as e:
                if e.status_code not in (None, 502, 503) or time.monotonic() > give_up:
                    raise
                time.sleep(1.0)

    def iter_results(self, page_size: int = 1000) -> Iterator[dict]:
        """Results in submission order, fetched page by page; stops at the first prompt still
        running (all of them once the job is done)."""
        start = 0
        while True:
            page = self.client._call(
                "GET", f"/jobs/{self.id}/results", params={"start": start, "limit": page_size}
            )
            yield from page
            if len(page) < page_size:
                return
            start += len(page)

    def results(self) -> list[dict]:
        """All results available now, in submission order (call after ``wait()`` for all)."""
        return list(self.iter_results())

    def cancel(self) -> dict:
        """Stop the job; results finished so far are kept. Returns its status."""
        info: dict = self.client._call("DELETE", f"/jobs/{self.id}")
        return info

    def __repr__(self) -> str:
        return f"Job({self.id!r}, url={self.client.url!r})"
