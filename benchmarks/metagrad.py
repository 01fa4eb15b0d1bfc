"""Memory and time of one meta-step for each meta-gradient mode, against K.

The reference meta-step is the trainer's meta-gradient (the gradient of
`Trainer._population_meta_loss`, as `Trainer._meta_step` takes it: K inner
updates per agent, a fresh rollout, the policy-gradient meta-loss) for the
default Breakout agent (`TrainConfig()` defaults: MLP 64-64 on flattened
observations, 32 environments, 16-step rollouts, Adam), with one agent in
the population unless `--population` says otherwise. A second, larger
reference (wider torso, more environments) shows where plain autodiff stops
fitting in memory. For every `K` and every variant the script reports:

* compiled temp and argument bytes from
  `jax.jit(f).lower(*args).compile().memory_analysis()` (a zero or missing
  figure is shown as unknown);
* the process's peak RSS increase while the first call runs (or, with
  `--isolate`, the peak RSS of a fresh process that runs only that variant);
* the median wall time per meta-step after one warm-up call;
* the same `K` inner updates with no meta-gradient (`inner`), for scale.

A variant whose compiled footprint exceeds the machine's memory, or what is
available when it would run, is reported as not fitting and is not run; one
that fails with an out-of-memory error is reported as such. A variant whose
call is predicted (from the same variant at a smaller `K` in this run, or in
a merged earlier run) to take longer than `--max-call-seconds` is compiled
only, and one whose warm-up call took longer is not timed further: its memory
is reported, its time is marked as not measured. Results go to a markdown
table on stdout, a CSV file and two PNG plots (log axes); `--merge` adds the
rows of an earlier run's CSV that this run did not measure.

Usage:
  python benchmarks/metagrad.py                      # the full default run
  python benchmarks/metagrad.py --ks 16,64 --references reference --repeats 2
  python benchmarks/metagrad.py --ks 1024 --merge benchmarks/results/metagrad.csv
  python benchmarks/metagrad.py --references "" --merge metagrad.csv  # re-render
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import psutil

from metarl.config import AgentConfig, MetaConfig, TrainConfig
from metarl.metagrad import MetaGradConfig, unroll
from metarl.trainer import Trainer

MIB = 2**20

REFERENCES = {
    # The trainer's defaults: the default Breakout agent and environments.
    "reference": AgentConfig(),
    # Four times the width and the environments: plain autodiff's stored
    # activations grow with both, the carries of mixflow only with the width.
    "large": AgentConfig(num_envs=128, hidden_sizes=(256, 256)),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of computing the meta-step (or, for `inner`, none at all).

    Attributes:
      name: the label in tables and plots.
      mode: a `meta.grad` mode, or None for the inner updates alone.
      checkpoint: store every `round(sqrt(K))`-th carry only.
      store_rollout: mixflow keeps each step's rollout.
      replay_rollout: mixflow keeps a rollout that is not stored as its record
        and replays the environments, instead of running the rollout again.
      store_inner_grad: mixflow keeps each step's inner gradient.
    """

    name: str
    mode: str | None
    checkpoint: bool = False
    store_rollout: bool = False
    replay_rollout: bool = False
    store_inner_grad: bool = False

    def grad_config(self, num_steps: int) -> MetaGradConfig:
        return MetaGradConfig(
            mode=self.mode or "autodiff",
            checkpoint_every=checkpoint_every(num_steps) if self.checkpoint else 0,
            store_rollout=self.store_rollout,
            replay_rollout=self.replay_rollout,
            store_inner_grad=self.store_inner_grad,
        )


