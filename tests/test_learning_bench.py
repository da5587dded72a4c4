"""tools/bench/learning.py: the grid's mechanics in --quick mode, the cache key, the identity sets."""
import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "bench"))


def bench(name: str):
    """A module of tools/bench imported by name (spawned workers import it the same way)."""
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def quick_grid(tmp_path_factory):
    """PM tuned and reported in the quick obsolescence regime (cache, data and summary under tmp)."""
    root = tmp_path_factory.mktemp("learning")
    args = ["--quick", "--data", str(root / "data"), "--cache", str(root / "cache"), "--out", str(root / "out")]
    assert bench("learning").main(["run", *args, "--regimes", "obsolescence", "--heads", "pm",
                                   "--stages", "tune,seeds", "--jobs", "2"]) == 0
    return root, args


def cached(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "cache").glob("*.json"))]


def test_quick_grid_tunes_on_validation_then_reports_seeds(quick_grid):
    grid = bench("learning_grid")
    root, _ = quick_grid
    results = cached(root)
    tune = [r for r in results if r["spec"]["seed"] == grid.TUNE_SEED]
    report = [r for r in results if r["spec"]["seed"] in grid.REPORT_SEEDS]
    lrs = {r["spec"]["setting"]["lr"]: grid.score(r) for r in tune if r["spec"]["setting"]["samples_per_class"] == 2}
    assert set(grid.LR_START) <= set(lrs)  # the start points span 100x
    best = max(lrs, key=lambda lr: (lrs[lr], -abs(math.log10(lr) + 1)))
    i = grid.LR_GRID.index(best)
    assert {grid.LR_GRID[j] for j in (i - 1, i + 1) if 0 <= j < len(grid.LR_GRID)} <= set(lrs)  # search finished
    other_k = {r["spec"]["setting"]["lr"]: grid.score(r) for r in tune
               if r["spec"]["setting"]["samples_per_class"] in grid.MEMORY_HEAD_OTHER_K}
    assert best in other_k  # PM also tried K = 4 at its best K = 2 setting
    summary = json.loads((root / "out" / "learning_quick.json").read_text())
    chosen = summary["chosen"]["obsolescence"]["pm"]
    if other_k[best] > lrs[best]:  # K = 4 won on validation: its own search decides the lr
        assert chosen["samples_per_class"] == 4 and other_k[chosen["lr"]] == max(other_k.values())
    else:
        assert chosen["samples_per_class"] == 2 and chosen["lr"] == best
    assert len(report) == len(grid.REPORT_SEEDS)
    for r in report:  # every report run uses the setting validation chose
        assert r["spec"]["setting"] == chosen and r["status"] == "ok"
        assert [p["step"] for p in r["curve"]][-1] == r["steps"] and len(r["curve"]) == grid.QUICK_CURVE_POINTS
        for role in ("val", "test"):
            assert 0.0 <= r["final"][role]["tar@0.001"] <= 1.0
            assert r["final"][role]["genuine_pairs"] == 3 * grid.QUICK_TEST_TREE["num_identities"]
        assert r["cost"]["cpu_s_per_step"] > 0 and r["cost"]["peak_rss_mb"] > 50
        assert math.isfinite(r["cost"]["loop_s_per_step"]) and r["ages"]["counts"]
    assert [row["head"] for row in summary["main"]] == ["pm"] and summary["main"][0]["seeds"] == 3
    table = (root / "out" / "learning_quick.md").read_text()
    assert f"| obsolescence | pm | {bench('learning_report').setting_text(chosen)} |" in table
    for name in ("lr", "steps", "time", "age"):
        assert (root / "out" / f"learning_quick_{name}.png").stat().st_size > 1000


