"""The protocol of issue #29: what runs, in what order, and how each setting is chosen.

Per horizon N (smallest first; a larger horizon starts its searches from the smaller one's
choices):
1. AdamW and Adam-mini: learning rate tuned at N steps on the tuning seed (not reported).
2. Both at N/2, 3N/4 and N steps on every reported seed, each run with its own full schedule.
3. AdamMini-BSFA (k, l, T fixed): learning rate x gamma x alpha tuned at N/2 on the tuning seed.
4. AdamMini-BSFA at N/2 and N, AdamW-BSFA (its rate tuned at N/2, gamma and alpha carried
   over) at N/2 and N, the control (Adam-mini at BSFA's rate and at that rate times gamma, N/2)
   and the ablations (BSFA's blocks as the Adam-mini partition; the first projection once the
   history holds k updates; N/2), every reported seed.

Searches are grids that widen: while the best point sits at an edge of the values tried along
an axis (among the points that share its other coordinates), the next value beyond is tried,
for at most `max_rounds` rounds. Learning rates are LR_BASE * 2**e for integer e; gamma moves
along GAMMA_LADDER; alpha takes the paper's values {1, 0.5, 0.2} (no widening). Every choice is
written to OUT/decisions.json as it is made.
"""

import json
import math
import os
import threading

