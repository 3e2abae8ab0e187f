"""The closed loop: a batched, family-agnostic sampling run with step-wise prompt refinement.

``rollout`` drives any :class:`~promptloop.backbones.base.Backbone` through its contract only (encode, prepare,
step, decode, noise level, token counting). Decision semantics come from
:mod:`promptloop.backbones.schedule`: a prompt that takes effect at step ``i`` is written while looking at the x0
estimate of step ``i - 1``, so refinements cost no extra denoiser evaluation. With ``feedback_delay = d > 0``
(pipelined feedback) the prompt that takes effect at step ``i`` is written from the x0 estimate of step
``i - 1 - d`` while the sampler runs steps ``i - d .. i - 1`` with the prompts in force, the policy call overlapping
them in a worker thread. A schedule's initial rewrite (step 0) is written before any x0 estimate exists: its
observation has no preview.

Steps are solver steps (``num_inference_steps`` of them): a second-order scheduler's step (Heun: predictor and
corrector) runs with one prompt, and its x0 estimate is that of its last denoiser evaluation.

Text budget convention: a prompt fits when ``backbone.count_tokens(prompt) <= backbone.text_budget``; longer
prompts are cut at the last word boundary that fits and flagged in ``Trajectory.truncated``.
"""
from __future__ import annotations

import contextlib
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .base import Backbone, PromptEmbeds, SamplerState
from .preview import to_pil
from .schedule import RefinementSchedule
from .types import Observation, PhaseTimes, RefineFn, RolloutOutput, SamplerSettings, Trajectory, negative_prompt_rows


def rollout(
    backbone: Backbone,
    queries: Sequence[str],
    seeds: Sequence[int],
    settings: Optional[SamplerSettings] = None,
    schedule: RefinementSchedule | Sequence[RefinementSchedule] | None = None,
    refine: Optional[RefineFn] = None,
    prompts: Optional[Sequence[Sequence[str]]] = None,
    initial_prompts: Optional[Sequence[str]] = None,
    feedback_delay: int = 0,
    progress: bool = False,
) -> RolloutOutput:
    """Sample one image per query, letting ``refine`` rewrite the prompt at each row's decision steps.

    Args:
        backbone: the frozen pipeline adapter.
        queries: B non-empty user queries (kept in the trajectory; rewards are scored against them).
        seeds: B ints; row i draws its noise from its own generator seeded with ``seeds[i]``, so row i of a batch
            equals a single-row rollout with that seed and schedule.
        settings: sampler settings shared by all rows (default ``SamplerSettings()``).
        schedule: one :class:`RefinementSchedule` for every row, or one per row (training draws a random one per
            trajectory). Default: no refinement.
        refine: feedback mode. Called once per decision step with the observations of every row that decides
            there (x0 preview included) and must return one ``str`` per observation. It runs in the caller's grad
            mode; everything else runs under ``torch.no_grad``.
        prompts: a-priori mode. For each row, its N_R + 1 prompts up front (initial, then one per decision step).
            The sampler runs uninterrupted: no previews are decoded and nothing is called back.
        initial_prompts: feedback mode only: the prompt in force before the first decision (default: the query).
        feedback_delay: feedback mode only: pipelined feedback. A prompt taking effect at step ``i`` is written
            from the preview of step ``max(i - 1 - d, 0)`` and ``refine`` runs in a worker thread (on CUDA, on its
            own stream) while the sampler goes on with the prompts in force. 0 (default) is the synchronous loop.
            Each row's decision steps must be more than ``d`` apart, so a row never has two rewrites in flight.
        progress: show a tqdm progress bar over sampler steps.

    Raises:
        TypeError/ValueError: invalid inputs (checked before any model work) or an invalid ``refine`` answer.
        FloatingPointError: NaN/inf latents, naming the sampler step that produced them.
    """
    settings = settings if settings is not None else SamplerSettings()
    plan = _plan(queries, seeds, settings, schedule, refine, prompts, initial_prompts, feedback_delay)
    caller_grad = torch.is_grad_enabled()
    with torch.no_grad():
        return _run(backbone, plan, settings, refine, caller_grad, progress)


