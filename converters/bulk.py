"""Bulk conversion: every student converted, verified, then published atomically; failures
are recorded and skipped, never fatal to the batch."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from converters.convert import convert_student, stale_reason
from converters.student import StudentSource, discover
from kdd_jax.io import atomic_write_json, save_converted

# Input problems we report per student and move past. Anything else is a bug and propagates.
EXPECTED_ERRORS = (ValueError, OSError, MemoryError)  # ConversionError, CheckpointError, ConfigError are ValueErrors;
# MemoryError: one student too large for this machine must not take the rest of the batch down


@dataclasses.dataclass
class Outcome:
    name: str
    source: str
    status: str  # "ok" | "failed" | "skipped" (already converted, up to date: `output` holds it)
    output: str | None = None
    error: str | None = None
    family: str | None = None
    parameters: int | None = None
    inferred: list[str] = dataclasses.field(default_factory=list)
    verification: dict | None = None
    seconds: float = 0.0


def convert_many(
    sources: list[str | Path],
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    verify: bool = True,
    allow_pickle: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int, int, StudentSource], None] | None = None,
) -> Iterator[Outcome]:
    """Yield one Outcome per student found in `sources`, converted into `out_dir/<name>`.

    With `verify`, a student whose Flax outputs or input-gradients disagree with the PyTorch
    reference is reported failed and NOT written. Raises (ConversionError) only when a source
    path is missing or holds no student at all.
    """
    students = discover(sources)
    out_dir = Path(out_dir)
    for i, src in enumerate(students):
        if on_start is not None:
            on_start(i, len(students), src)
        target = out_dir / src.name
        # Second guard (names are sanitised in discover): never write anywhere but directly under out_dir.
        if target.resolve().parent != out_dir.resolve():
            yield Outcome(name=src.name, source=str(src.weights), status="failed",
                          error=f"{src.weights}: output name {src.name!r} would escape {out_dir}")
            continue
        yield _convert_one(src, target, config, verify, allow_pickle, overwrite)


def _convert_one(src, target, config, verify, allow_pickle, overwrite) -> Outcome:
    t0 = time.perf_counter()
    outcome = Outcome(name=src.name, source=str(src.weights), status="failed")
    try:
        if target.exists() and not overwrite:
            why, earlier = stale_reason(src, target, config=config, allow_pickle=allow_pickle, verify=verify)
            if why is None:  # a rerun of an interrupted or finished batch: nothing to redo
                outcome.status, outcome.output = "skipped", str(target)
                outcome.family, outcome.parameters = earlier.get("family"), earlier.get("parameters")
                outcome.inferred = earlier.get("inferred") or []
                verification = earlier.get("verification")
                outcome.verification = None if not verification or verification.get("skipped") else verification
                outcome.seconds = time.perf_counter() - t0
                return outcome
            raise FileExistsError(f"{target} already exists and {why} (use --overwrite to replace it)")
        result = convert_student(src, config=config, allow_pickle=allow_pickle)
        outcome.family = result.config.family
        outcome.parameters = result.report["parameters"]
        outcome.inferred = result.report["inferred"]
        if verify:
            from converters.verify import verify_conversion

            outcome.verification = verify_conversion(result)
            result.report["verification"] = outcome.verification
            if not outcome.verification["ok"]:
                v = outcome.verification
                a = v.get("float64_arbiter")
                arb = "" if a is None else (
                    f"; re-run in float64 on the {len(a['probes'])} probe(s) whose float32 gradient failed, still "
                    f"apart: logit {a['max_logit_diff']:.3g}, gradient {a['max_input_grad_rel_l2']:.3g} relative")
                raise ValueError(
                    f"{src.weights}: verification against PyTorch failed (max logit diff "
                    f"{v['max_abs_logit_diff']:.3g}, input-grad relative L2 error {v['input_grad_rel_l2']:.3g}{arb}); "
                    "not written"
                )
        else:
            result.report["verification"] = {"skipped": True}
        save_converted(target, result.model, result.config, result.report, overwrite=overwrite)
        outcome.status, outcome.output = "ok", str(target)
    except EXPECTED_ERRORS as e:
        outcome.error = str(e)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def write_summary(path: str | Path, outcomes: list[Outcome]) -> None:
    atomic_write_json(path, {"students": [dataclasses.asdict(o) for o in outcomes]})
