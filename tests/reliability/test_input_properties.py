"""Property-based inputs: queries, prompt files and configs of any shape give a result or a clear error
(ValueError / TypeError / ConfigError with a message), never a crash with an unrelated exception."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from promptloop.backbones import RefinementSchedule, SamplerSettings, auto_backbone, rollout
from promptloop.configuration import ConfigError, build, load_config, parse_overrides
from promptloop.policy.sanitize import parse_prompt_schedule, sanitize_prompt
from promptloop.rl.config import TrainConfig, derive_sizes
from promptloop.rl.data import load_queries
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline
from trainer_helpers import tiny_policy

FEW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
"""Any valid Unicode text: control and format characters, emoji, right-to-left marks, combining marks."""


def _clear(error: BaseException) -> bool:
    return isinstance(error, (ValueError, TypeError)) and len(str(error)) > 10


# ------------------------------------------------------------------------------------------------------- queries
@pytest.fixture(scope="module")
def loop(vlm_dir):
    backbone = auto_backbone(tiny_sd_pipeline(seed=0))
    backbone.pipe.set_progress_bar_config(disable=True)
    return backbone, tiny_policy(vlm_dir)


@FEW
@given(query=ANY_TEXT)
@example(query="")
@example(query=" \t\n ")
@example(query="\x00\x01\x1b\x7f")
@example(query="\u202e\u200b\ufeff 猫 🐱 e\u0301")
@example(query="a red cat " * 400)  # 4000 characters: cut to the text encoder's budget, flagged
def test_any_query_runs_the_closed_loop_or_is_a_clear_error(loop, query):
    backbone, policy = loop
    try:
        out = rollout(backbone, [query], [0], SamplerSettings(num_inference_steps=2, preview_size=32),
                      RefinementSchedule.uniform(1), refine=policy.as_refine_fn(seed=0))
    except Exception as e:
        assert _clear(e), repr(e)
        assert not query.strip(), f"a non-blank query was refused: {e}"
        return
    assert torch.isfinite(out.images).all()
    trajectory = out.trajectories[0]
    assert trajectory.query == query and len(trajectory.prompts) == 2
    assert all(p.strip() for p in trajectory.prompts)


def test_a_query_that_is_not_valid_unicode_is_a_clear_error(loop):
    backbone, policy = loop
    with pytest.raises(ValueError):
        rollout(backbone, ["a cat \udcff"], [0], SamplerSettings(num_inference_steps=2, preview_size=32),
                RefinementSchedule.uniform(1), refine=policy.as_refine_fn(seed=0))


# ------------------------------------------------------------------------------------------ policy answers
POLICY_TEXT = st.one_of(ANY_TEXT, st.binary(max_size=300), st.text(max_size=300))  # st.text may hold surrogates


@MANY
@given(answer=POLICY_TEXT, previous=st.sampled_from(["a cat", "a red cat, oil painting"]),
       max_words=st.one_of(st.none(), st.integers(1, 20)))
def test_any_policy_answer_gives_a_clean_prompt_or_keeps_the_previous(answer, previous, max_words):
    result = sanitize_prompt(answer, previous, max_words)
    if result.kept_previous:
        assert result.prompt == previous
    else:
        assert any(c.isalnum() for c in result.prompt) and result.prompt.isprintable()
        assert result.prompt == result.prompt.strip() and "\n" not in result.prompt
        assert max_words is None or len(result.prompt.split(" ")) <= max_words
    result.prompt.encode("utf-8")  # no surrogates left: every backbone tokenizer can encode it
    schedule = parse_prompt_schedule(answer, 3, previous, max_words)
    assert len(schedule.prompts) == 3 and all(p.encode("utf-8") and p.strip() for p in schedule.prompts)


# -------------------------------------------------------------------------------------------------- prompt files
LINE = st.text(st.characters(exclude_categories=["Cs", "Zl", "Zp"], exclude_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85"),
               max_size=40)


@MANY
@given(lines=st.lists(st.one_of(LINE, st.just(""), st.just("   ")), max_size=30),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]),
       newline=st.sampled_from(["\n", "\r\n"]))
def test_any_text_prompt_file_gives_its_queries_or_a_clear_error(tmp_path_factory, lines, encoding, newline):
    path = tmp_path_factory.mktemp("prompts") / "queries.txt"
    try:
        path.write_bytes(newline.join(lines).encode(encoding))
    except UnicodeEncodeError:
        return  # the text has no representation in this encoding: not a file anyone can write
    expected = [" ".join(line.split()) for line in lines if line.split()]
    try:
        queries = load_queries(str(path))
    except ValueError as e:
        assert str(path) in str(e)
        decodable = True
        try:
            path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            decodable = False
        assert not decodable or not expected, str(e)  # refused only when not UTF-8, or when empty
        return
    if encoding in ("utf-8", "utf-8-sig"):
        assert queries == expected
    else:  # a latin-1/cp1252 file that happens to be valid UTF-8 is read as UTF-8 (e.g. b"\xc3\x80" is "\x80")
        text = path.read_bytes().decode("utf-8-sig")
        assert queries == [" ".join(line.split()) for line in text.splitlines() if line.split()]


JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                    ANY_TEXT), lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.sampled_from(["prompt", "text", "x"]), inner, max_size=3), max_leaves=6)


@MANY
@given(records=st.lists(JSON_VALUE, max_size=8), raw=st.lists(ANY_TEXT, max_size=3))
def test_any_jsonl_or_csv_prompt_file_gives_queries_or_a_clear_error(tmp_path_factory, records, raw):
    folder = tmp_path_factory.mktemp("prompts")
    jsonl = folder / "queries.jsonl"
    jsonl.write_text("\n".join([json.dumps(r) for r in records] + raw), encoding="utf-8")
    csv_file = folder / "queries.csv"
    csv_file.write_text("prompt,other\n" + "\n".join(raw + [json.dumps(r) for r in records]), encoding="utf-8")
    for path in (jsonl, csv_file):
        try:
            queries = load_queries(str(path))
        except ValueError as e:
            assert str(path) in str(e), str(e)
            continue
        assert queries and all(isinstance(q, str) and q == " ".join(q.split()) and q for q in queries)


def test_a_huge_prompt_file_loads_quickly(tmp_path):
    import time

    path = tmp_path / "huge.txt"
    path.write_text("\n".join(f"query number {i}\n" for i in range(200_000)), encoding="utf-8")  # ~4 MB, blanks
    start = time.perf_counter()
    queries = load_queries(str(path))
    assert len(queries) == 200_000 and queries[-1] == "query number 199999"
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------------------------------- configs
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["8", "-1", "0", "1e-5", "nan", "inf", "true", "[1]"]))
KEYS = {
    "backbone": ["name_or_path", "dtype", "num_inference_steps", "height", "width", "preview_size",
                 "rollout_batch_size", "guidance_scale"],
    "data": ["prompts", "column", "num_eval_prompts", "shuffle"],
    "grpo": ["prompts_per_step", "group_size", "num_refinements", "mini_batches", "micro_batch_size",
             "learning_rate", "weight_decay", "warmup_steps", "beta", "clip_low", "schedule", "max_steps",
             "nonfinite_rollout_limit", "ratio_tolerance"],
    "logging": ["output_dir", "checkpoint_every", "keep_last", "image_every", "eval_every", "report_to"],
    "reward": ["spec", "timeout_s"],
    "policy": ["lora_r", "temperature", "top_p", "max_new_tokens", "mode", "trust_remote_code"],
}
def _section(name):
    keys = st.sampled_from(KEYS[name] + ["not_a_key", 3])
    return st.dictionaries(keys, SCALAR, max_size=4)


CONFIG = st.fixed_dictionaries(
    {"backbone": st.one_of(st.just({"name_or_path": "tiny"}), _section("backbone"), SCALAR),
     "data": st.one_of(st.just({"prompts": "q.txt"}), _section("data"))},
    optional={name: st.one_of(_section(name), SCALAR) for name in ("grpo", "logging", "reward", "policy")}
    | {"surprise": SCALAR, 7: SCALAR})


@MANY
@given(data=CONFIG)
def test_any_config_mapping_builds_or_is_a_config_error(data):
    try:
        config = build(TrainConfig, data)
        derive_sizes(config.grpo, num_processes=1)
    except ConfigError as e:
        assert str(e)
        return
    except ValueError as e:  # derive_sizes: batch arithmetic that does not divide
        assert "divisible" in str(e)
        return
    assert config.grpo.group_size >= 2 and config.grpo.learning_rate > 0
    assert config.logging.checkpoint_every > 0 and config.backbone.num_inference_steps > 0


@FEW
@given(content=st.one_of(st.binary(max_size=200), ANY_TEXT.map(lambda t: t.encode("utf-8"))))
@example(content=b"\xef\xbb\xbfbackbone: {name_or_path: x}\ndata: {prompts: q.txt}\n")  # BOM
@example(content="backbone: {name_or_path: x}\n".encode("utf-16"))
@example(content=b"- a\n- list\n")
@example(content=b"1: 2\nzz: 3\n")  # non-string keys beside string keys
@example(content=b"grpo: {max_steps: " + b"9" * 5000 + b"}\n")  # past Python's int-digit limit
def test_any_config_file_loads_or_is_a_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_bytes(content)
    try:
        load_config(TrainConfig, path)
    except ConfigError as e:
        assert str(e)


@MANY
@given(argv=st.lists(st.one_of(st.sampled_from(["--grpo.group_size", "--grpo", "--", "--a=1", "--a.b=2", "8",
                                                 "--grpo.group_size.x", "--policy.lora_r=-3", "-x"]),
                               st.text(max_size=10)), max_size=6))
def test_any_command_line_overrides_parse_or_are_a_config_error(argv):
    try:
        overrides = parse_overrides(argv)
        build(TrainConfig, {"backbone": {"name_or_path": "tiny"}, "data": {"prompts": "q.txt"}, **overrides})
    except ConfigError as e:
        assert str(e)
