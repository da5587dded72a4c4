"""Learning benchmark: regimes, heads, settings, the cache key of a run, and the plan of runs.

A run is one (regime, head, setting, seed, schedule). Its result is cached as JSON under a key
that hashes everything that can change it, so the grid runs in parts and is summarised again
from the cache. :func:`plan` reads the cache and returns the runs to do next, in priority order:
learning rates are searched on a half-decade grid (start points spanning 100x, then the
neighbours of the best until the best has both measured), settings are chosen on the
validation tree, and the report runs (seeds, longer schedules, identity counts, PM's knobs) use
the chosen settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

BENCH_VERSION = 3  # 3: batches from the on-demand sampler (keyed permutations)

# what every run shares (part of every cache key)
TRAINING = dict(network="tiny", embedding_size=64, image_size=32, batch_size=64, margin_list=(1.0, 0.0, 0.35),
                margin_scale=32.0, weight_decay=5e-4, optimizer="sgd", warmup_epoch=0, lr_power=2.0)
# evaluation trees: identities of the training generator (seed 0), far above every training set
VAL_TREE = dict(first_identity=1_000_000, num_identities=400, templates_per_identity=3, degraded_fraction=0.3)
TEST_TREE = dict(first_identity=2_000_000, num_identities=400, templates_per_identity=3, degraded_fraction=0.3)
# margins a setting may pick: CosFace as trained everywhere, and plain normalised softmax (m = 0)
MARGINS = {"cosface": dict(margin_list=(1.0, 0.0, 0.35)), "softmax": dict(margin_list=(1.0, 0.0, 0.0))}
QUICK_VAL_TREE = {**VAL_TREE, "num_identities": 16}
QUICK_TEST_TREE = {**TEST_TREE, "num_identities": 16}
FAR_TARGETS = (1e-4, 1e-3, 1e-2)
SELECT_METRIC = "tar@0.001"

LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # half-decade steps
LR_START = (0.01, 0.1, 1.0)  # every search measures these first: 100x
HEAD_LR_SCALES = (1.0, 10.0)  # centre heads: centres at lr x scale
# K tried at a head's best K = 2 setting: plain shuffling (K = 1; not for memory heads, whose positive
# prototype would be the sample itself) and larger identity groups
CENTRE_HEAD_OTHER_K = (1, 4)
MEMORY_HEAD_OTHER_K = (4,)
TUNE_SEED = 0
REPORT_SEEDS = (1, 2, 3)
CURVE_POINTS = 8
QUICK_CURVE_POINTS = 2
SCHEDULE_FACTORS = (2, 4)  # longer schedules run at the chosen settings, in every regime
# where the class-centre heads still rose from 2x to 4x (obsolescence), 8x for the core heads
LONGEST_SCHEDULE = {"obsolescence": 8}
IDENTITY_SWEEP = (1000, 10000)  # besides the regime's own count (obsolescence)
MEMORY_FACTORS = (0.5, 2.0, 4.0, 8.0)  # PM knobs besides 1.0; x8 (3,200 slots, 32 classes per step)
# gives the obsolescence regime's prototypes a ~100-step life, near the 128-256 steps of the configs/ memory sizes


@dataclass(frozen=True)
class Regime:
    """A synthetic training set: identities, images per identity, degraded share, schedule (epochs)."""

    name: str
    num_identities: int
    images_per_identity: int
    degraded_fraction: float
    long_tail: bool = False
    epochs: int = 16

    def with_identities(self, count: int) -> "Regime":
        return dataclasses.replace(self, num_identities=int(count))


REGIMES = {
    "obsolescence": Regime("obsolescence", 4000, 4, 0.1),
    "ordinary": Regime("ordinary", 500, 32, 0.1),
    "quality": Regime("quality", 1000, 16, 0.5),
    "longtail": Regime("longtail", 2000, 8, 0.2, long_tail=True),
}
QUICK_REGIMES = {
    "obsolescence": Regime("obsolescence", 96, 4, 0.1, epochs=2),
    "ordinary": Regime("ordinary", 16, 16, 0.1, epochs=2),
    "quality": Regime("quality", 32, 8, 0.5, epochs=2),
    "longtail": Regime("longtail", 48, 6, 0.2, long_tail=True, epochs=2),
}
QUICK_IDENTITY_SWEEP = (48,)

HEADS = {
    "pm": dict(head="prototype_memory"),
    "full_softmax": dict(head="partial_fc", sample_rate=1.0),
    "partial_fc_0.1": dict(head="partial_fc", sample_rate=0.1),
    "partial_fc_0.3": dict(head="partial_fc", sample_rate=0.3),
    "pm_mining": dict(head="prototype_memory", doppelganger_mining=True),
    "qapm_norm": dict(head="qapm", quality_source="norm"),
    "qapm_soft": dict(head="qapm", quality_source="recognizability_soft"),
    "qapm_hard": dict(head="qapm", quality_source="recognizability_hard"),
    "qapm_oracle": dict(head="qapm", quality_source="external", quality_file="QUALITY"),
    # AdaFace's margin (m 0.4, h 0.333, t_alpha 0.01; s = margin_scale as every run) instead of CosFace
    "partial_fc_0.1_adaface": dict(head="partial_fc", sample_rate=0.1, margin="adaface"),
    "pm_adaface": dict(head="prototype_memory", margin="adaface"),
    "qapm_norm_adaface": dict(head="qapm", quality_source="norm", margin="adaface"),
}
CORE_HEADS = ("pm", "full_softmax", "partial_fc_0.1", "partial_fc_0.3")
OTHER_HEADS = ("pm_mining", "qapm_norm", "qapm_soft", "qapm_hard", "qapm_oracle")
QAPM_HEADS = ("qapm_norm", "qapm_soft", "qapm_hard", "qapm_oracle")
ADAFACE_HEADS = ("partial_fc_0.1_adaface", "pm_adaface", "qapm_norm_adaface")  # quality and long-tail regimes
SWEEP_HEADS = CORE_HEADS


def is_centre_head(head: str) -> bool:
    """Heads with class centres (learnable parameters): full softmax and Partial FC."""
    return HEADS[head]["head"] == "partial_fc"


@dataclass(frozen=True)
class Setting:
    """What is tuned or swept: learning rates, K, PM's memory and prototype gradient."""

    lr: float
    head_lr_scale: float = 1.0
    samples_per_class: int = 2
    memory_factor: float = 1.0  # memory_size = memory_factor x the columns of Partial FC 0.1
    prototype_grad: bool = True
    margin: str = "cosface"  # a key of MARGINS


