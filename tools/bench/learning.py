"""Learning benchmark: every head tuned on validation identities, reported on test identities.

Trains the ``tiny`` backbone (32x32 synthetic faces, 64-d embedding, batch 64, CosFace m=0.35
s=32, SGD with polynomial decay) through the project's recipe, loaders and IJB evaluation, in four
regimes (obsolescence, ordinary, quality, long tail). Three disjoint identity sets: training
(identities 0..N-1 of the synthetic generator), validation (an IJB-format tree of identities from
1,000,000, used only to choose settings) and test (a tree of identities from 2,000,000, used only
for the reported figures). See ``learning_grid`` for the grid and the order of the runs.

Every finished run is cached as ``<cache>/<key>.json`` (the key hashes its whole configuration),
so the grid runs in parts and the summary is rebuilt from the cache::

    python tools/bench/learning.py run --hours 2      # the next runs of the plan, 2 in parallel
    python tools/bench/learning.py plan               # what would run next
    python tools/bench/learning.py one --regime obsolescence --head pm --lr 0.03 --seed 1
    python tools/bench/learning.py summary            # tables, JSON and plots from the cache
    python tools/bench/learning.py summary --readme README.md   # ... and the tables into README
    python tools/bench/learning.py run --quick --cache /tmp/c --data /tmp/d   # mechanics (tests)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import learning_grid as grid  # noqa: E402
import learning_run as runner  # noqa: E402

RESULTS = REPO / "tools" / "bench" / "results"
DEFAULT_CACHE = RESULTS / "learning_runs"


def load_cache(cache_dir: Path) -> dict:
    """key -> cached result of every finished run under ``cache_dir``."""
    out = {}
    for path in sorted(cache_dir.glob("*.json")):
        result = json.loads(path.read_text())
        out[result["key"]] = result
    return out


def store(cache_dir: Path, result: dict) -> None:
    """Write one result atomically (a half-written file never enters the cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{result['key']}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, cache_dir / f"{result['key']}.json")


def prepare(specs: list[grid.RunSpec], data_root: Path) -> None:
    """Training sets and evaluation trees the runs need; checks the identity sets are disjoint."""
    quick = {s.quick for s in specs}
    trees = {(role, q): runner.prepare_tree(data_root, role, q) for q in quick for role in ("val", "test")}
    for regime in {s.regime for s in specs}:
        rec = runner.prepare_dataset(data_root, regime)
        for q in quick:
            runner.check_disjoint(runner.training_identities(rec), runner.tree_identities(trees["val", q]),
                                  runner.tree_identities(trees["test", q]))


def _work(spec: grid.RunSpec, data_root: str) -> dict:
    return runner.run_one(spec, Path(data_root))


