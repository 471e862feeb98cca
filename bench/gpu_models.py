"""BLIP2-OPT-2.7b and SDXL base 1.0 at their published sizes, with random weights: what they cost, not what they say.

A model's speed and memory depend on its architecture, not on its weights. The configurations below are written
from the public ``config.json`` files of ``Salesforce/blip2-opt-2.7b`` and ``stabilityai/stable-diffusion-xl-base-1.0``
(nothing is downloaded), built by the same transformers / diffusers classes the generators load, and saved where
``Blip2TextGenerator`` and ``SdxlImageGenerator`` load a checkpoint from. Their tokenizers have the published
vocabulary sizes (50,265 BPE tokens for OPT, 49,408 for CLIP) but synthetic entries: byte-level tokens plus
placeholders, so prompts tokenise to about as many tokens as real ones and every sampled id decodes.

``depth`` scales every stack of layers down (``Depth.reduced``: one layer per stack, the widths kept) so that the
CPU test suite builds the same configurations in seconds; ``Depth.full`` is the published model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Parameter counts of the published checkpoints (their safetensors headers), checked against the full builds.
PUBLISHED_PARAMS = {
    "blip2-opt-2.7b": 3_744_761_856,
    "sdxl-unet": 2_567_463_684,
    "sdxl-text_encoder": 123_060_480,
    "sdxl-text_encoder_2": 694_659_840,
    "sdxl-vae": 83_653_863,
}
OPT_VOCAB = 50_304  # embedding rows of the BLIP2 checkpoint: OPT-2.7b's 50,272 and 32 more (its image token, padded)
OPT_TOKENIZER_SIZE = 50_265
CLIP_VOCAB = 49_408
CLIP_MAX_TOKENS = 77
BLIP2_QUERY_TOKENS = 32
BLIP2_IMAGE_SIZE = 224


@dataclass(frozen=True)
class Depth:
    """Layers per stack: the published counts (full) or one per stack (reduced), widths unchanged."""

    full: bool = True

    def __call__(self, n: int) -> int:
        return n if self.full else 1


FULL, REDUCED = Depth(True), Depth(False)


# ------------------------------------------------------------------------------------------------ tokenizers


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE vocabularies spell bytes with (GPT-2's table, from tokenizers)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def save_opt_tokenizer(folder: Path) -> Path:
    """A GPT-2 BPE tokenizer with OPT's vocabulary size: OPT's special tokens, the 256 bytes, placeholders."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    while len(vocab) < OPT_TOKENIZER_SIZE:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer with CLIP's vocabulary size: the bytes, each also as a word end, specials, placeholders."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    alphabet = _byte_alphabet()
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[f"{ch}</w>"] = len(vocab)
    while len(vocab) < CLIP_VOCAB - 2:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = CLIP_VOCAB - 2, CLIP_VOCAB - 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_MAX_TOKENS)


# ------------------------------------------------------------------------------------------------ BLIP2


def blip2_config(depth: Depth = FULL, image_token_index: int = OPT_TOKENIZER_SIZE + 1):
    """Blip2Config of Salesforce/blip2-opt-2.7b: EVA ViT-g (39 layers), Q-Former (12), OPT-2.7b (32)."""
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": depth(39),
                       "num_attention_heads": 16, "image_size": BLIP2_IMAGE_SIZE, "patch_size": 14,
                       "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu"},
        qformer_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": depth(12),
                        "num_attention_heads": 12, "vocab_size": 30_522, "max_position_embeddings": 512,
                        "cross_attention_frequency": 2, "encoder_hidden_size": 1408},
        text_config={"model_type": "opt", "vocab_size": OPT_VOCAB, "hidden_size": 2560, "ffn_dim": 10_240,
                     "num_hidden_layers": depth(32), "num_attention_heads": 32, "word_embed_proj_dim": 2560,
                     "max_position_embeddings": 2048, "do_layer_norm_before": True, "activation_function": "relu",
                     "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_token_index=image_token_index,
    )


