"""Reproducibility of the demo-corpus jobs under rounding noise and seeds.

Runs each job several times, each run in its own process, and reports for every trained figure
how far the runs fall apart (the cause of the spread and the recipe that keeps it small:
docs/reproducibility.md):

* **threads**: the default seed with ``--threads 1`` and ``--threads 2`` (torch's reductions
  then add in another order, the rounding difference another CPU makes); the worst deviation
  from the two runs' mean (target: at most 2 points);
* **seeds**: one thread, three seeds (``run.seed`` of every stage); mean, sample standard
  deviation (ddof 1; target: at most 2 points) and worst deviation from the mean;
* optionally (``--avx2``) the default run on torch's AVX2 kernels instead of the machine's
  AVX-512 ones (``ATEN_CPU_CAPABILITY=avx2``) and NumPy without its AVX-512 paths
  (``NPY_DISABLE_CPU_FEATURES``), i.e. the code path of a CPU without AVX-512; its deviation
  from the mean with the threads-1 run (same target);
* **all** runs pooled: mean, sd, min, max and the expected range ``mean -/+ max(2 sd, 1)``
  (:mod:`lavis_c2f.pipeline.expected`), which ``--write-expected`` stores in
  ``lavis_c2f/configs/expected/demo_results.yaml`` for the quickstart and the README.

Jobs (``--jobs``):

* ``quickstart``: ``lavis-c2f quickstart --skip-untrained`` (the main job, default settings);
* ``demo_stage2`` / ``demo_stage2_mesm``: ``train.py --cfg-path projects/c2f/demo_stage2[_mesm].yaml``
  on the main job's demo corpus (:func:`corpus_args`; test split, official QVHighlights metrics);
* ``reduced_quickstart``: the reduced chain of the CI test
  (``tests/integration/test_reproducibility.py``, :data:`REDUCED_QUICKSTART_ARGS`); its
  threads deviation sets that test's tolerance.

Every run is deterministic on one machine, so ``--parallel N`` (N runs at once) changes the
wall time only. Time on 2 quiet cores, one run at a time: a quickstart run about 3.5 min, a
demo_stage2 run about 4 min, a demo_stage2_mesm run about 6 min, a reduced run about 1 min;
the default (4 runs of each of the 4 jobs) about 60 min, ``--avx2`` adds a fifth run to each.

    python bench/reproducibility.py [--jobs quickstart demo_stage2 demo_stage2_mesm reduced_quickstart]
        [--seeds 2024 1 2] [--avx2] [--parallel 1] [--out DIR] [--json OUT] [--write-expected]

Exit status 1 when a figure misses a target.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lavis_c2f.pipeline.expected import TARGET, FigureStats  # noqa: E402
from lavis_c2f.pipeline.quickstart import QUICKSTART_CORPUS  # noqa: E402
DEFAULT_SEED = 2024   # run.seed of the demo YAMLs
# NumPy's AVX-512 dispatch targets (x86); disabling one the CPU lacks is a no-op
NPY_AVX512 = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
# the CI test's reduced chain (tests/integration/test_reproducibility.py reads this)
REDUCED_QUICKSTART_ARGS = ["--n-videos", "300", "--corpus-param", "max_clips=30", "--skip-untrained"]

QUICKSTART_FIGURES = [
    ("VR R@1", "stage1-R@1"), ("VR R@5", "stage1-R@5"), ("VR R@10", "stage1-R@10"),
    ("MR R1@.5", "MR-full-R1@0.5"), ("MR R1@.7", "MR-full-R1@0.7"), ("MR mAP", "MR-full-mAP"),
    ("VCMR R1@.5", "VCMR-R@1-IoU@0.5"), ("VCMR R10@.5", "VCMR-R@10-IoU@0.5"),
    ("VCMR R100@.5", "VCMR-R@100-IoU@0.5"), ("VCMR R1@.7", "VCMR-R@1-IoU@0.7"),
    ("bound R1@.5", "oracle-VCMR-R@1-IoU@0.5"),
]
STAGE2_FIGURES = [("R1@0.5", "MR-full-R1@0.5"), ("R1@0.7", "MR-full-R1@0.7"), ("mAP", "MR-full-mAP"),
                  ("HL VeryGood mAP", "HL-min-VeryGood-mAP")]
JOBS = {
    "quickstart": {"kind": "quickstart", "args": ["--skip-untrained"], "figures": QUICKSTART_FIGURES},
    "demo_stage2": {"kind": "train", "yaml": "demo_stage2.yaml", "figures": STAGE2_FIGURES},
    "demo_stage2_mesm": {"kind": "train", "yaml": "demo_stage2_mesm.yaml", "figures": STAGE2_FIGURES},
    # the CI test compares thread counts only: no extra seeds
    "reduced_quickstart": {"kind": "quickstart", "args": REDUCED_QUICKSTART_ARGS, "figures": QUICKSTART_FIGURES,
                           "seeds": False},
}


@dataclass
class Run:
    """One run of a job: its perturbation and, once done, its figures and seconds."""

    job: str
    label: str
    threads: int
    seed: int
    cpu_capability: str = "native"
    figures: Dict[str, float] = field(default_factory=dict)
    test_queries: int = 0        # quickstart jobs: queries of the test split (summary.json)
    seconds: float = 0.0
    directory: str = ""

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        # OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning (no effect on the
        # numbers; on a busy machine spinning threads make a 2-thread run many times slower)
        env.update({"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
                    "OMP_WAIT_POLICY": "PASSIVE",
                    "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
                    "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])})
        for key in ("ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES", "C2F_OUTPUT", "C2F_STAGE1_RANKS"):
            env.pop(key, None)
        if self.cpu_capability != "native":
            env["ATEN_CPU_CAPABILITY"] = self.cpu_capability
            env["NPY_DISABLE_CPU_FEATURES"] = NPY_AVX512
        return env


def plan(jobs: Sequence[str], seeds: Sequence[int], avx2: bool, threads: Sequence[int] = (1, 2)) -> List[Run]:
    """The runs of every job: each thread count of ``threads`` at ``seeds[0]``, one thread at
    the other seeds, and the AVX2 code path at ``seeds[0]`` when asked."""
    runs = []
    for job in jobs:
        runs.append(Run(job, "threads 1", 1, seeds[0]))
        runs.extend(Run(job, f"threads {n}", n, seeds[0]) for n in threads if n != 1)
        if JOBS[job].get("seeds", True):
            runs.extend(Run(job, f"seed {s}", 1, s) for s in seeds[1:])
        if avx2:
            runs.append(Run(job, "avx2", 1, seeds[0], cpu_capability="avx2"))
    return runs


def _python() -> str:
    return sys.executable


def corpus_args() -> List[str]:
    """``make-demo-corpus`` options of the ``train`` jobs' corpus: the main job's
    (``lavis_c2f/configs/pipeline/quickstart.yaml``), whose 1025 test queries measure a grounder
    to about a point where the default corpus's 203 leave two points of sampling noise."""
    return [a for k, v in QUICKSTART_CORPUS.items() for a in ("--param", f"{k}={json.dumps(v)}")]


