"""The queue runner: several runners share the queue (a lock per entry), each finished run is written, reported and
committed by path; and the command line."""
import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import time
import traceback
from typing import Iterator, List, Optional, Sequence

import torch

from . import __doc__ as DESCRIPTION
from .data import prepare_data
from .plan import ARMS, GATE_SKIP_TOP1, LANES, RECIPE, REPO_DIR, RESULTS_DIR, SEARCHES, SHIPPED_RUN, Task, build_queue
from .report import write_report
from .results import is_finished, resolve_genotype, result_path, waits_for, write_json
from .retrain import export_shipped_run, retrain
from .search import publish_search, run_search


def git_commit(paths: Sequence[str], message: str, attempts: int = 10) -> bool:
    """Commit exactly `paths` (pathspec form: nobody else's staged or unstaged work is included), retrying while
    another git process holds the index lock."""
    rel = [os.path.relpath(p, REPO_DIR) for p in paths]
    for attempt in range(attempts):
        add = subprocess.run(['git', '-C', REPO_DIR, 'add', '--', *rel], capture_output=True, text=True)
        if add.returncode == 0:
            commit = subprocess.run(['git', '-C', REPO_DIR, 'commit', '-q', '-m', message, '--', *rel],
                                    capture_output=True, text=True)
            if commit.returncode == 0:
                print(f'  committed: {message}', flush=True)
                return True
            error = commit.stdout + commit.stderr
        else:
            error = add.stderr
        if 'index.lock' not in error:
            print(f'  commit failed: {error.strip()}', flush=True)
            return False
        time.sleep(3 + 2 * attempt)
    print(f'  commit failed after {attempts} attempts (index.lock)', flush=True)
    return False


def run_task(task: Task, data_root: str, work_dir: str, compile_model: bool = True) -> List[str]:
    """Run one queue entry and write its result files; returns their paths."""
    if task.kind == 'search':
        return publish_search(task, run_search(task, data_root, work_dir))
    model, result = retrain(task, data_root, work_dir, compile_model=compile_model)
    path = result_path(task)
    written = [export_shipped_run(model)] if (task.name, task.seed) == SHIPPED_RUN else []
    write_json(result, path)
    if result['arm'] == 'skip' and result['top1'] < GATE_SKIP_TOP1:
        print(f'  WARNING: all-skip seed {task.seed} ended at {result["top1"]:.2f} % < {GATE_SKIP_TOP1} %: the '
              f'recipe trains worse than the earlier ones. Retrains are held (searches go on); fix Recipe and '
              f'restart (results made with the old recipe are then ignored)', flush=True)
    return written + [path]


def print_status(queue: Sequence[Task]) -> None:
    for task in queue:
        state = 'finished' if is_finished(task) else (waits_for(task) or 'to run')
        print(f'{task.run_id:32s} {state}')


