"""Growth detection: is a metric rising by a steady amount per step?

The test is psutil's ``TestMemoryLeak`` idea (warm up, repeat the workload
many times, compare, retry with more repetitions when the answer is
unclear) with CPython's ``regrtest -R`` rule (a leak makes *every*
repetition grow) and a regression on top:

1. Warm-up. The first ``warmup`` steps (or points) are thrown away: caches,
   lazy imports, thread pools and free lists fill up there.
2. Batches. The rest is cut into ``batches`` consecutive batches, giving
   ``batches + 1`` boundary points (in-process: a measurement after a
   ``gc.collect()`` at each boundary).
3. Slope. An ordinary least-squares line through all points (value against
   step, or against seconds for sampled series) gives the growth per step,
   its standard error ``se`` and ``r2``; ``t = (slope - tolerance) / se``.
4. Verdict.

   * ``clean``  if slope <= tolerance;
   * ``noisy``  if some batch did not grow by more than
     ``max(tolerance * batch_steps, granularity)``; or the later half of
     the batches grew at under a quarter of the rate of the first half (a
     warm-up dying down, typical of a process importing torch); or ``t < 3``;
   * ``leak``   otherwise: every batch grew, steadily, and the slope is more
     than three standard errors above the tolerance.

   ``granularity`` is one page (4096 bytes) for byte metrics, since USS
   moves in pages, and 0 for counts. The every-batch rule is what rejects
   allocator noise: the allocator grows in jumps (a new arena, a resized
   dict, a page touched once) and then stays flat or shrinks, so a jump
   gives a slope but not five growing batches. The t rule rejects a noisy
   series whose batch boundaries happen to rise.
5. Retry. :func:`measure_growth` re-measures with twice as many steps per
   batch while any metric is ``noisy`` (``retries`` times). A leak scales
   with the batch size and turns into ``leak``; a one-off jump is diluted.

Metrics and their tolerances (per step, see :func:`default_tolerance`):

* ``fds``, ``threads``, RRef counts: 0. Every batch must gain at least one,
  so a count that only wanders within a range narrower than ``batches``
  can never be called a leak, however it moves.
* ``py_blocks`` (``sys.getallocatedblocks()``, objects alive; what
  ``regrtest -R`` watches): 0.5. One leaked object per step is 1-2 blocks
  per step whatever its size, so this catches it; transient objects of a
  step are freed before the measurement.
* ``uss`` and other byte metrics: :data:`MEMORY_TOLERANCE` (1 KiB). USS is
  blind to small leaks at first: the allocator serves them from memory
  already resident (measured here: ~400 KiB of 4 KiB objects vanish into
  a fresh interpreter's free heap before USS moves). It catches big
  buffers, tensors and native leaks.
"""

from __future__ import annotations

import array
import gc
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from ._model import LeakFound, LeakKind, MetricGrowth, ProcessRecord, Status, Verdict

PROBE_PREFIX = "LEAK_AUDIT_STEP "
MEMORY_TOLERANCE = 1024.0  # bytes per step; see the module docstring
BLOCKS_TOLERANCE = 0.5  # allocator blocks (objects) per step
MIN_T = 3.0  # slope must be this many standard errors above the tolerance
SLOWDOWN = 4.0  # a late-half growth rate this many times under the early half's is a warm-up
PAGE = 4096
DEFAULT_BATCHES = 5
GROWTH_KINDS = (LeakKind.FD_GROWTH, LeakKind.THREAD_GROWTH, LeakKind.MEMORY_GROWTH,
                LeakKind.LEAKED_RREF)

_BYTE_SUFFIXES = ("uss", "rss", "pss", "vms", "swap", "bytes", "mem", "memory")
_RREF_WORDS = ("rref", "num_forks", "num_pending_users", "num_pending_children")

Probe = Callable[[], float]
Probes = Mapping[str, Probe] | Callable[[], Mapping[str, float]]


