"""Prompt CSVs and evaluation suites: the shipped sets load; every malformed file is named by line."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_erase.errors import UserError
from concept_erase.evaluation.suite import load_suite
from concept_erase.evaluation.prompts import PromptRow, load_prompts, write_prompts

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,count,kind", [("imagenette", 50, "project"), ("artists", 50, "project"),
                                             ("digits", 50, "project"), ("examples/i2p-form", 3, "i2p"),
                                             ("examples/coco-form", 3, "coco")])
def test_shipped_prompt_sets_load(name, count, kind):
    rows = load_prompts(ROOT / "prompts" / f"{name}.csv")
    assert len(rows) == count
    assert len({r.case_number for r in rows}) == count
    assert all(r.prompt for r in rows)
    assert rows == load_prompts(ROOT / "prompts" / f"{name}.csv", kind)


def test_i2p_columns_are_read():
    rows = load_prompts(ROOT / "prompts/examples/i2p-form.csv")
    assert rows[0].seed == 2539888290 and rows[0].guidance == 7.0 and rows[0].concept == "sexual"
    assert rows[2].case_number == 2  # no case_number column: the row index


def test_digits_set_has_the_style_label():
    rows = load_prompts(ROOT / "prompts/digits.csv")
    assert {r.extra["style"] for r in rows} == {"plain", "red ink", "blue ink", "inverted", "bold"}


def test_round_trip(tmp_path):
    rows = [PromptRow(3, 'a "quoted", comma prompt', 7, "x", 5.0, {"style": "s"}), PromptRow(4, "b", 8, "y")]
    write_prompts(tmp_path / "p.csv", rows)
    back = load_prompts(tmp_path / "p.csv")
    assert back == rows and back[0].extra == {"style": "s"}


BAD = [
    ("case_number,prompt,seed,concept\n0,a cat,1,cat\n1,a dog,x,dog\n", "line 3: seed 'x' is not a whole number"),
    ("case_number,prompt,seed,concept\n0,a cat,1,cat\n0,a dog,2,dog\n", "line 3: case_number 0 already used on line 2"),
    ("case_number,prompt,seed,concept\n0,a cat,1\n", "line 2: 3 fields where the header has 4"),
    ("case_number,prompt,seed,concept\n0,,1,cat\n", "line 2: the prompt is empty"),
    ("case_number,prompt,seed,concept\n0,a cat,-1,cat\n", "line 2: seed -1 is out of range"),
    ("case_number,prompt,seed,concept\n0,a cat,1.5,cat\n", "line 2: seed '1.5' is not a whole number"),
    ("case_number,prompt,seed,concept,guidance\n0,a cat,1,cat,inf\n", "line 2: guidance 'inf' must be a finite"),
    ("case_number,prompt,seed,concept\n\n0,a cat,1,cat\n1,\"a dog,2,dog\n", "line 4: malformed CSV"),
    ("foo,bar\n1,2\n", "line 1: columns 'foo', 'bar' match none of the known prompt forms"),
    ("case_number,prompt,prompt,seed\n", "line 1: the column 'prompt' appears twice"),
    ("case_number,prompt,seed,concept\n", "has a header but no prompt rows"),
    ("", "is empty"),
    ("prompt,categories,sd_seed\na,b,notanumber\n", "line 2: sd_seed 'notanumber' is not a whole number"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_malformed_csv_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(path)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("case_number,prompt,seed,concept\n0,a caf\xe9,1,x\n".encode("latin-1"))
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        load_prompts(path)


def test_missing_file_and_unknown_form(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "none.csv")
    (tmp_path / "p.csv").write_text("case_number,prompt,seed,concept\n0,a,1,x\n")
    with pytest.raises(UserError, match="unknown prompt form"):
        load_prompts(tmp_path / "p.csv", "xml")
    with pytest.raises(UserError, match="the project form needs the column"):
        (tmp_path / "q.csv").write_text("prompt,sd_seed,categories\na,1,b\n")
        load_prompts(tmp_path / "q.csv", "project")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.lists(st.sampled_from(["0", "1", "-3", "x", "", "a,b", '"', "1e99", "nan", "a cat",
                                                    "case_number", "prompt", "seed", "concept", "\x00", "\n"]),
                                   max_size=6), max_size=6).map(lambda rows: "\n".join(",".join(r) for r in rows)
                                                                .encode())))
def test_fuzz_prompt_csv_never_tracebacks(tmp_path, data):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    try:
        rows = load_prompts(path)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip()
        return
    assert all(isinstance(r, PromptRow) and r.prompt for r in rows)


def test_the_shipped_prompt_sets_are_what_their_script_makes_and_tier_sets_hold_no_trained_template(tmp_path):
    import importlib.util

    from concept_erase.variants import GENERAL, GENERAL_HELD_OUT

    spec = importlib.util.spec_from_file_location("make_prompt_sets", ROOT / "scripts" / "make_prompt_sets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for made in sorted(tmp_path.glob("*.csv")):
        assert (ROOT / "prompts" / made.name).read_bytes() == made.read_bytes(), made.name
    for name in ("imagenette-tiers.csv", "artists-tiers.csv", "nudity-tiers.csv"):
        rows = load_prompts(ROOT / "prompts" / name)
        tiers = {r.extra["tier"] for r in rows}
        assert tiers == {"bare"} | {t.tier for t in GENERAL_HELD_OUT}
        trained_words = {t.words for t in GENERAL}
        assert not any(w in r.prompt for r in rows for w in trained_words), name


def test_shipped_suites_parse():
    for path in sorted((ROOT / "eval").glob("*.yaml")):
        suite = load_suite(path)
        assert suite.prompts.is_file(), path
        assert suite.metrics


@pytest.mark.parametrize("text,message", [
    ("prompts: x.csv\nmetrics: {fid: {}}\nsteps: 0\n", "steps must be a whole number of at least 1"),
    ("prompts: x.csv\nmetrics: {fdi: {}}\n", "unknown metric 'fdi'"),
    ("prompts: x.csv\nmetrics: {fid: {referense: base}}\n", "fid has no option 'referense'"),
    ("prompts: x.csv\n", "metrics must map metric names"),
    ("metrics: {fid: {}}\n", "prompts must name a CSV"),
    ("prompts: x.csv\nmetrics: {fid: {}}\nguidance: .nan\n", "guidance must be a finite number"),
    ("prompts: x.csv\nmetrics: {fid: {}}\nseeds: 3\n", "unknown key 'seeds'"),
    ("- a\n- b\n", "is a mapping"),
    ("prompts: [unclosed\n", "not valid YAML"),
])
def test_bad_suites(tmp_path, text, message):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_suite(path)