BASES = ("adamw", "adam-mini")
GAMMA_LADDER = [0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
ALPHAS = [1.0, 0.5, 0.2]
E_RANGE = (-8, 5)  # learning-rate exponents tried at most: 3e-3 * 2**e, 1.2e-5 .. 0.096


class Settings:
    """Everything that sets the study's size: the full study, `--quick` or `--paper`."""

    def __init__(self, args):
        self.mode = "paper" if args.paper else "quick" if args.quick else "full"
        self.vocab_size, self.batch_size, self.seq_len = 1024, 16, 128
        self.horizons = [1000, 5000]
        self.seeds = {1000: [0, 1, 2], 5000: [0, 1, 2]}
        self.tune_seed, self.eval_seed = 1000, 0
        self.eval_batches, self.final_eval_batches = 8, None  # None: the whole split
        self.lr_base, self.base_centre = 3e-3, 1  # first grid: 3e-3 * 2**{0, 1, 2}
        self.gammas = [1.0, 1.25, 1.5, 2.0, 3.0]  # first BSFA grid (alpha 0.5)
        self.rank, self.history, self.interval = 50, 60, 10
        self.max_rounds = 3
        self.warmup_fraction = 20  # warm-up N / 20 steps for every run of horizon N
        self.checkpoint_every = 1000
        if args.quick:
            self.horizons, self.seq_len = [40, 80], 64
            self.seeds = {40: [0, 1], 80: [0, 1]}
            self.gammas = [1.5, 2.0]
            self.rank, self.history, self.interval = 4, 8, 5
            self.max_rounds, self.final_eval_batches, self.checkpoint_every = 1, 8, 20
            self.eval_batches = 2
        if args.paper:
            self.horizons, self.seeds = [100_000], {100_000: [0, 1, 2]}
            self.lr_base, self.base_centre = 5e-4, 0
            self.warmup_fraction = 200  # the paper's 500 of 100k steps
            self.batch_size, self.seq_len = 240, 150  # the preset's (for tokens per parameter)
            self.checkpoint_every = 5000
        if args.horizons:
            self.horizons = [int(h) for h in args.horizons.split(",")]
        if args.seeds:
            n = int(args.seeds)
            self.seeds = {h: list(range(n)) for h in self.horizons}
        for h in self.horizons:
            self.seeds.setdefault(h, [0, 1, 2])

    def eval_every(self, h):
        return max(1, h // 20)

    def warmup(self, h):
        return max(1, h // self.warmup_fraction)

    def lr(self, e):
        return self.lr_base * 2.0 ** e

    def public(self):
        return {k: v for k, v in vars(self).items()}


def loss(result):
    v = result["val"]
    return v if v is not None and math.isfinite(v) else math.inf


class Study:
    def __init__(self, runner, settings):
        self.runner, self.s = runner, settings
        self.path = os.path.join(runner.out, "decisions.json")
        self.decisions = json.load(open(self.path)) if os.path.exists(self.path) else {}
        self.lock = threading.Lock()
        self.ready = {}  # (horizon index, what) -> Event

    # ---- specs ------------------------------------------------------------------------
    def spec(self, h, base, lr, steps, seed, bsfa=None, variant=None):
        return make_spec(self.s, h, base, lr, steps, seed, bsfa, variant)

    def decide(self, h, key, value):
        with self.lock:
            self.decisions.setdefault(str(h), {})[key] = value
            json.dump(self.decisions, open(self.path + ".tmp", "w"), indent=1)
            os.replace(self.path + ".tmp", self.path)

    def event(self, i, what):
        with self.lock:
            return self.ready.setdefault((i, what), threading.Event())

    def after(self, i, what):
        """The choice `what` of the previous horizon, once made."""
        self.event(i - 1, what).wait()
        made = self.decisions.get(str(self.s.horizons[i - 1]), {})
        if what not in made:
            raise RuntimeError(f"horizon {self.s.horizons[i - 1]} stopped before choosing {what}")
        return made[what]

    # ---- searches ---------------------------------------------------------------------
    def search(self, make, grid, ladders, priority, done=None):
        """Runs the points of `grid` (tuples; `make(point)` gives the spec), widening along
        every axis with a ladder while the best point sits at an edge; returns the best point,
        every point's result, and the axes on which the best is still at an edge."""
        done = dict(done or {})
        todo = [p for p in dict.fromkeys(grid) if p not in done]
        for _ in range(self.s.max_rounds + 1):
            results = self.runner.run_many([make(p) for p in todo], priority)
            done.update(zip(todo, results))
            best = min(done, key=lambda p: loss(done[p]))
            todo = [p for p in beyond_edges(best, done, ladders) if p not in done]
            if not todo:
                break
        edges = [a for a in range(len(best)) if ladders[a] and
                 any(p not in done for p in beyond_edges(best, done, ladders, only=a))]
        return best, done, edges

    def record_search(self, h, key, best, done, axes, edges):
        self.decide(h, key, {
            "best": dict(zip(axes, best)),
            "at_edge": [axes[a] for a in edges],
            "tried": [dict(zip(axes, p), val=r["val"], run=r["name"]) for p, r in done.items()],
        })

    def tune_base(self, i, h, base):
        centre = self.s.base_centre if i == 0 else self.after(i, f"e_{base}")
        grid = [(centre + d,) for d in (-1, 0, 1)]
        make = lambda p: self.spec(h, base, self.s.lr(p[0]), h, self.s.tune_seed)
        best, done, edges = self.search(make, grid, [E_RANGE], (i, 0))
        self.record_search(h, f"lr_search_{base}", best, done, ["e"], edges)
        self.decide(h, f"e_{base}", best[0])
        self.decide(h, f"lr_{base}", self.s.lr(best[0]))
        self.event(i, f"e_{base}").set()
        return best[0]

    def tune_bsfa(self, i, h, e_mini):
        """AdamMini-BSFA at N/2 on the tuning seed over (rate offset j from Adam-mini's tuned
        rate, gamma, alpha): first j x gamma at one alpha, then the other alphas at the best
        j and the gammas around the best, every axis widened at its edges."""
        half = h // 2
        make = lambda p: self.spec(h, "adam-mini", self.s.lr(e_mini + p[0]), half,
                                   self.s.tune_seed, bsfa=(p[1], p[2]))
        ladders = [(-4, 4), GAMMA_LADDER, None]
        if i == 0:
            js, gammas, alpha = (-1, 0, 1), self.s.gammas, 0.5
        else:
            prev = self.after(i, "bsfa")
            js = tuple(prev["j"] + d for d in (-1, 0, 1))
            gammas, alpha = neighbours(prev["gamma"]), prev["alpha"]
        grid = [(j, g, alpha) for j in js for g in gammas]
        best, done, _ = self.search(make, grid, ladders, (i, 1))
        others = [(best[0], g, a) for a in ALPHAS if a != alpha for g in neighbours(best[1])]
        if self.s.mode == "quick":
            others = [(best[0], best[1], a) for a in ALPHAS if a != alpha]
        best, done, edges = self.search(make, others, ladders, (i, 1), done)
        self.record_search(h, "bsfa_search", best, done, ["j", "gamma", "alpha"], edges)
        chosen = {"j": best[0], "gamma": best[1], "alpha": best[2],
                  "lr": self.s.lr(e_mini + best[0])}
        self.decide(h, "bsfa", chosen)
        self.event(i, "bsfa").set()
        return chosen

    def tune_adamw_bsfa(self, i, h, e_adamw, chosen):
        """AdamW-BSFA's rate (offset from AdamW's tuned rate) at N/2 on the tuning seed,
        with AdamMini-BSFA's gamma and alpha."""
        bsfa = (chosen["gamma"], chosen["alpha"])
        make = lambda p: self.spec(h, "adamw", self.s.lr(e_adamw + p[0]), h // 2,
                                   self.s.tune_seed, bsfa=bsfa)
        grid = [(chosen["j"] + d,) for d in (-1, 0, 1)]
        best, done, edges = self.search(make, grid, [(-4, 4)], (i, 2))
        self.record_search(h, "adamw_bsfa_search", best, done, ["j"], edges)
        result = {"j": best[0], "lr": self.s.lr(e_adamw + best[0]), "gamma": bsfa[0],
                  "alpha": bsfa[1]}
        self.decide(h, "adamw_bsfa", result)
        return result

    # ---- the reported arms --------------------------------------------------------------
    def baselines(self, i, h, e):
        seeds = self.s.seeds[h]
        specs = [self.spec(h, base, self.s.lr(e[base]), steps, s) for base in BASES
                 for steps in (h // 2, 3 * h // 4, h) for s in seeds]
        self.runner.run_many(specs, (i, 3))

    def bsfa_arms(self, i, h, e):
        seeds, half = self.s.seeds[h], h // 2
        chosen = self.tune_bsfa(i, h, e["adam-mini"])
        bsfa = (chosen["gamma"], chosen["alpha"])
        mini = lambda steps, s, variant=None: self.spec(h, "adam-mini", chosen["lr"], steps, s,
                                                        bsfa=bsfa, variant=variant)
        arms = [mini(steps, s) for steps in (half, h) for s in seeds]
        # The control: Adam-mini alone at BSFA's rate, and at that rate times gamma.
        arms += [self.spec(h, "adam-mini", chosen["lr"] * f, half, s)
                 for f in dict.fromkeys((1.0, chosen["gamma"])) for s in seeds]
        arms += [mini(half, s, v) for v in ("blocks", "late") for s in seeds]
        self.runner.run_many(arms, (i, 4))
        adamw = self.tune_adamw_bsfa(i, h, e["adamw"], chosen)
        self.runner.run_many([self.spec(h, "adamw", adamw["lr"], steps, s, bsfa=bsfa)
                              for steps in (half, h) for s in seeds], (i, 5))

    def horizon(self, i, h):
        try:
            e = parallel({base: (lambda b=base: self.tune_base(i, h, b)) for base in BASES})
            parallel({"baselines": lambda: self.baselines(i, h, e),
                      "bsfa": lambda: self.bsfa_arms(i, h, e)})
        finally:  # a larger horizon waiting on a choice this one never made stops too
            for what in ("e_adamw", "e_adam-mini", "bsfa"):
                self.event(i, what).set()

    def run(self):
        parallel({h: (lambda i=i, h=h: self.horizon(i, h)) for i, h in enumerate(self.s.horizons)})


def make_spec(s, h, base, lr, steps, seed, bsfa=None, variant=None):
    """A run of horizon `h`: `base` (wrapped in BSFA when `bsfa` = (gamma, alpha); `variant`
    "blocks" or "late" for the ablations), named by what sets it apart."""
    flags = ["--optimizer", base, "--lr", repr(lr), "--steps", str(steps), "--seed", str(seed),
             "--warmup-steps", str(s.warmup(h))]
    name = f"{base}-lr{lr:.4g}"
    gamma = alpha = None
    if bsfa:
        gamma, alpha = bsfa
        name = f"{base}-bsfa-lr{lr:.4g}-g{gamma:g}-a{alpha:g}"
        flags += ["--bsfa", "--set", f"bsfa.gamma={gamma!r}", "--set", f"bsfa.alpha={alpha!r}",
                  "--set", f"bsfa.rank={s.rank}", "--set", f"bsfa.history={s.history}",
                  "--set", f"bsfa.interval={s.interval}"]
    if variant == "blocks":
        name += "-adam-mini-blocks"
        flags += ["--set", 'bsfa.partition="adam-mini"']
    elif variant == "late":
        name += "-first-at-k"
        flags += ["--set", 'bsfa.first_projection="rank_updates"']
    return dict(horizon=h, base=base, bsfa=bool(bsfa), lr=lr, gamma=gamma, alpha=alpha,
                steps=steps, seed=seed, variant=variant, name=f"{name}-n{steps}-s{seed}",
                flags=flags)


def neighbours(gamma):
    """`gamma` and the values beside it on the ladder."""
    k = GAMMA_LADDER.index(gamma)
    return GAMMA_LADDER[max(0, k - 1):k + 2]


def beyond_edges(best, done, ladders, only=None):
    """The points one step beyond `best` along every axis on which it is the lowest or
    highest value tried among the points sharing its other coordinates."""
    out = []
    for a, ladder in enumerate(ladders):
        if not ladder or (only is not None and a != only):
            continue
        values = sorted({p[a] for p in done if all(p[i] == best[i] for i in range(len(best)) if i != a)})
        for edge, step in ((values[0], -1), (values[-1], 1)):
            if best[a] != edge:
                continue
            if isinstance(ladder, tuple):  # integer exponents within (lo, hi)
                nxt = best[a] + step
                ok = ladder[0] <= nxt <= ladder[1]
            else:
                k = ladder.index(best[a]) + step
                ok, nxt = 0 <= k < len(ladder), ladder[min(max(k, 0), len(ladder) - 1)]
            if ok:
                out.append(tuple(nxt if i == a else best[i] for i in range(len(best))))
    return out


def parallel(fns):
    """Runs each function in its own thread; their results by key (the first error raised
    again once all have finished)."""
    results, errors = {}, []

    def call(key, fn):
        try:
            results[key] = fn()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=call, args=kv) for kv in fns.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# CPU seconds per training step (one thread, batch 16 x 128, the study's model), measured over
# 200 steps while another job kept the second core busy; an 8-batch evaluation; and each run's
# start-up, final checkpoint and whole-split scoring (`eval`).
STEP_S = {"base": 0.069, "bsfa": 0.075, "blocks": 0.110, "late": 0.072}
EVAL_S, RUN_S = 0.23, 5.0


def estimate(s):
    """The study's CPU time before any widening: rows of (horizon, part, runs, CPU s)."""
    rows = []
    for i, h in enumerate(s.horizons):
        n, half = len(s.seeds[h]), h // 2
        first_grid = 3 * (len(s.gammas) if i == 0 else 3)
        parts = [
            ("lr search, AdamW and Adam-mini (N, tuning seed)", 6, "base", h),
            ("AdamW and Adam-mini at N/2", 2 * n, "base", half),
            ("AdamW and Adam-mini at 3N/4", 2 * n, "base", 3 * h // 4),
            ("AdamW and Adam-mini at N", 2 * n, "base", h),
            ("AdamMini-BSFA search, rate x gamma (N/2, alpha 0.5 or the last horizon's)",
             first_grid, "bsfa", half),
            ("AdamMini-BSFA search, other alphas x 3 gammas (N/2)", 6, "bsfa", half),
            ("AdamMini-BSFA at N/2", n, "bsfa", half),
            ("AdamMini-BSFA at N", n, "bsfa", h),
            ("control: Adam-mini at BSFA's rate and x gamma (N/2)", 2 * n, "base", half),
            ("ablation: Adam-mini blocks (N/2)", n, "blocks", half),
            ("ablation: first projection at k updates (N/2)", n, "late", half),
            ("AdamW-BSFA rate search (N/2)", 3, "bsfa", half),
            ("AdamW-BSFA at N/2 and N", n, "bsfa", half + h),
        ]
        for label, runs, kind, steps in parts:
            evals = steps / s.eval_every(h) if kind else 0
            cpu = runs * (steps * STEP_S[kind] + evals * EVAL_S + RUN_S * (2 if "N/2 and N" in label else 1))
            rows.append((h, label, runs * (2 if "N/2 and N" in label else 1), cpu))
    return rows