@dataclass
class _Plan:
    """Validated inputs of a rollout."""

    queries: list[str]
    seeds: list[int]
    schedules: list[RefinementSchedule]
    initial_prompts: list[str]
    apriori_prompts: Optional[list[list[str]]]
    feedback_delay: int = 0


@dataclass
class _Row:
    """Book-keeping of one row while sampling."""

    decision_steps: list[int]
    prompts: list[str]
    raw_prompts: list[str]
    truncated: list[bool]
    previews: list = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    step_prompt_index: list[int] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)


def _plan(queries, seeds, settings, schedule, refine, prompts, initial_prompts, feedback_delay=0) -> _Plan:
    queries = _check_strings("queries", queries, allow_empty=False)
    batch = len(queries)
    if batch == 0:
        raise ValueError("rollout needs at least one query, got an empty list.")
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a list of {batch} ints (one per query), got {type(seeds).__name__}.")
    seeds = list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"seeds has {len(seeds)} entries but there are {batch} queries; give one seed per query.")
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool)]
    if bad:
        raise TypeError(f"seeds must be ints, got {bad!r}.")
    if not isinstance(settings, SamplerSettings):
        raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}.")
    negative_prompt_rows(settings.negative_prompt, batch)  # raises on a bad negative prompt before any model work

    if schedule is None:
        schedule = RefinementSchedule.none()
    schedules = [schedule] * batch if isinstance(schedule, RefinementSchedule) else list(schedule)
    if len(schedules) != batch or not all(isinstance(s, RefinementSchedule) for s in schedules):
        raise TypeError(
            f"schedule must be a RefinementSchedule or a list of {batch} of them (one per query), got {schedule!r}."
        )
    for s in schedules:  # checks N_R and explicit steps against the number of steps before any model work
        s.steps(settings.num_inference_steps)

    if refine is not None and prompts is not None:
        raise ValueError("Give either `refine` (feedback mode) or `prompts` (a-priori mode), not both.")
    if refine is not None and not callable(refine):
        raise TypeError(f"refine must be callable (observations -> prompts), got {type(refine).__name__}.")
    if prompts is None and refine is None and any(s.num_decisions for s in schedules):
        raise ValueError(
            "The schedule has refinements but neither `refine` (feedback mode) nor `prompts` (a-priori mode) "
            "was given; pass one, or use RefinementSchedule.none()."
        )
    apriori = None
    if prompts is not None:
        if initial_prompts is not None:
            raise ValueError("In a-priori mode the initial prompt is prompts[i][0]; do not pass initial_prompts.")
        if isinstance(prompts, str) or len(prompts) != batch:
            raise ValueError(f"prompts must hold one list of prompts per query ({batch} lists).")
        apriori = []
        for i, (row_prompts, s) in enumerate(zip(prompts, schedules)):
            row_prompts = _check_strings(f"prompts[{i}]", row_prompts, allow_empty=True)
            if len(row_prompts) != s.num_decisions + 1:
                raise ValueError(
                    f"prompts[{i}] has {len(row_prompts)} prompts but row {i}'s schedule has {s.num_decisions} "
                    f"decisions: give {s.num_decisions + 1} (the initial prompt, then one per decision step)."
                )
            apriori.append(row_prompts)
        initial = [p[0] for p in apriori]
    elif initial_prompts is not None:
        initial = _check_strings("initial_prompts", initial_prompts, allow_empty=True)
        if len(initial) != batch:
            raise ValueError(f"initial_prompts has {len(initial)} entries but there are {batch} queries.")
    else:
        initial = list(queries)
    check_feedback_delay(feedback_delay, schedules, settings.num_inference_steps, pipelined=refine is not None)
    return _Plan(queries, seeds, schedules, initial, apriori, feedback_delay)


