"""The trials-table schema: columns per stage, validation errors that name the file, column and value, the score
columns computed once."""

import pandas as pd
import pytest

from esr.trials import (
    TrialSpec,
    TrialsTableError,
    columns,
    empty_frame,
    read_trials,
    score_columns,
    validate,
    write_trials,
)

from helpers import graded_row


def test_stages_add_columns_in_order():
    planned, generated, graded = columns("planned"), columns("generated"), columns("graded")
    assert planned == list(TrialSpec.__dataclass_fields__)
    assert generated[: len(planned)] == planned and graded[: len(generated)] == generated
    assert {"response", "token_ids", "provenance"} <= set(generated) - set(planned)
    assert {"attempt_scores", "n_attempts", "first_score", "last_score"} <= set(graded) - set(generated)
    assert list(empty_frame("graded").columns) == graded


def test_score_columns_skip_unscored_attempts():
    df = score_columns([[10.0, None, 80.0], [None], [], None, [55.0]])
    assert df["n_attempts"].tolist() == [2, 0, 0, 0, 1]
    assert df["first_score"].tolist()[0] == 10.0 and df["last_score"].tolist()[0] == 80.0
    assert df["first_score"].isna().tolist() == [False, True, True, True, False]


def test_write_read_roundtrip_and_errors_name_file_column_value(tmp_path):
    rows = pd.DataFrame([graded_row("a", scores=[20.0, 70.0]), graded_row("b", latent=3, scores=[50.0])])
    path = tmp_path / "trials.parquet"
    write_trials(path, rows, "graded")
    back = read_trials(path)
    assert back.trial_id.tolist() == ["a", "b"] and back.n_attempts.tolist() == [2, 1]
    with pytest.raises(TrialsTableError, match=r"t\.parquet: a graded trials table lacks column\(s\) first_score"):
        write_trials(tmp_path / "t.parquet", rows.drop(columns="first_score"), "graded")
    with pytest.raises(TrialsTableError, match=r"column 'seed' holds 'x' \(str\), expected int"):
        validate(rows.assign(seed=["x", 1]), "graded", "here")
    with pytest.raises(TrialsTableError, match="column 'response' is empty in row 1"):
        validate(rows.assign(response=["ok", None]), "graded")
    with pytest.raises(TrialsTableError, match=r"duplicate trial_id \['a'\]"):
        validate(pd.concat([rows, rows.iloc[:1]]), "graded")
    # exp7's regrade has one row per trial and judge
    twice = pd.concat([rows.assign(judge_id="j1"), rows.assign(judge_id="j2")], ignore_index=True)
    assert len(validate(twice, "graded", unique=("trial_id", "judge_id"))) == 4
    assert not (tmp_path / "t.parquet").exists()


def test_reading_empty_tables_gives_the_schema():
    assert list(read_trials([], "generated").columns) == columns("generated")
