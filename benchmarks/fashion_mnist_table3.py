"""The paper's Table 3 on Fashion-MNIST, converged: the entry point of the queue runner in `table3/`.

`python benchmarks/fashion_mnist_table3.py --help` prints how to start the runners, follow the queue and rebuild the
table (the docstring of `table3/__init__.py`); docs/results_fashion_mnist.md holds the set-up and the results.
"""
from table3.runner import main

if __name__ == '__main__':
    main()
