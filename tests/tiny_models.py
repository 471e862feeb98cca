"""Tiny BLIP2 and SDXL checkpoints: the real library classes at toy sizes with random weights, saved where
the generators load them from (as the libraries' own test suites build theirs). Shared by the generator and
job tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_IMAGE = 32  # SDXL output side and BLIP2 input side of the tiny models
MIN_CAPTION_TOKENS = 6  # the tiny BLIP2 always writes this many tokens, so no sampled caption comes out empty
CORPUS = (  # what the tiny BLIP2 tokenizer is trained on
    "Please write two captions of the image. Caption 1: Caption 2:",
    "a red bus parked on a wet street", "two dogs running in a sunny park",
    "a bowl of fruit on a wooden table", "an old man reading by the window",
)


# ------------------------------------------------------------------------------------------ tiny checkpoints


def save_tiny_blip2(folder: Path, seed: int = 0) -> Path:
    """A tiny random BLIP2 (ViT, Q-Former, OPT; hidden size 32, 2 layers) with a byte-level BPE tokenizer
    trained on CORPUS and a 32px image processor, saved where ``Blip2TextGenerator`` loads it from."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    vocab_dir = folder / "bpe"
    vocab_dir.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    # Trained on the captions only: had the prompt's "Caption 2:" become a token or two, the random model would
    # write that marker (where a caption ends) often enough to leave candidates empty.
    bpe.train_from_iterator(CORPUS[1:], vocab_size=320, min_frequency=1, show_progress=False)
    bpe.save_model(str(vocab_dir))
    tokenizer = GPT2Tokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), bos_token="</s>",
                              eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    num_query_tokens = 4
    processor = Blip2Processor(BlipImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}), tokenizer,
                               num_query_tokens=num_query_tokens)  # adds the <image> token to the tokenizer
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = Blip2Config(
        vision_config={**small, "image_size": TINY_IMAGE, "patch_size": 8},
        qformer_config={**small, "vocab_size": 99, "max_position_embeddings": 64, "cross_attention_frequency": 1},
        text_config={"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 32, "ffn_dim": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 32,
                     "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.min_new_tokens = MIN_CAPTION_TOKENS
    out = folder / "blip2"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_clip_tokenizer():
    """A CLIP tokenizer over single characters (no merges): the vocabulary SDXL's two text towers read."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,:'":
        vocab[ch] = len(vocab)
        vocab[f"{ch}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A tiny random SDXL pipeline (text_time UNet, 2-block VAE, two 16-d CLIP text towers, Euler) saved
    where ``SdxlImageGenerator`` loads it from."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_dim, time_dim = 16, 8
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_dim, projection_dim=text_dim,
                                 intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=2 * text_dim,  # both towers' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_dim,  # 6 size/crop ids + pooled tower 2
        norm_num_groups=1,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=TINY_IMAGE)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config),
                                     text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    out = folder / "sdxl"
    pipe.save_pretrained(out)
    return out


def tiny_model_job(job, weights: Path, accelerators: str, **generator):
    """``job`` (a JobConfig) with the BLIP2 and SDXL classes on tiny random checkpoints saved under ``weights``: two
    candidates, two denoising steps, TINY_IMAGE pixels, eight new tokens (``generator`` adds or overrides keys).
    Their declarations ask for what the real models need (12-14 GiB); the tiny ones need little: only the memory
    is set, so the pools' sizes stay the cluster's."""
    from rag4dmc.pipeline.config import StageResources

    blip2, sdxl = save_tiny_blip2(weights), save_tiny_sdxl(weights)
    return job.model_copy(update={"accelerators": accelerators, "generator": job.generator.model_copy(update={
        "text_backend": "blip2", "blip2_model": str(blip2), "image_backend": "sdxl", "sdxl_model": str(sdxl),
        "n_candidates": 2, "steps": 2, "image_size": TINY_IMAGE, "max_new_tokens": 8, **generator}),
        "resources": {"generate": StageResources(memory_gb=1.0)}})
