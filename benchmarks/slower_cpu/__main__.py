"""`python -m benchmarks.slower_cpu`: see the package's docstring."""

from benchmarks.slower_cpu import main

main()
