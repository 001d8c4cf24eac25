"""``LLM(...)`` keywords as a deploy spec: the offline API resolves through the same path as
``pdserve up``, and its errors name the keyword the caller wrote, not the YAML key."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from pdserve.cluster.config.errors import did_you_mean
from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.schema import DeploySpec, llm_keywords
from pdserve.cluster.config.spec import SpecError, load_spec
from pdserve.engine.deploy_config import DeploymentConfig

SOURCE = "LLM(...)"


def llm_spec(model: str | None, keywords: Mapping[str, Any]) -> DeploySpec:
    """The spec ``LLM(model, **keywords)`` describes, validated; None means the default. An
    unknown keyword is a TypeError, as for any function; a bad value a SpecError naming it."""
    table = llm_keywords()
    unknown = sorted(set(keywords) - set(table))
    if unknown:
        hint = did_you_mean(unknown[0], list(table))
        raise TypeError(
            f"LLM() got unknown keyword {unknown[0]!r}{hint}; it takes: {', '.join(sorted(table))}"
        )
    data: dict[str, Any] = {"name": f"llm-{uuid.uuid4().hex[:8]}"}
    if model is not None:
        data["model"] = {"path": model}
    for keyword, value in keywords.items():
        if value is not None:
            *sections, key = table[keyword]
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[key] = value
    try:
        return load_spec(data)
    except SpecError as e:
        raise _by_keyword(e) from None


def resolve_llm_spec(spec: DeploySpec, *, gpus_available: bool) -> DeploymentConfig:
    try:
        return resolve(spec, gpus_available=gpus_available)
    except SpecError as e:
        raise _by_keyword(e) from None


def _by_keyword(error: SpecError) -> SpecError:
    """The same problems, each led by the keyword that sets its key."""
    paths = {".".join(path): keyword for keyword, path in llm_keywords().items()}
    paths["model.path"] = "model"
    problems = []
    for problem in error.problems:
        path, sep, rest = problem.partition(": ")
        problems.append(f"{paths[path]}{sep}{rest}" if path in paths else problem)
    return SpecError(problems, SOURCE)
