"""What an engine decode step costs outside the model's kernels: the step's wall time, the
step thread's CPU outside the model by phase, and the model's own Python (batch 1/16/64 of
the default model, in this process).

For each batch size, ``--steps`` decode steps of that many running sequences (32-token
random prompts, greedy, ignore_eos), the sizes alternated round by round (``--repeats``):

- the step's wall time, and the step thread's CPU time outside the model's ``forward`` and
  ``compute_logits`` (CPU, not wall: on a loaded machine a pre-emption is not the engine's
  cost), split by phase: ``schedule``, the model runner's batch tensors (its ``execute``
  less the model), ``postprocess``, ``sample``, ``append`` (the token, the stop checks, the
  incremental detokenizer) and ``make_output``. This work is serial: the OpenMP thread has
  nothing to do while the step thread runs it.
- ``--python`` then times the model runner's ``execute`` (batch tensors, forward, logits)
  with every kernel made a no-op (the packed linears return a result computed once, the
  layers' fused C kernels and the paged attention return at once): the step thread's CPU
  for the Python around the kernels, per forward. It changes the engine for good, so it runs last.

``.venv/bin/py-spy record -r 250 -f raw -o FILE -- .venv/bin/python
benchmarks/step_overhead.py --batches 64`` samples the same steps. Recorded, not asserted;
not in CI.

    .venv/bin/python benchmarks/step_overhead.py [--batches 1,16,64] [--steps 30]
        [--repeats 3] [--python 200]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the workers do
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from services.engine.config import EngineConfig  # noqa: E402
from services.engine.layers import cpu_fused, cpu_linear  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402

PROMPT = 32
PHASES = (
    ("schedule", "scheduler", "schedule"),
    ("batch tensors", "runner", "execute"),
    ("postprocess", "scheduler", "postprocess"),
    ("sample", "executor", "sample"),
    ("append", "outputs", "append"),
    ("make_output", "outputs", "make_output"),
)


class Clock:
    """The step thread's CPU inside the model (``model_cpu``) and in each phase less the
    model's CPU inside it (``phases``), summed since the last ``reset``."""

    def __init__(self, engine: LLMEngine) -> None:
        self.model_cpu = 0.0
        self.phases: dict[str, float] = {name: 0.0 for name, _, _ in PHASES}
        model = engine.runner.model
        model.forward = self._timed(model.forward, None)
        model.compute_logits = self._timed(model.compute_logits, None)
        for name, owner, attr in PHASES:
            obj = getattr(engine, owner)
            setattr(obj, attr, self._timed(getattr(obj, attr), name))

    def _timed(self, fn: Callable[..., Any], phase: str | None) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            cpu, model = time.thread_time(), self.model_cpu
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.thread_time() - cpu
                if phase is None:
                    self.model_cpu += took
                else:
                    self.phases[phase] += took - (self.model_cpu - model)

        return run

    def reset(self) -> None:
        self.model_cpu = 0.0
        self.phases = dict.fromkeys(self.phases, 0.0)


def fill(engine: LLMEngine, batch: int, steps: int, rng: random.Random, tag: str) -> None:
    """``batch`` running decodes that last ``steps`` more steps (prefilled here)."""
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=0)
    for i in range(batch):
        prompt = [rng.randrange(100, 40000) for _ in range(PROMPT)]
        engine.add_request(f"{tag}-{i}", prompt, params)
    engine.step()  # the prompts
    engine.step()  # the first decode


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def measure(engine: LLMEngine, clock: Clock, steps: int) -> tuple[list[float], list[float]]:
    """Wall seconds of ``steps`` decode steps, and the step thread's CPU seconds in each
    outside the model."""
    walls: list[float] = []
    outside: list[float] = []
    clock.reset()
    for _ in range(steps):
        t, cpu, model = time.perf_counter(), time.thread_time(), clock.model_cpu
        engine.step()
        walls.append(time.perf_counter() - t)
        outside.append(time.thread_time() - cpu - (clock.model_cpu - model))
    return walls, outside


