"""The inference API (PromptLoopPipeline) and the command line, on tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from promptloop.backbones import RefinementSchedule, SamplerSettings, rollout
from promptloop.cli import main as cli_main
from promptloop.pipeline import PromptLoopPipeline
from promptloop.policy import PolicyConfig, PromptPolicy, VLLMPromptPolicy
from promptloop.testing import vllm_standin
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline
from promptloop.testing.tiny_vlm import save_tiny_vlm

QUERIES = ["a red cat", "a blue dog on the grass"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    vlm = save_tiny_vlm(root / "vlm", "qwen2_5_vl")
    config = PolicyConfig(model_name_or_path=str(vlm), max_new_tokens=6, min_pixels=28 * 28, max_pixels=56 * 56)
    torch.manual_seed(0)
    PromptPolicy.from_pretrained(str(vlm), config, device="cpu").save_pretrained(root / "policy")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "sd")
    return root


@pytest.fixture()
def loop(saved):
    return PromptLoopPipeline.from_pretrained(str(saved / "policy"), str(saved / "sd"), device="cpu")


def test_closed_loop_equals_the_rollout_and_is_reproducible(loop):
    out = loop(QUERIES, num_refinements=2, num_inference_steps=5, seed=3, preview_size=32, output_type="pt")
    reference = rollout(loop.backbone, QUERIES, [3, 4], SamplerSettings(num_inference_steps=5, preview_size=32),
                        RefinementSchedule.uniform(2), refine=loop.policy.as_refine_fn(image_seeds=[3, 4]))
    assert torch.equal(out.images, reference.images)
    assert [t.prompts for t in out.trajectories] == [t.prompts for t in reference.trajectories]
    again = loop(QUERIES, num_refinements=2, num_inference_steps=5, seed=3, preview_size=32, output_type="pt")
    assert torch.equal(out.images, again.images)
    assert all(len(t.decision_steps) == 2 and all(p is not None for p in t.previews) for t in out.trajectories)


def test_pipelined_closed_loop_reproduces_its_images(loop):
    kwargs = dict(num_refinements=2, num_inference_steps=8, seed=3, preview_size=32, output_type="pt",
                  feedback_delay=1)
    out, again = loop(QUERIES, **kwargs), loop(QUERIES, **kwargs)
    assert torch.equal(out.images, again.images)
    assert [t.prompts for t in out.trajectories] == [t.prompts for t in again.trajectories]
    assert all(t.decision_steps == [3, 5] for t in out.trajectories)


def test_initial_rewrite_writes_the_first_prompt_too(loop):
    out = loop(QUERIES, num_refinements=0, initial_rewrite=True, num_inference_steps=4, seed=3, output_type="pt")
    reference = rollout(loop.backbone, QUERIES, [3, 4], SamplerSettings(num_inference_steps=4),
                        RefinementSchedule.explicit([0]), refine=loop.policy.as_refine_fn(image_seeds=[3, 4]))
    assert torch.equal(out.images, reference.images)
    assert all(t.decision_steps == [0] and t.previews == [None] for t in out.trajectories)


def test_apriori_makes_one_policy_call_and_no_previews(loop, monkeypatch):
    calls = []
    act = loop.policy.act
    monkeypatch.setattr(loop.policy, "act", lambda obs, **kw: calls.append(len(obs)) or act(obs, **kw))
    out = loop(QUERIES, num_refinements=3, mode="apriori", num_inference_steps=6, seed=0)
    assert calls == [len(QUERIES)]
    assert all(p is None for t in out.trajectories for p in t.previews)
    assert all(len(t.prompts) == 4 for t in out.trajectories)
    assert loop.policy.config.mode == "closed"  # the temporary mode switch was undone


@pytest.mark.parametrize("mode", ["closed", "apriori", "oneshot"])
def test_an_images_prompts_and_pixels_do_not_depend_on_its_batch(loop, mode):
    """As with diffusers' per-image generators: image i is the same sampled alone or with others."""
    kwargs = dict(mode=mode, num_refinements=2, num_inference_steps=5, preview_size=32, output_type="pt")
    batch = loop(QUERIES, seed=[3, 4], **kwargs)
    for i, query in enumerate(QUERIES):
        alone = loop([query], seed=[3 + i], **kwargs)
        assert alone.trajectories[0].prompts == batch.trajectories[i].prompts
        torch.testing.assert_close(alone.images[0], batch.images[i], atol=1e-5, rtol=0)
    assert any(p != t.query for t in batch.trajectories for p in t.prompts), "the policy must write prompts"
    other = loop(QUERIES, seed=[3, 4], policy_seed=1, **kwargs)
    assert [t.prompts for t in other.trajectories] != [t.prompts for t in batch.trajectories]


