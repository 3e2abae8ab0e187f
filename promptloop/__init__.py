"""PromptLoop: a VLM policy rewrites the prompt of a frozen diffusion model at a few denoising steps while looking
at the x0 preview, trained with GRPO against image rewards."""

__version__ = "0.1.0.dev0"
