"""The study's readout (issue #29, points 5-7) from whatever has finished on disk: every run's
`result.json` (its final checkpoint scored on the validation split) and the choices in
`decisions.json`. Writes OUT/results.json and OUT/results.md; missing arms show as "-".

Per horizon N, paired over the reported seeds (the same seed: the same initialisation and
batches for both arms; differences are A - B, negative where A's loss is lower):
- BSFA@N/2 - AdamW@N and - Adam-mini@N (the paper's claim: <= 0);
- the step multiplier m: the steps a baseline, each run on its own schedule, needs to reach
  BSFA@N/2's loss, from its N/2, 3N/4 and N runs with the loss piecewise linear in log(steps),
  divided by N/2 (m = 2 is the paper's 2x; beyond the runs' range the end segments are
  extended and the value is marked);
- BSFA@N - the baselines@N; the control (Adam-mini at BSFA's rate and at that rate times
  gamma, N/2); the ablations (Adam-mini blocks; first projection at k updates; N/2).
"""

import glob
import json
import math
import os
import statistics

from .protocol import make_spec

# The #14 study (0.45 tokens per parameter, S = 1.84M parameters, N = 400, seed 0): Adam-mini
# at 200 and 400 steps (lr 3e-3; the 200-step run is quoted in issue #29) and AdamMini-BSFA at
# 200 steps (gamma 1.5, k 50). Two points only, so m is a log-linear interpolation between them.
STUDY_14 = {"tokens_per_param": 0.45, "adam_mini": {200: 5.544, 400: 4.8970}, "bsfa_half": 5.4760}


def load(out):
    runs = {}
    for path in glob.glob(os.path.join(out, "runs", "h*", "*", "result.json")):
        r = json.load(open(path))
        runs[(r["horizon"], r["name"])] = r
    decisions_path = os.path.join(out, "decisions.json")
    decisions = json.load(open(decisions_path)) if os.path.exists(decisions_path) else {}
    return runs, decisions


