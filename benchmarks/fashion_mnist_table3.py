"""The paper's Table 3 on Fashion-MNIST, converged: a queue of runs that outlives a session (code in `table3/`).

    apt-get install -y dataset-fashion-mnist
    for core in 1 2; do      # one runner per core; they share the queue (a lock per entry)
        OMP_NUM_THREADS=1 nohup python benchmarks/fashion_mnist_table3.py --commit >> runs/fm56_$core.log 2>&1 &
    done
    python benchmarks/fashion_mnist_table3.py --status         # the queue, what is finished
    python benchmarks/fashion_mnist_table3.py --report-only    # rebuild the table and plot from the result files
"""
from table3.runner import main

if __name__ == '__main__':
    main()
