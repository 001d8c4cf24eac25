"""``pdserve submit`` and ``pdserve jobs``: batch jobs from the command line, over the client
(httpx only: no Ray, no torch)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from pdserve.cluster.client import Client, PdserveError, read_prompts
from pdserve.cluster.client_jobs import Job, succeeded, summary

DEFAULT_URL = "http://127.0.0.1:8000"
SHOW_FAILURES = 5  # failed prompts named in the summary
SUBMIT_DESCRIPTION = (
    "Submit prompts as a job that runs on the cluster; results are written there as they "
    "complete, so you can disconnect and fetch them later."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    if command == "submit":
        p.description = SUBMIT_DESCRIPTION
        add_submit_args(p)
    else:
        add_jobs_args(p)


def run(command: str, args: argparse.Namespace) -> int:
    return run_submit(args) if command == "submit" else run_jobs(args)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"the pdserve server (default {DEFAULT_URL})")
    p.add_argument(
        "--api-key", default=None, help="the server's API key (default: $PDSERVE_API_KEY)"
    )


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", help='JSONL file: one {"prompt": ...} object or JSON string per line')
    p.add_argument(
        "-o", "--output", default="-", help="results JSONL, in prompt order (default: stdout)"
    )
    p.add_argument("--name", default=None, help="a name to find the job by in `pdserve jobs`")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and return; `pdserve jobs ID -o FILE` fetches results later",
    )
    _add_client_args(p)
    g = p.add_argument_group("sampling (server defaults when omitted)")
    g.add_argument("--max-tokens", type=int, help="tokens to generate per prompt (16)")
    g.add_argument("--temperature", type=float, help="0 = greedy (1.0)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int, help="per-request seed for sampling")
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="generate max-tokens")


def add_jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", nargs="?", help="one job: show it (and fetch its results with -o)")
    p.add_argument("-o", "--output", default=None, help="write the job's results (JSONL) here")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, with progress")
    p.add_argument("--cancel", action="store_true", help="cancel the job")
    _add_client_args(p)


def run_submit(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        return 2
    with _client(args) as client:
        try:
            job = client.submit_job(prompts, name=args.name, **_sampling(args))
        except PdserveError as e:
            err.print(f"[red]error:[/] {e}", highlight=False)
            return 1
        if args.no_wait:
            print(job.id)
            return 0
        err.print(f"job [bold]{job.id}[/]: {len(prompts)} prompts", highlight=False)
        return _finish(job, args.output, err)


def run_jobs(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    with _client(args) as client:
        try:
            if args.job_id is None:
                Console().print(jobs_table(client.list_jobs()))
                return 0
            job = client.job(args.job_id)
            if args.cancel:
                err.print(f"job {job.id}: {job.cancel()['state']}", highlight=False)
                return 0
            if args.wait or args.output:
                return _finish(job, args.output or "-", err, wait=args.wait)
            Console().print(jobs_table([job.status()]))
            return 0
        except PdserveError as e:
            err.print(f"[red]error:[/] {e}", highlight=False)
            return 1


def jobs_table(infos: list[dict[str, Any]]) -> Table:
    table = Table(title="pdserve jobs")
    for col in ("id", "name", "state", "done", "failed", "created", "took"):
        table.add_column(col, justify="right" if col in ("done", "failed", "took") else "left")
    for i in infos:
        took = (i["finished"] or 0) - i["created"] if i["finished"] else None
        table.add_row(
            i["id"],
            i["name"] or "",
            i["state"]
            + (f" ({i['error']})" if i.get("error") else "")
            + (f" [resumed {i['resumed']}x]" if i.get("resumed") else ""),
            f"{i['completed'] + i['failed']}/{i['total']}",
            str(i["failed"]),
            datetime.datetime.fromtimestamp(i["created"]).strftime("%Y-%m-%d %H:%M:%S"),
            f"{took:.1f} s" if took is not None else "-",
        )
    return table


def _finish(job: Job, output: str, err: Console, wait: bool = True) -> int:
    """Wait for the job (progress bar), write its results in prompt order, print a summary;
    0 only when it completed with no failed prompt."""
    try:
        info = job.wait(progress=True) if wait else job.status()
        n, failures = _write_results(job, output)
    except KeyboardInterrupt:
        err.print(
            f"\njob {job.id} keeps running on the cluster: `pdserve jobs {job.id} --wait -o FILE` "
            f"fetches its results, `pdserve jobs {job.id} --cancel` stops it",
            highlight=False,
        )
        return 130
    except PdserveError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    where = "stdout" if output == "-" else output
    err.print(f"{summary(info)}; {n} results written to {where}", highlight=False)
    for index, error in failures[:SHOW_FAILURES]:
        err.print(f"  prompt {index} failed: {error}", highlight=False)
    if len(failures) > SHOW_FAILURES:
        err.print(f"  ... and {len(failures) - SHOW_FAILURES} more (see `error` in the results)")
    return 0 if succeeded(info) else 1


def _write_results(job: Job, output: str) -> tuple[int, list[tuple[int, str]]]:
    """Write the results; returns how many, and (index, error) of each that failed."""
    n, failures = 0, []
    with _open(output) as out:
        for result in job.iter_results():
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            n += 1
            if result.get("error") is not None:
                failures.append((result["index"], result["error"]))
    return n, failures


@contextmanager
def _open(output: str) -> Iterator[IO[str]]:
    if output == "-":
        yield sys.stdout
    else:
        with open(output, "w", encoding="utf-8") as f:
            yield f


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key)  # None: $PDSERVE_API_KEY


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}
