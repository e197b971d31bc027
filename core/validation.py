"""Held-out validation inside a run: what picks the run's result.

With noisy objectives (a bucket of prompts per round) the best training value ever seen is a
lucky draw, not the best point. When the objective's data stream offers a validation set
(``stream.validation_data() -> (seed, data)``) and the config sets ``validation.every``, the run
evaluates the starting point once (the baseline), then every ``every`` rounds and at the end the
optimiser's recommendation and the incumbent, on the same held-out data with the same fixed seed.
The point with the best validation value is the run's selected result. Validation goes through
the executor like any round, so its values do not depend on the number of workers; its records
(``validation.jsonl``) and the selection are part of the checkpoint, so a resume continues them.
A validation evaluation that fails (after the executor's own retries) is warned about on stderr
and counted (``failures`` in the summary), never silently dropped.
"""
from __future__ import annotations

import warnings
from typing import Any

from .executor import Executor
from .objective import RoundContext, to_loss
from .space import Params, Space, to_jsonable
from .store import RunStore

#: ``RoundContext.round`` of a validation evaluation (not a training round).
VALIDATION_ROUND = -1


class Validator:
    def __init__(self, stream: Any, every: int | None, store: RunStore, direction: str) -> None:
        self.active = (every is not None and stream is not None and hasattr(stream, "validation_data")
                       and getattr(stream, "has_validation", True))
        self.stream, self.every, self.store, self.direction = stream, every, store, direction

    @staticmethod
    def initial_state() -> dict[str, Any]:
        return {"count": 0, "baseline": None, "selected": None}

    def due(self, rounds_done: int, finished: bool) -> bool:
        return self.active and (finished or rounds_done % self.every == 0)  # type: ignore[operator]

    def baseline(self, state: dict[str, Any], executor: Executor, space: Space) -> None:
        """Validate the starting point once, before the first round."""
        if not self.active or state["baseline"] is not None:
            return
        record = self._evaluate(state, executor, [("baseline", space.init_params())], rounds_done=0)[0]
        state["baseline"] = record
        self._consider(state, record)

    def validate(self, state: dict[str, Any], executor: Executor, rounds_done: int, recommendation: Params,
                 incumbent: Params | None) -> None:
        points = [("recommendation", recommendation)]
        if incumbent is not None and to_jsonable(incumbent) != to_jsonable(recommendation):
            points.append(("incumbent", incumbent))
        for record in self._evaluate(state, executor, points, rounds_done):
            self._consider(state, record)

    def _evaluate(self, state: dict[str, Any], executor: Executor, points: list[tuple[str, Params]],
                  rounds_done: int) -> list[dict[str, Any]]:
        seed, data = self.stream.validation_data()
        ctx = RoundContext(round=VALIDATION_ROUND, seed=int(seed), data=data)
        results = executor.evaluate([params for _, params in points], ctx)
        records = []
        for (source, params), result in zip(points, results):
            records.append({"after_round": rounds_done, "source": source, "params": to_jsonable(params),
                            "value": result.value, "metrics": result.metrics, "status": result.status,
                            "seed": int(seed), **({"error": result.error} if result.error else {})})
        self.store.append_validation(records)
        state["count"] += len(records)
        for record in records:  # never silent: a failed validation cannot be selected
            if record["status"] != "ok":
                state["failures"] = state.get("failures", 0) + 1
                warnings.warn(f"calibri: validation of the {record['source']} after round {rounds_done} failed: "
                              f"{record.get('error')}", RuntimeWarning, stacklevel=3)
        return records

    def _consider(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        if record["value"] is None:
            return
        selected = state["selected"]
        if selected is None or to_loss(record["value"], self.direction) < to_loss(selected["value"], self.direction):
            state["selected"] = record

    @staticmethod
    def summary(state: dict[str, Any]) -> dict[str, Any] | None:
        """What best.json shows: the baseline's and the selected point's validation values."""
        if state["baseline"] is None and state["selected"] is None:
            return None
        baseline, selected = state["baseline"], state["selected"]
        failures = state.get("failures", 0)
        return {"evaluations": state["count"], **({"failures": failures} if failures else {}),
                "baseline": None if baseline is None else baseline["value"],
                "selected": None if selected is None else {k: selected[k] for k in ("value", "source", "after_round",
                                                                                    "params")}}
