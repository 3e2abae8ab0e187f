"""What every prompt-writing policy shares, whichever engine samples its answers (transformers or vLLM).

The chat it is shown, how a saved policy folder resolves to its config, the tokens it may never write, the answers'
sanitation into prompts and the sampler's refine callable live here; subclasses only sample answers (``act``).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, NamedTuple, Optional, Sequence, Union

import torch
from transformers import AutoProcessor, ProcessorMixin

from promptloop.backbones.types import Observation, RefineFn
from promptloop.policy.chat import Chat, build_chat
from promptloop.policy.config import LOOP_CONFIG_NAME, POLICY_CONFIG_NAME, LoopDefaults, PolicyConfig
from promptloop.policy.hub import download_saved_policy, is_hub_id
from promptloop.policy.sanitize import PromptSchedule, parse_prompt_schedule, sanitize_prompt

ADAPTER_CONFIG_NAME = "adapter_config.json"
_VISION_TOKEN_ATTRIBUTES = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                            "boi_token_id", "eoi_token_id")


@dataclass(kw_only=True)
class PromptActions:
    """The prompts a policy wrote for a batch of observations (one entry per observation)."""

    texts: list[str]
    """Raw decoded answers (special tokens removed)."""
    prompts: list[str]
    """Sanitized prompts, one per observation (a-priori mode: the step ``refinement_index`` of the schedule)."""
    kept_previous: list[bool]
    """The observation's current prompt was kept: the answer held no usable prompt, or it left out a word of the
    query while ``config.keep_query_words`` is on."""
    truncated: list[bool]
    """The prompt was cut to ``config.max_prompt_words`` words."""
    schedules: Optional[list[PromptSchedule]] = None
    """A-priori mode only: the parsed schedule of every observation."""


class ResolvedPolicy(NamedTuple):
    """Where a policy loads from: its config, and the local folder of a saved policy (None: a base model)."""

    config: PolicyConfig
    folder: Optional[str]

    @property
    def adapter_folder(self) -> Optional[str]:
        """The saved folder when it holds a LoRA adapter (a saved policy can also be a bare base model)."""
        has_adapter = self.folder is not None and (Path(self.folder) / ADAPTER_CONFIG_NAME).is_file()
        return self.folder if has_adapter else None

    def base_model_kwargs(self, **download: Any) -> dict[str, Any]:
        """The ``from_pretrained`` keywords of the base model: its revision, ``trust_remote_code`` and ``download``
        (``token``, ``cache_dir``, ``local_files_only``)."""
        return dict(revision=self.config.model_revision, trust_remote_code=self.config.trust_remote_code, **download)

    def load_processor(self, **download: Any) -> ProcessorMixin:
        """The saved policy's processor (its tokenizer and chat template), else the base model's."""
        if self.folder is not None:
            return AutoProcessor.from_pretrained(self.folder, trust_remote_code=self.config.trust_remote_code)
        return AutoProcessor.from_pretrained(self.config.model_name_or_path, **self.base_model_kwargs(**download))

    @property
    def loop_defaults(self) -> Optional[LoopDefaults]:
        """The saved folder's :class:`LoopDefaults` (how it was trained to be called), if it records them."""
        path = Path(self.folder) / LOOP_CONFIG_NAME if self.folder is not None else None
        return LoopDefaults.load(path) if path is not None and path.is_file() else None


def resolve_policy_config(
    path_or_id: str, config: Optional[PolicyConfig] = None, base_model_name_or_path: Optional[str] = None, *,
    revision: Optional[str] = None, **download: Any,
) -> ResolvedPolicy:
    """The config to load ``path_or_id`` with, and the local folder when it is a saved policy (a folder or a hub repo
    holding ``policy_config.json``; a repo is downloaded at ``revision``, with ``download``'s ``token``,
    ``cache_dir`` and ``local_files_only``).

    A saved policy keeps its model and LoRA fields, its base model's revision included; ``config`` (if given)
    replaces the sampling/chat settings; a base model path starting with ``./`` or ``../`` is relative to the saved
    folder; ``base_model_name_or_path`` overrides the base. ``trust_remote_code`` comes only from ``config``, never
    from a saved (downloaded) file. Otherwise ``path_or_id`` is the base model, with ``config`` (default
    ``PolicyConfig()``) as settings. ``revision`` is that of ``path_or_id`` (default: ``config.model_revision`` when
    ``config`` names ``path_or_id``).
    """
    if revision is None and config is not None and config.model_name_or_path == path_or_id:
        revision = config.model_revision
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        folder = str(local) if (local / POLICY_CONFIG_NAME).is_file() else None
    else:
        folder = download_saved_policy(path_or_id, revision=revision, **download) if is_hub_id(path_or_id) else None
    if folder is None:
        if (local / "policy" / POLICY_CONFIG_NAME).is_file() or (local / "checkpoints").is_dir():
            raise ValueError(f"{path_or_id} is a training run folder, not a policy: load the trained policy "
                             f"{local / 'policy'} (written when training completes) or a checkpoint's "
                             f"{local / 'checkpoints' / 'step-N' / 'policy'}.")
        return ResolvedPolicy(dataclasses.replace(
            config or PolicyConfig(), model_name_or_path=path_or_id, model_revision=revision), None)
    saved = PolicyConfig.load(Path(folder) / POLICY_CONFIG_NAME)
    base, base_revision = saved.model_name_or_path, saved.model_revision
    if base.startswith(("./", "../")):
        base = str((Path(folder) / base).resolve())
    caller = config or PolicyConfig()
    if base_model_name_or_path:
        base, base_revision = base_model_name_or_path, caller.model_revision
    resolved = dataclasses.replace(
        config or saved, model_name_or_path=base, model_revision=base_revision,
        lora_r=saved.lora_r, lora_alpha=saved.lora_alpha, lora_dropout=saved.lora_dropout,
        lora_target_modules=saved.lora_target_modules, trust_remote_code=caller.trust_remote_code,
    )
    return ResolvedPolicy(resolved, folder)