def prepare(out: Path, jobs: Sequence[str]) -> Dict[str, str]:
    """The shared demo corpus (:func:`corpus_args`) and MESM vocabulary of the ``train`` jobs (made once)."""
    shared: Dict[str, str] = {}
    if any(JOBS[j]["kind"] == "train" for j in jobs):
        corpus = out / "corpus"
        subprocess.run([_python(), "-m", "lavis_c2f.cli", "make-demo-corpus", str(corpus)] + corpus_args(), check=True,
                       cwd=str(ROOT), env=Run("", "", 1, 0).env(), stdout=subprocess.DEVNULL)
        shared["corpus"] = str(corpus)
        if "demo_stage2_mesm" in jobs:
            vocab = out / "demo_vocab.json"
            subprocess.run([_python(), "-m", "lavis_c2f.cli", "vocab", "--ann", str(corpus / "annotations" / "train.jsonl"),
                            "--tokenizer", "whitespace", "--out", str(vocab)], check=True, cwd=str(ROOT),
                           env=Run("", "", 1, 0).env(), stdout=subprocess.DEVNULL)
            shared["vocab"] = str(vocab)
    return shared


def command(run: Run, out: Path, shared: Dict[str, str]) -> Tuple[List[str], Dict[str, str], Path]:
    """``(argv, env, run directory)`` of one run."""
    spec = JOBS[run.job]
    tag = run.label.replace(" ", "")
    rdir = out / run.job / tag
    env = run.env()
    if spec["kind"] == "quickstart":
        argv = [_python(), "-m", "lavis_c2f.cli", "quickstart", "--out", str(rdir), "--threads", str(run.threads),
                "--seed", str(run.seed)] + list(spec["args"])
        return argv, env, rdir
    if "vocab" in shared:
        env["C2F_VOCAB_COUNTS"] = shared["vocab"]
    argv = [_python(), str(ROOT / "train.py"), "--cfg-path", str(ROOT / "projects" / "c2f" / spec["yaml"]),
            "--options", f"run.output_dir={out / run.job}", f"run.job_id={tag}", f"run.seed={run.seed}",
            "run.device=cpu", "run.progress=false", f"datasets.c2f_demo.data_root={shared['corpus']}"]
    return argv, env, rdir


