"""`python -m biflow_bench ...` (what torchrun launches) is the `biflow-bench` command."""

from .cli import main

main()