def python_only(engine: LLMEngine, batch: int, repeats: int) -> float:
    """Step-thread CPU seconds of one ``ModelRunner.execute`` of ``batch`` decodes with every
    kernel a no-op (the engine is unusable afterwards)."""
    results: dict[tuple[int, int], torch.Tensor] = {}
    linear = cpu_linear.OneDNNLinear.__call__

    def cached(self: cpu_linear.OneDNNLinear, x: torch.Tensor) -> torch.Tensor:
        key = (id(self), x.shape[0])
        if key not in results:
            results[key] = linear(self, x)
        return results[key]

    cpu_linear.OneDNNLinear.__call__ = cached  # type: ignore[method-assign]
    ops = cpu_fused.ops()
    if ops is not None:
        for name in ("_norm", "_silu", "_add", "_rotary", "_rotary_store"):  # not the sampler's
            setattr(ops, name, lambda *args: 0)
    path = getattr(engine.runner.model.model, "decode_path", None)
    for layer in path.layers if path is not None else ():
        if layer is not None and layer.kernel is not None:
            layer.kernel.fused = layer.kernel.fn = lambda *args: 0
    engine.runner.model.forward = type(engine.runner.model).forward.__get__(engine.runner.model)
    fill(engine, batch, repeats + 1, random.Random(1), f"python-{batch}")
    sched = engine.scheduler.schedule()
    engine.runner.execute(sched.scheduled, None)
    cpu = time.thread_time()
    for _ in range(repeats):
        engine.runner.execute(sched.scheduled, None)
    return (time.thread_time() - cpu) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per batch and round")
    p.add_argument("--repeats", type=int, default=3, help="rounds (batch sizes alternated)")
    p.add_argument("--python", type=int, default=0, metavar="N",
                   help="then N forwards per batch with the kernels no-ops (0: skip)")  # fmt: skip
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",") if b]
    if not batches or min(batches) < 1 or a.steps < 1 or a.repeats < 1 or a.python < 0:
        p.error("--batches, --steps and --repeats >= 1, --python >= 0")
    engine = LLMEngine(EngineConfig(max_num_seqs=max(64, *batches)))
    clock = Clock(engine)
    rng = random.Random(0)
    fill(engine, 4, 4, rng, "warm")
    drain(engine)
    load = os.getloadavg()[0]
    walls: dict[int, list[float]] = {b: [] for b in batches}
    outs: dict[int, list[float]] = {b: [] for b in batches}
    phases: dict[int, dict[str, list[float]]] = {b: {} for b in batches}
    for r in range(a.repeats):
        for b in batches:
            fill(engine, b, a.steps, rng, f"{b}-{r}")
            w, o = measure(engine, clock, a.steps)
            walls[b] += w
            outs[b] += o
            for name, spent in clock.phases.items():
                phases[b].setdefault(name, []).append(spent / a.steps)
            drain(engine)
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; torch threads "
          f"{torch.get_num_threads()}; {a.steps} decode steps x {a.repeats} rounds a batch")  # fmt: skip
    print("| batch | step wall (median) | step-thread CPU outside the model (median) | a row |")
    print("|---:|---:|---:|---:|")
    for b in batches:
        w, o = statistics.median(walls[b]), statistics.median(outs[b])
        print(f"| {b} | {1e3 * w:.2f} ms | {1e3 * o:.3f} ms | {1e6 * o / b:.0f} us |")
    names = [name for name, _, _ in PHASES]
    print("\nStep-thread CPU a step outside the model, by phase (median of the rounds' means):")
    print("| batch | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for b in batches:
        cells = " | ".join(f"{1e6 * statistics.median(phases[b][n]):.0f} us" for n in names)
        print(f"| {b} | {cells} |")
    if a.python:
        print("\nStep-thread CPU of one ModelRunner.execute with every kernel a no-op:")
        for b in batches:
            print(f"| {b} | {1e3 * python_only(engine, b, a.python):.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
