"""The generic loop, exercised on the tiny SD1 backbone (DDIM, epsilon)."""
import pytest
import torch

from promptloop.backbones import RefinementSchedule, SamplerSettings, fit_prompt, rollout
from promptloop.backbones.preview import to_pil

SETTINGS = SamplerSettings(num_inference_steps=6, guidance_scale=4.0, preview_size=None)


def append_refine(suffix=" oil painting"):
    calls = []

    def refine(observations):
        calls.append(observations)
        return [o.prompt + suffix for o in observations]

    return refine, calls


def test_prompt_switch_changes_only_steps_from_k_on(sd_backbone, record_steps):
    k = 3
    base = record_steps(sd_backbone)
    plain = rollout(sd_backbone, ["a red cat"], [5], SETTINGS)
    base.close()
    switched_rec = record_steps(sd_backbone)
    refine, calls = append_refine()
    switched = rollout(sd_backbone, ["a red cat"], [5], SETTINGS, RefinementSchedule.explicit([k]), refine=refine)
    for i in range(k):  # steps 0..k-1 ran with the initial prompt: unchanged
        assert torch.equal(base.latents[i], switched_rec.latents[i]), i
    for i in range(k, SETTINGS.num_inference_steps):
        assert (base.latents[i] - switched_rec.latents[i]).abs().max() > 1e-4, i
    assert (plain.images - switched.images).abs().max() > 1e-4
    assert len(calls) == 1 and calls[0][0].step == k
    traj = switched.trajectories[0]
    assert traj.prompts == ["a red cat", "a red cat oil painting"]
    assert traj.step_prompt_index == [0, 0, 0, 1, 1, 1]
    assert traj.decision_steps == [k] and traj.timesteps == [float(sd_backbone.pipe.scheduler.timesteps[k])]