def figures_of(run: Run, rdir: Path) -> Dict[str, float]:
    """The run's test figures (quickstart: the trained row; train.py: the test metrics)."""
    summary = json.loads((rdir / "summary.json").read_text())
    metrics = summary["trained"] if JOBS[run.job]["kind"] == "quickstart" else summary["test"]["test"]
    return {key: float(metrics[key]) for _, key in JOBS[run.job]["figures"] if metrics.get(key) is not None}


def execute(run: Run, out: Path, shared: Dict[str, str]) -> Run:
    argv, env, rdir = command(run, out, shared)
    rdir.parent.mkdir(parents=True, exist_ok=True)
    log = rdir.parent / f"{rdir.name}.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(argv, cwd=str(ROOT), env=env, stdout=f, stderr=subprocess.STDOUT)
    run.seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.job} / {run.label} failed (exit {proc.returncode}); log: {log}")
    run.figures, run.directory = figures_of(run, rdir), str(rdir)
    if JOBS[run.job]["kind"] == "quickstart":
        run.test_queries = int(json.loads((rdir / "summary.json").read_text())["corpus"]["test"]["queries"])
    print(f"  {run.job} / {run.label}: {run.seconds:.0f} s", flush=True)
    return run


@dataclass
class FigureReport:
    """The statistics of one figure of one job (module docstring)."""

    name: str
    key: str
    values: Dict[str, float]
    threads_mean: Optional[float]
    threads_dev: Optional[float]
    seeds_mean: Optional[float]
    seeds_sd: Optional[float]
    seeds_dev: Optional[float]
    avx2_dev: Optional[float]
    all: FigureStats

    @property
    def ok(self) -> bool:
        return all(v is None or v <= TARGET + 1e-9 for v in (self.threads_dev, self.avx2_dev, self.seeds_sd))


