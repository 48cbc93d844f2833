"""The demo over many seeds, one row per seed against the demo's acceptance criteria.

    python scripts/demo_sweep.py --seeds 0-9 [--out out/sweep] [--config FILE.yaml] [key=value ...]

Each seed is an ordinary `jaxpatience demo --seed S key=value ...` run in OUT/runs/seedS-<hash of its settings>/
(a rerun resumes it, or reprints it). Stages that do not depend on a setting the sweep varies are reused, not
rerun: before a seed runs, every finished run of the same seed in OUT/runs is searched for each stage group
(the base: data, init, base SFT and its two evaluations; Patience with DPO; Patience with DPO + NLL; IRPO) whose
own settings match, and that group's folders and stage times are copied in. So a sweep of
`patience.train.loss.beta=0.2` trains no base model again, and one of `irpo.sampling.num_samples=12` reruns only
IRPO. The criteria (issue 32): the headline Patience row at least 15 points over the base with longer answers;
the other Patience row present; IRPO above the base's 95% interval after iteration 1 and, after iteration 2, not
below iteration 1's interval. OUT/sweep.json keeps the rows; `--markdown` prints the table as docs/RESULTS.md
shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import profile_demo  # scripts/, beside this file: the demo's compile-time listener

from jaxpatience.config import read_json
from jaxpatience.durability import outputs
from jaxpatience.durability.store import read_jsonl
from jaxpatience.recipes import demo

# Stage groups: (folders under a demo's out, its stage names in timings.json, the settings it depends on beyond
# the base's). The base depends on every top-level key but patience_nll_weight, on `sft`, and on how the demo
# evaluates (irpo's greedy evaluation settings, `_eval_keys`).
GROUPS = {
    "base": (("data", "init", "base", "irpo/base_eval", "forced_eval"), ("data", "init", "base_sft", "base_eval",
             "forced_eval"), ()),
    "patience": (("patience", "patience_eval"), ("patience_train", "patience_eval"), ("patience",)),
    "patience_nll": (("patience_nll", "patience_nll_eval"), ("patience_nll_train", "patience_nll_eval"),
                     ("patience", "patience_nll_weight")),
    "irpo": (("irpo",), ("irpo",), ("irpo",)),
}  # fmt: skip
LOCK = "sweep.lock"  # in a run folder while a sweep runs its demo: a second sweep leaves that seed alone
SWEEP_KEYS = "sweep_keys.json"  # in each run folder: each group's settings hash, for later sweeps to match
MIN_GAIN = 0.15  # the headline Patience row's least gain over the base (issue 32)


def parse_seeds(text: str) -> list[int]:
    """'0-9', '0,3,5' or '0-2,7' -> the seeds in order; a clear error for anything else."""
    seeds = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        high = high if dash else low
        if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
            raise SystemExit(f"demo_sweep: --seeds takes ranges and lists like 0-9 or 0,3,5, not {text!r}.")
        seeds += range(int(low), int(high) + 1)
    return list(dict.fromkeys(seeds))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def group_keys(config: demo.DemoConfig) -> dict[str, str]:
    """Each stage group's hash of the settings it depends on (the seed included)."""
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    irpo = settings["irpo"]
    evaluation = {  # what irpo.eval_config reads for a greedy held-out evaluation
        "sampling": {k: v for k, v in irpo["sampling"].items() if k not in ("temperature", "num_samples", "seed")},
        "generation_batch_size": irpo["generation_batch_size"],
        "prompt_style": irpo["prompt_style"],
        "dtypes": [irpo["training"]["param_dtype"], irpo["training"]["compute_dtype"]],
    }
    own = {"patience", "patience_nll_weight", "irpo"}
    base = {**{k: v for k, v in settings.items() if k not in own}, "evaluation": evaluation}
    return {name: _digest([base, [settings[k] for k in extra]]) for name, (_, _, extra) in GROUPS.items()}