def test_a_second_invocation_runs_nothing_and_one_run_comes_from_the_cli(quick_grid):
    learning = bench("learning")
    root, args = quick_grid
    before = {p.name: p.stat().st_mtime_ns for p in (root / "cache").glob("*.json")}
    assert learning.main(["run", *args, "--regimes", "obsolescence", "--heads", "pm", "--stages", "tune,seeds"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (root / "cache").glob("*.json")} == before

    one = ["one", *args, "--regime", "obsolescence", "--head", "partial_fc_0.1", "--lr", "0.1",
           "--head-lr-scale", "10", "--samples-per-class", "1", "--seed", "5", "--points", "1", "--margin", "softmax"]
    assert learning.main(one) == 0
    new = [r for r in cached(root) if r["key"] + ".json" not in before]
    assert len(new) == 1 and new[0]["spec"]["setting"] == {
        "lr": 0.1, "head_lr_scale": 10.0, "samples_per_class": 1, "memory_factor": 1.0, "prototype_grad": True,
        "margin": "softmax"}
    spec = bench("learning_grid").spec_from_config(new[0]["spec"])
    job = bench("learning_run").job_config(root / "job" / "job.py", spec, root / "rec", root / "out", stop=1)
    assert "config.margin_list = (1.0, 0.0, 0.0)" in job.read_text()  # the margin reaches the job
    path = root / "cache" / f"{new[0]['key']}.json"
    stamp = path.stat().st_mtime_ns
    assert learning.main(one) == 0 and path.stat().st_mtime_ns == stamp  # served from the cache


def test_training_validation_and_test_identities_are_disjoint(quick_grid):
    grid, run = bench("learning_grid"), bench("learning_run")
    root, _ = quick_grid
    data = root / "data"
    train = run.training_identities(run.dataset_dir(data, grid.QUICK_REGIMES["obsolescence"]))
    val = run.tree_identities(run.tree_dir(data, "val", True))
    test = run.tree_identities(run.tree_dir(data, "test", True))
    assert train == set(range(grid.QUICK_REGIMES["obsolescence"].num_identities))
    for ids, tree in ((val, grid.QUICK_VAL_TREE), (test, grid.QUICK_TEST_TREE)):  # the tree's own index range
        assert ids == set(range(tree["first_identity"], tree["first_identity"] + tree["num_identities"]))
    assert not (train & val) and not (train & test) and not (val & test)
    run.check_disjoint(train, val, test)
    with pytest.raises(run.DataError, match="training and test identities overlap"):
        run.check_disjoint(train, val, test | {3})
    # the full-size trees lie above every training set of the grid (regimes and identity sweep)
    largest = max([r.num_identities for r in grid.REGIMES.values()] + list(grid.IDENTITY_SWEEP))
    spans = sorted((t["first_identity"], t["first_identity"] + t["num_identities"]) for t in (grid.VAL_TREE, grid.TEST_TREE))
    assert largest <= spans[0][0] and spans[0][1] <= spans[1][0]
    # enough genuine template pairs that one pair is under 0.1 point
    assert 100.0 / (grid.TEST_TREE["num_identities"] * math.comb(grid.TEST_TREE["templates_per_identity"], 2)) < 0.1


def test_the_cache_key_changes_with_every_setting():
    grid = bench("learning_grid")
    base = grid.RunSpec(grid.REGIMES["obsolescence"], "pm", grid.Setting(lr=0.1), seed=1, epochs=16, points=8)
    keys = {base.key()}
    changed = {"lr": 0.3, "head_lr_scale": 10.0, "samples_per_class": 4, "memory_factor": 2.0, "prototype_grad": False,
               "margin": "softmax"}
    for name, value in changed.items():
        keys.add(dataclasses.replace(base, setting=dataclasses.replace(base.setting, **{name: value})).key())
    regime_changes = {"name": "other", "num_identities": 1000, "images_per_identity": 8, "degraded_fraction": 0.5,
                      "long_tail": True, "epochs": 32}
    for name, value in regime_changes.items():
        keys.add(dataclasses.replace(base, regime=dataclasses.replace(base.regime, **{name: value})).key())
    for name, value in {"head": "qapm_norm", "seed": 2, "epochs": 32, "points": 1, "quick": True}.items():
        keys.add(dataclasses.replace(base, **{name: value}).key())
    assert len(keys) == 1 + len(changed) + len(regime_changes) + 5
    assert set(grid.Setting.__dataclass_fields__) == set(changed)  # every field is covered above
    assert set(grid.Regime.__dataclass_fields__) == set(regime_changes)
    assert dataclasses.replace(base, stages=("seeds",)).key() == base.key()  # why it runs is not what it is
    assert grid.spec_from_config(base.config()).key() == base.key()


def test_head_state_counts_centres_and_momentum_or_memory_slots():
    grid, run = bench("learning_grid"), bench("learning_run")
    regime, dim = grid.REGIMES["obsolescence"], grid.TRAINING["embedding_size"]
    for head in ("full_softmax", "partial_fc_0.1"):  # float32 centres and their SGD momentum, an int64 step per class
        spec = grid.RunSpec(regime, head, grid.Setting(lr=0.1), seed=1, epochs=16, points=8)
        expected = regime.num_identities * (2 * dim * 4 + 8) + 8
        assert run.head_state_mb(spec) == pytest.approx(expected / 2**20)
    for factor in (1.0, 4.0):  # memory_size = factor x the columns of Partial FC 0.1: slots, their class and step
        spec = grid.RunSpec(regime, "pm", grid.Setting(lr=0.1, memory_factor=factor), seed=1, epochs=16, points=8)
        slots = round(factor * regime.num_identities / 10)
        assert run.head_state_mb(spec) == pytest.approx((slots * (dim * 4 + 2 * 8) + 8) / 2**20)


def test_the_lr_search_measures_the_start_points_then_walks_to_a_local_best():
    grid = bench("learning_grid")
    truth = {0.001: 0.1, 0.003: 0.2, 0.01: 0.4, 0.03: 0.7, 0.1: 0.5, 0.3: 0.3, 1.0: 0.0, 3.0: 0.0, 10.0: 0.0}
    measured: dict = {}

    def measure(lr):
        return {"status": "ok", "final": {"val": {grid.SELECT_METRIC: truth[lr]}}} if lr in measured else None

    rounds = []
    while True:
        todo, best = grid.search_lr(measure, grid.LR_START)
        if not todo:
            break
        rounds.append(sorted(todo))
        measured.update(dict.fromkeys(todo))
    assert rounds[0] == sorted(grid.LR_START)
    assert rounds[1:] == [[0.03, 0.3]]  # neighbours of 0.1, the best start point
    assert best == 0.03 and {0.01, 0.1} <= set(measured)
    # a diverged run counts as zero
    assert grid.score({"status": "diverged", "final": None}) == 0.0


def _tune_to_the_end(grid, head: str, truth) -> tuple[object, list]:
    """Run the planner's tuning of ``head`` (obsolescence regime) against ``truth(setting) -> score``."""
    planner = grid.Planner({})
    proposed = []
    while True:
        todo, chosen, _ = planner.tuning("obsolescence", head)
        if not todo:
            return chosen, proposed
        for spec in todo:
            proposed.append(spec.setting)
            planner.cache[spec.key()] = {"status": "ok", "spec": spec.config(),
                                         "final": {"val": {grid.SELECT_METRIC: truth(spec.setting)}}}


def test_tuning_tries_the_other_k_at_the_best_setting_and_searches_on_when_it_wins():
    grid = bench("learning_grid")

    def peaked(lr: float, at: float) -> float:
        return 1.0 - abs(math.log10(lr) - math.log10(at)) / 10

    # PM: K = 2 peaks at lr 0.03; K = 4 is better and peaks at 0.01, so its search walks there
    chosen, proposed = _tune_to_the_end(grid, "pm", lambda s: peaked(s.lr, 0.03 if s.samples_per_class == 2 else 0.01)
                                        + (0.1 if s.samples_per_class == 4 else 0.0))
    assert {s.samples_per_class for s in proposed} == {2, *grid.MEMORY_HEAD_OTHER_K} == {2, 4}
    assert dataclasses.replace(proposed[0], lr=0.03, samples_per_class=4) in proposed  # tried at the K = 2 best
    assert (chosen.lr, chosen.samples_per_class, chosen.head_lr_scale) == (0.01, 4, 1.0)
    # PM where K = 4 loses: one extra run, K = 2 stays
    chosen, proposed = _tune_to_the_end(grid, "pm", lambda s: peaked(s.lr, 0.03) - (s.samples_per_class == 4))
    assert [s for s in proposed if s.samples_per_class == 4] == [dataclasses.replace(chosen, samples_per_class=4)]
    assert (chosen.lr, chosen.samples_per_class) == (0.03, 2)
    # a centre head tries K = 1 and K = 4 (and both centre learning-rate lines); the better one wins
    chosen, proposed = _tune_to_the_end(grid, "full_softmax", lambda s: peaked(s.lr, 0.3) + 0.05 * (s.head_lr_scale > 1)
                                        + 0.01 * (s.samples_per_class == 1) + 0.005 * (s.samples_per_class == 4))
    assert {s.samples_per_class for s in proposed} == {1, 2, 4}
    assert {s.head_lr_scale for s in proposed} == set(grid.HEAD_LR_SCALES)
    assert (chosen.lr, chosen.head_lr_scale, chosen.samples_per_class) == (0.3, 10.0, 1)


def _finished(spec, val: float, test: float) -> dict:
    """A cached result with the fields the report reads (synthetic figures)."""
    point = {"step": 100, "cpu_s": 10.0, "test": {"tar@0.001": test}}
    return {"status": "ok", "spec": spec.config(), "curve": [point],
            "final": {"val": {"tar@0.0001": val, "tar@0.001": val}, "test": {"tar@0.0001": test, "tar@0.001": test}},
            "cost": {"loop_s_per_step": 0.05, "cpu_s_per_step": 0.1, "peak_rss_mb": 500.0}, "ages": None}


def test_the_report_sets_each_adaface_head_against_its_cosface_head():
    grid, report = bench("learning_grid"), bench("learning_report")
    planner = grid.Planner({})
    test_figures = {"pm": [0.90, 0.91, 0.92], "pm_adaface": [0.95, 0.96, 0.97],
                    "partial_fc_0.1": [0.90, 0.91, 0.92], "partial_fc_0.1_adaface": [0.905, 0.91, 0.915]}
    for head in test_figures:
        while (todo := planner.tuning("quality", head)[0]):
            for spec in todo:
                planner.cache[spec.key()] = _finished(spec, 1.0 - abs(math.log10(spec.setting.lr) + 2) / 10, 0.5)
        for spec, test in zip(planner.seeds("quality", head), test_figures[head]):
            planner.cache[spec.key()] = _finished(spec, test, test)
    rows = {row["head"]: row for row in report.collect(planner)["adaface"]}
    assert set(rows) == {"pm", "partial_fc_0.1"}  # QAPM has no CosFace figures here
    assert rows["pm"]["adaface"][0] == pytest.approx(96.0) and rows["pm"]["cosface"][0] == pytest.approx(91.0)
    assert rows["pm"]["verdict"] == "better"  # 5 points apart, 1 + 1 of spread
    assert rows["partial_fc_0.1"]["verdict"] == "tie"
    assert "| quality | pm | 91.0 ± 1.0 | 96.0 ± 1.0 | better |" in report.markdown(report.collect(planner))


def test_the_summary_replaces_only_the_marked_block_of_the_readme(tmp_path):
    report = bench("learning_report")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.README_BEGIN}\nold table\n{report.README_END}\nafter\n")
    report.splice_readme(readme, "| new | table |\n")
    text = readme.read_text()
    assert "old table" not in text and "| new | table |" in text
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
    report.splice_readme(readme, "| newer |\n")  # the markers survive, so it runs again
    assert "| new | table |" not in readme.read_text() and "| newer |" in readme.read_text()
    (tmp_path / "OTHER.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="OTHER.md"):
        report.splice_readme(tmp_path / "OTHER.md", "| x |\n")


def test_the_longest_schedule_runs_only_for_the_core_heads_where_set_and_widens_the_table():
    grid, report = bench("learning_grid"), bench("learning_report")
    planner = grid.Planner({})
    (regime, factor), = grid.LONGEST_SCHEDULE.items()
    base = planner.regimes[regime].epochs
    for head in ("full_softmax", "pm_mining"):
        while (todo := planner.tuning(regime, head)[0]):
            for spec in todo:
                planner.cache[spec.key()] = _finished(spec, 1.0 - abs(math.log10(spec.setting.lr) + 2) / 10, 0.5)
        for spec in planner.seeds(regime, head):
            planner.cache[spec.key()] = _finished(spec, 0.9, 0.9)
        for spec in planner.schedule_runs(regime, head):
            planner.cache[spec.key()] = _finished(spec, spec.epochs / 1000, spec.epochs / 1000)
    core = [s.epochs for s in planner.schedule_runs(regime, "full_softmax")]
    other = [s.epochs for s in planner.schedule_runs(regime, "pm_mining")]
    assert core == [base * f for f in (*grid.SCHEDULE_FACTORS, factor)]
    assert other == [base * f for f in grid.SCHEDULE_FACTORS]
    text = report.markdown(report.collect(planner))
    header = next(line for line in text.splitlines() if line.startswith("| regime | head | epochs"))
    assert header.count("epochs: test (val)") == len(grid.SCHEDULE_FACTORS) + 2
    fs_row = next(line for line in text.splitlines() if line.startswith(f"| {regime} | full_softmax | {base}:"))
    assert f"{base * factor}: {base * factor / 10:.1f}" in fs_row
    mining_row = next(line for line in text.splitlines() if line.startswith(f"| {regime} | pm_mining | {base}:"))
    assert mining_row.endswith("|  |")  # one empty cell: it has no longest schedule