def analyse(job: str, runs: Sequence[Run], base_seed: int) -> List[FigureReport]:
    reports = []
    t = {r.threads: r for r in runs if r.seed == base_seed and r.cpu_capability == "native"}
    avx2 = next((r for r in runs if r.seed == base_seed and r.cpu_capability != "native"), None)
    seed_runs = [r for r in runs if r.threads == 1 and r.cpu_capability == "native"]
    for name, key in JOBS[job]["figures"]:
        vals = {r.label: r.figures[key] for r in runs if key in r.figures}
        if not vals:
            continue
        th = [t[n].figures[key] for n in (1, 2) if n in t and key in t[n].figures]
        sd_vals = [r.figures[key] for r in seed_runs if key in r.figures]
        seeds = FigureStats.of(sd_vals) if len(sd_vals) > 1 else None
        reports.append(FigureReport(
            name=name, key=key, values=vals,
            threads_mean=round(sum(th) / 2, 2) if len(th) == 2 else None,
            threads_dev=round(abs(th[0] - th[1]) / 2, 2) if len(th) == 2 else None,
            seeds_mean=seeds.mean if seeds else None, seeds_sd=seeds.sd if seeds else None,
            seeds_dev=round(max(abs(v - seeds.mean) for v in sd_vals), 2) if seeds else None,
            avx2_dev=(round(abs(avx2.figures[key] - t[1].figures[key]) / 2, 2)
                      if avx2 is not None and 1 in t and key in avx2.figures and key in t[1].figures else None),
            all=FigureStats.of(list(vals.values()))))
    return reports


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_report(job: str, runs: Sequence[Run], reports: Sequence[FigureReport]) -> str:
    labels = [r.label for r in runs]
    head = (["figure"] + labels + ["thr mean", "thr dev", "avx2 dev", "seed mean", "seed sd", "seed dev", "all mean",
                                   "all sd", "min", "max", "expected", "target"])
    rows = []
    for rep in reports:
        rows.append([rep.name] + [f"{rep.values[l]:.2f}" if l in rep.values else "-" for l in labels]
                    + [_f(rep.threads_mean), _f(rep.threads_dev), _f(rep.avx2_dev), _f(rep.seeds_mean), _f(rep.seeds_sd),
                       _f(rep.seeds_dev), _f(rep.all.mean), _f(rep.all.sd), _f(rep.all.min), _f(rep.all.max),
                       f"{rep.all.lo:.1f}-{rep.all.hi:.1f}", "ok" if rep.ok else "MISSED"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    seconds = ", ".join(f"{r.label} {r.seconds:.0f} s" for r in runs)
    lines = [f"{job}: {len(runs)} runs ({seconds})", fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows]
    return "\n".join(lines)


def readme_row(reports: Sequence[FigureReport]) -> str:
    """Markdown cells ``mean ± sd`` of every figure (for the README's Results tables)."""
    return "| " + " | ".join(f"{r.all.mean:.1f} ± {r.all.sd:.1f}" for r in reports) + " |"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        import torch

        flags = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 (informative only)
        pass
    return f"{cpu}, {os.cpu_count()} cores" + (f", torch CPU capability {flags}" if flags else "")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (and docs/reproducibility.md) for what each statistic is.")
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS), help="jobs to run (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED, 1, 2],
                    help="run.seed values; the first is also run with 2 threads (default: 2024 1 2; one seed: the "
                         "threads comparison only)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                    help="thread counts compared at the first seed (default: 1 2)")
    ap.add_argument("--avx2", action="store_true", help="add a run on the AVX2 code path (torch and NumPy)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (results do not depend on it)")
    ap.add_argument("--out", default=None, help="work folder (default: ./bench_reproducibility/<timestamp>)")
    ap.add_argument("--json", default=None, help="write every run and statistic to this JSON file")
    ap.add_argument("--write-expected", action="store_true",
                    help="store the figures in lavis_c2f/configs/expected/demo_results.yaml (quickstart, README)")
    args = ap.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "bench_reproducibility" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs = plan(args.jobs, args.seeds, args.avx2, args.threads)
    print(f"reproducibility bench: {len(runs)} runs of {', '.join(args.jobs)} in {out} "
          f"({args.parallel} at a time; {machine()}" + (f"; load {load0:.1f}" if load0 is not None else "") + ")",
          flush=True)
    t0 = time.perf_counter()
    shared = prepare(out, args.jobs)
    with cf.ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        done = list(pool.map(lambda r: execute(r, out, shared), runs))
    total = round(time.perf_counter() - t0, 1)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result: Dict[str, Any] = {"date": datetime.date.today().isoformat(), "machine": machine(), "seconds": total,
                              "load_start": load0, "load_end": load1, "seeds": args.seeds, "target": TARGET,
                              "parallel": args.parallel, "jobs": {}}
    ok_all = True
    expected_jobs = {}
    for job in args.jobs:
        jruns = [r for r in done if r.job == job]
        reports = analyse(job, jruns, args.seeds[0])
        ok_all &= all(r.ok for r in reports)
        print("\n" + format_report(job, jruns, reports))
        print("README cells (mean ± sd over all runs): " + readme_row(reports))
        result["jobs"][job] = {"runs": [asdict(r) for r in jruns],
                               "figures": [{**asdict(r), "ok": r.ok} for r in reports]}
        settings = ({"args": list(JOBS[job].get("args", [])), "test_queries": jruns[0].test_queries}
                    if JOBS[job]["kind"] == "quickstart" else {"yaml": f"projects/c2f/{JOBS[job]['yaml']}"})
        expected_jobs[job] = {
            "measured": {"date": result["date"], "machine": result["machine"],
                         "command": "python bench/reproducibility.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                         "seconds_per_run": round(sum(r.seconds for r in jruns) / len(jruns), 1),
                         "load_average": [round(x, 1) for x in (load0, load1) if x is not None],
                         "parallel": args.parallel},
            "settings": settings,
            "runs": [{"label": r.label, "threads": r.threads, "seed": r.seed, "cpu_capability": r.cpu_capability}
                     for r in jruns],
            "figures": {r.key: r.all for r in reports}}
    print(f"\ntargets (threads dev <= {TARGET:g}, seeds sd <= {TARGET:g}): {'met' if ok_all else 'MISSED'}; "
          f"{len(done)} runs in {total:.0f} s" + (f" (load average {load0:.1f} -> {load1:.1f})" if load1 is not None else ""))
    if args.json:
        from lavis_c2f.common.io import write_json

        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.write_expected:
        from lavis_c2f.pipeline.expected import write_expected

        header = ("# Expected figures of the demo-corpus jobs, written by `python bench/reproducibility.py "
                  "--write-expected`\n# (lavis_c2f/pipeline/expected.py). The quickstart prints the quickstart "
                  "range beside its table;\n# the README's Results section shows mean ± sd (a test checks they agree).\n")
        print(f"wrote {write_expected(expected_jobs, header=header)}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
