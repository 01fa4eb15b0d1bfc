"""Meta-training throughput as the population is split over more devices.

For each device count this measures meta-steps per second and environment
steps per second of the compiled meta-step (median over repeats, after
warm-up), and prints a markdown table with the speed-up and the scaling
efficiency, `throughput(n) / (n * throughput(1))`.

Each device count runs in a process of its own. By default the devices are
simulated CPU devices (`--xla_force_host_platform_device_count`), which share
the machine's cores: they show that the sharded program runs and what it
costs, not what separate accelerators would gain. `--real` uses the first
`n` of the machine's own devices instead (GPUs, say).

`--scaling strong` (default) keeps the population fixed and splits it over
more devices; `--scaling weak` keeps the agents per device fixed, so the
population grows with the devices.

  python benchmarks/scaling.py
  python benchmarks/scaling.py --devices 1 2 4 8 --real --env breakout
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _config(args, population: int) -> dict:
    return {
        "env": {"name": args.env},
        "agent": {
            "num_envs": args.num_envs,
            "unroll_length": args.unroll_length,
            "hidden_sizes": list(args.hidden_sizes),
        },
        "meta": {"inner_steps": args.inner_steps, "population_size": population},
        "logger": {"mode": "disabled"},
    }


def _population(args, devices: int) -> int:
    if args.scaling == "weak":
        return args.population * devices
    return args.population


def measure(args) -> dict:
    """Times the meta-step on the first `args.worker` devices of this process.

    Args:
      args: the parsed command line; `args.worker` is the device count.

    Returns:
      The measurements of one device count, as plain values.
    """
    import jax

    from metarl.config import TrainConfig, from_dict
    from metarl.trainer import Trainer

    devices = jax.devices()[: args.worker]
    if len(devices) < args.worker:
        raise SystemExit(
            f"scaling: {args.worker} devices asked for, {len(devices)} present"
        )
    population = _population(args, args.worker)
    config = from_dict(TrainConfig, _config(args, population))
    trainer = Trainer(config, devices=devices)
    state = trainer.init(0)

    # The first meta-step compiles; the second settles buffers and caches.
    start = time.perf_counter()
    state, metrics = trainer.meta_step(state)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = trainer.meta_step(state)
    jax.block_until_ready(metrics)

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = trainer.meta_step(state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median_s = statistics.median(times)
    return {
        "devices": len(devices),
        "platform": devices[0].platform,
        "population": population,
        "compile_s": compile_s,
        "median_s": median_s,
        "meta_steps_per_s": 1.0 / median_s,
        "env_steps_per_s": trainer.env_steps_per_meta_step / median_s,
    }


def _run_worker(args, devices: int) -> dict:
    env = dict(os.environ)
    if not args.real:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={devices}"
        ).strip()
    command = [sys.executable, __file__, "--worker", str(devices), *sys.argv[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"scaling: the {devices}-device run failed:\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| devices | population | meta-steps/s | env steps/s | speed-up | "
        "efficiency | compile s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = row["env_steps_per_s"] / base["env_steps_per_s"]
        ideal = row["devices"] / base["devices"]
        lines.append(
            f"| {row['devices']} | {row['population']} | "
            f"{row['meta_steps_per_s']:.2f} | {row['env_steps_per_s']:,.0f} | "
            f"{speedup:.2f}x | {speedup / ideal:.0%} | {row['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--scaling", choices=("strong", "weak"), default="strong")
    parser.add_argument(
        "--population",
        type=int,
        default=8,
        help="agents in all (strong) or per device (weak)",
    )
    parser.add_argument("--env", default="catch")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--unroll-length", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=8)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--real", action="store_true", help="use real devices")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(measure(args)))
        return

    # Other work on the machine takes cores from the simulated devices; the
    # load average says how much.
    load_before = os.getloadavg()[0]
    rows = [_run_worker(args, n) for n in args.devices]
    kind = "real" if args.real else "simulated"
    print(
        f"{args.scaling} scaling on {kind} {rows[0]['platform']} devices, "
        f"{os.cpu_count()} CPU cores (load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after): {args.env}, {args.num_envs} envs x "
        f"{args.unroll_length} steps, K={args.inner_steps}, hidden "
        f"{args.hidden_sizes}, median of {args.repeats} meta-steps\n"
    )
    print(_table(rows))


if __name__ == "__main__":
    main()
