"""The HTTP server tests' shared pieces: a scripted frontend behind the real app. Test modules
import the ``*_fixture`` functions, which pytest knows as ``tokenizer``, ``frontend``, ``client``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from _scripted_frontend import ScriptedFrontend
from fastapi.testclient import TestClient
from transformers import PreTrainedTokenizerBase

from pdserve.cluster.serving.server import create_app
from pdserve.engine.deploy_config import ServerSettings
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import load_tokenizer

MODEL = "tiny"
COMPLETION = {"model": MODEL, "prompt": "Hello world"}
HISTOGRAMS = (
    "time_to_first_token",
    "inter_token_latency",
    "e2e_request_latency",
    "request_queue_time",
    "request_prefill_time",
    "kv_transfer_time",
)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module", name="tokenizer")
def tokenizer_fixture(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(make_tiny_model(tmp_path_factory.mktemp("tok") / "llama", "llama")))


@pytest.fixture(name="frontend")
def frontend_fixture(tokenizer: PreTrainedTokenizerBase) -> ScriptedFrontend:
    return ScriptedFrontend(tokenizer)


def serve(frontend: ScriptedFrontend, **settings: Any) -> TestClient:
    app = create_app(frontend, ServerSettings(served_model_name=MODEL, **settings))
    return TestClient(app)


@pytest.fixture(name="client")
def client_fixture(frontend: ScriptedFrontend) -> Iterator[TestClient]:
    with serve(frontend) as c:
        yield c