@dataclass(frozen=True)
class RunSpec:
    """One training run and its evaluation points."""

    regime: Regime
    head: str
    setting: Setting
    seed: int
    epochs: int
    points: int
    quick: bool = False
    stages: tuple[str, ...] = field(default=(), compare=False)  # why it runs; not part of the key

    def config(self) -> dict:
        """Everything that determines the result (the cache key hashes this)."""
        return {
            "version": BENCH_VERSION, "quick": self.quick, "regime": dataclasses.asdict(self.regime),
            "head": self.head, "head_config": HEADS[self.head], "setting": dataclasses.asdict(self.setting),
            "seed": self.seed, "epochs": self.epochs, "points": self.points, "training": TRAINING,
            "val_tree": QUICK_VAL_TREE if self.quick else VAL_TREE,
            "test_tree": QUICK_TEST_TREE if self.quick else TEST_TREE,
        }

    def key(self) -> str:
        text = json.dumps(self.config(), sort_keys=True, default=list)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        s = self.setting
        extra = "" if s.head_lr_scale == 1.0 else f" hs{s.head_lr_scale:g}"
        extra += "" if s.samples_per_class == 2 else f" K{s.samples_per_class}"
        extra += "" if s.memory_factor == 1.0 else f" mem{s.memory_factor:g}"
        extra += "" if s.prototype_grad else " nograd"
        extra += "" if s.margin == "cosface" else f" {s.margin}"
        return (f"{self.regime.name}/n{self.regime.num_identities} {self.head} lr{s.lr:g}{extra} "
                f"seed{self.seed} e{self.epochs}")


Cache = dict  # key -> result dict (see learning_run.run_one)


def score(result: dict) -> float:
    """Selection figure of a finished run: final validation TAR at FAR 1e-3 (0 if it diverged)."""
    if result.get("status") != "ok":
        return 0.0
    return float(result["final"]["val"][SELECT_METRIC])


def _neighbours(lr: float) -> list[float]:
    i = LR_GRID.index(lr)
    return [LR_GRID[j] for j in (i - 1, i + 1) if 0 <= j < len(LR_GRID)]


def search_lr(measure: Callable[[float], dict | None], start: Iterable[float]) -> tuple[list[float], float | None]:
    """One step of the learning-rate search on ``LR_GRID``.

    ``measure(lr)`` returns the cached result or None. Returns (learning rates still to run,
    best lr so far or None). The search is done when it returns no lr to run: every start point is
    measured and the best point's grid neighbours are measured too.
    """
    start = list(start)
    missing = [lr for lr in start if measure(lr) is None]
    if missing:
        return missing, None
    measured = {lr: score(r) for lr in LR_GRID if (r := measure(lr)) is not None}
    best = max(measured, key=lambda lr: (measured[lr], -abs(math.log10(lr) + 1)))  # ties: nearer 0.1
    return [lr for lr in _neighbours(best) if lr not in measured], best


