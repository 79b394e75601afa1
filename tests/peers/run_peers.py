"""Judge PyREPL3 by other projects' own tests: run their kernel-facing suites
against ipykernel and against PyREPL3, and list what passes on one and not on
the other.

    .venv/bin/python -m tests.peers.run_peers                      # all suites, all three kernels
    .venv/bin/python -m tests.peers.run_peers --kernels ipykernel,pyrepl3   # without the --no-pool spec
    .venv/bin/python -m tests.peers.run_peers --suites ipykernel --kernels pyrepl3 \\
        --test tests/test_kernel.py::test_sys_path --keep         # one test, its log, by-hand commands

The sdists of the installed ipykernel, jupyter_server and papermill are
downloaded once into ``.peers-cache/`` (it ignores itself in git). The name
``python3`` is bound to each kernel on a temporary ``JUPYTER_PATH``; nothing
reads or writes the user's Jupyter directories, and every process a run causes
is ended before the runner exits (on a timeout, SIGTERM or Ctrl-C too).

A test that passes on ipykernel and fails on a PyREPL3 kernel is run again
alone (up to twice): if it passes then, it failed only because an earlier
test left the shared kernel in a bad state, or the machine was loaded (it is
reported, not counted). A failure that
remains is accepted only if ``known_differences.toml`` lists it with a reason.
Exit status: 0 when every such failure is listed, 1 when one is not (or a run
hit its time bound), 2 when the run could not be set up, 3 when pytest plugins
the peer suites need are not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a path: make `tests.peers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.peers import harness, sources  # noqa: E402
from tests.peers.harness import BASELINE, KERNELS, SUITES, Job, RunResult  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib  # type: ignore[no-redef]

KNOWN_DIFFERENCES = Path(__file__).resolve().parent / "known_differences.toml"
# "not-run": the pytest process ended (or was killed) before the test ran.
FAILING = ("failed", "error", "timeout", "not-run")
DEFAULT_KERNELS = "ipykernel,pyrepl3,pyrepl3-cold"
ALONE_ATTEMPTS = 2
EXIT_MISSING_DEPENDENCIES = 3


@dataclass(frozen=True)
class KnownDifference:
    suite: str
    test: str
    kernels: tuple[str, ...]
    category: str
    reason: str

    def matches(self, suite: str, kernel: str, nodeid: str) -> bool:
        if suite != self.suite or kernel not in self.kernels:
            return False
        # An entry without parameters covers every parametrization of the test.
        return nodeid == self.test or ("[" not in self.test and nodeid.split("[")[0] == self.test)


def load_known(path: Path = KNOWN_DIFFERENCES) -> list[KnownDifference]:
    """The accepted differences (``[[difference]]`` tables with suite, tests, reason)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    known = []
    pyrepl3_kernels = tuple(k for k in KERNELS if k != BASELINE)
    for i, entry in enumerate(data.get("difference", [])):
        missing = {"suite", "tests", "reason", "category"} - set(entry)
        if missing or entry["suite"] not in SUITES or not entry["reason"].strip():
            raise ValueError(
                f"{path.name}: difference #{i + 1} needs suite, tests, category, reason"
            )
        kernels = tuple(entry.get("kernels", pyrepl3_kernels))
        for test in entry["tests"]:
            known.append(
                KnownDifference(
                    entry["suite"],
                    test,
                    kernels,
                    entry["category"],
                    " ".join(entry["reason"].split()),
                )
            )
    return known


