"""Run one of timm's scripts (validate.py, inference.py, benchmark.py, ...) with the Meta-Pooling models registered.

    python -m train_hooks.launch PATH/TO/validate.py --model mobilenetv2_metapool_100 \\
        --model-kwargs genotype=runs/search1/genotype.json --checkpoint model_best.pth.tar --data-dir DATA

timm's train.py can import the plugin itself (`--device-modules timm_metapool`); the other scripts have no such flag.
The launcher imports `timm_metapool`, then runs the script as `__main__` with its own arguments, as
`python SCRIPT ARGS...` would.
"""
import os
import runpy
import sys
from typing import Optional, Sequence

__all__ = ['main']

USAGE = """usage: timm-metapool-launch SCRIPT [SCRIPT_ARGS ...]

Import timm_metapool (registering mobilenetv2_metapool_*), then run SCRIPT as __main__ with SCRIPT_ARGS,
e.g. timm's validate.py, inference.py or benchmark.py."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`timm-metapool-launch SCRIPT ARGS...`: run SCRIPT as `__main__` with the plugin imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    script, script_args = argv[0], argv[1:]
    if script.startswith('-'):
        raise SystemExit(f"timm-metapool-launch: error: the first argument must be the script to run (e.g. "
                         f"PATH/TO/validate.py), then its arguments; got the option {script!r}.")
    if os.path.isdir(script):
        raise SystemExit(f"timm-metapool-launch: error: {script!r} is a folder; give the script inside it, e.g. "
                         f"{os.path.join(script, 'validate.py')}.")
    if not os.path.isfile(script):
        raise SystemExit(f"timm-metapool-launch: error: script {script!r} not found. timm's scripts are not in the "
                         f"pip package: take them from https://github.com/huggingface/pytorch-image-models.")

    import timm_metapool  # noqa: F401  registers the architectures before the script looks them up

    saved_argv, saved_path = sys.argv, list(sys.path)
    # What `python SCRIPT ARGS` sets up: the script's argv, and its folder first on the import path.
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name='__main__')
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == '__main__':
    sys.exit(main())
