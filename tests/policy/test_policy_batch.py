"""Contracts of the per-sample image records and their re-batching (no model)."""
import pytest
import torch

from promptloop.policy.batch import PolicySample, collate_samples, split_image_inputs


def _by_sample_encoding():
    """Two samples batched by sample (Idefics3's layout): 3 real crops, then none (all-zero padding)."""
    pixels = torch.zeros(2, 3, 3, 4, 4)
    pixels[0] = torch.arange(1, 3 * 3 * 16 + 1, dtype=torch.float32).view(3, 3, 4, 4)
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.long)
    masks[0] = 1
    return {"input_ids": torch.ones(2, 5, dtype=torch.long), "pixel_values": pixels, "pixel_attention_mask": masks}


def test_images_batched_by_sample_are_split_without_padding_and_re_batched_with_it():
    encoding = _by_sample_encoding()
    pieces = split_image_inputs(encoding, [1, 0], by_sample=True)
    assert pieces[1] == {}
    assert pieces[0]["pixel_values"].shape == (1, 3, 3, 4, 4)
    assert torch.equal(pieces[0]["pixel_values"][0], encoding["pixel_values"][0])

    short = {key: value[:, :2] for key, value in pieces[0].items()}  # a sample of 2 crops
    samples = [PolicySample(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long), torch.tensor([3]), v)
               for v in ({}, pieces[0], short)]
    batch = collate_samples(samples, 0, torch.device("cpu"), token_types_key=None, images_by_sample=True)
    pixels = batch.model_inputs["pixel_values"]
    assert pixels.shape == (3, 3, 3, 4, 4)  # one row per sample, padded to the most crops
    assert not pixels[0].any() and not pixels[2, 2].any()  # a sample without images: all-zero padding
    assert torch.equal(pixels[1], encoding["pixel_values"][0]) and torch.equal(pixels[2, :2], pixels[1, :2])
    assert batch.model_inputs["pixel_attention_mask"].sum((1, 2, 3)).tolist() == [0, 48, 32]
    assert "mm_token_type_ids" not in batch.model_inputs and "token_type_ids" not in batch.model_inputs


def test_a_layout_that_is_not_by_sample_is_an_error():
    encoding = _by_sample_encoding()
    encoding["pixel_values"] = encoding["pixel_values"].flatten(0, 1)  # (images, channels, h, w)
    with pytest.raises(ValueError, match=r"batched by sample it should be \(2, images, channels, height, width\)"):
        split_image_inputs(encoding, [1, 0], by_sample=True)