def run_plan(planner: grid.Planner, cache_dir: Path, data_root: Path, jobs: int, max_runs: int | None,
             deadline: float | None, filters: dict) -> int:
    """Keep ``jobs`` runs going, highest priority first, re-planning after each; returns runs done."""
    from tqdm import tqdm

    done = 0
    running: dict = {}
    failed: set[str] = set()  # not retried in this invocation
    bar = tqdm(desc="runs", unit="run")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            may_start = (max_runs is None or done + len(running) < max_runs) and (deadline is None or time.time() < deadline)
            if may_start:
                busy = {spec.key() for spec in running.values()}
                pending = [s for s in planner.plan(**filters) if s.key() not in busy | failed]
                bar.total = done + len(running) + len(pending)
                bar.refresh()
                for spec in pending[: jobs - len(running)]:
                    prepare([spec], data_root)
                    running[pool.submit(_work, spec, str(data_root))] = spec
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # one broken run must not stop the grid; it is logged and skipped
                    failed.add(spec.key())
                    bar.write(f"{spec.label()}: FAILED: {exc}")
                    with open(cache_dir.parent / "learning_failures.log", "a", encoding="utf-8") as log:
                        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {spec.key()} {spec.label()}\n{exc}\n\n")
                    continue
                store(cache_dir, result)
                planner.cache[result["key"]] = result
                done += 1
                bar.update(1)
                bar.write(f"{spec.label()}: {result['status']}, val TAR@1e-3 {grid.score(result) * 100:.1f}")
    bar.close()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="tiny regimes and trees: mechanics only")
    common.add_argument("--cache", default=None, help=f"cached results (default {DEFAULT_CACHE}; quick: under --data)")
    common.add_argument("--data", default=str(REPO / "data_cache" / "learning"), help="datasets, trees, scratch")
    common.add_argument("--out", default=str(RESULTS), help="summary outputs")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(grid.STAGES)}")
    filters.add_argument("--regimes", default="", help="comma-separated subset of the regimes")
    filters.add_argument("--heads", default="", help="comma-separated subset of the heads")
    run = sub.add_parser("run", parents=[common, filters], help="run the next runs of the plan, then summarise")
    run.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    run.add_argument("--max-runs", type=int, default=None)
    run.add_argument("--hours", type=float, default=None, help="start no run after this much time")
    sub.add_parser("plan", parents=[common, filters], help="list the runs the plan would do next")
    summary = sub.add_parser("summary", parents=[common], help="tables, JSON and plots from the cache")
    summary.add_argument("--readme", default=None, help="also write the tables into this README between its markers")
    one = sub.add_parser("one", parents=[common], help="run (or show from the cache) one run")
    one.add_argument("--regime", required=True, choices=sorted(grid.REGIMES))
    one.add_argument("--head", required=True, choices=list(grid.HEADS))
    one.add_argument("--lr", type=float, required=True)
    one.add_argument("--head-lr-scale", type=float, default=1.0)
    one.add_argument("--samples-per-class", type=int, default=2)
    one.add_argument("--memory-factor", type=float, default=1.0)
    one.add_argument("--no-prototype-grad", action="store_true")
    one.add_argument("--margin", choices=sorted(grid.MARGINS), default="cosface",
                     help="cosface (m=0.35, as every grid run) or softmax (m=0)")
    one.add_argument("--seed", type=int, default=1)
    one.add_argument("--epochs", type=int, default=None, help="default: the regime's schedule")
    one.add_argument("--points", type=int, default=grid.CURVE_POINTS)
    one.add_argument("--identities", type=int, default=None, help="default: the regime's count")
    args = parser.parse_args(argv)

    data_root = Path(args.data)
    cache_dir = Path(args.cache) if args.cache else (data_root / "quick_cache" if args.quick else DEFAULT_CACHE)
    planner = grid.Planner(load_cache(cache_dir), quick=args.quick)
    if args.command in ("run", "plan"):
        split = lambda text: [x for x in text.split(",") if x] or None  # noqa: E731
        chosen = {"stages": split(args.stages), "regimes": split(args.regimes), "heads": split(args.heads)}
        if args.command == "plan":
            for spec in planner.plan(**chosen):
                print(f"{spec.stages[0]:<9} {spec.label()}")
            return 0
        deadline = time.time() + args.hours * 3600 if args.hours else None
        count = run_plan(planner, cache_dir, data_root, args.jobs, args.max_runs, deadline, chosen)
        print(f"{count} runs done, {len(planner.plan(**chosen))} left in this part of the plan")
    elif args.command == "one":
        regime = planner.regimes[args.regime]
        if args.identities:
            regime = regime.with_identities(args.identities)
        setting = grid.Setting(args.lr, args.head_lr_scale, args.samples_per_class, args.memory_factor,
                               not args.no_prototype_grad, args.margin)
        spec = planner.spec(regime, args.head, setting, args.seed, args.epochs, args.points, "one")
        result = planner.result(spec)
        if result is None:
            prepare([spec], data_root)
            result = runner.run_one(spec, data_root)
            store(cache_dir, result)
            planner.cache[result["key"]] = result
        print(json.dumps({k: result[k] for k in ("label", "status", "final", "cost")}, indent=1))
        return 0
    import learning_report as report

    readme = Path(args.readme) if getattr(args, "readme", None) else None
    report.write_summary(planner, Path(args.out), "learning_quick" if args.quick else "learning", readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