def end_token_ids(generation_eos: Union[int, list[int], None], tokenizer: Any,
                  turn_end_token: Optional[str] = None) -> list[int]:
    """The model's end tokens: its generation config's, else the tokenizer's end token; and the token that closes
    a turn in its chat template (``turn_end_token``), when the vocabulary has it."""
    eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    vocab = tokenizer.get_vocab() if turn_end_token else {}
    if turn_end_token in vocab:
        ids.add(vocab[turn_end_token])
    ids = sorted(ids)
    if not ids:
        raise ValueError("The model has no end token: set generation_config.eos_token_id or tokenizer.eos_token.")
    return ids


def suppressed_token_ids(tokenizer: Any, model_config: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> list[int]:
    """Special tokens (vision placeholders, chat markers, ...) that must never be generated, end tokens excepted."""
    ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for attribute in _VISION_TOKEN_ATTRIBUTES:
        value = getattr(model_config, attribute, None)
        if value is not None:
            ids.add(value)
    return sorted(i for i in ids - set(eos_token_ids) if i < vocab_size)


def resolve_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> Optional[int]:
    """One seed for a call from either ``seed`` or a draw from ``generator`` (not both)."""
    if seed is not None and generator is not None:
        raise ValueError("Pass either seed or generator, not both.")
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    return seed


def check_row_seeds(row_seeds: Optional[Sequence[int]], num_rows: int, seed: Optional[int],
                    generator: Optional[torch.Generator]) -> Optional[list[int]]:
    """``row_seeds`` as a list of ints, after checking it holds one seed per row and comes without a call seed."""
    if row_seeds is None:
        return None
    if seed is not None or generator is not None:
        raise ValueError("Pass row_seeds (one seed per observation) or seed/generator (one for the call), not both.")
    row_seeds = [int(s) for s in row_seeds]
    if len(row_seeds) != num_rows:
        raise ValueError(f"row_seeds holds {len(row_seeds)} seeds for {num_rows} observations: give one per "
                         "observation.")
    return row_seeds


def image_row_seed(seed: Optional[int], image_seed: int, refinement_index: int) -> int:
    """The policy's sampling seed for one image at one refinement: a hash of ``seed`` (None counts as 0), the image's
    noise seed and the refinement index alone, so an image's prompts do not depend on the batch it is sampled in."""
    key = repr((0 if seed is None else int(seed), int(image_seed), int(refinement_index))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2  # < 2**62


class PromptWriter(abc.ABC):
    """A chat VLM that writes the next text-to-image prompt from an :class:`Observation`.

    Subclasses sample the answers (:meth:`act`); the chat, the sanitation of answers into prompts and the sampler's
    callable (:meth:`as_refine_fn`) are shared, so every engine turns the same answer into the same prompt.
    """

    def __init__(self, processor: ProcessorMixin, config: PolicyConfig) -> None:
        self.processor = processor
        self.config = config
        self.loop_defaults: Optional[LoopDefaults] = None
        """How the policy was trained to be called (saved as ``loop_config.json``; the trainer sets it)."""

    @abc.abstractmethod
    def act(
        self, observations: Sequence[Observation], *, seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None, row_seeds: Optional[Sequence[int]] = None,
    ) -> PromptActions:
        """Sample one answer per observation and turn it into a prompt; ``seed`` (or a draw from ``generator``)
        makes the call reproducible. ``row_seeds`` (instead): one seed per observation, each row sampled from its own
        stream, so a row's answer does not depend on the other rows of the batch."""

    @property
    @abc.abstractmethod
    def has_adapter(self) -> bool:
        """The policy has a LoRA adapter on top of its base model."""

    @abc.abstractmethod
    def reference(self) -> ContextManager["PromptWriter"]:
        """A context within which the policy answers as its base model (adapter off); an error without adapter."""

    def chats(self, observations: Sequence[Observation]) -> tuple[list[Chat], list[str]]:
        """Each observation's chat and its text under the processor's chat template (generation prompt added).

        The chat is that of ``config.mode``; the config's system prompt is used only in the mode it was written for
        (``config.system_prompt_mode``), other modes get their default.
        """
        if not observations:
            raise ValueError("act() needs at least one observation.")
        mode = self.config.mode
        system_prompt = self.config.system_prompt_for(mode)
        chats = [build_chat(self._without_special_tokens(o), mode, system_prompt) for o in observations]
        texts = [self.processor.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=False)
                 for chat in chats]
        # Gemma's template writes <bos> and its tokenizer adds one: the processor and vLLM tokenize these texts
        # with special tokens, and a second <bos> would be an input the model was never trained on.
        bos = self.processor.tokenizer.bos_token
        if bos and any(text.startswith(bos) for text in texts) and self._tokenizer_adds_bos():
            texts = [text[len(bos):] if text.startswith(bos) else text for text in texts]
        return chats, texts

    @functools.cached_property
    def _special_tokens(self) -> Optional[re.Pattern]:
        tokenizer = self.processor.tokenizer
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(tokenizer.all_special_tokens)
        specials.discard("")
        return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None

    def _without_special_tokens(self, observation: Observation) -> Observation:
        """``observation`` with the tokenizer's special-token strings removed from its texts: a query or a written
        prompt holding "<image>" or "<|im_end|>" would otherwise be read as a placeholder (the processor would count
        an image it does not have) or end a turn."""
        if self._special_tokens is None:
            return observation

        def clean(text: str) -> str:
            cleaned = self._special_tokens.sub(" ", text)
            return text if cleaned == text else " ".join(cleaned.split())

        return dataclasses.replace(observation, query=clean(observation.query), prompt=clean(observation.prompt),
                                   history=[clean(h) for h in observation.history])

    def _tokenizer_adds_bos(self) -> bool:
        tokenizer = self.processor.tokenizer
        return tokenizer.bos_token_id in tokenizer("").input_ids

    def act_per_image(self, observations: Sequence[Observation], image_seeds: Sequence[int],
                      seed: Optional[int] = None) -> PromptActions:
        """:meth:`act` with each observation's answer drawn from :func:`image_row_seed` ``(seed,
        image_seeds[o.row], o.refinement_index)``: an image's answers do not depend on the batch it is in."""
        if any(not 0 <= o.row < len(image_seeds) for o in observations):
            raise ValueError(f"image_seeds holds {len(image_seeds)} seeds but the sampler has rows "
                             f"{sorted({o.row for o in observations})}: give one seed per row.")
        return self.act(observations, row_seeds=[image_row_seed(seed, image_seeds[o.row], o.refinement_index)
                                                 for o in observations])

    def fill_prompts(self, actions: PromptActions, observations: Sequence[Observation]) -> None:
        """Sanitize ``actions.texts`` into ``prompts`` / ``kept_previous`` / ``truncated`` (and ``schedules``)."""
        max_words = self.config.max_prompt_words
        if self.config.mode == "apriori":
            actions.schedules = []
        for text, observation in zip(actions.texts, observations):
            query = observation.query if self.config.keep_query_words else None
            if self.config.mode == "apriori":  # later refinements read the schedule: every step is guarded
                schedule = parse_prompt_schedule(text, observation.num_refinements, observation.prompt, max_words,
                                                 query)
                k = min(observation.refinement_index, observation.num_refinements - 1)
                actions.schedules.append(schedule)
                prompt, kept, truncated = schedule.prompts[k], schedule.missing[k], schedule.truncated[k]
            else:
                result = sanitize_prompt(text, observation.prompt, max_words, query)
                prompt, kept, truncated = result.prompt, result.kept_previous, result.truncated
            actions.prompts.append(prompt)
            actions.kept_previous.append(kept)
            actions.truncated.append(truncated)

    def as_refine_fn(self, seed: Optional[int] = None, image_seeds: Optional[Sequence[int]] = None) -> RefineFn:
        """A :data:`RefineFn` for the sampler; ``seed`` makes the sequence of calls reproducible.

        ``image_seeds`` (one per sampler row, e.g. the images' noise seeds): each row's answer at refinement k is
        sampled from :func:`image_row_seed` ``(seed, image_seeds[row], k)``, so an image's prompts are the same in
        any batch. Without it, each call's rows share one stream drawn from ``seed`` (as in training, where the rows
        of a group share their image seed). In a-priori mode the schedule is written at refinement 0 of each row and
        read back at later refinements.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None and image_seeds is None else None
        schedules: dict[tuple[int, str], list[str]] = {}

        def act(observations: list[Observation]) -> PromptActions:
            if image_seeds is None:
                return self.act(observations, generator=generator)
            return self.act_per_image(observations, image_seeds, seed)

        def refine(observations: list[Observation]) -> list[str]:
            if self.config.mode != "apriori":
                return act(observations).prompts
            fresh = [o for o in observations if o.refinement_index == 0 or (o.row, o.query) not in schedules]
            if fresh:
                actions = act(fresh)
                for observation, schedule in zip(fresh, actions.schedules):
                    schedules[(observation.row, observation.query)] = schedule.prompts
            return [schedules[(o.row, o.query)][min(o.refinement_index, len(schedules[(o.row, o.query)]) - 1)]
                    for o in observations]

        return refine
