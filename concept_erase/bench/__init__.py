"""`concept-erase bench`: the method benchmark on the digits model, split by job (the run plan and
runner, step timing, peak memory, the report, bootstrap statistics)."""
