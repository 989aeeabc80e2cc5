"""The validation report: one frozen dataclass tree, written as JSON and printed as a table.

``MachineInfo`` (where a measurement ran) is shared with ``echoembed bench``'s report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoembed.errors import InputError

REPORT_SCHEMA = 1


@dataclass(frozen=True)
class MachineInfo:
    """Where a measurement ran: platform, CPU, Python, ONNX Runtime (and its providers)."""

    platform: str
    processor: str
    cpu_model: str | None  # /proc/cpuinfo "model name"; None where unknown (and in old reports)
    int8_u8s8_saturates: bool | None  # no VNNI: INT8 artifacts need 7-bit weights
    cpu_count: int | None
    python: str
    onnxruntime: str
    cpu_id: str | None = None  # vendor, family, model, kernel flags (``runtime.cpu.cpu_id``)
    providers: tuple[str, ...] | None = None  # the artifact session's; omitted from JSON when None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (the keys reports have always had; ``providers`` only when known)."""
        data = dataclasses.asdict(self)
        if self.providers is None:
            del data["providers"]
        else:
            data["providers"] = list(self.providers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MachineInfo:
        """Read ``to_dict``'s object back; reports written before ``cpu_model``,
        ``int8_u8s8_saturates`` and ``cpu_id`` existed read as None there. Unknown keys raise
        TypeError."""
        d = {"cpu_model": None, "int8_u8s8_saturates": None, "cpu_id": None, **data}
        if d.get("providers") is not None:
            d["providers"] = tuple(d["providers"])
        return cls(**d)


def describe_machine(m: MachineInfo) -> str:
    """One line naming where a report was measured (every published figure names its CPU)."""
    cpu = m.cpu_model or m.processor
    if m.cpu_id:
        cpu += f" ({m.cpu_id})"
    cores = "" if m.cpu_count is None else f", {m.cpu_count} cores"
    return f"CPU: {cpu}{cores}; onnxruntime {m.onnxruntime}, Python {m.python}"


def machine_info(providers: Sequence[str] | None = None) -> MachineInfo:
    """This machine, now (imports onnxruntime for its version)."""
    import onnxruntime as ort

    from echoembed.runtime.cpu import cpu_id, cpu_model, u8s8_saturates

    return MachineInfo(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_model=cpu_model(),
        int8_u8s8_saturates=u8s8_saturates(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        cpu_id=cpu_id(),
        providers=None if providers is None else tuple(providers),
    )


@dataclass(frozen=True)
class Agreement:
    """Per-text cosine between the artifact and the reference, same template, same texts."""

    texts: int
    mean: float
    min: float
    p1: float  # 1st percentile


@dataclass(frozen=True)
class TaskScore:
    """One task metric (x100) for the artifact, the reference and the classical template."""

    task: str  # sts | retrieval | classification
    dataset: str
    metric: str  # spearman | ndcg@10 | recall@100 | accuracy
    templates: str  # echo templates used, e.g. "echo" or "query/document"
    examples: int  # pairs, queries or test texts
    artifact: float
    reference: float | None  # PyTorch fp32 reference, same templates
    classical: float | None  # the artifact with the classical template (mean pooling)
    subset: str  # how the data was cut (limit, distractors, splits)

    @property
    def drop(self) -> float | None:
        """Points the artifact is below the reference (negative: above)."""
        return None if self.reference is None else self.reference - self.artifact


@dataclass(frozen=True)
class Latency:
    runner: str  # "artifact" | "reference"
    batch1_p50_ms: float
    batch1_p95_ms: float
    batch1_texts: int
    texts_per_s: float  # at batch_size, median of repeats
    batch_size: int
    throughput_texts: int


@dataclass(frozen=True)
class Budget:
    max_drop: float  # points, on every task metric
    worst_drop: float
    worst: str  # which metric
    passed: bool


@dataclass(frozen=True)
class ValidationReport:
    artifact: str
    precision: str
    model_sha256: str
    reference: str | None
    created: str
    seconds: float
    machine: MachineInfo
    agreement: Agreement | None
    scores: tuple[TaskScore, ...]
    latency: tuple[Latency, ...]
    budget: Budget | None
    schema: int = REPORT_SCHEMA

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["machine"] = self.machine.to_dict()
        for s, obj in zip(data["scores"], self.scores, strict=True):
            s["drop"] = obj.drop
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "report") -> ValidationReport:
        """Parse and check a report written by ``to_json`` (unknown or missing fields fail)."""
        try:
            data = json.loads(text)
            if data.get("schema") != REPORT_SCHEMA:
                raise InputError(
                    f"{where}: report schema {data.get('schema')!r}, this echoembed reads "
                    f"{REPORT_SCHEMA}"
                )
            scores = []
            for s in data.pop("scores"):
                s.pop("drop", None)
                scores.append(TaskScore(**s))
            agreement = data.pop("agreement")
            budget = data.pop("budget")
            return cls(
                machine=MachineInfo.from_dict(data.pop("machine")),
                scores=tuple(scores),
                latency=tuple(Latency(**x) for x in data.pop("latency")),
                agreement=None if agreement is None else Agreement(**agreement),
                budget=None if budget is None else Budget(**budget),
                **data,
            )
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise InputError(f"{where}: not a valid echoembed validation report ({e})") from e


def read_report(path: str | os.PathLike[str]) -> ValidationReport:
    p = Path(path)
    return ValidationReport.from_json(p.read_text(encoding="utf-8"), where=str(p))


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(report: ValidationReport) -> str:
    """Markdown tables: agreement, task scores side by side, latency, budget."""
    lines = [
        f"artifact {report.artifact} ({report.precision}); reference {report.reference}",
        describe_machine(report.machine),
    ]
    a = report.agreement
    if a is not None:
        lines.append(
            f"agreement with the reference over {a.texts} texts: cosine mean {a.mean:.5f}, "
            f"min {a.min:.5f}, p1 {a.p1:.5f}"
        )
    lines += [
        "",
        "| task | data | metric | templates | n | artifact | reference | drop | classical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.scores:
        lines.append(
            f"| {s.task} | {s.dataset} | {s.metric} | {s.templates} | {s.examples} | "
            f"{_f(s.artifact)} | {_f(s.reference)} | {_f(s.drop)} | {_f(s.classical)} |"
        )
    subsets = dict.fromkeys(f"{s.task}: {s.subset}" for s in report.scores)
    lines += [""] + [f"- {x}" for x in subsets]
    if report.latency:
        lines += [
            "",
            "| runner | batch-1 p50 ms | batch-1 p95 ms | texts/s | batch |",
            "|---|---|---|---|---|",
        ]
        for x in report.latency:
            lines.append(
                f"| {x.runner} | {x.batch1_p50_ms:.1f} | {x.batch1_p95_ms:.1f} | "
                f"{x.texts_per_s:.1f} | {x.batch_size} |"
            )
    b = report.budget
    if b is not None:
        verdict = "PASS" if b.passed else "FAIL"
        lines += [
            "",
            f"budget: {verdict}: worst drop {b.worst_drop:.2f} points ({b.worst}), allowed "
            f"{b.max_drop:.2f}",
        ]
    return "\n".join(lines)
