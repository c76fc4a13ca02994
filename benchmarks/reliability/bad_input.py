"""Case 6: what every installed adapter does with malformed input, as a table generated from real runs.

For each adapter (``tensor`` always; ``image``, ``detection``, ``text`` and ``ranking`` when their plugins import),
a catalogue of malformed requests (wrong types, shapes and dtypes, NaN/inf, empty, oversized, unknown keys and
parameters, out-of-range ids) is submitted through a real `Scheduler` with a real small model, all in one batch
window between two good requests of the same workload. Each row records whether the input was refused at
submit, failed in its batch, or was accepted, with the error type, rule and message it got; the good requests
must succeed every time. `render` turns the rows into ``docs/bad-input.md``; the suite regenerates the table and
fails when the committed file differs, so the document stays true.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from typing import Any

import numpy as np
import torch

import batchplex
from batchplex import BatchPolicy, Scheduler

from .catalogue import SECTIONS, Section

__all__ = ["bad_input_table", "run_section", "render", "render_section", "split_sections", "generated_with",
           "torch_release", "DOC_PATH", "REGENERATE", "SECTIONS"]

DOC_PATH = "docs/bad-input.md"
REGENERATE = ".venv/bin/python -m benchmarks.reliability.run bad-input"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_GENERATED = re.compile(r"<!-- generated with torch (\S+) -->")


def _message(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = _ADDRESS.sub("0x…", text)
    return text if len(text) <= 240 else text[:239] + "…"


def _describe(result: Any) -> str:
    """A short, deterministic description of an accepted request's result."""
    if isinstance(result, torch.Tensor):
        return f"result: {str(result.dtype).removeprefix('torch.')} tensor of shape {tuple(result.shape)}"
    if isinstance(result, dict):
        return f"result: dict with {', '.join(sorted(result))}"
    return f"result: {type(result).__name__}"


def _row(label: str, at_submit: bool, outcome: Any) -> dict[str, str]:
    if not isinstance(outcome, BaseException):
        return {"input": label, "outcome": "accepted", "error": "", "rule": "", "message": _describe(outcome)}
    error = type(outcome).__name__
    if outcome.__cause__ is not None:
        error += f" (cause: {type(outcome.__cause__).__name__})"
    return {"input": label, "outcome": "refused at submit" if at_submit else "failed in its batch",
            "error": error, "rule": str(getattr(outcome, "rule", "") or ""), "message": _message(outcome)}


async def run_section(section: Section, device: str = "cpu") -> dict[str, Any]:
    """Submit the section's catalogue through a real scheduler; ``{"skipped": why}`` when its plugin is absent."""
    plugins = []
    if section.plugin is not None:
        try:
            plugins.append(importlib.import_module(section.plugin))
        except ImportError as error:
            return {"adapter": section.adapter, "skipped": f"{section.plugin} is not importable: {error}"}
    try:
        setup = section.setup(torch.device(device))
    except (ImportError, FileNotFoundError) as error:
        return {"adapter": section.adapter, "skipped": f"{type(error).__name__}: {error}"}
    name = section.adapter
    async with Scheduler(autoload=False, plugins=plugins) as scheduler:
        scheduler.add_workload(name, adapter=name, model=setup.model, device=device, adapter_options=setup.options,
                               policy=BatchPolicy(max_batch_size=len(section.cases) + 2, max_wait_ms=30))
        first = asyncio.ensure_future(scheduler.submit(name, setup.good()))
        tasks = [asyncio.ensure_future(scheduler.submit(name, make(), **params)) for _, make, params in section.cases]
        last = asyncio.ensure_future(scheduler.submit(name, setup.good()))
        await asyncio.sleep(0)  # every task has run its first step: prepare and enqueue, or a refusal
        refused = [task.done() for task in tasks]
        outcomes = await asyncio.gather(first, *tasks, last, return_exceptions=True)
    goods = [outcomes[0], outcomes[-1]]
    rows = [_row(label, at_submit, outcome)
            for (label, _, _), at_submit, outcome in zip(section.cases, refused, outcomes[1:-1])]
    return {"adapter": name, "plugin": section.plugin or "built in", "workload": setup.describe,
            "good_ok": sum(not isinstance(g, BaseException) for g in goods), "good_total": len(goods),
            "good_errors": [repr(g) for g in goods if isinstance(g, BaseException)], "rows": rows}


async def bad_input_table(*, adapters: tuple[str, ...] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Case 6 for every section (or those named in ``adapters``)."""
    sections = [s for s in SECTIONS if adapters is None or s.adapter in adapters]
    return {"params": {"device": device, "batchplex": batchplex.__version__,
                       "numpy": np.__version__, "torch": torch.__version__},
            "sections": [await run_section(section, device) for section in sections]}


# ---------------------------------------------------------------------------------------------- document
def torch_release() -> str:
    """``major.minor`` of the running torch: some messages quote torch's own wording, which changes by release."""
    return ".".join(torch.__version__.split(".")[:2])


def generated_with(document: str) -> dict[str, str]:
    """What the committed document records about the run that produced it (``{"torch": "2.14"}``)."""
    found = _GENERATED.search(document)
    return {"torch": found.group(1)} if found else {}


_HEADER = f"""# Bad input: what each adapter answers

This file is generated by the reliability suite; do not edit it by hand. Regenerate it with

    {REGENERATE}

and `tests/reliability/test_reliability_bad_input.py` fails whenever this file and the code disagree.

Every row below was submitted through a real `Scheduler` with a real small model, in one batch window between two
good requests of the same workload; both good requests succeeded in every section. *Refused at submit* means the
caller's `await submit(...)` raised before anything was queued; *failed in its batch* means the request was queued,
its batch raised, and bisection failed it alone (`RequestFailed`); *accepted* means it ran and got a result.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_section(section: dict[str, Any]) -> str:
    lines = [f"## `{section['adapter']}` ({section['plugin']})", "", section["workload"], "",
             "| input | outcome | error | rule | message |", "|---|---|---|---|---|"]
    for row in section["rows"]:
        lines.append("| " + " | ".join(_cell(row[key]) for key in ("input", "outcome", "error", "rule", "message"))
                     + " |")
    return "\n".join(lines) + "\n"


def render(result: dict[str, Any]) -> str:
    """The whole document from `bad_input_table`'s result (skipped sections are left out)."""
    parts = [f"<!-- generated with torch {torch_release()} -->\n{_HEADER}"]
    parts += [render_section(s) for s in result["sections"] if "skipped" not in s]
    return "\n".join(parts)


def split_sections(document: str) -> dict[str, str]:
    """``{adapter: its section's text}`` of a rendered document (to compare section by section)."""
    sections = {}
    for chunk in document.split("\n## `")[1:]:
        adapter = chunk.split("`", 1)[0]
        sections[adapter] = "## `" + chunk.rstrip("\n") + "\n"
    return sections