VARIANTS = {
    v.name: v
    for v in [
        Variant("inner", None),
        Variant("autodiff", "autodiff"),
        Variant("autodiff_remat", "autodiff_remat"),
        Variant("mixflow", "mixflow"),
        Variant("mixflow+grad", "mixflow", store_inner_grad=True),
        Variant("mixflow+replay", "mixflow", replay_rollout=True),
        Variant(
            "mixflow+replay+grad", "mixflow", replay_rollout=True, store_inner_grad=True
        ),
        Variant(
            "mixflow+rollout+grad", "mixflow", store_rollout=True, store_inner_grad=True
        ),
        Variant("mixflow+ckpt", "mixflow", checkpoint=True),
        Variant(
            "mixflow+ckpt+replay+grad",
            "mixflow",
            checkpoint=True,
            replay_rollout=True,
            store_inner_grad=True,
        ),
        Variant(
            "mixflow+ckpt+rollout+grad",
            "mixflow",
            checkpoint=True,
            store_rollout=True,
            store_inner_grad=True,
        ),
        Variant("autodiff_remat+ckpt", "autodiff_remat", checkpoint=True),
    ]
}

DEFAULT_VARIANTS = [
    "inner",
    "autodiff",
    "autodiff_remat",
    "mixflow",
    "mixflow+grad",
    "mixflow+replay",
    "mixflow+replay+grad",
    "mixflow+rollout+grad",
    "mixflow+ckpt",
    "mixflow+ckpt+replay+grad",
]
DEFAULT_LARGE_VARIANTS = [
    "inner",
    "autodiff",
    "autodiff_remat",
    "mixflow",
    "mixflow+replay",
    "mixflow+ckpt",
]


def checkpoint_every(num_steps: int) -> int:
    """The segment length `c ~ sqrt(K)` that minimises `K / c + c` stored carries."""
    return max(1, round(math.sqrt(num_steps)))


@dataclasses.dataclass
class Result:
    """One row of the table."""

    reference: str
    num_steps: int
    variant: str
    checkpoint_every: int
    status: str = "ok"
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    rss_peak_increase_bytes: int | None = None
    rss_peak_bytes: int | None = None
    time_s: float | None = None
    time_runs: int = 0
    compile_s: float | None = None


