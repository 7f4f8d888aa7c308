"""`concept-erase bench`: the method benchmark on a built-in model whose package gives its world (`world`), split by
job (the file and its plan, the runs, the sequential benchmark, step timing, peak memory, the report, bootstrap
statistics)."""
