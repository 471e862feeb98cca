"""The one factory of models, after open_clip's: a configuration in, the class or the loaded model out.

Encoders (``rag4dmc.actors.encoders``) and generators (``rag4dmc.actors.generators``) are built here and only here.
With ``RAG4DMC_STANDIN`` set (a benchmark and test aid, ``rag4dmc.actors.standin``; off unless set) the factory
hands out the stand-ins instead, so the modules of the real models never depend on the aid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rag4dmc.actors import standin
from rag4dmc.actors.generators import (
    Blip2TextGenerator,
    ImageGenerator,
    NearestNeighbourImageGenerator,
    NearestNeighbourTextGenerator,
    SdxlImageGenerator,
    TextGenerator,
)
from rag4dmc.pipeline.config import EncoderConfig, GeneratorConfig

if TYPE_CHECKING:  # the encoders' module imports torch: a stage without an encoder (retrieval, nn generation) never does
    from rag4dmc.actors.encoders import Encoder, LiteEncoder, OpenClipEncoder


def encoder_class(cfg: EncoderConfig) -> type[LiteEncoder] | type[OpenClipEncoder]:
    """The encoder class a config selects (its ``RESOURCES`` size the actor pools)."""
    if standin.enabled():  # a benchmark and test aid (actors/standin.py); off unless RAG4DMC_STANDIN is set
        return standin.encoder_class(cfg)
    from rag4dmc.actors.encoders import LiteEncoder, OpenClipEncoder

    return {"lite": LiteEncoder, "open_clip": OpenClipEncoder}[cfg.backend]


def create_encoder(cfg: EncoderConfig, storage_options: dict | None = None,
                   towers: tuple[str, ...] | None = None) -> Encoder:
    """The one place that turns an encoder configuration into a loaded encoder; ``towers``: the ones a caller
    embeds with (default both; the lite encoder loads only those, open_clip's model loads whole)."""
    if standin.enabled():
        return standin.create_encoder(cfg)
    from rag4dmc.actors.encoders import TOWERS, LiteEncoder, OpenClipEncoder

    towers = TOWERS if towers is None else towers
    if cfg.backend == "lite":
        return LiteEncoder(device=cfg.device, batch_size=cfg.batch_size, cpu_runtime=cfg.cpu_runtime, towers=towers)
    return OpenClipEncoder(cfg.model_name, cfg.pretrained, cfg.model_dir, device=cfg.device,
                           precision=cfg.precision, batch_size=cfg.batch_size, storage_options=storage_options)


def text_generator_class(cfg: GeneratorConfig) -> type[NearestNeighbourTextGenerator] | type[Blip2TextGenerator]:
    """The image->text generator class a config selects (its ``RESOURCES`` size the actor pool)."""
    if standin.enabled():  # a benchmark and test aid (actors/standin.py); off unless RAG4DMC_STANDIN is set
        return standin.text_generator_class(cfg)
    return {"nn": NearestNeighbourTextGenerator, "blip2": Blip2TextGenerator}[cfg.text_backend]


def image_generator_class(cfg: GeneratorConfig) -> type[NearestNeighbourImageGenerator] | type[SdxlImageGenerator]:
    """The text->image generator class a config selects (its ``RESOURCES`` size the actor pool)."""
    if standin.enabled():
        return standin.image_generator_class(cfg)
    return {"nn": NearestNeighbourImageGenerator, "sdxl": SdxlImageGenerator}[cfg.image_backend]


def create_text_generator(cfg: GeneratorConfig, storage_options: dict | None = None) -> TextGenerator:
    """The configured image->text generator, loaded."""
    if standin.enabled():
        return standin.create_text_generator(cfg)
    if cfg.text_backend == "nn":
        return NearestNeighbourTextGenerator()
    return Blip2TextGenerator(cfg.blip2_model, cfg.model_dir, device=cfg.device, precision=cfg.precision,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=cfg.batch_size, storage_options=storage_options)


def create_image_generator(cfg: GeneratorConfig, storage_options: dict | None = None) -> ImageGenerator:
    """The configured text->image generator, loaded."""
    if standin.enabled():
        return standin.create_image_generator(cfg)
    if cfg.image_backend == "nn":
        return NearestNeighbourImageGenerator()
    return SdxlImageGenerator(cfg.sdxl_model, cfg.model_dir, device=cfg.device, precision=cfg.precision,
                              mode=cfg.sdxl_mode, strength=cfg.strength, steps=cfg.steps,
                              guidance_scale=cfg.guidance_scale, image_size=cfg.image_size,
                              batch_size=cfg.batch_size, storage_options=storage_options)