def is_byte_metric(metric: str) -> bool:
    return metric.lower().endswith(_BYTE_SUFFIXES)


def kind_of(metric: str) -> LeakKind:
    """Which verdict a metric feeds. Unknown names count as memory (objects)."""
    name = metric.lower()
    if name.endswith("fds"):
        return LeakKind.FD_GROWTH
    if name.endswith("threads"):
        return LeakKind.THREAD_GROWTH
    if any(w in name for w in _RREF_WORDS):
        return LeakKind.LEAKED_RREF
    return LeakKind.MEMORY_GROWTH


def default_tolerance(metric: str) -> float:
    if is_byte_metric(metric):
        return MEMORY_TOLERANCE
    return BLOCKS_TOLERANCE if metric.lower().endswith("py_blocks") else 0.0


def _ols(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Slope, its standard error and r2 of the least-squares line.

    r2 is 1.0 for a flat series; the standard error is 0.0 for a perfect line.
    """
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0:
        return 0.0, math.inf, 0.0
    slope = sxy / sxx
    ssr = max(0.0, syy - slope * sxy)
    se = math.sqrt(ssr / (n - 2) / sxx) if n > 2 else math.inf
    r2 = 1.0 if syy == 0 else (sxy * sxy) / (sxx * syy)
    return slope, se, r2


def fit_growth(points: Sequence[tuple[float, float]], *, source: str, metric: str,
               per: str = "step", tolerance: float | None = None, warmup: int = 0,
               batches: int = DEFAULT_BATCHES) -> MetricGrowth:
    """Apply the rule of the module docstring to ``(x, value)`` points.

    Args:
        points: in order of x (step number or seconds).
        warmup: how many leading points to drop.
        tolerance: per unit of x; ``None`` picks :func:`default_tolerance`.
    """
    tol = default_tolerance(metric) if tolerance is None else tolerance
    pts = [(float(x), float(y)) for x, y in points[warmup:]
           if y is not None and math.isfinite(float(y))]
    common = dict(source=source, metric=metric, kind=kind_of(metric), per=per, tolerance=tol)
    if len(pts) < batches + 1:
        return MetricGrowth(**common, slope=0.0, t=0.0, r2=0.0, batch_growths=(),
                            points=len(pts), verdict="insufficient",
                            note=f"need {batches + 1} points after warm-up, have {len(pts)}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    slope, se, r2 = _ols(xs, ys)
    t = (slope - tol) / se if se > 0 else (math.inf if slope > tol else -math.inf)
    cuts = [round(k * (len(pts) - 1) / batches) for k in range(batches + 1)]
    growths = tuple(ys[b] - ys[a] for a, b in zip(cuts, cuts[1:]))
    spans = [xs[b] - xs[a] for a, b in zip(cuts, cuts[1:])]
    granularity = PAGE if is_byte_metric(metric) else 0.0
    flat = sum(1 for g, s in zip(growths, spans) if not g > max(tol * s, granularity))
    half = batches // 2
    early = sum(growths[:half]) / max(sum(spans[:half]), 1e-12)
    late = sum(growths[-half:]) / max(sum(spans[-half:]), 1e-12)
    if slope <= tol:
        verdict, note = "clean", ""
    elif flat:
        verdict, note = "noisy", f"{flat} of {batches} batches did not grow"
    elif late < early / SLOWDOWN:
        verdict, note = "noisy", ("growth is dying down (a warm-up still ending?); "
                                  "raise the warm-up")
    elif t < MIN_T:
        verdict, note = "noisy", f"slope only {t:.1f} standard errors over tolerance"
    else:
        verdict, note = "leak", ""
    return MetricGrowth(**common, slope=slope, t=t, r2=r2, batch_growths=growths,
                        points=len(pts), verdict=verdict, note=note)


def growth_verdicts(fits: Iterable[MetricGrowth], *, none_reason: str) -> list[Verdict]:
    """One verdict per growth kind; UNKNOWN (with ``none_reason``) if nothing fed it."""
    fits = list(fits)
    out = []
    for kind in GROWTH_KINDS:
        mine = [f for f in fits if f.kind is kind]
        leaks = [f for f in mine if f.verdict == "leak"]
        decided = [f for f in mine if f.verdict != "insufficient"]
        noisy = [f for f in decided if f.verdict == "noisy"]
        details = tuple(f.describe() for f in (leaks or noisy or mine))
        if leaks:
            worst = max(leaks, key=lambda f: f.slope)
            summary = (f"{len(leaks)} series grow steadily; worst {worst.source} {worst.metric} "
                       f"{worst.slope:+.4g}/{worst.per}")
            out.append(Verdict(kind=kind, status=Status.LEAK, summary=summary, details=details))
        elif decided:
            # Uneven rises (a warm-up, allocator jumps) are not leaks; they are
            # counted in the summary so that a short or starved measurement
            # that could not tell is visible as such.
            uneven = f" ({len(noisy)} rose unevenly: {noisy[0].note})" if noisy else ""
            out.append(Verdict(kind=kind, status=Status.CLEAN,
                               summary=f"{len(decided)} series checked, none grows steadily"
                                       f"{uneven}",
                               details=details))
        else:
            reason = none_reason if not mine else "too few points after warm-up"
            out.append(Verdict(kind=kind, status=Status.UNKNOWN, summary=f"not measured: {reason}",
                               details=details))
    return out


# -- probes -------------------------------------------------------------------------------


def self_probes() -> dict[str, Probe]:
    """This process: ``py_blocks`` (objects alive, CPython's allocator count) and
    :func:`process_probes`. ``py_blocks`` comes first so that the other
    probes' temporary objects are not counted in it.

    ``sys.getallocatedblocks()`` is what CPython's own refleak hunter
    (``regrtest -R``) watches: one leaked object is one or two blocks,
    whatever its size, so it sees a leak USS cannot (USS only moves once the
    allocator's free memory is used up).
    """
    return {"py_blocks": sys.getallocatedblocks, **process_probes(os.getpid())}


def process_probes(pid: int | None = None, *, prefix: str = "") -> dict[str, Probe]:
    """Probes reading one process from the outside: ``uss`` (bytes), ``fds``, ``threads``.

    Works for any process you may read (your workers, by pid), not only this one.
    """
    proc = psutil.Process(pid)
    return {f"{prefix}uss": lambda: proc.memory_full_info().uss,
            f"{prefix}fds": proc.num_fds,
            f"{prefix}threads": proc.num_threads}


def debug_info_probes(keys: Sequence[str] = ("num_owner_rrefs", "num_forks",
                                             "num_pending_users")) -> dict[str, Probe]:
    """Probes over ``localrref.get_debug_info()`` counters in this process.

    Raises:
        RuntimeError: localrref is not importable or has no ``get_debug_info``.
    """
    try:
        import localrref
        get = localrref.get_debug_info
    except (ImportError, AttributeError) as exc:
        raise RuntimeError("debug_info_probes needs localrref with get_debug_info(); "
                           f"it is not available here ({exc}). Pass your own probes= "
                           "callbacks instead.") from exc
    return {f"rref.{k}": (lambda k=k: float(get().get(k, 0))) for k in keys}


def _read_probes(probes: Probes) -> dict[str, float]:
    if callable(probes):
        return {k: float(v) for k, v in probes().items()}
    return {k: float(f()) for k, f in probes.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class GrowthReport:
    metrics: tuple[MetricGrowth, ...]
    steps: int  # steps run in total, warm-up included
    rounds: int  # 1 + retries used
    times: int  # steps per batch in the last round

    @property
    def leaks(self) -> tuple[MetricGrowth, ...]:
        return tuple(m for m in self.metrics if m.verdict == "leak")

    @property
    def verdicts(self) -> tuple[Verdict, ...]:
        return tuple(v for v in growth_verdicts(self.metrics, none_reason="no probe for it")
                     if v.status is not Status.UNKNOWN)

    def render(self) -> str:
        head = f"growth over {self.steps} steps ({self.rounds} round(s), {self.times} steps/batch)"
        return "\n".join([head] + ["  " + m.describe() for m in self.metrics])

    def to_json(self) -> dict:
        return {"steps": self.steps, "rounds": self.rounds, "times": self.times,
                "metrics": [m.to_json() for m in self.metrics]}

    def raise_if_leaking(self) -> None:
        if self.leaks:
            raise LeakFound("steady growth per step:\n" + self.render())


def measure_growth(step_fn: Callable[[], object], *, warmup: int = 10, times: int = 50,
                   batches: int = DEFAULT_BATCHES, tolerance: Mapping[str, float] | None = None,
                   probes: Probes | None = None, include_self: bool = True, retries: int = 2,
                   collect: bool = True, source: str = "self") -> GrowthReport:
    """Run ``step_fn`` many times and report the per-step growth of each metric.

    Args:
        step_fn: one step of the workload; called ``warmup + batches * times``
            times (more on retries).
        warmup: steps run before the first measurement.
        times: steps per batch; doubled on each retry.
        batches: batches per round; every one must grow for a ``leak`` verdict.
        tolerance: per-step tolerance by metric name; others use
            :func:`default_tolerance`.
        probes: extra metrics: a mapping of name to a callable returning a
            number, or one callable returning a mapping (one round trip to
            a worker for all its numbers). Names ending in ``fds``/``threads``
            feed fd/thread growth, names containing ``rref`` feed leaked RRef,
            everything else memory growth.
        include_self: also measure this process: ``py_blocks``, ``uss``,
            ``fds``, ``threads`` (see :func:`self_probes`).
        retries: extra rounds while some metric is ``noisy``.
        collect: run ``gc.collect()`` before every measurement.

    Returns:
        A :class:`GrowthReport`; call ``raise_if_leaking()`` in a test.

    Raises:
        ValueError: a count is out of range, or there is nothing to measure.
    """
    if times < 1 or batches < 2 or warmup < 0 or retries < 0:
        raise ValueError(f"measure_growth needs times >= 1, batches >= 2, warmup >= 0 and "
                         f"retries >= 0; got times={times}, batches={batches}, "
                         f"warmup={warmup}, retries={retries}")
    sources: list[Probes] = []
    if include_self:
        sources.append(self_probes())
    if probes is not None:
        sources.append(probes)
    if not sources:
        raise ValueError("measure_growth has nothing to measure: pass probes= or "
                         "include_self=True")
    tolerance = dict(tolerance or {})

    def measure(into: dict[str, array.array] | None, slot: int) -> list[str]:
        if collect:
            gc.collect()
        names = []
        for p in sources:
            for name, value in _read_probes(p).items():
                names.append(name)
                if into is not None:
                    into[name][slot] = value
        return names

    for _ in range(warmup):
        step_fn()
    names = measure(None, 0)  # learn the names before allocating storage
    steps, per_batch = warmup, times
    final: dict[str, MetricGrowth] = {}
    for round_no in range(1, retries + 2):
        # Values go into storage allocated up front: keeping a new object per
        # measurement would itself show up as growth of py_blocks.
        store = {name: array.array("d", bytes(8 * (batches + 1))) for name in names}
        measure(store, 0)
        for b in range(1, batches + 1):
            for _ in range(per_batch):
                step_fn()
            measure(store, b)
        steps += batches * per_batch
        for name, values in store.items():
            pts = [(b * per_batch, v) for b, v in enumerate(values)]
            fit = fit_growth(pts, source=source, metric=name, tolerance=tolerance.get(name),
                             batches=batches)
            if name not in final or final[name].verdict != "leak":
                final[name] = fit
        if not any(f.verdict == "noisy" for f in final.values()):
            break
        per_batch *= 2
    return GrowthReport(metrics=tuple(final.values()), steps=steps, rounds=round_no,
                        times=per_batch)


# -- probe lines (the CLI's growth mode) ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbePoint:
    source: str
    step: float
    metrics: Mapping[str, float]


def probe_line(step: int, *, source: str | None = None, measure_self: bool = True,
               collect: bool = True, **metrics: float) -> str:
    """The line an audited program prints (to stdout) once per step.

    ``LEAK_AUDIT_STEP {"step": 7, "pid": 123, "py_blocks": ..., "uss": ..., "fds": ...,
    "threads": ...}``. With ``measure_self`` this process's numbers (see
    :func:`self_probes`) are added, after a ``gc.collect()`` unless
    ``collect`` is False (without it py_blocks saw-tooths with the garbage
    collector). Extra keyword numbers (``live_rrefs=...``) are passed through.
    """
    payload: dict[str, object] = {"step": step, "pid": os.getpid()}
    if source is not None:
        payload["source"] = source
    if measure_self:
        if collect:
            gc.collect()
        payload.update((k, f()) for k, f in self_probes().items())
    payload.update(metrics)
    return PROBE_PREFIX + json.dumps(payload)


def parse_probe_line(line: str) -> ProbePoint | None:
    """The point a probe line carries; None for other lines.

    Raises:
        ValueError: the line starts with the prefix but is not a JSON object
            with a numeric "step".
    """
    if not line.startswith(PROBE_PREFIX):
        return None
    try:
        payload = json.loads(line[len(PROBE_PREFIX):])
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed probe line (not JSON: {exc}): {line[:120]!r}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("step"), (int, float)):
        raise ValueError(f'malformed probe line (need a JSON object with a numeric "step"): '
                         f"{line[:120]!r}")
    source = payload.get("source") or (f"pid {payload['pid']}" if "pid" in payload else "main")
    metrics = {k: float(v) for k, v in payload.items()
               if k not in ("step", "pid", "source") and isinstance(v, (int, float))
               and not isinstance(v, bool)}
    return ProbePoint(source=str(source), step=float(payload["step"]), metrics=metrics)


def fit_probe_points(points: Iterable[ProbePoint], *, warmup: int, batches: int,
                     tolerance: Mapping[str, float]) -> list[MetricGrowth]:
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in points:
        for metric, value in p.metrics.items():
            series.setdefault((p.source, metric), []).append((p.step, value))
    return [fit_growth(pts, source=src, metric=metric, tolerance=tolerance.get(metric),
                       warmup=warmup, batches=batches)
            for (src, metric), pts in series.items()]


def fit_process_samples(records: Iterable[ProcessRecord], *, warmup_s: float,
                        cooldown_s: float, batches: int,
                        tolerance: Mapping[str, float]) -> list[MetricGrowth]:
    """Time-series mode: slope per second of each process's sampled uss/fds/threads.

    The first ``warmup_s`` seconds (imports, pools filling) and, for processes
    that exited, the last ``cooldown_s`` seconds (teardown frees everything)
    of each series are dropped before fitting.
    """
    fits = []
    for rec in records:
        if not rec.samples:
            continue
        start = rec.samples[0].t + warmup_s
        end = rec.samples[-1].t - (cooldown_s if rec.end_state == "exited" else 0.0)
        kept = [s for s in rec.samples if start <= s.t <= end]
        source = f"pid {rec.pid} ({rec.name})"
        for metric in ("uss", "fds", "threads"):
            pts = [(s.t, getattr(s, metric)) for s in kept if getattr(s, metric) is not None]
            fits.append(fit_growth(pts, source=source, metric=metric, per="s",
                                   tolerance=tolerance.get(metric), batches=batches))
    return fits