def check_feedback_delay(delay, schedules: Sequence[RefinementSchedule], num_steps: int,
                         pipelined: bool = True) -> None:
    """ValueError unless ``delay`` is a valid ``feedback_delay`` for these schedules (each row's decision steps more
    than ``delay`` apart) at ``num_steps`` sampler steps; ``pipelined`` False: only 0 is valid (no ``refine``)."""
    if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
        raise ValueError(f"feedback_delay must be an int >= 0, got {delay!r}.")
    if delay == 0:
        return
    if not pipelined:
        raise ValueError("feedback_delay applies to feedback mode (`refine`) only; a-priori prompts and plain "
                         "sampling have no policy call to overlap. Leave it at 0.")
    for row, s in enumerate(schedules):
        steps = s.steps(num_steps)
        close = [(a, b) for a, b in zip(steps, steps[1:]) if b - a <= delay]
        if close:
            raise ValueError(
                f"feedback_delay={delay} needs each row's decision steps more than {delay} apart, but row {row} "
                f"decides at steps {steps} (too close: {close}). Use fewer refinements, more sampling steps or a "
                "smaller delay.")


def _check_strings(name: str, values, allow_empty: bool) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}.")
    values = list(values)
    not_str = [(i, type(v).__name__) for i, v in enumerate(values) if not isinstance(v, str)]
    if not_str:
        raise TypeError(f"{name} must contain only str; entries (index, type) {not_str} are not strings.")
    not_unicode = [i for i, v in enumerate(values) if any("\ud800" <= c <= "\udfff" for c in v)]
    if not_unicode:
        raise ValueError(f"{name} entries {not_unicode} hold lone surrogates (bytes that were not valid UTF-8); "
                         "decode the text with errors='replace' or fix its encoding.")
    if not allow_empty:
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty:
            raise ValueError(f"{name} entries {empty} are empty; every query needs some text.")
    return values


