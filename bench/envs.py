"""Benchmark of the text envs: step throughput and the cost of returning to a saved state.

Measured side by side in one run and printed as ratios:

* steps/s of ``w2s/TextWorld-v0`` with admissible commands and expert plan (TextWorld's state tracking) and
  without them (bare Z-machine steps), each with and without state keys (``info["state_key"]``);
* returning to the state after a 20-step prefix: ``clone_state`` + ``restore_state`` (exact engine snapshot)
  vs TextWorld's ``Environment.copy()`` vs ``reset`` + replay of the prefix;
* the same for ``w2s/ScienceWorld-v0`` (clone there is replay-based), and its steps/s with and without state
  keys, unless ``--no-sciworld``;
* ``w2s/TextWorldExpress-v0`` steps/s with and without admissible commands and expert plan, and clone+restore
  (replay-based) vs reset+replay after a 20-step prefix, unless ``--no-twx``.

Usage: ``python bench/envs.py [--quick] [--no-sciworld] [--no-twx] [--cache-dir DIR]``. The target is clone+restore at least
10x faster than reset+replay on TextWorld.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (JIT of the JVM, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prefix(env, length: int, seed: int) -> list[str]:
    """A random prefix of admissible commands that does not end the game."""
    rng = random.Random(seed)
    _, info = env.reset()
    actions: list[str] = []
    while len(actions) < length:
        candidates = [c for c in info["admissible_commands"] if not c.startswith(("eat", "drink"))]
        action = rng.choice(candidates or ["look"])
        state = env.clone_state()
        _, _, terminated, truncated, info_next = env.step(action)
        if terminated or truncated:  # keep the prefix alive: undo and try another
            env.restore_state(state)
            continue
        actions.append(action)
        info = info_next
    return actions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_textworld(cache_dir: str, quick: bool) -> dict[str, float]:
    from w2s_agents.envs.suites import TextWorldSuite, register_suite
    from w2s_agents.envs.textworld_env import TextWorldEnv

    suite = register_suite(
        TextWorldSuite(
            "bench-tw-cooking", "tw-cooking", {"recipe": 2, "take": 2, "go": 6, "open": True}, seed=42
        )
    )
    task = suite.task_ids("train")[0]
    steps = 100 if quick else 500
    repeats = 10 if quick else 40
    out: dict[str, float] = {}

    configs = [
        ("with admissible commands + expert plan", {"admissible_commands": True, "expert_plan": True}),
        ("without (bare steps)", {"admissible_commands": False, "expert_plan": False}),
    ]
    cmds = ["look", "inventory", "go north", "go south", "examine cookbook", "open fridge"]
    for label, kwargs in configs:
        # one env, the keys switched on and off between rounds: the same interpreter and the same load
        env = TextWorldEnv(task, cache_dir=cache_dir, max_steps=10**6, **kwargs)
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3 if quick else 7):
            for keys in (True, False):
                env.state_key = keys
                env.reset()
                start = time.perf_counter()
                for i in range(steps):
                    env.step(cmds[i % len(cmds)])
                rates[keys].append(steps / (time.perf_counter() - start))
        out[f"steps/s {label}"] = statistics.median(rates[True])
        out[f"steps/s {label}, no state keys"] = statistics.median(rates[False])
        if not kwargs["admissible_commands"]:  # the key alone, without the noise of whole steps
            env.state_key = True
            status = env.clone_state().status
            calls = 2000
            start = time.perf_counter()
            for _ in range(calls):
                env._engine_state_key(status)
            out["state key us"] = 1e6 * (time.perf_counter() - start) / calls
        env.close()

    env = TextWorldEnv(task, cache_dir=cache_dir, max_steps=10**6)
    prefix = _prefix(env, 20, seed=0)
    env.reset()
    for a in prefix:
        env.step(a)
    state = env.clone_state()

    def clone_restore() -> None:
        env.restore_state(env.clone_state())

    def restore_only() -> None:
        env.restore_state(state)

    def tw_copy() -> None:
        env.copy_engine().close()

    def reset_replay() -> None:
        env.reset()
        for a in prefix:
            env.step(a)

    out["clone+restore ms"] = 1000 * _median_time(clone_restore, repeats)
    out["restore only ms"] = 1000 * _median_time(restore_only, repeats)
    out["env.copy() ms"] = 1000 * _median_time(tw_copy, repeats)
    out["reset+replay ms"] = 1000 * _median_time(reset_replay, max(3, repeats // 4))
    # check the restore is exact while we are here
    env.restore_state(state)
    a = [env.step(c) for c in ("look", "inventory")]
    env.restore_state(state)
    assert [env.step(c) for c in ("look", "inventory")] == a
    env.close()
    return out


def bench_scienceworld(quick: bool) -> dict[str, float]:
    from w2s_agents.envs.scienceworld_env import ScienceWorldEnv

    out: dict[str, float] = {}
    steps = 30 if quick else 100
    for label, adm, keys in [
        ("with admissible commands", True, True),
        ("without", False, True),
        ("without, no state keys", False, False),
    ]:
        env = ScienceWorldEnv("chemistry-mix/0", admissible_commands=adm, max_steps=10**6, state_key=keys)
        env.reset()
        start = time.perf_counter()
        for i in range(steps):
            env.step(["look around", "inventory", "open door to kitchen", "wait1"][i % 4])
        out[f"steps/s {label}"] = steps / (time.perf_counter() - start)
        env.close()
    env = ScienceWorldEnv("chemistry-mix/0", admissible_commands=False, max_steps=10**6)
    _, info = env.reset()
    # most of the gold path without finishing the task (steps after the end would not reach the engine)
    prefix = (info["expert_plan"][:12] + ["look around"] * 20)[:20]
    for a in prefix:
        env.step(a)
    repeats = 3 if quick else 10

    def clone_restore() -> None:
        env.restore_state(env.clone_state())

    def reset_replay() -> None:
        env.reset()
        for a in prefix:
            env.step(a)

    out["clone+restore ms (replay-based)"] = 1000 * _median_time(clone_restore, repeats)
    out["reset+replay ms"] = 1000 * _median_time(reset_replay, repeats)
    env.close()
    return out


def bench_textworld_express(quick: bool) -> dict[str, float]:
    from w2s_agents.envs.textworld_express_env import TextWorldExpressEnv

    out: dict[str, float] = {}
    steps = 500 if quick else 3000
    for label, kwargs in [
        ("with admissible commands + expert plan", {"admissible_commands": True, "expert_plan": True}),
        ("without", {"admissible_commands": False, "expert_plan": False}),
    ]:
        env = TextWorldExpressEnv("twx-cookingworld/train/0", max_steps=10**6, **kwargs)
        env.reset()
        cmds = ["look around", "inventory", "open fridge", "move south", "move north", "take cookbook"]
        for i in range(200):  # warm-up: the JVM compiles the hot paths
            env.step(cmds[i % len(cmds)])
        env.reset()
        start = time.perf_counter()
        for i in range(steps):
            env.step(cmds[i % len(cmds)])
        out[f"steps/s {label}"] = steps / (time.perf_counter() - start)
        env.close()
    env = TextWorldExpressEnv("twx-cookingworld/train/0", max_steps=10**6)
    prefix = _prefix(env, 20, seed=0)
    env.reset()
    for a in prefix:
        env.step(a)
    state = env.clone_state()
    repeats = 10 if quick else 40

    def clone_restore() -> None:
        env.restore_state(env.clone_state())

    def reset_replay() -> None:
        env.reset()
        for a in prefix:
            env.step(a)

    out["clone+restore ms (replay-based)"] = 1000 * _median_time(clone_restore, repeats)
    out["reset+replay ms"] = 1000 * _median_time(reset_replay, repeats)
    env.restore_state(state)  # the restore is exact: the same continuation twice
    a = [env.step(c) for c in ("look around", "inventory")]
    env.restore_state(state)
    assert [env.step(c) for c in ("look around", "inventory")] == a
    env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--no-sciworld", action="store_true", help="skip ScienceWorld (needs Java)")
    parser.add_argument("--no-twx", action="store_true", help="skip TextWorld-Express (needs Java)")
    parser.add_argument(
        "--cache-dir", default=None, help="TextWorld game cache (default: a temporary folder)"
    )
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_cpu_model()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    with tempfile.TemporaryDirectory(prefix="w2s-bench-games-") as tmp:
        tw = bench_textworld(args.cache_dir or tmp, args.quick)
    print("\n## w2s/TextWorld-v0 (tw-cooking game, recipe 2, 6 rooms)")
    with_ = tw["steps/s with admissible commands + expert plan"]
    without = tw["steps/s without (bare steps)"]
    print(f"steps/s with admissible commands + expert plan: {with_:9.1f}")
    print(f"steps/s without (bare steps):                   {without:9.1f}   ({without / with_:.1f}x)")
    print("state keys (on above): steps/s without them, and the share of speed the keys cost")
    for label in ("with admissible commands + expert plan", "without (bare steps)"):
        keyed, plain = tw[f"steps/s {label}"], tw[f"steps/s {label}, no state keys"]
        print(f"  {label + ':':39} {plain:9.1f}   (keyed / plain {keyed / plain:.2f}x)")
    key_us = tw["state key us"]
    print(f"  one state key: {key_us:.1f} us = {key_us * without / 1e4:.1f}% of a bare step")
    print("return to the state after a 20-step prefix (median):")
    cr, rs, cp, rr = tw["clone+restore ms"], tw["restore only ms"], tw["env.copy() ms"], tw["reset+replay ms"]
    print(f"  clone+restore  {cr:8.3f} ms   (restore alone {rs:.3f} ms)")
    print(f"  env.copy()     {cp:8.3f} ms   {cp / cr:7.1f}x clone+restore")
    print(f"  reset+replay   {rr:8.3f} ms   {rr / cr:7.1f}x clone+restore")
    target = rr / cr >= 10
    print(
        f"target clone+restore >= 10x faster than reset+replay: {'met' if target else 'NOT met'} ({rr / cr:.1f}x)"
    )

    if not args.no_sciworld:
        sw = bench_scienceworld(args.quick)
        print("\n## w2s/ScienceWorld-v0 (chemistry-mix/0)")
        a, b = sw["steps/s with admissible commands"], sw["steps/s without"]
        c = sw["steps/s without, no state keys"]
        print(f"steps/s with admissible commands: {a:8.1f}")
        print(f"steps/s without:                  {b:8.1f}   ({b / a:.1f}x)")
        print(f"steps/s without, no state keys:   {c:8.1f}   (keyed / plain {b / c:.2f}x)")
        cr, rr = sw["clone+restore ms (replay-based)"], sw["reset+replay ms"]
        print(f"  clone+restore (replay) {cr:8.1f} ms;  reset+replay {rr:8.1f} ms  ({rr / cr:.2f}x)")

    if not args.no_twx:
        tx = bench_textworld_express(args.quick)
        print("\n## w2s/TextWorldExpress-v0 (twx-cookingworld/train/0: 3 rooms, 2 ingredients)")
        a, b = tx["steps/s with admissible commands + expert plan"], tx["steps/s without"]
        print(f"steps/s with admissible commands + expert plan: {a:8.1f}")
        print(f"steps/s without:                                {b:8.1f}   ({b / a:.2f}x)")
        cr, rr = tx["clone+restore ms (replay-based)"], tx["reset+replay ms"]
        print("return to the state after a 20-step prefix (median):")
        print(f"  clone+restore (replay) {cr:8.2f} ms;  reset+replay {rr:8.2f} ms  ({rr / cr:.2f}x)")


if __name__ == "__main__":
    main()