def reuse_stages(run_dir: Path, runs: Path, keys: dict[str, str]) -> list[str]:
    """Copy into a new `run_dir` each stage group a finished run in `runs` made with the same settings; returns
    the groups copied. The copied stage times go into run_dir/timings.json, so the demo reports them."""
    reused, times = [], {}
    others = [p.parent for p in runs.glob(f"*/{SWEEP_KEYS}") if p.parent != run_dir]
    for name, (folders, stages, _) in GROUPS.items():
        source = next((o for o in others if _finished(o) and read_json(o / SWEEP_KEYS).get(name) == keys[name]), None)
        if source is None:
            continue
        for folder in folders:
            if (source / folder).exists():  # irpo/ holds irpo/base_eval too: the same files
                shutil.copytree(source / folder, run_dir / folder, symlinks=True, dirs_exist_ok=True)
        old = read_json(source / "timings.json")
        times.update({stage: old[stage] for stage in stages if stage in old})
        reused.append(name)
    if times:
        outputs.mark(run_dir, "demo", "run")  # a demo's folder (durability/outputs.py), its stages copied in
        (run_dir / "timings.json").write_text(json.dumps(times, indent=2))
    return reused


def _running_elsewhere(run_dir: Path) -> int | None:
    """The id of another live process running this seed's demo (two sweeps over the same seeds), or None."""
    try:
        pid = int((run_dir / LOCK).read_text())
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid if pid != os.getpid() else None


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and (run_dir / "timings.json").is_file()


def _save_profile(run_dir: Path, profile: dict) -> None:
    """run_dir/profile.json: XLA compile seconds and programs of each stage this sweep ran there."""
    path = run_dir / "profile.json"
    saved = read_json(path) if path.is_file() else {}
    for stage, seconds in profile["seconds"].items():
        saved[stage] = {"compile_s": round(seconds, 2), "programs": profile["programs"][stage]}
    path.write_text(json.dumps(saved, indent=2))


def sample_patient_share(run_dir: Path, iteration: int = 1) -> float | None:
    """The share of IRPO's samples (temperature > 0, training problems) in the patient format at `iteration`: what
    IRPO can pair. None if that iteration drew none."""
    path = run_dir / "irpo" / f"iter_{iteration}" / "samples" / "generations.jsonl"
    if not path.is_file():
        return None
    responses = [record["response"] for record in read_jsonl(path)]
    return sum(r.lstrip().startswith(demo.PATIENT_START) for r in responses) / max(len(responses), 1)


def seed_row(summary: dict, run_dir: Path | None = None) -> dict:
    """One seed's figures and the criteria, from the demo's summary (and its IRPO samples, in `run_dir`)."""
    base, irpo = summary["base"], summary["irpo"]
    headline = summary[summary.get("headline", "patience")]
    other = "patience" if summary.get("headline") == "patience_nll" else "patience_nll"
    rows = {"base": base, "started": summary["base_forced_patient_start"], "headline": headline}
    rows.update(other=summary.get(other), **{f"irpo{r['iteration']}": r for r in irpo})
    accuracy = {name: r["accuracy"] for name, r in rows.items() if r is not None}
    first, second = (irpo + [None, None])[:2]
    checks = {
        "patience": headline["accuracy"] >= base["accuracy"] + MIN_GAIN
        and headline["mean_response_tokens"] > base["mean_response_tokens"],
        "other_row": rows["other"] is not None,
        "irpo_rise": first is not None and first["accuracy"] > base["accuracy_ci95"][1],
        "irpo_hold": second is not None and first is not None and second["accuracy"] >= first["accuracy_ci95"][0],
    }
    return {
        "seed": summary["seed"],
        "headline": summary.get("headline", "patience"),
        "accuracy": accuracy,
        "patient_share": {name: r["patient_share"] for name, r in rows.items() if r is not None},
        "tokens": {name: r["mean_response_tokens"] for name, r in rows.items() if r is not None},
        "pairs": [r["pairs"] for r in irpo],
        "irpo_sample_patient_share": [sample_patient_share(run_dir, r["iteration"]) for r in irpo] if run_dir else [],
        "stage_s": summary["stage_s"],
        "wall_s": summary["wall_s"],
        "checks": checks,
        "ok": all(checks.values()),
    }


