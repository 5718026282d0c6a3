"""The paper's Table 3 on Fashion-MNIST, converged: a queue of runs that outlives a session.

    apt-get install -y dataset-fashion-mnist
    for core in 1 2; do      # one runner per core; they share the queue (a lock per entry)
        OMP_NUM_THREADS=1 nohup python benchmarks/fashion_mnist_table3.py --commit >> runs/fm56_$core.log 2>&1 &
    done
    python benchmarks/fashion_mnist_table3.py --status         # the queue, what is finished
    python benchmarks/fashion_mnist_table3.py --report-only    # rebuild the table and plot from the result files

MobileNetV2 width 0.35 at 56 px with timm's `output_stride=16`, so every enhancer slot sees a map of 4x4 or more
(14x14 down to 4x4) and the pooling candidates stay distinct functions. Every retrain uses one recipe on the full
60,000-image training split and is evaluated on the 10,000-image test split after every epoch. Arms: all-`skip`,
all-`avg3` (Local), all-`global`, Random (`random:SEED`, a different genotype per seed), PMPL from two independent
searches (`train_hooks.search` on the training split, the meta split carved from it) and timm's SqueezeExcite and
CoordAttn in the same slots. A third search repeats search A with `--no-early-stop`, for the search cost.

Each finished run writes one small result file under benchmarks/results/fashion_mnist_56px/ (`runs/<arm>_seed<k>.json`;
`searches/<name>/` with genotype.json, search.png, search_log.csv and result.json). A run whose result file exists is
skipped; an unfinished one resumes from its per-epoch checkpoint in --work-dir (never committed). A run that fails is
logged and retried on the next start. Several runners share the queue: an entry runs in the one that holds its lock.
After every run the table (docs/results_fashion_mnist.md, between its markers) and the bar plot are rebuilt from the
result files; with --commit the run's files are committed by path. Retrains run through torch.compile, which needs a
C++ compiler on CPU (`--no-compile` runs them eagerly; each epoch row records which).

The code, one job per module, imports only downward: `plan` (recipe, searches, arms, queue), `data`, `models`,
`results` (result files and what is finished), `retrain`, `search`, `report` (the doc's table and the plot) and
`runner` (the queue and the command line).
"""