class _EncodingCache:
    """Per-rollout cache prompt -> one-row embedding; missing prompts are encoded together in one call."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.rows: dict[str, PromptEmbeds] = {}

    def embeds(self, prompts: list[str]) -> PromptEmbeds:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            encoded = self.backbone.encode_prompts(missing)
            if len(encoded) != len(missing):
                raise ValueError(
                    f"{type(self.backbone).__name__}.encode_prompts returned {len(encoded)} rows for "
                    f"{len(missing)} prompts."
                )
            for j, p in enumerate(missing):
                self.rows[p] = encoded.select([j])
        return PromptEmbeds.cat([self.rows[p] for p in prompts])


def fit_prompt(backbone: Backbone, prompt: str) -> tuple[str, bool]:
    """Cut ``prompt`` at the last word boundary that fits ``backbone.text_budget``; returns (prompt, truncated).

    A single word longer than the budget is cut at the last fitting character.
    """
    budget = backbone.text_budget
    if backbone.count_tokens(prompt) <= budget:
        return prompt, False
    word_ends = [m.end() for m in re.finditer(r"\S+", prompt)]
    fits = lambda end: backbone.count_tokens(prompt[:end]) <= budget  # noqa: E731
    k = _last_true(len(word_ends), lambda j: fits(word_ends[j]))
    if k >= 0:
        return prompt[: word_ends[k]], True
    first_word = prompt.lstrip()
    offset = len(prompt) - len(first_word)
    c = _last_true(word_ends[0] - offset, lambda j: fits(offset + j + 1))
    return prompt[: offset + c + 1], True


def _last_true(n: int, pred) -> int:
    """Largest j in [0, n) with pred(j), for pred monotone (True then False); -1 if none."""
    lo, hi = 0, n  # invariant: pred true below lo, false from hi on
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


def _check_answer(answer, n: int) -> list[str]:
    if isinstance(answer, str) or not isinstance(answer, Sequence):
        raise TypeError(
            f"refine must return a list of {n} str (one per observation), got {type(answer).__name__}."
        )
    answer = list(answer)
    if len(answer) != n:
        raise ValueError(f"refine returned {len(answer)} prompts for {n} observations; return exactly one each.")
    not_str = [(i, type(v).__name__) for i, v in enumerate(answer) if not isinstance(v, str)]
    if not_str:
        raise TypeError(f"refine must return str prompts; entries (index, type) {not_str} are not strings.")
    return answer


class _Timer:
    """Accumulates wall-clock seconds per phase; synchronises the CUDA stream so that GPU work is counted."""

    def __init__(self, device: torch.device):
        self.total = PhaseTimes()
        device = torch.device(device)
        # the caller's stream only: a pipelined policy call runs on its own stream and must not be waited for
        cuda = device.type == "cuda"
        self.sync = (lambda: torch.cuda.current_stream(device).synchronize()) if cuda else (lambda: None)

    @contextlib.contextmanager
    def phase(self, name: str, rows: Sequence[_Row]) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.add(name, rows, time.perf_counter() - start)

    def add(self, name: str, rows: Sequence[_Row], elapsed: float) -> None:
        setattr(self.total, name, getattr(self.total, name) + elapsed)
        for row in rows:
            setattr(row.times, name, getattr(row.times, name) + elapsed)


def _run(backbone: Backbone, plan: _Plan, settings: SamplerSettings, refine, caller_grad: bool, progress: bool):
    batch = len(plan.queries)
    timer = _Timer(backbone.device)
    cache = _EncodingCache(backbone)
    rows = []
    for i in range(batch):
        fitted, cut = fit_prompt(backbone, plan.initial_prompts[i])
        rows.append(_Row(decision_steps=[], prompts=[fitted], raw_prompts=[plan.initial_prompts[i]], truncated=[cut]))

    generators = [torch.Generator("cpu").manual_seed(s) for s in plan.seeds]
    with timer.phase("denoise", rows):
        state = backbone.prepare(settings, generators)
    num_steps = state.num_solver_steps
    for row, s in zip(rows, plan.schedules):
        row.decision_steps = s.steps(num_steps)
        row.timesteps = [float(state.timesteps[state.step_starts[k]]) for k in row.decision_steps]
    deciding_at: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        for k in row.decision_steps:
            deciding_at.setdefault(k, []).append(i)

    with timer.phase("encode", rows):
        embeds = cache.embeds([r.prompts[-1] for r in rows])
    x0 = None
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="rollout", total=num_steps)
    pipelined = _Pipeline(plan.feedback_delay, deciding_at, backbone.device) if plan.feedback_delay else None
    with pipelined or contextlib.nullcontext():
        for step in steps:
            if pipelined is not None:
                for k, rows_k in pipelined.submissions(step):
                    observations = _observe(backbone, plan, rows, rows_k, state, step, k, x0, settings, timer)
                    pipelined.submit(k, rows_k, observations, refine, caller_grad, [rows[i] for i in rows_k])
                deciding, new_prompts = pipelined.due(step, timer)
            else:
                deciding = deciding_at.get(step, [])
                new_prompts = []
                if deciding and plan.apriori_prompts is None:
                    observations = _observe(backbone, plan, rows, deciding, state, step, step, x0, settings, timer)
                    with timer.phase("refine", [rows[i] for i in deciding]), torch.set_grad_enabled(caller_grad):
                        new_prompts = _check_answer(refine(observations), len(observations))
                elif deciding:
                    new_prompts = [plan.apriori_prompts[i][len(rows[i].prompts)] for i in deciding]
                    for i in deciding:
                        rows[i].previews.append(None)
            if deciding:
                for i, raw in zip(deciding, new_prompts):
                    fitted, cut = fit_prompt(backbone, raw)
                    rows[i].prompts.append(fitted)
                    rows[i].raw_prompts.append(raw)
                    rows[i].truncated.append(cut)
                with timer.phase("encode", [rows[i] for i in deciding]):
                    embeds = cache.embeds([r.prompts[-1] for r in rows])
            for row in rows:
                row.step_prompt_index.append(len(row.prompts) - 1)
            with timer.phase("denoise", rows):
                for evaluation in state.evaluations(step):
                    result = backbone.step(state, evaluation, embeds)
            state.latents = result.latents
            if not torch.isfinite(result.latents).all():
                bad_rows = [i for i in range(batch) if not torch.isfinite(result.latents[i]).all()]
                raise FloatingPointError(
                    f"Non-finite latents (NaN/inf) after sampler step {step} of {num_steps} "
                    f"(timestep {float(state.timesteps[state.step_starts[step]])}) in rows {bad_rows}; check the "
                    "model dtype (e.g. an fp16 VAE/UNet overflow), the scheduler and the guidance scale."
                )
            x0 = result.x0

    with timer.phase("decode", rows):
        images = backbone.decode(state.latents, generators=generators)  # the pipeline decodes with its generators
    trajectories = [
        Trajectory(
            query=plan.queries[i], seed=plan.seeds[i], num_steps=num_steps, decision_steps=r.decision_steps,
            timesteps=r.timesteps, prompts=r.prompts, raw_prompts=r.raw_prompts, truncated=r.truncated,
            previews=r.previews, step_prompt_index=r.step_prompt_index, times=r.times,
        )
        for i, r in enumerate(rows)
    ]
    return RolloutOutput(images=images, trajectories=trajectories, times=timer.total)


def _observe(backbone, plan, rows, deciding, state: SamplerState, step, effective_step, x0, settings, timer):
    """Decode the previews of the deciding rows (x0 of the latest completed step, before ``step``) into their
    observations, for prompts that take effect at ``effective_step`` (its timestep and noise level). Before the first
    step (``x0`` None) there is no preview. A sampling decoder draws from a fresh generator seeded with the row's
    seed, so previews are reproducible and leave the rows' generators to the final decode."""
    deciding_rows = [rows[i] for i in deciding]
    if x0 is None:
        previews = [None] * len(deciding)
    else:
        generators = [torch.Generator("cpu").manual_seed(plan.seeds[i]) for i in deciding]
        with timer.phase("preview", deciding_rows):
            previews = to_pil(backbone.decode(x0[deciding], size=settings.preview_size, preview=True,
                                              generators=generators))
    start = state.step_starts[effective_step]
    noise = backbone.noise_level(state, start)
    observations = []
    for i, preview in zip(deciding, previews):
        row = rows[i]
        row.previews.append(preview)
        k = len(row.prompts) - 1
        observations.append(Observation(
            row=i, query=plan.queries[i], prompt=row.prompts[-1], history=list(row.prompts), preview=preview,
            step=effective_step, num_steps=state.num_solver_steps, refinement_index=k,
            num_refinements=len(row.decision_steps), noise_level=noise,
            metadata={"seed": plan.seeds[i], "timestep": float(state.timesteps[start]), "preview_step": step - 1},
        ))
    return observations


