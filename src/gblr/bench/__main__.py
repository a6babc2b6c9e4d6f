"""``python -m gblr.bench``: run the benchmark suite and write RESULTS.md."""

from gblr.bench.suite import main

raise SystemExit(main())