@dataclass
class Difference:
    """A test that passes on ipykernel and fails on a PyREPL3 kernel."""

    suite: str
    kernel: str
    nodeid: str
    outcome: str
    message: str
    excerpt: str
    alone: str | None = None  # outcome when run alone (None: not re-run)
    known: KnownDifference | None = None

    @property
    def counts(self) -> bool:
        """Fails CI: not listed and not cleared by a run alone."""
        return self.known is None and self.alone != "passed"


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.peers.run_peers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--suites", default=",".join(SUITES), help=f"comma-separated: {', '.join(SUITES)}"
    )
    p.add_argument(
        "--kernels",
        default=os.environ.get("PYREPL3_PEERS_KERNELS", DEFAULT_KERNELS),
        help=f"comma-separated: {', '.join(KERNELS)} (default {DEFAULT_KERNELS}, or $PYREPL3_PEERS_KERNELS)",
    )
    p.add_argument(
        "--test",
        action="append",
        default=[],
        help="a node id to run instead of the suite (repeatable; one suite)",
    )
    p.add_argument(
        "--jobs", type=int, default=3, help="runs at once (default 3; the tests mostly wait)"
    )
    p.add_argument(
        "--deadline", type=float, default=900, help="seconds for everything (default 900)"
    )
    p.add_argument(
        "--max-alone", type=int, default=25, help="most re-runs alone per run (default 25)"
    )
    p.add_argument(
        "--cache", type=Path, default=harness.DEFAULT_CACHE, help="where sdists are kept"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--artifacts",
        type=Path,
        help="where each run's pytest log and daemon logs are kept (default: CACHE/last-run)",
    )
    p.add_argument(
        "--markdown", type=Path, help="write a status report (failures, excerpts, re-run commands)"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directories and print by-hand commands",
    )
    p.add_argument("--show-log", action="store_true", help="print the pytest output of every run")
    args = p.parse_args(argv)
    args.artifacts = args.artifacts or args.cache / "last-run"
    args.suites = [s for s in args.suites.split(",") if s]
    args.kernels = [k for k in args.kernels.split(",") if k]
    for name in args.suites:
        if name not in SUITES:
            p.error(f"unknown suite {name!r}: choose from {', '.join(SUITES)}")
    for name in args.kernels:
        if name not in KERNELS:
            p.error(f"unknown kernel {name!r}: choose from {', '.join(KERNELS)}")
    if args.test and len(args.suites) != 1:
        p.error("--test needs exactly one --suites")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = harness.missing_plugins()
    if missing:
        print(
            f"peers: missing test dependencies (the dev extras): pip install {' '.join(missing)}",
            file=sys.stderr,
        )
        return EXIT_MISSING_DEPENDENCIES
    harness.become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    start = time.monotonic()
    run_id = uuid.uuid4().hex[:12]
    base = Path(tempfile.mkdtemp(prefix="pyrepl3-peers-"))
    jobs: list[Job] = []
    try:
        sources.prepare_cache(args.cache)
        shutil.rmtree(args.artifacts, ignore_errors=True)
        versions = {}
        for name in args.suites:
            versions[name], source = sources.fetch_sources(SUITES[name].dist, args.cache)
            for kernel in args.kernels:
                jobs.append(
                    Job(
                        SUITES[name],
                        kernel,
                        source,
                        base / f"{name}-{kernel}",
                        run_id,
                        args.artifacts,
                    )
                )
        print(
            "peers: "
            + ", ".join(f"{n} {v}" for n, v in versions.items())
            + f"; kernels {', '.join(args.kernels)}; {len(jobs)} runs, {args.jobs} at once",
            flush=True,
        )
        runs = _run_all(jobs, args, start)
        diffs = compare(runs, args)
        _rerun_alone(jobs, diffs, args, start)
        print(render(runs, diffs, versions, args, time.monotonic() - start))
        if args.keep:
            for job in jobs:
                print(
                    f"\n# by hand, {job.suite.name} on {job.kernel}:\n"
                    + job.reproduce(args.test or list(job.suite.targets))
                )
        if args.json:
            args.json.write_text(
                json.dumps(to_json(runs, diffs, versions, time.monotonic() - start), indent=1)
            )
        if args.markdown:
            args.markdown.write_text(
                markdown(runs, diffs, versions, args, time.monotonic() - start)
            )
        return verdict(runs, diffs, args)
    except harness.PeerSetupError as exc:
        print(f"peers: setup failed: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"peers: interrupted ({exc}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        harness.kill_active()
        for job in jobs:
            if job.env:
                job.cleanup()
        harness.kill_marked(run_id)
        harness.kill_descendants()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


Runs = dict[tuple[str, str], RunResult]


def _run_all(jobs: list[Job], args: argparse.Namespace, start: float) -> Runs:
    runs: Runs = {}

    def one(job: Job) -> None:
        remaining = args.deadline - (time.monotonic() - start)
        if remaining <= 5:
            runs[(job.suite.name, job.kernel)] = RunResult(cut=True)
            return
        job.setup()
        bound = min(job.suite.bound, remaining)
        result = job.run(args.test or list(job.suite.targets), bound, "suite")
        runs[(job.suite.name, job.kernel)] = result
        print(
            f"peers: {job.suite.name} on {job.kernel}: {_counts(result)} ({result.elapsed:.0f}s)",
            flush=True,
        )
        if args.show_log and result.log:
            print(result.log.read_text(errors="replace"))

    # The longest suites first, so the pool ends together.
    _in_pool(one, [(job,) for job in sorted(jobs, key=lambda j: -j.suite.bound)], args.jobs)
    return runs


def _in_pool(fn: Any, calls: list[tuple[Any, ...]], workers: int) -> None:
    """Run ``fn(*call)`` for each call, ``workers`` at once; on any exception
    (a signal included) kill the runs in progress instead of waiting for them."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for future in [pool.submit(fn, *call) for call in calls]:
            future.result()
    except BaseException:
        harness.kill_active()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _counts(r: RunResult) -> str:
    text = (
        f"{r.count('passed')} passed, {r.count('failed')} failed, {r.count('error', 'timeout')} errors, "
        f"{r.count('skipped', 'xfailed')} skipped"
    )
    if r.count("not-run"):
        text += f", {r.count('not-run')} not run"
    if r.cut:
        text += ", CUT by the time bound"
    return text


def compare(runs: Runs, args: argparse.Namespace) -> list[Difference]:
    known = load_known()
    diffs = []
    for suite in args.suites:
        base = runs.get((suite, BASELINE))
        for kernel in args.kernels:
            if kernel == BASELINE or (suite, kernel) not in runs:
                continue
            other = runs[(suite, kernel)]
            for nodeid, res in sorted(other.results.items()):
                passed_on_base = base is None or (
                    nodeid in base.results and base.results[nodeid].outcome == "passed"
                )
                if other.cut and res.outcome == "not-run":
                    continue  # the cut itself fails the run; these say nothing more
                if res.outcome in FAILING and passed_on_base:
                    match = next((k for k in known if k.matches(suite, kernel, nodeid)), None)
                    diffs.append(
                        Difference(
                            suite,
                            kernel,
                            nodeid,
                            res.outcome,
                            res.message,
                            res.excerpt,
                            known=match,
                        )
                    )
    return diffs


def _rerun_alone(
    jobs: list[Job], diffs: list[Difference], args: argparse.Namespace, start: float
) -> None:
    """Run each unlisted difference again alone, in its own pytest process, up
    to twice: a test that passes once then failed for another reason than the
    kernel's (an earlier test, a loaded machine) and is not counted."""
    if args.test:
        return
    by_job = {(j.suite.name, j.kernel): j for j in jobs}

    def one(key: tuple[str, str], items: list[Difference]) -> None:
        job = by_job[key]
        for i, diff in enumerate(items[: args.max_alone]):
            for attempt in range(ALONE_ATTEMPTS):
                remaining = args.deadline - (time.monotonic() - start)
                if remaining <= 5:
                    return
                bound = min(job.suite.test_timeout + 60, remaining)
                run = job.run([diff.nodeid], bound, f"alone-{i}-{attempt}")
                res = run.results.get(diff.nodeid)
                diff.alone = res.outcome if res else "not-run"
                if diff.alone == "passed":
                    break

    todo: dict[tuple[str, str], list[Difference]] = {}
    for diff in diffs:
        if diff.known is None and args.max_alone > 0:
            todo.setdefault((diff.suite, diff.kernel), []).append(diff)
    if not todo:
        return
    print(
        f"peers: running {sum(len(v) for v in todo.values())} unlisted failures again alone",
        flush=True,
    )
    _in_pool(one, list(todo.items()), args.jobs)


def stale_entries(runs: Runs, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Listed differences whose tests now pass on a kernel: (suite, kernel, nodeid)."""
    stale = []
    for k in load_known():
        for kernel in k.kernels:
            run = runs.get((k.suite, kernel))
            if run is None or args.test:
                continue
            for nodeid, res in run.results.items():
                if k.matches(k.suite, kernel, nodeid) and res.outcome == "passed":
                    stale.append((k.suite, kernel, nodeid))
    return stale


def verdict(runs: Runs, diffs: list[Difference], args: argparse.Namespace) -> int:
    for (suite, kernel), run in runs.items():
        if kernel == BASELINE and not args.test and run.count("passed") == 0:
            print(
                f"peers: {suite} passed no test on ipykernel: the setup is broken (see its log)",
                file=sys.stderr,
            )
            return 2
    if any(run.cut for run in runs.values()):
        return 1
    return 1 if any(d.counts for d in diffs) else 0


def render(
    runs: Runs,
    diffs: list[Difference],
    versions: dict[str, str],
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    lines = [
        "",
        f"{'suite':<24}{'kernel':<14}{'passed':>7}{'failed':>7}{'errors':>7}{'skipped':>8}{'time':>7}",
    ]
    for suite in args.suites:
        for kernel in args.kernels:
            r = runs.get((suite, kernel))
            if r is None:
                continue
            lines.append(
                f"{suite + ' ' + versions[suite]:<24}{kernel:<14}{r.count('passed'):>7}{r.count('failed'):>7}"
                f"{r.count('error', 'timeout'):>7}{r.count('skipped', 'xfailed'):>8}{r.elapsed:>6.0f}s"
                + ("  CUT by the time bound" if r.cut else "")
                + (f"  {r.count('not-run')} not run" if r.count("not-run") else "")
            )
    for suite in args.suites:
        for kernel in args.kernels:
            mine = [d for d in diffs if d.suite == suite and d.kernel == kernel]
            if not mine:
                continue
            lines.append(f"\n{suite}: pass on ipykernel, fail on {kernel} ({len(mine)}):")
            for d in mine:
                if d.known:
                    tag = f"known ({d.known.category})"
                elif d.alone == "passed":
                    tag = "passes alone (fails after an earlier failure)"
                elif d.alone:
                    tag = f"NOT LISTED, {d.alone} alone too"
                else:
                    tag = "NOT LISTED"
                lines.append(f"  {d.outcome:<8}{d.nodeid}  [{tag}]")
                if not d.known and d.message:
                    lines.append(f"          {d.message.splitlines()[0][:200]}")
    stale = stale_entries(runs, args)
    if stale:
        lines.append("\nlisted in known_differences.toml but passing now (remove them):")
        lines.extend(f"  {s} on {k}: {n}" for s, k, n in stale)
    counted = [d for d in diffs if d.counts]
    lines.append(
        f"\npeers: {len(counted)} unlisted PyREPL3-only failures, "
        f"{sum(1 for d in diffs if d.known)} known differences, {elapsed:.0f}s"
    )
    return "\n".join(lines)


def to_json(
    runs: Runs, diffs: list[Difference], versions: dict[str, str], elapsed: float
) -> dict[str, Any]:
    return {
        "versions": versions,
        "elapsed": round(elapsed, 1),
        "runs": [
            {
                "suite": suite,
                "kernel": kernel,
                "elapsed": round(r.elapsed, 1),
                "cut": r.cut,
                "exit_code": r.exit_code,
                "counts": {
                    o: r.count(o)
                    for o in (
                        "passed",
                        "failed",
                        "error",
                        "timeout",
                        "skipped",
                        "xfailed",
                        "xpassed",
                        "not-run",
                    )
                },
                "results": {n: t.outcome for n, t in sorted(r.results.items())},
            }
            for (suite, kernel), r in sorted(runs.items())
        ],
        "differences": [
            {
                **{k: v for k, v in asdict(d).items() if k != "known"},
                "known": asdict(d.known) if d.known else None,
                "counts": d.counts,
            }
            for d in diffs
        ],
    }


def markdown(
    runs: Runs,
    diffs: list[Difference],
    versions: dict[str, str],
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    out = [
        "# Peer suites: PyREPL3 vs ipykernel",
        "",
        f"Generated by `python -m tests.peers.run_peers` ({time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f}s).",
        "",
        "| suite | kernel | passed | failed | errors | skipped | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for (suite, kernel), r in sorted(runs.items()):
        out.append(
            f"| {suite} {versions[suite]} | {kernel} | {r.count('passed')} | {r.count('failed')} | "
            f"{r.count('error', 'timeout')} | {r.count('skipped', 'xfailed')} | {r.elapsed:.0f}s"
            + (" (cut)" if r.cut else "")
            + " |"
        )
    for title, pick in (
        ("Failing on PyREPL3, not listed (to fix)", lambda d: d.counts),
        (
            "Failing in the suite run only (pass alone)",
            lambda d: not d.known and d.alone == "passed",
        ),
        ("Known differences (known_differences.toml)", lambda d: d.known is not None),
    ):
        chosen = [d for d in diffs if pick(d)]
        out += ["", f"## {title}: {len(chosen)}", ""]
        for d in chosen:
            out.append(f"### `{d.nodeid}` ({d.suite}, {d.kernel}: {d.outcome})")
            if d.known:
                out += ["", d.known.reason, ""]
                continue
            out += [
                "",
                "```",
                _tail(d.excerpt) or d.message,
                "```",
                "",
                f"Re-run: `.venv/bin/python -m tests.peers.run_peers --suites {d.suite} --kernels {d.kernel} "
                f"--test '{d.nodeid}' --show-log --keep`",
                "",
            ]
    return "\n".join(out) + "\n"


def _tail(excerpt: str) -> str:
    """The end of the traceback, and the captured output the excerpt carries."""
    head, sep, captured = excerpt.partition("\n--- captured ")
    return "\n".join(head.splitlines()[-15:]) + (sep + captured if sep else "")


if __name__ == "__main__":
    sys.exit(main())