def test_mode_none_is_plain_sampling(loop):
    out = loop(QUERIES, mode="none", num_inference_steps=4, seed=0, output_type="pt")
    plain = rollout(loop.backbone, QUERIES, [0, 1], SamplerSettings(num_inference_steps=4))
    assert torch.equal(out.images, plain.images)


def test_num_images_per_prompt_repeats_each_prompt_with_consecutive_seeds(loop):
    kwargs = dict(num_refinements=1, num_inference_steps=4, seed=3, preview_size=32, output_type="pt")
    out = loop(QUERIES, num_images_per_prompt=2, **kwargs)
    expanded = loop([QUERIES[0], QUERIES[0], QUERIES[1], QUERIES[1]], **kwargs)
    assert [t.query for t in out.trajectories] == [t.query for t in expanded.trajectories]
    assert torch.equal(out.images, expanded.images)
    assert not torch.equal(out.images[0], out.images[1]), "two images of one prompt use different seeds"


def test_a_generator_draws_the_seeds_as_in_diffusers(loop):
    kwargs = dict(num_refinements=1, num_inference_steps=4, preview_size=32, output_type="pt")
    out = loop(QUERIES, generator=torch.Generator().manual_seed(7), **kwargs)
    again = loop(QUERIES, generator=torch.Generator().manual_seed(7), **kwargs)
    seeds = [t.seed for t in out.trajectories]
    assert torch.equal(out.images, again.images) and seeds == [t.seed for t in again.trajectories]
    assert len(set(seeds)) == 2 and seeds != [0, 1]
    assert torch.equal(out.images, loop(QUERIES, seed=seeds, **kwargs).images)
    per_image = loop(QUERIES, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)],
                     **kwargs)
    assert len({t.seed for t in per_image.trajectories}) == 1  # two generators in the same state


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=1, generator=torch.Generator()), "seed or generator, not both"),
    (dict(generator=[torch.Generator()]), "a list of 2 \\(one per image\\)"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an int >= 1"),
    (dict(seed=[1, 2, 3]), "seed holds 3 values for 2 images"),
    (dict(mode="loop"), "mode='loop' is not one of"),
    (dict(num_refinements=-1), "num_refinements must be an int >= 0"),
    (dict(num_refinements=5, num_inference_steps=4), "at least 6 sampling steps"),
    (dict(mode="apriori", feedback_delay=1), "applies to mode 'closed' only"),
    (dict(mode="oneshot", initial_rewrite=True), "initial_rewrite=True applies to mode 'closed' only"),
    (dict(num_refinements=3, num_inference_steps=6, feedback_delay=1), "more than 1 apart"),
    (dict(negative_prompt=["blurry"]), "negative_prompt holds 1 prompts for 2 prompts; give one per prompt"),
    (dict(output_type="latent"), r"output_type='latent' is not one of \('pil', 'np', 'pt'\)"),
])
def test_bad_arguments_are_clear_errors(loop, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loop(QUERIES, **kwargs)


def test_output_types_as_in_diffusers(loop, monkeypatch):
    kwargs = dict(mode="none", num_inference_steps=3, seed=0)
    pt = loop(QUERIES, output_type="pt", **kwargs).images
    as_np = loop(QUERIES, output_type="np", **kwargs).images
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32 and as_np.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(as_np, pt.permute(0, 2, 3, 1).numpy())
    pil = loop(QUERIES, **kwargs).images
    assert all(isinstance(image, Image.Image) for image in pil) and len(pil) == 2
    monkeypatch.setattr("promptloop.pipeline.rollout", lambda *a, **k: pytest.fail("sampled before checking"))
    with pytest.raises(ValueError, match="output_type='PIL' is not one of"):
        loop(QUERIES, output_type="PIL", **kwargs)


def test_a_negative_prompt_per_prompt_is_shared_by_its_images_as_in_diffusers(loop):
    negatives = ["blurry", "dark, low quality"]
    out = loop(QUERIES, mode="none", negative_prompt=negatives, num_images_per_prompt=2, guidance_scale=5.0,
               num_inference_steps=3, seed=0, output_type="pt")
    expected = loop.backbone.pipe(QUERIES, negative_prompt=negatives, num_images_per_prompt=2, guidance_scale=5.0,
                                  num_inference_steps=3, output_type="pt",
                                  generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
    torch.testing.assert_close(out.images, expected, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="a list of str \\(one per prompt\\)"):
        loop(QUERIES, mode="none", negative_prompt=[1, 2])


def test_device_places_what_was_loaded_here_and_to_moves_both(saved, monkeypatch):
    from diffusers import StableDiffusionPipeline

    moved = []
    real_to = StableDiffusionPipeline.to
    monkeypatch.setattr(StableDiffusionPipeline, "to", lambda self, *a, **k: moved.append(a) or real_to(self, *a, **k))
    loop = PromptLoopPipeline.from_pretrained(str(saved / "policy"), str(saved / "sd"), device="cpu")
    assert moved == [("cpu",)], "a pipeline loaded from a path goes to the device"
    user_pipe = tiny_sd_pipeline(seed=0)
    PromptLoopPipeline.from_pretrained(str(saved / "policy"), user_pipe, device="cpu")
    assert moved == [("cpu",)], "the user's pipeline object stays where it is"
    policy_moves = []
    monkeypatch.setattr(loop.policy.model, "to", lambda *a, **k: policy_moves.append(a))
    assert loop.to("cpu") is loop
    assert moved == [("cpu",), ("cpu",)] and policy_moves == [("cpu",)]


@pytest.fixture()
def tagged_on_hub(saved, hub_cache):
    """The saved policy and pipeline in a hub cache, only under tags (no main): they load only at those revisions;
    the pipeline's weight files are those of the variant "fp16" only."""
    hub_cache.add("me/loop", saved / "policy", "1" * 40, ("v1",))
    StableDiffusionPipeline.from_pretrained(saved / "sd").save_pretrained(saved / "sd-variant", variant="fp16")
    hub_cache.add("me/tiny-sd", saved / "sd-variant", "2" * 40, ("fp32",))
    return hub_cache


def _images_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_policy_and_pipeline_load_from_the_hub_at_their_revisions(loop, tagged_on_hub):
    call = dict(num_refinements=1, num_inference_steps=4, preview_size=32, seed=3)
    hub = PromptLoopPipeline.from_pretrained("me/loop", "me/tiny-sd", device="cpu", policy_revision="v1",
                                             revision="fp32", variant="fp16", **tagged_on_hub.offline)
    assert _images_equal(hub(QUERIES, **call).images, loop(QUERIES, **call).images)
    with pytest.raises(OSError):  # the default branch does not exist: the revision was what found them
        PromptLoopPipeline.from_pretrained("me/loop", "me/tiny-sd", device="cpu", revision="fp32",
                                           variant="fp16", **tagged_on_hub.offline)


def test_sample_command_takes_hub_revisions(loop, tagged_on_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tagged_on_hub.path))  # as HF_HUB_CACHE=... would
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = cli_main(["sample", "--policy", "me/loop", "--policy-revision", "v1", "--backbone", "me/tiny-sd",
                     "--backbone-revision", "fp32", "--backbone-variant", "fp16", "--prompt", QUERIES[0],
                     "--refinements", "1", "--steps", "4", "--preview-size", "32", "--seed", "3", "--device", "cpu",
                     "--out", str(tmp_path / "out")])
    assert code == 0
    expected = loop([QUERIES[0]], num_refinements=1, num_inference_steps=4, preview_size=32, seed=3).images
    assert _images_equal([Image.open(tmp_path / "out" / "000.png")], expected)


def test_policy_must_be_a_prompt_policy():
    with pytest.raises(TypeError, match="PromptPolicy"):
        PromptLoopPipeline("not a policy", tiny_sd_pipeline())
    with pytest.raises(ValueError, match="policy_backend='onnx' is not one of"):
        PromptLoopPipeline.from_pretrained("/nonexistent/policy", "/nonexistent/sd", policy_backend="onnx")


def test_the_vllm_backend_gives_the_transformers_backends_images(saved, loop, monkeypatch):
    vllm_standin.install(monkeypatch)
    greedy = PolicyConfig(model_name_or_path=str(saved / "vlm"), do_sample=False, max_new_tokens=6,
                          min_pixels=28 * 28, max_pixels=56 * 56)
    served = PromptLoopPipeline(VLLMPromptPolicy.from_pretrained(saved / "policy", greedy), loop.backbone)
    reference = PromptLoopPipeline(PromptPolicy.from_pretrained(saved / "policy", greedy, device="cpu"), loop.backbone)
    rewritten = []
    for mode in ("closed", "apriori"):
        kwargs = dict(num_refinements=2, mode=mode, num_inference_steps=5, seed=3, preview_size=32, output_type="pt")
        out, expected = served(QUERIES[1:], **kwargs), reference(QUERIES[1:], **kwargs)
        assert out.trajectories[0].prompts == expected.trajectories[0].prompts
        assert torch.equal(out.images, expected.images)
        rewritten += [p for p in out.trajectories[0].prompts if p != QUERIES[1]]
    assert rewritten, "the tiny policy wrote no prompt of its own: the comparison would prove nothing"
    assert served.policy.config.mode == "closed"


def test_sample_command_writes_images_trajectories_and_strips(saved, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n  a green tree \n", encoding="utf-8")
    code = cli_main(["sample", "--policy", str(saved / "policy"), "--backbone", str(saved / "sd"),
                     "--prompts", str(prompts), "--refinements", "2", "--steps", "4", "--preview-size", "32",
                     "--out", str(tmp_path / "out")])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000.json", "000.png", "000_strip.png", "001.json", "001.png", "001_strip.png", "sample.json"]
    record = json.loads((tmp_path / "out" / "001.json").read_text())
    assert record["query"] == "a green tree" and len(record["decision_steps"]) == 2
    assert "wrote 6 files and sample.json" in capsys.readouterr().out
    made_by = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert made_by["arguments"]["policy"] == str(saved / "policy") and made_by["arguments"]["refinements"] == 2
    assert made_by["environment"]["promptloop"] and made_by["environment"]["torch"]


def test_sample_command_batches_images_with_global_seeds(saved, loop, tmp_path):
    args = ["--refinements", "1", "--steps", "4", "--preview-size", "32", "--seed", "5"]
    code = cli_main(["sample", "--policy", str(saved / "policy"), "--backbone", str(saved / "sd"), "--prompt",
                     QUERIES[1], "--num-images", "3", "--batch-size", "2", "--out", str(tmp_path / "out"), *args])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png") if "strip" not in p.name) == [
        "000.png", "001.png", "002.png"]
    # the last image came alone in the second batch, with seed 5 + 2
    alone = loop([QUERIES[1]], num_refinements=1, num_inference_steps=4, preview_size=32, seed=7).images[0]
    written = Image.open(tmp_path / "out" / "002.png")
    assert np.array_equal(np.asarray(written), np.asarray(alone))
    assert json.loads((tmp_path / "out" / "002.json").read_text())["query"] == QUERIES[1]
    # another batch size writes the same prompts (the policy's sampling is seeded per image)
    assert cli_main(["sample", "--policy", str(saved / "policy"), "--backbone", str(saved / "sd"), "--prompt",
                     QUERIES[1], "--num-images", "3", "--batch-size", "3", "--out", str(tmp_path / "one"), *args]) == 0
    for stem in ("000", "001", "002"):
        prompts = [json.loads((tmp_path / out / f"{stem}.json").read_text())["prompts"] for out in ("out", "one")]
        assert prompts[0] == prompts[1]


def test_sample_command_runs_the_vllm_backend(saved, tmp_path, monkeypatch):
    vllm_standin.install(monkeypatch)
    code = cli_main(["sample", "--policy", str(saved / "policy"), "--backbone", str(saved / "sd"), "--prompt",
                     "a red cat", "--refinements", "1", "--steps", "3", "--preview-size", "32",
                     "--policy-backend", "vllm", "--out", str(tmp_path / "out")])
    assert code == 0 and len(list((tmp_path / "out").glob("000*"))) == 3
    assert len(vllm_standin.LLM.instances[-1].requests) == 1


@pytest.mark.parametrize("args,match", [
    ([], "exactly one of --prompt TEXT or --prompts FILE"),
    (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    (["--prompt", "a cat", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--prompt", "a cat", "--num-images", "-1"], "--num-images must be >= 1"),
])
def test_sample_command_bad_arguments(saved, args, match):
    with pytest.raises(SystemExit, match=match):
        cli_main(["sample", "--policy", str(saved / "policy"), "--backbone", str(saved / "sd"), *args])


def test_train_command_config_errors_name_the_key(tmp_path, monkeypatch):
    config = tmp_path / "train.yaml"
    config.write_text("backbone: {name_or_path: x}\ndata: {prompts: p.txt}\n")
    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['grpo.groupsize'\]"):
        cli_main(["train", str(config), "--grpo.groupsize", "4"])
    with pytest.raises(SystemExit, match="must be divisible by grpo.micro_batch_size=7"):
        cli_main(["train", str(config), "--grpo.micro_batch_size", "7"])
    with pytest.raises(SystemExit, match="config file .* does not exist"):
        cli_main(["train", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match="prompt file 'p.txt' does not exist"):
        cli_main(["train", str(config)])
    (tmp_path / "p.txt").write_text("a cat\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="reward.spec: Unknown reward 'imagerewards'"):
        cli_main(["train", str(config), "--reward.spec", "imagerewards"])
    with pytest.raises(SystemExit, match="logging.eval_every=5 .* give data.eval_prompts"):
        cli_main(["train", str(config), "--logging.eval_every", "5"])


def test_train_command_checks_resume_before_loading_models(tmp_path, monkeypatch):
    from promptloop.rl.trainer import GRPOTrainer

    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    (tmp_path / "p.txt").write_text("a cat\n")
    config.write_text(f"backbone: {{name_or_path: x}}\ndata: {{prompts: {tmp_path / 'p.txt'}}}\n"
                      f"logging: {{output_dir: {run}}}\n")
    with pytest.raises(SystemExit, match="no complete checkpoint under .*run/checkpoints"):
        cli_main(["train", str(config), "--resume"])
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        cli_main(["train", str(config), "--resume-from", str(tmp_path)])
    for both in (["--resume", "--resume-from", str(tmp_path)], ["--auto-resume", "--resume"]):
        with pytest.raises(SystemExit, match="not several"):
            cli_main(["train", str(config), *both])

    older, newer = run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000004"
    for folder, step in ((older, 2), (newer, 4)):
        folder.mkdir(parents=True)
        (folder / "checkpoint.json").write_text(json.dumps({"step": step}))
    resumed = []

    class StubTrainer:
        step, policy_dir, run_dir, terminated = 4, run / "policy", run, False

        def train(self, resume):
            resumed.append(resume)

    monkeypatch.setattr(GRPOTrainer, "from_config", classmethod(lambda cls, config, queries: StubTrainer()))
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(config.read_text().replace(str(run), str(tmp_path / "new-run")))
    # checkpoints past the start would be taken for the new run's: an error, unless they may be deleted
    with pytest.raises(SystemExit, match=r"checkpoints after step 2, .*\(step-00000004\).*overwrite_output_dir"):
        cli_main(["train", str(config), "--resume-from", str(older)])
    with pytest.raises(SystemExit, match=r"after step 0, .*\(step-00000002, step-00000004\)"):
        cli_main(["train", str(config)])
    assert cli_main(["train", str(config), "--resume-from", str(older), "--logging.overwrite_output_dir", "true"]) == 0
    assert cli_main(["train", str(config), "--resume"]) == 0
    assert cli_main(["train", str(config), "--auto-resume"]) == 0
    assert cli_main(["train", str(fresh), "--auto-resume"]) == 0  # no checkpoint yet: a fresh start
    assert resumed == [older, newer, newer, False]

    StubTrainer.terminated = True  # a SIGTERM stopped it: status 143, as schedulers expect
    assert cli_main(["train", str(config), "--auto-resume"]) == 143


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_trains_and_evaluates_in_the_mini_world(quick_demo):
    out = quick_demo
    for name in ("reward_curve.png", "results.md", "summary.json", "eval/results.json", "eval/report.html"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval" / "results.json").read_text())
    methods = {row["method"] for row in results["summary"]}
    assert {"base", "untrained", "trained", "shipped-800-steps"} <= methods
    table = (out / "results.md").read_text()
    assert "Paired difference to `base`" in table and "Paired difference to `untrained`" in table
    assert "### What the policy wrote during training" in table
    assert "| 1-1 | 8 |" in table and "| 2-2 | 8 |" in table, "one row per training step of the quick demo"
    assert list((out / "eval").rglob("*.png")), "no images or trajectory strips"
    assert json.loads((out / "summary.json").read_text())["train_steps"] == 2


def test_a_runs_checkpoints_are_evaluated_step_by_step(quick_demo, tmp_path):
    from promptloop.miniworld.evaluate_run import checkpoint_steps, evaluate_run

    assert list(checkpoint_steps(quick_demo / "train", every=50)) == [2]  # the last one is always included
    curve = evaluate_run(quick_demo / "train", tmp_path / "curve", every=1, prompts=2, seeds=1, log=lambda *a: None)
    assert set(curve) == {"reward/preference", "reward/gold", "reward/fidelity"}
    assert [row["step"] for row in curve["reward/fidelity"]] == [None, 0, 2]
    assert all(0.0 <= row["mean"] <= 1.0 for row in curve["reward/fidelity"])
    assert (tmp_path / "curve" / "training_curve.png").is_file()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        checkpoint_steps(tmp_path, every=1)


def test_a_run_is_evaluated_greedily_at_another_n_r(quick_demo, tmp_path):
    from promptloop.miniworld.evaluate_run import evaluate_run

    curve = evaluate_run(quick_demo / "train", tmp_path / "greedy", every=50, prompts=2, seeds=1, refinements=2,
                         temperature=0.0, log=lambda *a: None)
    results = json.loads((tmp_path / "greedy" / "results.json").read_text())
    assert results["config"]["policy_sampling"]["do_sample"] is False
    assert {m["label"]: m["num_refinements"] for m in results["methods"]}["step-2"] == 2
    rows = {row["method"]: row for row in curve["reward/preference"]}
    # the warm start's greedy rewrite is the query itself (it was trained to keep the query): same images as the base
    assert rows["untrained"]["mean"] == pytest.approx(rows["base"]["mean"], abs=1e-6)


def test_a_run_is_evaluated_with_an_initial_rewrite_on_other_seeds(quick_demo, tmp_path):
    from promptloop.miniworld.evaluate_run import evaluate_run

    evaluate_run(quick_demo / "train", tmp_path / "initial", every=50, prompts=2, seeds=1, first_seed=5,
                 refinements=1, initial_rewrite=True, log=lambda *a: None)
    results = json.loads((tmp_path / "initial" / "results.json").read_text())
    assert results["seeds"] == [5]
    assert {m["label"]: m["initial_rewrite"] for m in results["methods"]} == {"base": False, "untrained": True,
                                                                               "step-2": True}
    steps = {s["method"]: s["decision_steps"] for s in results["samples"]}
    assert steps["base"] == [] and steps["untrained"] == steps["step-2"] == [0, 5]
    assert (tmp_path / "initial" / "report.html").read_text().count("N_R = 1 + initial rewrite") == 2


def test_sample_command_puts_policy_and_pipeline_on_the_gpu_by_default(saved, tmp_path, monkeypatch):
    placed = []

    def record(cls, policy, backbone, device=None, **kwargs):
        placed.append(device)
        raise SystemExit("stop before loading")

    monkeypatch.setattr(PromptLoopPipeline, "from_pretrained", classmethod(record))
    for cuda, args, expected in ((True, [], "cuda"), (False, [], "cpu"), (True, ["--device", "cuda:1"], "cuda:1")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        with pytest.raises(SystemExit, match="stop before loading"):
            cli_main(["sample", "--policy", str(saved / "policy"), "--backbone", str(saved / "sd"), "--prompt", "a",
                      *args])
        assert placed[-1] == expected


def test_unset_loop_settings_follow_how_the_policy_was_trained(saved, loop, tmp_path):
    """A policy saved with loop_config.json (the trainer writes it) runs as trained when the caller does not say;
    explicit arguments win; a policy without the file keeps 5 refinements and no initial rewrite."""
    from promptloop.policy.config import LoopDefaults

    call = dict(num_inference_steps=6, preview_size=32, seed=1)
    plain = loop(QUERIES[:1], **call)
    assert len(plain.trajectories[0].decision_steps) == 5

    policy = PromptPolicy.from_pretrained(saved / "policy", device="cpu")
    policy.loop_defaults = LoopDefaults(num_refinements=2, initial_rewrite=True)
    policy.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "loop_config.json").read_text()) == {
        "num_refinements": 2, "initial_rewrite": True}
    trained = PromptLoopPipeline.from_pretrained(str(tmp_path / "trained"), str(saved / "sd"), device="cpu")
    assert trained.policy.loop_defaults == LoopDefaults(2, True)
    out = trained(QUERIES[:1], **call)
    assert out.trajectories[0].decision_steps[0] == 0 and len(out.trajectories[0].decision_steps) == 3
    explicit = trained(QUERIES[:1], num_refinements=1, initial_rewrite=False, **call)
    assert len(explicit.trajectories[0].decision_steps) == 1
    apriori = trained(QUERIES[:1], mode="apriori", **call)  # no initial rewrite outside closed mode
    assert len(apriori.trajectories[0].decision_steps) == 2

    code = cli_main(["sample", "--policy", str(tmp_path / "trained"), "--backbone", str(saved / "sd"), "--prompt",
                     QUERIES[0], "--steps", "6", "--preview-size", "32", "--seed", "1", "--out", str(tmp_path / "o")])
    assert code == 0
    assert json.loads((tmp_path / "o" / "000.json").read_text())["decision_steps"] == out.trajectories[0].decision_steps
    (tmp_path / "trained" / "loop_config.json").write_text('{"num_refinements": -1, "initial_rewrite": true}')
    with pytest.raises(ValueError, match="num_refinements must be an int >= 0"):
        PromptLoopPipeline.from_pretrained(str(tmp_path / "trained"), str(saved / "sd"), device="cpu")


def test_unset_mode_is_the_policys_own(saved, loop, tmp_path):
    """A one-shot writer (policy.mode oneshot) runs one-shot unless told otherwise; the default policy runs closed."""
    import dataclasses

    call = dict(num_inference_steps=6, preview_size=32, seed=2)
    assert loop.policy.config.mode == "closed"
    assert _images_equal(loop(QUERIES, **call).images, loop(QUERIES, mode="closed", **call).images)

    oneshot = PromptPolicy.from_pretrained(saved / "policy", device="cpu")
    oneshot.config = dataclasses.replace(oneshot.config, mode="oneshot")
    oneshot.save_pretrained(tmp_path / "oneshot")
    writer = PromptLoopPipeline.from_pretrained(str(tmp_path / "oneshot"), str(saved / "sd"), device="cpu")
    unset, explicit = writer(QUERIES, **call), writer(QUERIES, mode="oneshot", **call)
    assert _images_equal(unset.images, explicit.images)
    assert [t.decision_steps for t in unset.trajectories] == [t.decision_steps for t in explicit.trajectories]
    closed = writer(QUERIES, mode="closed", **call)
    assert [t.decision_steps for t in closed.trajectories] != [t.decision_steps for t in unset.trajectories]