def save_blip2(folder: Path, depth: Depth = FULL, device: str = "cpu", dtype: torch.dtype = torch.float32,
               min_new_tokens: int | None = None) -> Path:
    """A random BLIP2-OPT-2.7b and its processor saved where ``Blip2TextGenerator`` loads them from.

    ``min_new_tokens`` makes every caption that long: random weights would otherwise stop at a random end token
    and cost less than a real model, which writes about as many tokens as ``max_new_tokens`` allows."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, GPT2Tokenizer

    vocab = save_opt_tokenizer(folder / "bpe")
    tokenizer = GPT2Tokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), bos_token="</s>",
                              eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    processor = Blip2Processor(BlipImageProcessor(size={"height": BLIP2_IMAGE_SIZE, "width": BLIP2_IMAGE_SIZE}),
                               tokenizer, num_query_tokens=BLIP2_QUERY_TOKENS)  # adds the <image> token
    config = blip2_config(depth, tokenizer.convert_tokens_to_ids(processor.image_token.content))
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(dtype)
    if min_new_tokens is not None:
        model.generation_config.min_new_tokens = min_new_tokens
    out = folder / "blip2"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ SDXL


def sdxl_unet(depth: Depth = FULL):
    """UNet2DConditionModel of SDXL base 1.0: 320/640/1280 channels, 1/2/10 transformer layers, text_time embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        layers_per_block=depth(2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(depth(1), depth(2), depth(10)),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )


def sdxl_vae(depth: Depth = FULL):
    """AutoencoderKL of SDXL: 128/256/512/512 channels, 2 layers per block, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=depth(2), norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                         force_upcast=True)


def sdxl_text_configs(depth: Depth = FULL):
    """The two text towers: CLIP ViT-L/14's (768 wide, 12 layers) and OpenCLIP ViT-bigG/14's (1280, 32 layers)."""
    from transformers import CLIPTextConfig

    common = {"vocab_size": CLIP_VOCAB, "max_position_embeddings": CLIP_MAX_TOKENS, "bos_token_id": 0,
              "eos_token_id": 2, "pad_token_id": 1}
    vit_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=depth(12),
                           num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu", **common)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=depth(32),
                           num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **common)
    return vit_l, big_g


def sdxl_pipeline(folder: Path, depth: Depth = FULL, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A random SDXL base pipeline (UNet, VAE, two text towers, Euler scheduler, tokenizers) on ``device``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(folder / "clip-vocab")
    vit_l, big_g = sdxl_text_configs(depth)
    with torch.device(device):
        parts = {"unet": sdxl_unet(depth), "vae": sdxl_vae(depth), "text_encoder": CLIPTextModel(vit_l),
                 "text_encoder_2": CLIPTextModelWithProjection(big_g)}
    parts = {name: module.to(dtype) for name, module in parts.items()}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1, num_train_timesteps=1000)
    return StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **parts)


def save_sdxl(folder: Path, depth: Depth = FULL, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A random SDXL base pipeline saved where ``SdxlImageGenerator`` loads it from."""
    out = folder / "sdxl"
    sdxl_pipeline(folder, depth, device, dtype).save_pretrained(out)
    return out


def parameter_counts(depth: Depth = FULL) -> dict[str, int]:
    """Parameters of each model at ``depth``, built on the meta device (no memory, no time)."""
    from transformers import Blip2ForConditionalGeneration, CLIPTextModel, CLIPTextModelWithProjection

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        vit_l, big_g = sdxl_text_configs(depth)
        return {"blip2-opt-2.7b": count(Blip2ForConditionalGeneration(blip2_config(depth))),
                "sdxl-unet": count(sdxl_unet(depth)), "sdxl-text_encoder": count(CLIPTextModel(vit_l)),
                "sdxl-text_encoder_2": count(CLIPTextModelWithProjection(big_g)), "sdxl-vae": count(sdxl_vae(depth))}