def test_previews_are_pred_original_sample_of_previous_step(sd_backbone, record_steps, monkeypatch):
    scheduler_cls = type(sd_backbone.pipe.scheduler)
    pred_original = []
    original_step = scheduler_cls.step

    def spy(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        pred_original.append(out.pred_original_sample.clone())
        return out

    monkeypatch.setattr(scheduler_cls, "step", spy)
    rec = record_steps(sd_backbone)
    refine, calls = append_refine()
    settings = SamplerSettings(num_inference_steps=6, guidance_scale=4.0, preview_size=32)
    rollout(sd_backbone, ["a red cat", "a dog"], [1, 2], settings, RefinementSchedule.uniform(2), refine=refine)
    assert len(pred_original) == 6
    for i in range(6):
        assert torch.equal(rec.x0[i], pred_original[i])
    for observations in calls:
        step = observations[0].step
        expected = to_pil(sd_backbone.decode(pred_original[step - 1], size=32, preview=True))
        for o in observations:
            assert o.preview.size == (32, 32)
            assert list(o.preview.getdata()) == list(expected[o.row].getdata())


def test_batch_invariance_with_per_row_random_schedules(sd_backbone):
    queries, seeds = ["a red cat", "a green house", "two dogs"], [11, 12, 13]
    schedules = [RefinementSchedule.random(2, seed=s) for s in (0, 1, 2)]
    assert len({tuple(s.steps(6)) for s in schedules}) > 1

    def refine(observations):
        return [f"{o.query}, step {o.step}" for o in observations]

    batch = rollout(sd_backbone, queries, seeds, SETTINGS, schedules, refine=refine)
    for i in range(3):
        single = rollout(sd_backbone, [queries[i]], [seeds[i]], SETTINGS, schedules[i], refine=refine)
        torch.testing.assert_close(batch.images[i:i + 1], single.images, atol=1e-5, rtol=0)
        assert batch.trajectories[i].prompts == single.trajectories[0].prompts
        assert batch.trajectories[i].decision_steps == schedules[i].steps(6)


def test_apriori_mode_equals_feedback_with_same_prompts_and_skips_previews(sd_backbone, monkeypatch):
    schedule = RefinementSchedule.uniform(2)
    refine, calls = append_refine(", detailed")
    feedback = rollout(sd_backbone, ["a red cat"], [3], SETTINGS, schedule, refine=refine)
    prompts = [feedback.trajectories[0].prompts]

    decodes = []
    original_decode = type(sd_backbone).decode
    monkeypatch.setattr(sd_backbone, "decode", lambda latents, size=None, preview=False, generators=None: (
        decodes.append(preview), original_decode(sd_backbone, latents, size, preview, generators))[1])
    apriori = rollout(sd_backbone, ["a red cat"], [3], SETTINGS, schedule, prompts=prompts)
    assert decodes == [False]  # only the final decode
    assert apriori.trajectories[0].previews == [None, None]
    assert apriori.times.preview == 0 and apriori.times.refine == 0
    torch.testing.assert_close(apriori.images, feedback.images, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"prompts\[0\] has 2 prompts .* give 3"):
        rollout(sd_backbone, ["a red cat"], [3], SETTINGS, schedule, prompts=[prompts[0][:2]])


def test_only_changed_prompts_are_encoded(sd_backbone, monkeypatch):
    encoded = []
    original = type(sd_backbone).encode_prompts
    monkeypatch.setattr(sd_backbone, "encode_prompts", lambda prompts: (encoded.append(list(prompts)),
                                                                       original(sd_backbone, prompts))[1])

    def refine(observations):  # row 0 keeps its prompt, row 1 changes once then returns to an earlier one
        return [o.prompt if o.row == 0 else ("b two" if o.refinement_index == 0 else "b one") for o in observations]

    rollout(sd_backbone, ["a one", "b one"], [0, 1], SETTINGS, RefinementSchedule.uniform(2), refine=refine)
    assert encoded == [["a one", "b one"], ["b two"]]


def test_truncation_at_word_boundary_is_flagged(sd_backbone):
    budget = sd_backbone.text_budget
    long_prompt = " ".join(["colorful"] * 40)  # byte-level tiny tokenizer: ~9 tokens a word
    assert sd_backbone.count_tokens(long_prompt) > budget
    fitted, cut = fit_prompt(sd_backbone, long_prompt)
    assert cut and sd_backbone.count_tokens(fitted) <= budget
    assert long_prompt.startswith(fitted) and long_prompt[len(fitted)] == " " and fitted.endswith("colorful")
    assert sd_backbone.count_tokens(fitted + " colorful") > budget  # the longest word prefix that fits
    assert fit_prompt(sd_backbone, "a red cat") == ("a red cat", False)
    one_word = "x" * 200
    fitted, cut = fit_prompt(sd_backbone, one_word)
    assert cut and len(fitted) == budget

    out = rollout(sd_backbone, [long_prompt], [0], SETTINGS, RefinementSchedule.explicit([2]),
                  refine=lambda obs: ["short prompt"])
    traj = out.trajectories[0]
    assert traj.truncated == [True, False] and traj.raw_prompts[0] == long_prompt
    assert traj.prompts[0] != long_prompt and traj.prompts[1] == "short prompt"


def test_observation_fields_and_phase_times(sd_backbone):
    refine, calls = append_refine()
    out = rollout(sd_backbone, ["q0", "q1"], [0, 1], SETTINGS, RefinementSchedule.uniform(2), refine=refine,
                  progress=True)
    first, second = calls
    assert [o.row for o in first] == [0, 1] and [o.refinement_index for o in second] == [1, 1]
    assert second[0].history == ["q0", "q0 oil painting"] and second[0].query == "q0"
    assert 1 > first[0].noise_level > second[0].noise_level > 0
    assert first[0].num_steps == 6 and first[0].num_refinements == 2
    for phase in ("encode", "denoise", "preview", "refine", "decode"):
        assert getattr(out.times, phase) > 0, phase
    assert out.images.shape == (2, 3, 64, 64) and 0 <= out.images.min() and out.images.max() <= 1


@pytest.mark.parametrize("queries, seeds, error, match", [
    ([], [], ValueError, "at least one query"),
    (["ok", "  "], [0, 1], ValueError, r"entries \[1\] are empty"),
    (["ok", 3], [0, 1], TypeError, r"\(1, 'int'\)"),
    ("a cat", [0], TypeError, "list of str"),
    (["a", "b"], [0], ValueError, "seeds has 1 entries but there are 2 queries"),
    (["a"], [0.5], TypeError, "seeds must be ints"),
])
def test_bad_queries_and_seeds(sd_backbone, queries, seeds, error, match):
    with pytest.raises(error, match=match):
        rollout(sd_backbone, queries, seeds, SETTINGS)


def test_bad_schedules_and_modes(sd_backbone):
    refine, _ = append_refine()
    with pytest.raises(ValueError, match="6 refinements needs at least 7 sampling steps"):
        rollout(sd_backbone, ["a"], [0], SETTINGS, RefinementSchedule.uniform(6), refine=refine)
    with pytest.raises(ValueError, match=r"\[6\] are out of range"):
        rollout(sd_backbone, ["a"], [0], SETTINGS, RefinementSchedule.explicit([6]), refine=refine)
    with pytest.raises(TypeError, match="list of 2 of them"):
        rollout(sd_backbone, ["a", "b"], [0, 1], SETTINGS, [RefinementSchedule.none()], refine=refine)
    with pytest.raises(ValueError, match="neither `refine`"):
        rollout(sd_backbone, ["a"], [0], SETTINGS, RefinementSchedule.uniform(1))
    with pytest.raises(ValueError, match="not both"):
        rollout(sd_backbone, ["a"], [0], SETTINGS, RefinementSchedule.uniform(1), refine=refine,
                prompts=[["a", "b"]])
    with pytest.raises(ValueError, match="does not understand SamplerSettings.extra keys"):
        rollout(sd_backbone, ["a"], [0], SamplerSettings(num_inference_steps=2, extra={"guidence": 1}))


@pytest.mark.parametrize("answer, error, match", [
    (lambda obs: [o.prompt for o in obs][:1], ValueError, "returned 1 prompts for 2 observations"),
    (lambda obs: "one string", TypeError, "got str"),
    (lambda obs: [o.prompt for o in obs[:1]] + [None], TypeError, r"\(1, 'NoneType'\)"),
])
def test_bad_refine_answers(sd_backbone, answer, error, match):
    with pytest.raises(error, match=match):
        rollout(sd_backbone, ["a", "b"], [0, 1], SETTINGS, RefinementSchedule.uniform(1), refine=answer)


def test_nan_latents_are_reported_with_the_step(sd_backbone):
    calls = {"n": 0}

    def inject_nan(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # the UNet's third call is sampler step 2
            return (output[0] * float("nan"),) + tuple(output[1:])

    handle = sd_backbone.pipe.unet.register_forward_hook(inject_nan)
    try:
        with pytest.raises(FloatingPointError, match=r"after sampler step 2 of 6.*rows \[0\]"):
            rollout(sd_backbone, ["a"], [0], SETTINGS)
    finally:
        handle.remove()


def test_pipelined_feedback_sees_an_older_preview_and_applies_the_prompt_on_schedule(sd_backbone, monkeypatch):
    """feedback_delay = d: the prompt taking effect at step k is written from the x0 of step k - 1 - d (step 0's
    when that is earlier), in a worker thread, and nothing else changes."""
    import threading

    scheduler_cls = type(sd_backbone.pipe.scheduler)
    pred_original, original_step = [], scheduler_cls.step
    monkeypatch.setattr(scheduler_cls, "step", lambda self, *a, **k: (
        lambda out: (pred_original.append(out.pred_original_sample.clone()), out)[1])(original_step(self, *a, **k)))
    threads = []

    def refine(observations):
        threads.append(threading.current_thread().name)
        return [f"{o.query} v{o.refinement_index}" for o in observations]

    settings = SamplerSettings(num_inference_steps=8, guidance_scale=4.0, preview_size=32)
    schedule = RefinementSchedule.explicit([2, 5])
    piped = rollout(sd_backbone, ["a red cat", "a dog"], [1, 2], settings, schedule, refine=refine, feedback_delay=2)
    assert all(name.startswith("promptloop-refine") for name in threads) and len(threads) == 2
    traj = piped.trajectories[0]
    assert traj.decision_steps == [2, 5] and traj.step_prompt_index == [0, 0, 1, 1, 1, 2, 2, 2]
    assert traj.prompts == ["a red cat", "a red cat v0", "a red cat v1"]
    # step 2's prompt was written from step 0's x0 (2 - 1 - 2 < 0), step 5's from step 2's
    for preview, seen_step in zip(traj.previews, (0, 2)):
        expected = to_pil(sd_backbone.decode(pred_original[seen_step][:1], size=32, preview=True))[0]
        assert list(preview.getdata()) == list(expected.getdata())
    assert piped.times.refine > 0

    # the same prompts applied synchronously (a-priori) give the same images: only what the policy saw differs
    apriori = rollout(sd_backbone, ["a red cat", "a dog"], [1, 2], settings, schedule,
                      prompts=[t.prompts for t in piped.trajectories])
    torch.testing.assert_close(apriori.images, piped.images, atol=1e-6, rtol=0)
    # and delay 0 is the synchronous loop, on the calling thread
    threads.clear()
    sync = rollout(sd_backbone, ["a red cat", "a dog"], [1, 2], settings, schedule, refine=refine, feedback_delay=0)
    assert threads == [threading.current_thread().name] * 2
    torch.testing.assert_close(sync.images, piped.images, atol=1e-6, rtol=0)  # this refine ignores the preview


def test_pipelined_feedback_errors(sd_backbone):
    settings = SamplerSettings(num_inference_steps=8, guidance_scale=4.0, preview_size=32)
    refine = lambda obs: [o.prompt for o in obs]  # noqa: E731
    with pytest.raises(ValueError, match=r"row 0 decides at steps \[2, 4\] \(too close: \[\(2, 4\)\]\)"):
        rollout(sd_backbone, ["a"], [0], settings, RefinementSchedule.explicit([2, 4]), refine=refine,
                feedback_delay=2)
    with pytest.raises(ValueError, match="feedback mode"):
        rollout(sd_backbone, ["a"], [0], settings, RefinementSchedule.explicit([2]), prompts=[["a", "b"]],
                feedback_delay=1)
    with pytest.raises(ValueError, match="int >= 0"):
        rollout(sd_backbone, ["a"], [0], settings, RefinementSchedule.explicit([2]), refine=refine, feedback_delay=-1)

    def failing(observations):
        raise RuntimeError("policy crashed")

    with pytest.raises(RuntimeError, match="policy crashed"):  # a worker's error reaches the caller
        rollout(sd_backbone, ["a"], [0], settings, RefinementSchedule.explicit([3]), refine=failing, feedback_delay=1)


def test_initial_rewrite_decides_step_0_without_a_preview(sd_backbone, record_steps):
    refine, calls = append_refine()
    rec = record_steps(sd_backbone)
    out = rollout(sd_backbone, ["a red cat"], [5], SETTINGS, RefinementSchedule.uniform(2, initial_rewrite=True),
                  refine=refine)
    rec.close()
    traj = out.trajectories[0]
    assert traj.decision_steps == [0, 2, 4] and [o[0].step for o in calls] == [0, 2, 4]
    assert calls[0][0].preview is None and calls[0][0].num_refinements == 3 and traj.previews[0] is None
    assert all(o[0].preview is not None for o in calls[1:])
    assert traj.step_prompt_index == [1, 1, 2, 2, 3, 3]  # the query itself is never denoised with
    assert len(rec.latents) == SETTINGS.num_inference_steps  # no extra denoiser evaluation
    # step 0 ran with the rewritten prompt: the first latent equals a plain run from that prompt
    first = record_steps(sd_backbone)
    rollout(sd_backbone, ["a red cat"], [5], SETTINGS, initial_prompts=["a red cat oil painting"])
    assert torch.equal(first.latents[0], rec.latents[0])


def test_initial_rewrite_with_pipelined_feedback_matches_synchronous(sd_backbone):
    schedule = RefinementSchedule.explicit([0, 3])
    sync = rollout(sd_backbone, ["a red cat"], [5], SETTINGS, schedule, refine=append_refine()[0])
    refine, calls = append_refine()
    piped = rollout(sd_backbone, ["a red cat"], [5], SETTINGS, schedule, refine=refine, feedback_delay=1)
    assert torch.equal(sync.images, piped.images)
    assert [o[0].step for o in calls] == [0, 3] and calls[1][0].metadata["preview_step"] == 1


def test_pipelined_observation_reports_the_step_its_prompt_takes_effect_at(sd_backbone):
    """With feedback_delay, the observation's step, timestep and noise level are all those of the step the prompt
    takes effect at (as without delay); only the preview is older."""
    settings = SamplerSettings(num_inference_steps=10, guidance_scale=3.0, preview_size=16)
    seen = {}
    for delay in (0, 3):
        refine, calls = append_refine()
        rollout(sd_backbone, ["a cat"], [0], settings, RefinementSchedule.explicit([6]), refine=refine,
                feedback_delay=delay)
        seen[delay] = calls[0][0]
    state = sd_backbone.prepare(settings, [torch.Generator().manual_seed(0)])
    for o in seen.values():
        assert o.step == 6 and o.noise_level == sd_backbone.noise_level(state, 6)
        assert o.metadata["timestep"] == float(state.timesteps[6])
    assert seen[0].metadata["preview_step"] == 5 and seen[3].metadata["preview_step"] == 2


def _scheduler(name, **config):
    import diffusers

    from promptloop.testing.tiny_pipelines import SD_SCHEDULER_CONFIG

    scheduler = getattr(diffusers, name)(**{**SD_SCHEDULER_CONFIG, **config})
    scheduler.set_timesteps(4)
    return scheduler


@pytest.mark.parametrize("name, config, starts", [
    ("DDIMScheduler", {}, [0, 1, 2, 3]),
    ("HeunDiscreteScheduler", {}, [0, 2, 4, 6]),  # predictor + corrector, the last step Euler
    ("KDPM2DiscreteScheduler", {}, [0, 2, 4, 6]),
    ("PNDMScheduler", {"skip_prk_steps": True}, [0, 2, 3, 4]),  # the first PLMS step evaluates twice
    ("PNDMScheduler", {}, [0, 4, 8, 12]),  # three Runge-Kutta warm-up steps of four evaluations
])
def test_solver_step_starts(name, config, starts):
    from promptloop.backbones.base import solver_step_starts

    scheduler = _scheduler(name, **config)
    assert solver_step_starts(scheduler, len(scheduler.timesteps)) == starts
    if len(starts) < len(scheduler.timesteps):  # one evaluation more fits no multi-evaluation pattern
        with pytest.raises(ValueError, match=f"{name} .* cannot split into solver steps.*EulerDiscreteScheduler"):
            solver_step_starts(scheduler, len(scheduler.timesteps) + 1)


@pytest.mark.parametrize("name, config", [
    ("HeunDiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
    ("PNDMScheduler", {}),
])
def test_multi_evaluation_schedulers_refine_at_solver_steps(sd_backbone, record_steps, name, config):
    """Plain sampling equals the stock pipeline; a prompt switch at solver step 2 changes the prompt for every
    denoiser evaluation of that step and later, none before; the policy sees solver steps only."""
    from .conftest import stock_images

    pipe = sd_backbone.pipe
    original = pipe.scheduler
    pipe.scheduler = _scheduler(name, **config)
    settings = SamplerSettings(num_inference_steps=4, guidance_scale=3.0, preview_size=None)
    try:
        plain = rollout(sd_backbone, ["a red cat"], [5], settings)
        torch.testing.assert_close(plain.images, stock_images(pipe, ["a red cat"], [5], num_inference_steps=4,
                                                              guidance_scale=3.0), atol=1e-6, rtol=0)
        state = sd_backbone.prepare(settings, [torch.Generator().manual_seed(5)])
        first = state.step_starts[2]
        prompts_seen, rec = [], record_steps(sd_backbone)
        recording = sd_backbone.step

        def step(state, i, embeds):
            prompts_seen.append(embeds.tensors["prompt_embeds"])
            return recording(state, i, embeds)

        sd_backbone.step = step
        refine, calls = append_refine()
        out = rollout(sd_backbone, ["a red cat"], [5], settings, RefinementSchedule.explicit([2]), refine=refine)
        initial = sd_backbone.encode_prompts(["a red cat"]).tensors["prompt_embeds"]
        assert [torch.equal(p, initial) for p in prompts_seen] == [i < first for i in range(state.num_steps)]
        observation, trajectory = calls[0][0], out.trajectories[0]
        assert observation.num_steps == trajectory.num_steps == 4 and trajectory.step_prompt_index == [0, 0, 1, 1]
        assert trajectory.timesteps == [float(state.timesteps[first])] == [observation.metadata["timestep"]]
        assert observation.noise_level == sd_backbone.noise_level(state, first)
        expected = to_pil(sd_backbone.decode(rec.x0[first - 1], preview=True))[0]  # x0 of step 1's last evaluation
        assert list(observation.preview.getdata()) == list(expected.getdata())
    finally:
        pipe.scheduler = original
