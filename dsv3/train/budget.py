"""A training run sized to a wall-clock budget: how many steps fit, corrected as the real pace shows.

The budget covers the whole run, from the start of the process to the last sample: data preparation,
the steps, their evaluations and checkpoints, and the end (final evaluation, save, samples). A few timed
passes give the first step count; every `REPLAN_EVERY` steps during the first half of the run the count
is corrected from the measured pace (there the learning rate is the constant peak whatever the count,
so the change bends nothing that has already happened); and if other work slows the machine so much that
the end would not fit, the run stops early. A budgeted run is therefore not repeatable step for step:
pass max_steps for that.

The clock is an argument, so the arithmetic can be tested without waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

END_RESERVE_S = 20.0  # kept free of steps for the final save and the samples
REPLAN_EVERY = 10  # steps between re-sizings
REPLAN_UNTIL = 0.5  # re-size only before this fraction of the run: well inside the constant learning rate


class TimeBudget:
    def __init__(self, minutes: float, started: float, clock: Callable[[], float] = time.perf_counter):
        self.deadline = started + minutes * 60
        self.clock = clock
        self.end_eval = 0.0  # what the final evaluation costs at the probe's pace (END_RESERVE_S covers the rest)
        self.probe_step_s = 0.0
        self.since, self.first_step = started, 0  # where the measured pace starts

    def plan(self, step_s: float, eval_s: float, eval_every: int) -> int:
        """The steps that fit, from the probe's seconds per step and per evaluation (evaluations come every
        eval_every steps; one more and the end reserve at the end)."""
        self.probe_step_s, self.end_eval = step_s, eval_s
        left = self.deadline - self.end_cost(1.0) - self.clock()
        return max(1, int(left / (step_s + eval_s / eval_every)))

    def start(self, step: int) -> None:
        """The loop begins at `step`: the pace is measured from here."""
        self.since, self.first_step = self.clock(), step

    def replan(self, step: int, max_steps: int, warmup: int, last_step_s: float) -> int | None:
        """A new step count when the measured pace (wall time per step since `start`, evaluations and
        checkpoints included) moves it by more than 5%; None to keep it. Only after the warm-up and before
        half of the run."""
        if step % REPLAN_EVERY or step <= warmup or step >= REPLAN_UNTIL * max_steps or step <= self.first_step:
            return None
        now = self.clock()
        per_step = (now - self.since) / (step - self.first_step)
        left = self.deadline - self.end_cost(self.slowdown(last_step_s)) - now
        steps = max(step + int(left / per_step), math.ceil(step / REPLAN_UNTIL))
        return steps if abs(steps - max_steps) > 0.05 * max_steps else None

    def end_cost(self, slowdown: float) -> float:
        """Seconds to keep for the end: the final evaluation at the current pace, and the fixed reserve."""
        return self.end_eval * slowdown + END_RESERVE_S

    def slowdown(self, last_step_s: float) -> float:
        """How much slower the last step ran than the probe's: the end will be slowed alike when other work
        has taken the machine's cores."""
        return max(1.0, last_step_s / self.probe_step_s) if self.probe_step_s else 1.0

    def out_of_time(self, last_step_s: float) -> bool:
        """Stop once what is left only covers the end of the run at the current pace."""
        return self.clock() + self.end_cost(self.slowdown(last_step_s)) + last_step_s > self.deadline