class _Pipeline:
    """Pipelined feedback: the rewrites taking effect at step ``k`` are requested at step ``max(k - delay, 1)``
    (from the x0 of the step before) and computed in one worker thread while the sampler goes on; an initial rewrite
    (step 0) has nothing to overlap and is awaited at once. One call is in flight at a time, in schedule order, so
    the policy sees the same sequence of calls as the synchronous loop."""

    def __init__(self, delay: int, deciding_at: dict[int, list[int]], device):
        self.requests: dict[int, list[tuple[int, list[int]]]] = {}
        for k in sorted(deciding_at):
            self.requests.setdefault(min(k, max(k - delay, 1)), []).append((k, deciding_at[k]))
        self.pending: dict[int, tuple[list[int], Future]] = {}
        self.cuda = torch.device(device).type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptloop-refine")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)  # never leave a policy call running after the rollout returns or raises
        return False

    def submissions(self, step: int) -> list[tuple[int, list[int]]]:
        """(effective step, rows) of the rewrites to request before denoising ``step``."""
        return self.requests.get(step, [])

    def submit(self, k, deciding, observations, refine, caller_grad, deciding_rows) -> None:
        def call():
            # timed here, not by the rollout's timer: its CUDA synchronisation would stall the sampler's stream
            start = time.perf_counter()
            stream = torch.cuda.Stream() if self.cuda else None
            with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), \
                    torch.set_grad_enabled(caller_grad):
                answer = refine(observations)
            if stream is not None:
                stream.synchronize()
            return _check_answer(answer, len(observations)), time.perf_counter() - start

        self.pending[k] = (deciding, deciding_rows, self.pool.submit(call))

    def due(self, step: int, timer: "_Timer") -> tuple[list[int], list[str]]:
        """Rows and prompts taking effect at ``step`` (waits for their call if it is still running); the call's
        wall time is counted as the rows' ``refine`` phase, though it overlapped the sampler."""
        if step not in self.pending:
            return [], []
        deciding, deciding_rows, future = self.pending.pop(step)
        prompts, elapsed = future.result()
        timer.add("refine", deciding_rows, elapsed)
        return deciding, prompts