@dataclass
class Planner:
    """Reads the cache and proposes the next runs (see the module docstring)."""

    cache: Cache
    quick: bool = False
    regimes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.regimes:
            self.regimes = QUICK_REGIMES if self.quick else REGIMES

    @property
    def points(self) -> int:
        """Evaluations along a report run."""
        return QUICK_CURVE_POINTS if self.quick else CURVE_POINTS

    def spec(self, regime: Regime, head: str, setting: Setting, seed: int, epochs: int | None = None,
             points: int = 1, stage: str = "") -> RunSpec:
        return RunSpec(regime, head, setting, seed, epochs or regime.epochs, points, self.quick, (stage,))

    def result(self, spec: RunSpec) -> dict | None:
        return self.cache.get(spec.key())

    # --- tuning -----------------------------------------------------------------------------
    def _line(self, regime: Regime, head: str, base: Setting, start: Iterable[float]) -> tuple[list[RunSpec], float | None]:
        def make(lr: float) -> RunSpec:
            return self.spec(regime, head, dataclasses.replace(base, lr=lr), TUNE_SEED, stage="tune")

        todo, best = search_lr(lambda lr: self.result(make(lr)), start)
        return [make(lr) for lr in todo], best

    def tuning(self, regime_name: str, head: str) -> tuple[list[RunSpec], Setting | None, list[dict]]:
        """(runs still needed, chosen setting once the search is complete, every measured point)."""
        regime = self.regimes[regime_name]
        scales = HEAD_LR_SCALES if is_centre_head(head) else (1.0,)
        todo: list[RunSpec] = []
        candidates: list[Setting] = []
        for scale in scales:
            runs, best = self._line(regime, head, Setting(lr=LR_START[0], head_lr_scale=scale), LR_START)
            todo += runs
            if best is not None and not runs:
                candidates.append(Setting(lr=best, head_lr_scale=scale))
        chosen = None
        if not todo and candidates:
            chosen = max(candidates, key=lambda s: score(self.result(self.spec(regime, head, s, TUNE_SEED))))
            # the other K values tried at the best K = 2 setting; the best of them searched on if it wins
            ks = CENTRE_HEAD_OTHER_K if is_centre_head(head) else MEMORY_HEAD_OTHER_K
            others = [dataclasses.replace(chosen, samples_per_class=k) for k in ks]
            results = [self.result(self.spec(regime, head, other, TUNE_SEED)) for other in others]
            missing = [other for other, r in zip(others, results) if r is None]
            if missing:
                todo += [self.spec(regime, head, other, TUNE_SEED, stage="tune") for other in missing]
                chosen = None
            else:
                other, other_result = max(zip(others, results), key=lambda pair: score(pair[1]))
                if score(other_result) > score(self.result(self.spec(regime, head, chosen, TUNE_SEED))):
                    runs, best = self._line(regime, head, other, [other.lr])
                    todo += runs
                    chosen = dataclasses.replace(other, lr=best) if not runs else None
        points = [r for r in self.cache.values() if r["spec"]["regime"]["name"] == regime_name
                  and r["spec"]["regime"]["num_identities"] == regime.num_identities and r["spec"]["head"] == head
                  and r["spec"]["seed"] == TUNE_SEED and r["spec"]["epochs"] == regime.epochs
                  and r["spec"]["points"] == 1 and r["spec"]["quick"] == self.quick]
        return todo, chosen, points

    def chosen(self, regime_name: str, head: str) -> Setting | None:
        return self.tuning(regime_name, head)[1]

    # --- report runs ------------------------------------------------------------------------
    def seeds(self, regime_name: str, head: str, regime: Regime | None = None, setting: Setting | None = None,
              epochs: int | None = None, stage: str = "seeds") -> list[RunSpec]:
        regime = regime or self.regimes[regime_name]
        setting = setting or self.chosen(regime_name, head)
        if setting is None:
            return []
        return [self.spec(regime, head, setting, seed, epochs, self.points, stage) for seed in REPORT_SEEDS]

    def schedule_runs(self, regime_name: str, head: str) -> list[RunSpec]:
        regime = self.regimes[regime_name]
        setting = self.chosen(regime_name, head)
        if setting is None:
            return []
        factors = SCHEDULE_FACTORS
        if regime_name in LONGEST_SCHEDULE and head in CORE_HEADS:
            factors += (LONGEST_SCHEDULE[regime_name],)
        return [self.spec(regime, head, setting, REPORT_SEEDS[0], regime.epochs * f, self.points, "schedule")
                for f in factors]

    def sweep_runs(self, head: str) -> list[RunSpec]:
        base = self.regimes["obsolescence"]
        runs: list[RunSpec] = []
        for count in (QUICK_IDENTITY_SWEEP if self.quick else IDENTITY_SWEEP):
            runs += self.seeds("obsolescence", head, regime=base.with_identities(count), stage="sweep")
        return runs

    def knob_runs(self) -> list[RunSpec]:
        chosen = self.chosen("obsolescence", "pm")
        if chosen is None:
            return []
        other_k = 2 if chosen.samples_per_class == 4 else 4  # K in {2, 4}
        variants = [dataclasses.replace(chosen, memory_factor=f) for f in MEMORY_FACTORS]
        variants += [dataclasses.replace(chosen, samples_per_class=other_k), dataclasses.replace(chosen, prototype_grad=False)]
        runs: list[RunSpec] = []
        for setting in variants:
            runs += self.seeds("obsolescence", "pm", setting=setting, stage="knobs")
        return runs

    # --- the plan ---------------------------------------------------------------------------
    def steps(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(stage, regime, heads) in priority order."""
        every = CORE_HEADS + OTHER_HEADS
        return [
            ("tune", "obsolescence", CORE_HEADS), ("tune", "ordinary", CORE_HEADS),
            ("seeds", "obsolescence", CORE_HEADS), ("seeds", "ordinary", CORE_HEADS),
            ("tune", "quality", CORE_HEADS + QAPM_HEADS), ("tune", "longtail", CORE_HEADS),
            ("schedule", "obsolescence", CORE_HEADS), ("sweep", "obsolescence", SWEEP_HEADS),
            ("seeds", "quality", CORE_HEADS + QAPM_HEADS), ("seeds", "longtail", CORE_HEADS),
            ("tune", "quality", ADAFACE_HEADS), ("tune", "longtail", ADAFACE_HEADS),
            ("seeds", "quality", ADAFACE_HEADS), ("seeds", "longtail", ADAFACE_HEADS),
            ("tune", "obsolescence", OTHER_HEADS), ("tune", "ordinary", OTHER_HEADS),
            ("tune", "quality", ("pm_mining",)), ("tune", "longtail", OTHER_HEADS),
            ("seeds", "obsolescence", OTHER_HEADS), ("seeds", "ordinary", OTHER_HEADS),
            ("seeds", "quality", ("pm_mining",)), ("seeds", "longtail", OTHER_HEADS),
            ("knobs", "obsolescence", ("pm",)),
            ("schedule", "ordinary", CORE_HEADS), ("schedule", "longtail", CORE_HEADS),
            ("schedule", "quality", CORE_HEADS + ("qapm_soft",)),
            ("schedule", "ordinary", every), ("schedule", "quality", every), ("schedule", "longtail", every),
            ("schedule", "obsolescence", OTHER_HEADS),
        ]

    def plan(self, stages: Iterable[str] | None = None, regimes: Iterable[str] | None = None,
             heads: Iterable[str] | None = None) -> list[RunSpec]:
        """Runs not in the cache whose prerequisites are, highest priority first (no duplicates)."""
        stages, regimes, heads = (set(x) if x else None for x in (stages, regimes, heads))
        out: dict[str, RunSpec] = {}
        for stage, regime, stage_heads in self.steps():
            if (stages and stage not in stages) or (regimes and regime not in regimes) or regime not in self.regimes:
                continue
            for head in stage_heads:
                if heads and head not in heads:
                    continue
                if stage == "tune":
                    runs = self.tuning(regime, head)[0]
                elif stage == "seeds":
                    runs = self.seeds(regime, head)
                elif stage == "schedule":
                    runs = self.schedule_runs(regime, head)
                elif stage == "sweep":
                    runs = self.sweep_runs(head)
                else:
                    runs = self.knob_runs()
                for run in runs:
                    key = run.key()
                    if key not in self.cache and key not in out:
                        out[key] = run
        return list(out.values())


def spec_from_config(config: dict) -> RunSpec:
    """The RunSpec a cached result's ``spec`` describes (inverse of :meth:`RunSpec.config`)."""
    return RunSpec(Regime(**config["regime"]), config["head"], Setting(**config["setting"]), config["seed"],
                   config["epochs"], config["points"], config["quick"])


STAGES = ("tune", "seeds", "schedule", "sweep", "knobs")