def stats(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def multiplier(points, target, half):
    """Steps at which the loss, piecewise linear in log(steps) through `points` [(steps, loss)]
    (ascending steps), reaches `target`, over `half`; and where: "inside", or "below" / "beyond"
    when an end segment had to be extended. None when the loss does not fall."""
    pts = [(math.log(s), l) for s, l in points if l is not None]
    if len(pts) < 2:
        return None, None
    at = lambda a, b: math.exp(a[0] + (target - a[1]) * (b[0] - a[0]) / (b[1] - a[1])) / half
    for a, b in zip(pts, pts[1:]):
        if min(a[1], b[1]) <= target <= max(a[1], b[1]) and a[1] != b[1]:
            return at(a, b), "inside"
    below = target > pts[0][1]
    a, b = (pts[0], pts[1]) if below else (pts[-2], pts[-1])
    if b[1] >= a[1]:
        return None, None
    return at(a, b), "below" if below else "beyond"


class Readout:
    def __init__(self, out, settings, size):
        self.out, self.s, self.size = out, settings, size
        self.runs, self.decisions = load(out)

    def arm(self, h, base, lr, steps, bsfa=None, variant=None):
        """{seed: val} of an arm over the reported seeds (finished runs only)."""
        out = {}
        for seed in self.s.seeds[h]:
            name = make_spec(self.s, h, base, lr, steps, seed, bsfa, variant)["name"]
            r = self.runs.get((h, name))
            if r is not None:
                out[seed] = r["val"]
        return out

    def arms(self, h):
        d = self.decisions.get(str(h), {})
        half, arms = h // 2, {}
        for base in ("adamw", "adam-mini"):
            if f"lr_{base}" in d:
                for steps in (half, 3 * h // 4, h):
                    arms[f"{base}@{steps}"] = self.arm(h, base, d[f"lr_{base}"], steps)
        if "bsfa" in d:
            c = d["bsfa"]
            g = (c["gamma"], c["alpha"])
            for steps in (half, h):
                arms[f"bsfa@{steps}"] = self.arm(h, "adam-mini", c["lr"], steps, g)
            arms[f"control-rate@{half}"] = self.arm(h, "adam-mini", c["lr"], half)
            arms[f"control-rate-x-gamma@{half}"] = self.arm(h, "adam-mini", c["lr"] * c["gamma"], half)
            arms[f"bsfa-adam-mini-blocks@{half}"] = self.arm(h, "adam-mini", c["lr"], half, g, "blocks")
            arms[f"bsfa-first-at-k@{half}"] = self.arm(h, "adam-mini", c["lr"], half, g, "late")
        if "adamw_bsfa" in d:
            c = d["adamw_bsfa"]
            for steps in (half, h):
                arms[f"adamw-bsfa@{steps}"] = self.arm(h, "adamw", c["lr"], steps, (c["gamma"], c["alpha"]))
        return arms

    @staticmethod
    def paired(a, b):
        seeds = sorted(set(a) & set(b))
        diffs = {s: a[s] - b[s] for s in seeds}
        out = stats(list(diffs.values()))
        if out:
            out.update(per_seed=diffs, a_lower=sum(v < 0 for v in diffs.values()))
        return out

    def multipliers(self, h, arms, target_arm):
        half, out = h // 2, {}
        target = arms.get(f"{target_arm}@{half}", {})
        for base in ("adamw", "adam-mini"):
            curve = [arms.get(f"{base}@{s}", {}) for s in (half, 3 * h // 4, h)]
            steps = (half, 3 * h // 4, h)
            per_seed = {}
            for seed, t in target.items():
                if all(seed in c for c in curve):
                    per_seed[seed] = multiplier([(s, c[seed]) for s, c in zip(steps, curve)], t, half)
            means = [statistics.fmean(c.values()) if c else None for c in curve]
            of_means = (multiplier(list(zip(steps, means)), statistics.fmean(target.values()), half)
                        if target and None not in means else (None, None))
            out[base] = {"per_seed": per_seed, "stats": stats([m for m, _ in per_seed.values()]),
                         "of_means": of_means}
        return out

    def horizon(self, h):
        arms, half = self.arms(h), h // 2
        get = lambda k: arms.get(k, {})
        tokens = h * self.s.batch_size * self.s.seq_len
        params = self.size.get("parameters") if self.size else None
        pairs = {
            "bsfa@N/2 - adamw@N": (get(f"bsfa@{half}"), get(f"adamw@{h}")),
            "bsfa@N/2 - adam-mini@N": (get(f"bsfa@{half}"), get(f"adam-mini@{h}")),
            "bsfa@N - adamw@N": (get(f"bsfa@{h}"), get(f"adamw@{h}")),
            "bsfa@N - adam-mini@N": (get(f"bsfa@{h}"), get(f"adam-mini@{h}")),
            "bsfa@N/2 - adam-mini@N/2": (get(f"bsfa@{half}"), get(f"adam-mini@{half}")),
            "adamw-bsfa@N/2 - adamw@N": (get(f"adamw-bsfa@{half}"), get(f"adamw@{h}")),
            "adamw-bsfa@N - adamw@N": (get(f"adamw-bsfa@{h}"), get(f"adamw@{h}")),
            "adamw-bsfa@N/2 - adamw@N/2": (get(f"adamw-bsfa@{half}"), get(f"adamw@{half}")),
            "control: bsfa@N/2 - adam-mini at BSFA's rate": (get(f"bsfa@{half}"), get(f"control-rate@{half}")),
            "control: bsfa@N/2 - adam-mini at BSFA's rate x gamma": (get(f"bsfa@{half}"), get(f"control-rate-x-gamma@{half}")),
            "ablation: adam-mini blocks - bsfa@N/2": (get(f"bsfa-adam-mini-blocks@{half}"), get(f"bsfa@{half}")),
            "ablation: first at k - bsfa@N/2": (get(f"bsfa-first-at-k@{half}"), get(f"bsfa@{half}")),
            "ablation: adam-mini blocks - adam-mini@N/2": (get(f"bsfa-adam-mini-blocks@{half}"), get(f"adam-mini@{half}")),
            "ablation: first at k - adam-mini@N/2": (get(f"bsfa-first-at-k@{half}"), get(f"adam-mini@{half}")),
        }
        return {
            "tokens_per_param": tokens / params if params else None,
            "decisions": self.decisions.get(str(h), {}),
            "arms": {k: {"per_seed": v, "stats": stats(list(v.values()))} for k, v in arms.items()},
            "paired": {k: self.paired(a, b) for k, (a, b) in pairs.items()},
            "m_bsfa": self.multipliers(h, arms, "bsfa"),
            "m_adamw_bsfa": self.multipliers(h, arms, "adamw-bsfa"),
        }

    def study_14(self):
        a = STUDY_14["adam_mini"]
        m, where = multiplier(sorted(a.items()), STUDY_14["bsfa_half"], 200)
        return {"tokens_per_param": STUDY_14["tokens_per_param"], "m_vs_adam_mini_seed0": m,
                "where": where, "source": "#14 results (seed 0) and the 200-step Adam-mini run of issue #29"}

    def write(self, extra):
        report = dict(extra, horizons={h: self.horizon(h) for h in self.s.horizons},
                      study_14=self.study_14(),
                      runs=sorted(self.runs.values(), key=lambda r: (r["horizon"], r["name"])))
        json.dump(report, open(os.path.join(self.out, "results.json"), "w"), indent=1)
        text = tables(report, self.s)
        open(os.path.join(self.out, "results.md"), "w").write(text)
        return report, text


def fmt(s, digits=4):
    return "-" if not s else f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def fmt_m(entry):
    st, (m, where) = entry["stats"], entry["of_means"]
    per = ", ".join(f"s{seed} {v:.2f}{'' if w == 'inside' else '*'}" if v else f"s{seed} -"
                    for seed, (v, w) in sorted(entry["per_seed"].items()))
    mean = "-" if not st else f"{st['mean']:.2f} ± {st['std']:.2f}"
    of = "-" if m is None else f"{m:.2f}{'' if where == 'inside' else '*'}"
    return f"{mean} | {of} | {per}"


def tables(report, s):
    lines = ["# BSFA study (issue #29): results", ""]
    b = report.get("binary", {})
    size = report.get("model", {})
    lines.append(f"Binary commit {b.get('commit', '?')} (sha256 {b.get('sha256', '?')[:12]}); model "
                 f"{size.get('parameters', '?')} parameters, {size.get('bsfa_covered', '?')} in BSFA's blocks "
                 f"({100 * (size.get('bsfa_share') or 0):.1f}%). Losses: each run's final checkpoint "
                 "scored by `bsfa-train eval` on the validation split; mean ± std over the reported "
                 "seeds; differences paired by seed (negative: the first arm is lower).")
    for h, r in report["horizons"].items():
        tpp = r["tokens_per_param"]
        tpp = "-" if tpp is None else f"{tpp:.1f}"
        lines += ["", f"## N = {h} ({tpp} tokens per parameter at N)", ""]
        d = r["decisions"]
        chosen = [f"AdamW lr {d['lr_adamw']:.4g}" if "lr_adamw" in d else None,
                  f"Adam-mini lr {d['lr_adam-mini']:.4g}" if "lr_adam-mini" in d else None,
                  "AdamMini-BSFA lr {lr:.4g}, gamma {gamma:g}, alpha {alpha:g}".format(**d["bsfa"]) if "bsfa" in d else None,
                  "AdamW-BSFA lr {lr:.4g}".format(**d["adamw_bsfa"]) if "adamw_bsfa" in d else None]
        lines.append("Tuned: " + "; ".join(c for c in chosen if c) + ".")
        edges = [f"{k} ({', '.join(v['at_edge'])})" for k, v in d.items()
                 if isinstance(v, dict) and v.get("at_edge")]
        if edges:
            lines.append(f"Still at an edge after widening: {'; '.join(edges)}.")
        lines += ["", "| arm | final val loss | per seed |", "|---|---|---|"]
        for k, a in r["arms"].items():
            per = ", ".join(f"s{seed} {v:.4f}" for seed, v in sorted(a["per_seed"].items()))
            st = a["stats"]
            mean = "-" if not st else "{:.4f} ± {:.4f}".format(st["mean"], st["std"])
            lines.append(f"| {k} | {mean} | {per} |")
        lines += ["", "| paired difference | mean ± std | first arm lower (seeds) |", "|---|---|---|"]
        for k, p in r["paired"].items():
            lower = "-" if not p else "{}/{}".format(p["a_lower"], p["n"])
            lines.append(f"| {k} | {fmt(p)} | {lower} |")
        lines += ["", "| step multiplier m (steps the baseline needs to reach the arm's N/2 loss, / (N/2)) "
                  "| m per seed, mean ± std | m of the means | per seed |", "|---|---|---|---|"]
        for arm_key, arm in (("m_bsfa", "AdamMini-BSFA"), ("m_adamw_bsfa", "AdamW-BSFA")):
            for base, entry in r[arm_key].items():
                lines.append(f"| {arm}@N/2 against {base} | {fmt_m(entry)} |")
        lines += ["", "(* extrapolated beyond the baseline's N/2 .. N runs along an end segment.)"]
        for key in ("lr_search_adamw", "lr_search_adam-mini", "bsfa_search", "adamw_bsfa_search"):
            if key in d:
                tried = sorted(d[key]["tried"], key=lambda t: t["val"] if t["val"] is not None else 1e9)
                cells = ", ".join(" ".join(f"{k}={v:g}" for k, v in t.items() if k not in ("val", "run"))
                                  + f": {t['val']:.4f}" for t in tried)
                lines.append(f"- {key} (tuning seed {s.tune_seed}), best first: {cells}")
    s14 = report["study_14"]
    m14 = s14["m_vs_adam_mini_seed0"]
    lines += ["", "## m against tokens per parameter", "",
              "| study | tokens/param at N | m (AdamMini-BSFA@N/2 vs Adam-mini) | m vs AdamW |",
              "|---|---|---|---|",
              f"| #14 (S, seed 0, two points) | {s14['tokens_per_param']} | "
              f"{'-' if m14 is None else round(m14, 2)} | - |"]
    for h, r in report["horizons"].items():
        m = r["m_bsfa"]

        def cell(base):
            st = m[base]["stats"]
            return "-" if not st else "{:.2f} ± {:.2f}".format(st["mean"], st["std"])

        tpp = r["tokens_per_param"]
        tpp = "-" if tpp is None else f"{tpp:.1f}"
        lines.append(f"| N = {h} | {tpp} | {cell('adam-mini')} | {cell('adamw')} |")
    return "\n".join(lines) + "\n"