COLUMNS = ("base", "started", "headline", "other", "irpo1", "irpo2")


def table(rows: list[dict], markdown: bool = False) -> str:
    """The sweep as text: accuracy (patient share) per stage, the criteria, the demo's wall time per seed."""
    names = {"headline": "Patience (headline)", "other": "Patience (other loss)", "started": "base, started"}
    names |= {"irpo1": "IRPO 1", "irpo2": "IRPO 2"}
    header = ["seed", *(names.get(c, c) for c in COLUMNS), "IRPO samples patient", "criteria", "demo s"]
    lines = []
    for row in rows:
        cells = [str(row["seed"])]
        for column in COLUMNS:
            acc = row["accuracy"].get(column)
            cells.append("—" if acc is None else f"{100 * acc:.1f} ({100 * row['patient_share'][column]:.0f}%)")
        shares = [f"{100 * v:.0f}%" for v in row.get("irpo_sample_patient_share", []) if v is not None]
        cells.append(" → ".join(shares) or "—")
        failed = [name for name, ok in row["checks"].items() if not ok]
        cells += ["all met" if row["ok"] else "fails " + ", ".join(failed), f"{row['wall_s']:.0f}"]
        lines.append(cells)
    if markdown:
        rule = "|" + "---|" * len(header)
        return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(c) + " |" for c in lines])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-9", help="seeds to run: 0-9, 0,3,5 or 0-2,7 (default 0-9)")
    parser.add_argument("--out", default="out/sweep", help="the sweep's folder (reruns resume and reuse it)")
    parser.add_argument("--config", help="a YAML file stating what differs from configs/toy.yaml")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--progress", action="store_true", help="progress bars (off by default: a sweep is long)")
    parser.add_argument("overrides", nargs="*", help="key=value, as for jaxpatience demo (the same for every seed)")
    args = parser.parse_args()
    seeds, out = parse_seeds(args.seeds), Path(args.out)
    runs = out / "runs"
    rows = []
    for seed in seeds:
        config = demo.load_demo_config([*args.overrides, f"seed={seed}"], path=args.config)
        keys = group_keys(config)
        run_dir = runs / f"seed{seed}-{_digest(keys)}"
        if (owner := _running_elsewhere(run_dir)) is not None:
            print(f"\n== seed {seed}: {run_dir} is being run by process {owner}; left to it.", flush=True)
            continue
        reused = [] if run_dir.exists() else reuse_stages(run_dir, runs, keys)
        print(f"\n== seed {seed}: {run_dir}" + (f" (reusing {', '.join(reused)})" if reused else ""), flush=True)
        start = time.perf_counter()
        outputs.mark(run_dir, "demo", "run")  # the demo's folder, before the lock goes in
        (run_dir / LOCK).write_text(str(os.getpid()))
        try:
            with profile_demo.compile_profile() as profile:
                summary = demo.run_demo(config, run_dir, progress=args.progress)
        finally:
            (run_dir / LOCK).unlink(missing_ok=True)
        _save_profile(run_dir, profile)
        (run_dir / SWEEP_KEYS).write_text(json.dumps(keys, indent=2))
        rows.append(seed_row(summary, run_dir))
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s in this sweep", flush=True)
        (out / "sweep.json").write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=2))
    print("\n" + table(rows, markdown=args.markdown))
    passed = sum(row["ok"] for row in rows)
    print(f"\n{passed} of {len(rows)} seeds meet every criterion; accuracy in %, patient answers in brackets.")


if __name__ == "__main__":
    main()
