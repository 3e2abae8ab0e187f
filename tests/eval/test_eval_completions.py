"""Contracts of the completions analysis (promptloop.eval.completions) on hand-written logs."""
import json

import pytest

from promptloop.eval.completions import (DROPPED, FIRST, LATER, UNCHANGED, added_words, edit_attribution,
                                         load_completions, main, windows)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(step, query, prompts, reward):
    return {"step": step, "query": query, "prompts": [query, *prompts], "reward": reward}


@pytest.fixture
def log(tmp_path):
    rows = []
    for step in (1, 2, 3):
        # Group mean 1.75: "blue" at the first action +1.25, "blue" later -0.75, unchanged +0.25, "circle"
        # dropped -0.75.
        rows += [_row(step, "red circle", ["red circle blue", "red circle blue"], 3.0),
                 _row(step, "red circle", ["red circle", "red circle blue"], 1.0),
                 _row(step, "red circle", ["red circle", "red circle"], 2.0),
                 _row(step, "red circle", ["red", "red"], 1.0)]
    rows.append({"step": 3, "query": "red circle", "prompts": ["red circle", "x"], "reward": None})
    return _write(tmp_path / "completions.jsonl", rows)


def test_load_skips_nonfinite_and_accepts_the_run_folder(log):
    rows = load_completions(log.parent)
    assert len(rows) == 12
    assert rows[3].keeps_query is False and rows[0].keeps_query is True


def test_added_words_are_counted_at_the_action_that_adds_them(log):
    first, later = load_completions(log)[:2]
    assert added_words(first) == [("blue", 1)]
    assert added_words(later) == [("blue", 2)]


def test_attribution_centres_rewards_within_groups(log):
    stats = edit_attribution(load_completions(log))
    # group mean (3 + 1 + 2 + 1) / 4 = 1.75
    assert stats[("blue", FIRST)].mean == pytest.approx(1.25)
    assert stats[("blue", LATER)].mean == pytest.approx(-0.75)
    assert stats[(DROPPED, "")].mean == pytest.approx(-0.75) and stats[(DROPPED, "")].samples == 3
    assert stats[(UNCHANGED, "")].mean == pytest.approx(0.25)
    assert stats[("blue", FIRST)].n == 3 and stats[("blue", FIRST)].half_width == pytest.approx(0.0)


def test_windows_summarise_reward_kept_query_and_added_words(log):
    first, second = windows(load_completions(log), size=2, top=1)
    assert (first.first, first.last, first.trajectories) == (1, 2, 8)
    assert first.mean_reward == pytest.approx(1.75)
    assert first.keeps_query == pytest.approx(0.75)
    assert first.top_added == [("blue", 0.5)]
    assert second.trajectories == 4
    with pytest.raises(ValueError, match="window size"):
        windows(load_completions(log), size=0)


def test_cli_prints_tables_and_writes_json(log, tmp_path, capsys):
    out = tmp_path / "a.json"
    main([str(log), "--window", "3", "--min-count", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| 1-3 | 12 | 1.750 | 0.75 | blue 0.50" in text
    assert "| blue | first action | 3 | 3 | +1.250" in text  # 3 trajectories in 3 groups
    payload = json.loads(out.read_text())
    assert payload["windows"][0]["trajectories"] == 12
    assert {(a["edit"], a["where"]) for a in payload["attribution"]} >= {("blue", FIRST), (DROPPED, "")}


def test_bad_logs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="log_completions"):
        load_completions(tmp_path)
    bad = _write(tmp_path / "completions.jsonl", [{"step": 1, "query": "q"}])
    with pytest.raises(ValueError, match="completions.jsonl:1 is not a completions row"):
        load_completions(bad)


def test_attribution_intervals_are_over_groups(tmp_path):
    # two trajectories with the edit in each of two groups: 4 trajectories, but 2 independent groups
    rows = []
    for step, rewards in ((1, (3.0, 3.0, 1.0, 1.0)), (2, (2.0, 2.0, 1.0, 1.0))):
        rows += [_row(step, "cat", ["cat big"], rewards[0]), _row(step, "cat", ["cat big"], rewards[1]),
                 _row(step, "cat", ["cat"], rewards[2]), _row(step, "cat", ["cat"], rewards[3])]
    stat = edit_attribution(load_completions(_write(tmp_path / "c.jsonl", rows)))[("big", FIRST)]
    assert (stat.samples, stat.n) == (4, 2) and stat.mean == pytest.approx((1.0 + 0.5) / 2)
    # the t-interval of the two group means 1.0 and 0.5 (1 degree of freedom), not of four values
    assert stat.half_width == pytest.approx(12.706205 * 0.25, rel=1e-6)