class RssSampler:
    """Samples this process's resident set size in a thread while active."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _memory_figure(analysis, name: str) -> int | None:
    value = getattr(analysis, name, None) if analysis is not None else None
    return int(value) if value else None


def _is_out_of_memory(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, MemoryError) or any(
        s in text for s in ("resource_exhausted", "out of memory", "bad_alloc")
    )


def build(reference: str, num_steps: int, population: int):
    """The trainer for a reference at `K = num_steps` and its initial state."""
    config = TrainConfig(
        agent=REFERENCES[reference],
        meta=MetaConfig(inner_steps=num_steps, population_size=population),
    )
    trainer = Trainer(config)
    return trainer, trainer.init(0)


def step_function(trainer: Trainer, variant: Variant, num_steps: int):
    """The function to measure: a meta-step, or the inner updates alone."""
    if variant.mode is None:
        (group,) = trainer.groups

        def inner_updates(state):
            def one_agent(meta, inner):
                return unroll(group.problem, meta, inner, num_steps)[0]

            return jax.vmap(one_agent, in_axes=(group.agent_meta_axes(), 0))(
                group.agent_meta(state.meta_params), state.population[0].inner
            ).params

        return inner_updates
    trainer.grad_config = variant.grad_config(num_steps)

    # The meta-gradient line of `Trainer._meta_step`; the rest of that step
    # (Adam on the objective's few scalars, agent resets) is the same for
    # every mode and only lengthens compilation.
    def meta_gradient(state):
        return jax.grad(trainer._population_meta_loss, has_aux=True)(
            state.meta_params, state.population
        )

    return meta_gradient


def compile_variant(trainer, state, variant, num_steps, result: Result):
    """Compiles the variant and records its compiled memory; returns the
    executable or None when compiling failed."""
    start = time.perf_counter()
    try:
        compiled = (
            jax.jit(step_function(trainer, variant, num_steps)).lower(state).compile()
        )
    except Exception as error:  # A failed variant is a result, not a crash.
        result.status = (
            "out of memory while compiling"
            if _is_out_of_memory(error)
            else f"compile failed: {type(error).__name__}: {str(error)[:120]}"
        )
        return None
    result.compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    result.temp_bytes = _memory_figure(analysis, "temp_size_in_bytes")
    result.argument_bytes = _memory_figure(analysis, "argument_size_in_bytes")
    result.output_bytes = _memory_figure(analysis, "output_size_in_bytes")
    return compiled


def fits_in_memory(result: Result, headroom: float = 0.85) -> bool:
    """False, with the reason in `result.status`, if the compiled footprint
    exceeds this machine's memory or what it has available now.

    The two are told apart because other processes share the machine: only
    the first says that the configuration cannot run here at all.
    """
    needed = sum(
        b or 0 for b in (result.temp_bytes, result.argument_bytes, result.output_bytes)
    )
    memory = psutil.virtual_memory()
    if needed > memory.total:
        result.status = (
            f"does not fit: needs {needed / 2**30:.1f} GiB, "
            f"machine has {memory.total / 2**30:.1f} GiB"
        )
        return False
    if needed > headroom * memory.available:
        result.status = (
            f"does not fit now: needs {needed / 2**30:.1f} GiB, "
            f"{memory.available / 2**30:.1f} GiB available"
        )
        return False
    return True


def predicted_call_seconds(known: list[Result], result: Result) -> float | None:
    """One call's time at `result.num_steps`, extrapolated linearly in K from the
    same reference and variant timed at the largest smaller K, if any."""
    timed = [
        r
        for r in known
        if (r.reference, r.variant) == (result.reference, result.variant)
        and r.time_s is not None
        and r.num_steps < result.num_steps
    ]
    if not timed:
        return None
    base = max(timed, key=lambda r: r.num_steps)
    return base.time_s * result.num_steps / base.num_steps


def run_once(compiled, state, result: Result, sample_rss: bool) -> float | None:
    """One call, timed; records peak RSS if asked; None if it failed."""
    try:
        if sample_rss:
            with RssSampler() as sampler:
                start = time.perf_counter()
                jax.block_until_ready(compiled(state))
                elapsed = time.perf_counter() - start
            result.rss_peak_increase_bytes = sampler.peak - sampler.baseline
            result.rss_peak_bytes = sampler.peak
            return elapsed
        start = time.perf_counter()
        jax.block_until_ready(compiled(state))
        return time.perf_counter() - start
    except Exception as error:  # A failed variant is a result, not a crash.
        result.status = (
            "out of memory"
            if _is_out_of_memory(error)
            else f"failed: {type(error).__name__}: {str(error)[:120]}"
        )
        return None


def measure_group(reference, num_steps, variant_names, args, run: bool, known=()):
    """All variants at one `K`: compiled first, then timed round-robin so that
    a change in the machine's load hits every variant alike.

    `known` holds results at other `K` from which a call's time is predicted;
    a variant predicted to be over `args.max_call_seconds` is compiled only.
    """
    trainer, state = build(reference, num_steps, args.population)
    results, executables = [], {}
    for name in variant_names:
        variant = VARIANTS[name]
        result = Result(
            reference=reference,
            num_steps=num_steps,
            variant=name,
            checkpoint_every=variant.grad_config(num_steps).checkpoint_every,
        )
        results.append(result)
        compiled = compile_variant(trainer, state, variant, num_steps, result)
        if compiled is None:
            continue
        _progress(result)
        if not fits_in_memory(result):
            continue
        if not run:
            result.status = "compiled only: fits"
            continue
        predicted = predicted_call_seconds(list(known), result)
        if predicted is not None and predicted > args.max_call_seconds:
            result.status = (
                f"fits; not timed: about {predicted:.3g} s per call predicted, "
                f"over --max-call-seconds {args.max_call_seconds:g}"
            )
            continue
        executables[name] = compiled

    # Warm-up calls, one variant at a time, with the RSS sampler on.
    times: dict[str, list[float]] = {}
    spent: dict[str, float] = {}
    for result in results:
        if result.variant not in executables:
            continue
        elapsed = run_once(executables[result.variant], state, result, True)
        if elapsed is None:
            del executables[result.variant]
            continue
        if elapsed > args.max_call_seconds:
            # Its peak RSS is measured; timing it would cost more such calls.
            result.status = (
                f"fits; not timed: warm-up call took {elapsed:.3g} s, "
                f"over --max-call-seconds {args.max_call_seconds:g}"
            )
            del executables[result.variant]
            continue
        times[result.variant], spent[result.variant] = [], elapsed

    # Timed calls, round-robin, until each variant has its repeats or has
    # used its time budget (always at least one timed call).
    for _ in range(args.repeats):
        for result in results:
            name = result.variant
            if name not in executables:
                continue
            if times[name] and spent[name] > args.max_seconds:
                continue
            elapsed = run_once(executables[name], state, result, False)
            if elapsed is None:
                del executables[name]
                continue
            times[name].append(elapsed)
            spent[name] += elapsed
    for result in results:
        if times.get(result.variant):
            result.time_s = statistics.median(times[result.variant])
            result.time_runs = len(times[result.variant])
            if result.time_runs < args.repeats:
                result.status = (
                    f"ok, {result.time_runs} of {args.repeats} timed runs "
                    f"(over --max-seconds {args.max_seconds:g})"
                )
    return results


def measure_isolated(reference, num_steps, name, args, known=()) -> Result:
    """One variant in a fresh process, so its peak RSS is its own."""
    spec = {
        "reference": reference,
        "num_steps": num_steps,
        "variant": name,
        "known": [dataclasses.asdict(r) for r in known],
    }
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(spec),
        "--population",
        str(args.population),
        "--repeats",
        str(args.repeats),
        "--max-seconds",
        str(args.max_seconds),
        "--max-call-seconds",
        str(args.max_call_seconds),
    ]
    process = subprocess.run(command, capture_output=True, text=True)
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            return Result(**json.loads(line[len("RESULT ") :]))
    status = "out of memory" if process.returncode in (-9, 137) else "failed"
    tail = (process.stderr or "").strip().splitlines()[-1:] or [""]
    return Result(
        reference=reference,
        num_steps=num_steps,
        variant=name,
        checkpoint_every=VARIANTS[name].grad_config(num_steps).checkpoint_every,
        status=f"{status} (exit {process.returncode}) {tail[0][:100]}",
    )


def worker(spec: str, args) -> None:
    spec = json.loads(spec)
    known = [Result(**r) for r in spec["known"]]
    (result,) = measure_group(
        spec["reference"], spec["num_steps"], [spec["variant"]], args, True, known
    )
    # The whole process's peak, which includes what importing JAX costs.
    result.rss_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def _progress(result: Result) -> None:
    print(
        f"  compiled {result.reference} K={result.num_steps} {result.variant}: "
        f"temp {_mib(result.temp_bytes)} MiB in {result.compile_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _mib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / MIB:.1f}"


def _ratio(value, base) -> str:
    if value is None or base is None:
        return "-"
    return f"{value / base:.2f}"


def _find(results, reference, num_steps, variant) -> Result | None:
    for r in results:
        if (r.reference, r.num_steps, r.variant) == (reference, num_steps, variant):
            return r
    return None


def markdown_table(results: list[Result], reference: str) -> str:
    """One table per reference, with ratios to autodiff and to the inner updates."""
    lines = [
        "| K | variant | c | temp MiB | temp / autodiff | args MiB | peak RSS +MiB "
        "| time ms | time / autodiff | time / inner | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.reference != reference:
            continue
        autodiff = _find(results, reference, r.num_steps, "autodiff")
        inner = _find(results, reference, r.num_steps, "inner")
        time_ms = None if r.time_s is None else r.time_s * 1e3
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.num_steps),
                    r.variant,
                    str(r.checkpoint_every or "-"),
                    _mib(r.temp_bytes),
                    _ratio(r.temp_bytes, autodiff and autodiff.temp_bytes),
                    _mib(r.argument_bytes),
                    "-"
                    if r.rss_peak_increase_bytes is None
                    else f"{r.rss_peak_increase_bytes / MIB:.0f}",
                    "-" if time_ms is None else f"{time_ms:.0f}",
                    _ratio(r.time_s, autodiff and autodiff.time_s),
                    _ratio(r.time_s, inner and inner.time_s),
                    r.status,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def target_report(results: list[Result], num_steps: int = 64) -> str:
    """The targets at `K = num_steps` on the reference meta-step, met or missed."""

    def get(variant, field):
        r = _find(results, "reference", num_steps, variant)
        return None if r is None else getattr(r, field)

    # (variant, baseline, field, bound, strictly below)
    checks = [
        ("mixflow", "autodiff", "temp_bytes", 0.25, False),
        ("mixflow", "autodiff_remat", "temp_bytes", 1.0, False),
        ("mixflow+ckpt", "autodiff", "temp_bytes", 0.1, False),
        ("mixflow", "autodiff", "time_s", 1.0, False),
        ("mixflow", "autodiff_remat", "time_s", 1.0, True),
        ("mixflow", "inner", "time_s", 3.5, False),
    ]
    lines = [f"Targets at K={num_steps} on the reference meta-step:"]
    for variant, base, field, bound, strict in checks:
        what = "temp" if field == "temp_bytes" else "time"
        label = f"{variant} {what} {'<' if strict else '<='} {bound:g} x {base}"
        value, base_value = get(variant, field), get(base, field)
        if value is None or base_value is None:
            lines.append(f"- {label}: not measured")
            continue
        ratio = value / base_value
        met = ratio < bound if strict else ratio <= bound
        lines.append(f"- {label}: {ratio:.3f} -> {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def plot(results: list[Result], out_dir: Path) -> list[Path]:
    """Compiled temp memory and time per meta-step against K, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = sorted({r.reference for r in results}, key=list(REFERENCES).index)
    paths = []
    for field, label, scale, name in [
        ("temp_bytes", "compiled temp memory (MiB)", 1 / MIB, "metagrad_memory.png"),
        ("time_s", "time per meta-step (s)", 1.0, "metagrad_time.png"),
    ]:
        fig, axes = plt.subplots(
            1, len(references), figsize=(6 * len(references), 4.5), squeeze=False
        )
        for ax, reference in zip(axes[0], references, strict=True):
            rows = [
                r
                for r in results
                if r.reference == reference and getattr(r, field) is not None
            ]
            for index, variant in enumerate(VARIANTS):
                # One colour and line style per variant in every panel, so
                # they can be compared; past ten colours the lines are dashed.
                color = f"C{index % 10}"
                linestyle = "-" if index < 10 else "--"
                points = sorted(
                    (r.num_steps, getattr(r, field) * scale)
                    for r in rows
                    if r.variant == variant
                )
                if points:
                    ks, values = zip(*points, strict=True)
                    ax.plot(
                        ks,
                        values,
                        marker="o",
                        color=color,
                        linestyle=linestyle,
                        label=variant,
                    )
                unfit = [
                    (r.num_steps, getattr(r, field) * scale)
                    for r in rows
                    if r.variant == variant and r.status.startswith("does not fit")
                ]
                if unfit:
                    ax.scatter(*zip(*unfit, strict=True), s=150, marker="x", c=color)
            if any(r.status.startswith("does not fit") for r in rows):
                ax.axhline(
                    psutil.virtual_memory().total * scale,
                    color="gray",
                    linestyle="--",
                    label="this machine's memory (x: does not fit)",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("K (inner updates per meta-step)")
            ax.set_ylabel(label)
            ax.set_title(reference)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def read_csv(path: Path) -> list[Result]:
    """The rows `write_csv` wrote, with empty cells as None."""
    types = dict.fromkeys(["reference", "variant", "status"], str)
    types |= dict.fromkeys(["time_s", "compile_s"], float)
    with path.open(newline="") as f:
        return [
            Result(
                **{k: None if v == "" else types.get(k, int)(v) for k, v in row.items()}
            )
            for row in csv.DictReader(f)
        ]


def merge(earlier: list[Result], results: list[Result]) -> list[Result]:
    """`results` and the rows of `earlier` at a (reference, K) this run did not
    measure, so that every ratio in a table still compares rows of one run."""
    measured = {(r.reference, r.num_steps) for r in results}
    kept = [r for r in earlier if (r.reference, r.num_steps) not in measured]
    order = list(VARIANTS)
    return sorted(
        kept + results,
        key=lambda r: (
            list(REFERENCES).index(r.reference),
            r.num_steps,
            order.index(r.variant),
        ),
    )


def write_csv(results: list[Result], path: Path) -> None:
    fields = [f.name for f in dataclasses.fields(Result)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow(dataclasses.asdict(r))


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _variant_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}"
        )
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ks",
        type=_int_list,
        default=[16, 64, 256, 1024],
        help="comma-separated K values of the reference",
    )
    parser.add_argument(
        "--variants",
        type=_variant_list,
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--references",
        default="reference,large",
        help="comma-separated: reference, large",
    )
    parser.add_argument(
        "--large-ks",
        type=_int_list,
        default=[16, 64, 256, 1024],
        help="comma-separated K values of the large reference",
    )
    parser.add_argument(
        "--large-variants",
        type=_variant_list,
        default=DEFAULT_LARGE_VARIANTS,
        help="variants of the large reference",
    )
    parser.add_argument(
        "--large-run-ks",
        type=_int_list,
        default=[16, 64, 256, 1024],
        help="K values at which the large reference is run and timed (within "
        "--max-call-seconds); at the others it is compiled only",
    )
    parser.add_argument(
        "--population", type=int, default=1, help="agents per meta-step"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="stop timing a variant once its calls took this long (at least "
        "one timed call after the warm-up)",
    )
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        default=60.0,
        help="do not time a variant whose call is predicted to take longer, or "
        "whose warm-up call took longer (its memory is still reported)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier run's CSV: its rows at (reference, K) pairs this run "
        "does not measure join the table, CSV and plots",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run each variant in a fresh process: its own peak RSS, but "
        "timings from different processes",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    references = [r for r in args.references.split(",") if r]
    earlier = read_csv(args.merge) if args.merge else []
    print(
        f"# metagrad benchmark: jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"population {args.population}, float32"
    )
    if references:
        print(f"# {_load()} at the start")
    results: list[Result] = []
    for reference in references:
        large = reference == "large"
        ks = args.large_ks if large else args.ks
        names = args.large_variants if large else args.variants
        for num_steps in ks:
            run = not large or num_steps in args.large_run_ks
            print(f"{reference} K={num_steps} ...", file=sys.stderr, flush=True)
            known = [r for r in earlier + results if r.reference == reference]
            if args.isolate and run:
                group = [
                    measure_isolated(
                        reference,
                        num_steps,
                        n,
                        args,
                        [r for r in known if r.variant == n],
                    )
                    for n in names
                ]
            else:
                group = measure_group(reference, num_steps, names, args, run, known)
            results.extend(group)
            jax.clear_caches()
    if references:
        print(f"# {_load()} at the end")
    if earlier:
        measured = {(r.reference, r.num_steps) for r in results}
        from_earlier = sorted({(r.reference, r.num_steps) for r in earlier} - measured)
        results = merge(earlier, results)
        references = sorted({r.reference for r in results}, key=list(REFERENCES).index)
        print(
            f"# rows from {args.merge} (an earlier run): "
            + ", ".join(f"{ref} K={k}" for ref, k in from_earlier)
        )
    for reference in references:
        agent = REFERENCES[reference]
        print(
            f"\n## {reference}: {agent.num_envs} envs x {agent.unroll_length} steps, "
            f"MLP {list(agent.hidden_sizes)}, Breakout-MinAtar\n"
        )
        print(markdown_table(results, reference))
    if "reference" in references:
        print("\n" + target_report(results))
    csv_path = args.out_dir / "metagrad.csv"
    write_csv(results, csv_path)
    paths = plot(results, args.out_dir)
    print(f"\nCSV: {csv_path}\nplots: {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
