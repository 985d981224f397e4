"""``python -m benchmarks BENCH ...``: the benchmarks without the ``cssl`` command."""

from benchmarks.cli import main

raise SystemExit(main())
