"""Malformed config files never produce a traceback: a UserError (one clear line) or a valid config."""

import string

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_erase.config import EraseConfig, build_config, load_yaml
from concept_erase.errors import UserError

KEYS = ["model", "concepts", "concept", "anchors", "steps", "lr", "eps", "method", "train", "lambda", "overwrite",
        "mixed-precision", "beta_schedule", "retain_batch_size", "unknown_key", "seed"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


def _load(path):
    try:
        settings_ = load_yaml(path)
        cfg = build_config(settings_, source=str(path))
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return None
    assert isinstance(cfg, EraseConfig)
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(string.printable, max_size=200))
def test_random_text_as_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    _load(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mapping=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_random_settings_as_yaml(tmp_path, mapping):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(mapping))
    _load(path)


def test_non_finite_numbers_are_refused():
    import math

    import pytest

    for key in ("steps", "eps", "lr", "lambda_init"):
        for bad in (math.nan, math.inf):
            with pytest.raises(UserError, match="finite|whole number"):
                build_config({key: bad})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_random_bytes_as_yaml(tmp_path, raw):
    path = tmp_path / "run.yaml"
    path.write_bytes(raw)
    _load(path)


# The benchmark file and the evaluation suite: the same promise.
BENCH_KEYS = ["recipe", "concepts", "seeds", "methods", "eps_sweep", "evaluation", "memory_probe_steps", "timing_probe", "unknown"]
BENCH_VALUES = st.one_of(VALUES, st.lists(st.dictionaries(st.sampled_from(["method", "label", "lambda_init", "beta",
                                                                            "eps", "steps", "nonsense"]),
                                                          SCALARS, max_size=3), max_size=3),
                         st.sampled_from([["three"], ["red ink", "one"], "three", {"seeds": 2, "every": 0},
                                          {"seeds": "x"}, [{"method": "eupmu"}], [{"method": "nope"}]]))
SUITE_KEYS = ["name", "prompts", "prompts_form", "seeds_per_prompt", "steps", "guidance", "batch_size", "metrics",
              "unknown"]
SUITE_VALUES = st.one_of(VALUES, st.sampled_from(["digits.csv", {"fid": {}}, {"judge": None}, {"clip_score": []},
                                                  {"fid": {"reference": "base"}}, "auto", "i2p"]))


def _loads_or_says(loader, path):
    try:
        loader(path)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip()


def _bench_loader():
    from concept_erase.bench.spec import load_bench

    return load_bench


def _suite_loader():
    from concept_erase.evaluation.suite import load_suite

    return load_suite


@pytest.mark.parametrize("loader,keys,values", [(_bench_loader, BENCH_KEYS, BENCH_VALUES),
                                                (_suite_loader, SUITE_KEYS, SUITE_VALUES)],
                         ids=["benchmark", "suite"])
def test_random_benchmark_files_and_suites(tmp_path, loader, keys, values):
    import yaml

    @settings(max_examples=150, deadline=None)
    @given(mapping=st.dictionaries(st.sampled_from(keys), values, max_size=8))
    def check(mapping):
        path = tmp_path / "file.yaml"
        path.write_text(yaml.safe_dump(mapping))
        _loads_or_says(loader(), path)

    check()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(string.printable, max_size=200))
def test_random_text_as_benchmark_and_suite(tmp_path, text):
    from concept_erase.bench.spec import load_bench
    from concept_erase.evaluation.suite import load_suite

    path = tmp_path / "file.yaml"
    path.write_text(text)
    _loads_or_says(load_bench, path)
    _loads_or_says(load_suite, path)