@contextlib.contextmanager
def entry_lock(work_dir: str, task: Task) -> Iterator[bool]:
    """Hold `task`'s lock while it runs: True if this runner got it, False if another runner (of this session or a
    later one on the same work dir) is running the entry."""
    os.makedirs(os.path.join(work_dir, 'locks'), exist_ok=True)
    with open(os.path.join(work_dir, 'locks', task.run_id.replace(' ', '_') + '.lock'), 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield True


def entry_running(work_dir: str, task: Task) -> bool:
    with entry_lock(work_dir, task) as mine:
        return not mine


def run_queue(queue: Sequence[Task], data_root: str, work_dir: str, commit: bool, max_runs: Optional[int],
              poll_s: float = 60.0, gate: bool = True, compile_model: bool = True) -> None:
    """Run the first unfinished, ready entry that no other runner holds, until none is left; wait while the only
    ones left wait for entries that other runners are running. A failure is logged and retried on the next start.
    Without `gate`, retrains do not wait for the convergence check."""
    ran, failed = 0, set()
    while max_runs is None or ran < max_runs:
        pending = [t for t in queue if t not in failed and not is_finished(t)]
        ready = [t for t in pending if not gate or not waits_for(t)]
        started = False
        for task in ready:
            with entry_lock(work_dir, task) as mine:
                if not mine or is_finished(task):  # finished by another runner since the list was made
                    continue
                started = True
                print(f'[{time.strftime("%H:%M:%S")}] start {task.run_id}', flush=True)
                try:
                    paths = run_task(task, data_root, work_dir, compile_model=compile_model)
                except (Exception, SystemExit) as error:  # the search CLI reports its errors as SystemExit
                    print(f'[{time.strftime("%H:%M:%S")}] FAILED {task.run_id}: {error!r}\n'
                          f'{traceback.format_exc()}', flush=True)
                    failed.add(task)
                    break
            ran += 1
            print(f'[{time.strftime("%H:%M:%S")}] finished {task.run_id}', flush=True)
            paths += [write_report(), os.path.join(RESULTS_DIR, 'accuracy.png')]
            if commit:
                git_commit([p for p in paths if os.path.exists(p)], f'fashion-mnist 56px: {task.run_id} finished')
            break
        if started:
            continue
        if not ready and not any(entry_running(work_dir, t) for t in queue):
            return  # nothing left, or what is left waits for what nobody runs (held retrains, failed searches)
        time.sleep(poll_s)  # what is left runs in other runners or waits for their results


def only_entry(queue: Sequence[Task], run_id: str) -> Task:
    """The queue entry named `run_id`, or a SystemExit that lists the names and says why it cannot run."""
    task = next((t for t in queue if t.run_id == run_id), None)
    if task is None:
        raise SystemExit(f'error: --only {run_id!r} is not a queue entry; one of: '
                         f'{", ".join(t.run_id for t in queue)}')
    if task.kind == 'retrain' and resolve_genotype(ARMS[task.name], task.seed) is None:
        raise SystemExit(f'error: {run_id} needs its search, which has not finished; run that first.')
    return task


def require_cxx_compiler() -> None:
    """torch.compile on CPU builds C++ kernels; without a compiler it fails only at the first step, obscurely."""
    compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')
    if compiler is None:
        raise SystemExit('error: torch.compile needs a C++ compiler on CPU and none was found (set CXX, or install '
                         'g++); or pass --no-compile to run the retrains eagerly.')


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default=os.path.join(REPO_DIR, 'runs', 'fashion_mnist_56px'),
                        help='data, checkpoints and search outputs (not committed)')
    parser.add_argument('--commit', action='store_true', help="commit each finished run's result files (by path)")
    parser.add_argument('--max-runs', type=int, default=None, help='stop after this many finished runs')
    parser.add_argument('--lane', choices=LANES, default='all',
                        help='run only the searches or only the retrains '
                             '(runners share the queue: each entry runs in one)')
    parser.add_argument('--only', metavar='RUN_ID', default=None,
                        help="run this one entry (as --status names it, e.g. pmpl_a_seed0) even while the convergence "
                             "check holds retrains; a PMPL retrain still needs its search")
    parser.add_argument('--no-compile', action='store_true',
                        help='run retrains eagerly instead of through torch.compile '
                             '(which needs a C++ compiler on CPU)')
    parser.add_argument('--status', action='store_true', help='print the queue and exit')
    parser.add_argument('--report-only', action='store_true', help='rebuild the table and plot and exit')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two shared cores: a second thread stalls at OpenMP barriers under load
    queue = build_queue()
    if args.status:
        print_status(queue)
        return
    if args.report_only:
        print(write_report())
        return
    if not args.no_compile:
        require_cxx_compiler()
    data_root = prepare_data(os.path.join(args.work_dir, 'data'))
    print(f'Table 3 runner ({args.lane}, pid {os.getpid()}): {sum(is_finished(t) for t in queue)}/{len(queue)} '
          f'finished; recipe {RECIPE}; searches {SEARCHES}', flush=True)
    if args.only:
        queue = [only_entry(queue, args.only)]
    run_queue([t for t in queue if args.lane in ('all', t.kind)], data_root, args.work_dir, args.commit,
              args.max_runs, gate=not args.only, compile_model=not args.no_compile)
    write_report()
    print('queue done' if all(is_finished(t) for t in queue) else 'stopped with entries left (see --status)',
          flush=True)
