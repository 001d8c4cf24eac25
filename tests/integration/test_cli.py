"""The command line as a user runs it: `pdserve up -f SPEC` (local-tp3.yaml's shape), then status, a
request, and `pdserve down`, each a separate process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cluster_helpers import deploy_spec, free_port

pytestmark = pytest.mark.integration
PDSERVE = str(Path(sys.executable).parent / "pdserve")


def test_help_explains_every_verb() -> None:
    out = subprocess.run([PDSERVE, "--help"], capture_output=True, text=True, check=True).stdout
    for verb in (
        "generate",
        "demo",
        "up",
        "status",
        "down",
        "submit",
        "jobs",
        "bench",
        "sweep",
        "profile",
        "plan",
        "make-tiny-model",
    ):
        assert verb in out
    # --help stays fast: no verb's heavy imports (torch, Ray) at parser construction
    probe = "import sys; import pdserve.cluster.cli as c; c.build_parser(); print('torch' in sys.modules, 'ray' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.split() == ["False", "False"]


def test_every_verb_has_light_help() -> None:
    """`pdserve VERB --help` imports only that verb's module, and none loads torch or Ray."""
    probe = (
        "import sys, contextlib, io\n"
        "from pdserve.cluster.cli import COMMANDS, main\n"
        "for c in COMMANDS:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        main([c.name, '--help'])\n"
        "    assert out.getvalue().startswith(f'usage: pdserve {c.name}'), out.getvalue()\n"
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.split() == ["False", "False"]


def test_cli_archs_match_the_engine() -> None:
    from pdserve.cluster.cli.tiny_model import TINY_ARCHS as CLI_ARCHS
    from pdserve.engine.tiny_model import TINY_ARCHS

    assert CLI_ARCHS == TINY_ARCHS


def test_up_status_request_down(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "up.log").open("w+")
    spec = tmp_path / "tp2.yaml"  # deploy/local-tp3.yaml's shape on the tiny model, at TP=2
    text = Path("deploy/local-tp3.yaml").read_text().replace("name: local-tp3", "name: itest-tp2")
    text = text.replace("port: 8001", f"port: {port}")
    text = text.replace("builtin:smollm2-135m-instruct", "builtin:tiny-llama")
    spec.write_text(text.replace("tensor_parallel_size: 3", "tensor_parallel_size: 2"))
    up = subprocess.Popen(
        [PDSERVE, "up", "-f", str(spec)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert up.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(1)
        body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        found = re.search(r"ray cluster: (\S+)", Path(log.name).read_text())
        assert found
        # the address `up` printed: never `auto`, which may find another cluster on this host
        args = ["-n", "itest-tp2", "--address", found.group(1)]
        status = subprocess.run(
            [PDSERVE, "status", *args, "--json"], capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stderr[-2000:]
        info = json.loads(status.stdout)
        assert info["state"] == "serving" and info["prefill"][0]["tp"] == 2
        # each pool's prefix cache: its size, what it holds, its hit rate
        assert (
            info["prefill"][0]["kv_total_blocks"] > 0 and "kv_cached_blocks" in info["prefill"][0]
        )
        assert info["decode"][0]["kv_total_blocks"] > 0
        # without --address: the address `up` recorded for this name on this machine
        down = subprocess.run(
            [PDSERVE, "down", "-n", "itest-tp2"], capture_output=True, text=True, timeout=180
        )
        assert down.returncode == 0, down.stderr[-2000:]
        assert up.wait(timeout=120) == 0  # `up` returns once the deployment is down
    finally:
        if up.poll() is None:
            up.kill()


def test_sigterm_stops_a_foreground_up_cleanly(tmp_path: Path) -> None:
    """`kill PID` / `docker stop` reach a foreground `up` as SIGTERM: it shuts the deployment down
    as Ctrl-C does and exits 0."""
    spec = tmp_path / "term.yaml"
    data = deploy_spec("deploy/local.yaml", "itest-term", Path("builtin:tiny-llama"))
    # colocated: one worker actor is enough to see the deployment stop (the suite's time)
    data["mode"] = "colocated"
    del data["prefill"]
    port = data["server"]["port"]
    spec.write_text(yaml.safe_dump(data))
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen([PDSERVE, "up", "-f", str(spec)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "serving" not in Path(log.name).read_text():
            assert up.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.5)
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0, Path(log.name).read_text()
        assert "deployment 'itest-term' stopped" in Path(log.name).read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if up.poll() is None:
            up.kill()
