"""Textual-inversion embeddings in our pipelines: diffusers' and A1111's files (SD: one vector set;
SDXL: clip_l and clip_g), in prompts and negative prompts, as diffusers' pipelines read them; files
for another model, pickled objects and known words refused with nothing changed.

The embeddings are random vectors of the tiny presets' widths (SD 64; SDXL 32 and 64), two vectors a
word, so that a word spelt out to its n tokens is exercised too.
"""

import dataclasses
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines import TextToImagePipeline, TextToImageXLPipeline
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components
from sdlite.models_xl import build_components_xl
from sdlite.textual_inversion import EmbeddingFileError

WORD = "<sq>"
PROMPT = f"a red {WORD} on grey"


def _vectors(width: int, seed: int) -> torch.Tensor:
    return torch.randn(2, width, generator=torch.Generator().manual_seed(seed))


def _sd(cls=TextToImagePipeline):
    parts = build_components("tiny", seed=0)
    if cls is StableDiffusionPipeline:  # diffusers insists on steps_offset 1; the encoders are the same
        config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
        parts = dataclasses.replace(parts, scheduler=DDPMScheduler.from_config(config | {"steps_offset": 1}))
        return cls(
            **parts.as_dict(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return cls(**parts.as_dict())


def _xl(cls=TextToImageXLPipeline):
    parts = build_components_xl("tiny-sdxl", seed=0).as_dict()
    return cls(**parts, add_watermarker=False) if cls is StableDiffusionXLPipeline else cls(**parts)


def _embeds(pipe, prompt=PROMPT, negative=None) -> list[torch.Tensor]:
    with torch.no_grad():
        kwargs = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        out = pipe.encode_prompt(prompt, negative_prompt=negative, **kwargs)
    return [t for t in out if t is not None]


def _equal(a, b) -> bool:
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))


@pytest.fixture
def sd_files(tmp_path) -> dict[str, Path]:
    """The same word in each SD format: diffusers' folder, A1111's .pt and .safetensors."""
    vectors = _vectors(64, 0)
    (tmp_path / "diffusers").mkdir()
    safetensors.torch.save_file({WORD: vectors}, tmp_path / "diffusers" / "learned_embeds.safetensors")
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
             "name": WORD, "step": 500, "sd_checkpoint_name": "tiny"}  # fmt: skip
    torch.save(a1111, tmp_path / "a1111.pt")
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / f"{WORD}.safetensors")
    return {"diffusers": tmp_path / "diffusers", "pt": tmp_path / "a1111.pt",
            "safetensors": tmp_path / f"{WORD}.safetensors", "vectors": vectors}  # fmt: skip


def test_a_diffusers_embedding_gives_the_prompt_embeds_diffusers_pipeline_gives(sd_files):
    ours, theirs = _sd(), _sd(StableDiffusionPipeline)
    before = _embeds(ours)
    ours.load_textual_inversion(sd_files["diffusers"])
    theirs.load_textual_inversion(str(sd_files["diffusers"]), local_files_only=True)
    after = _embeds(ours)
    assert not torch.allclose(after[0], before[0], atol=1e-3)  # the word means something now
    assert _equal(after, _embeds(theirs))
    ids = ours.tokenizer(ours.maybe_convert_prompt(PROMPT, ours.tokenizer)).input_ids  # "<sq> <sq>_1"
    assert ours.tokenizer.convert_tokens_to_ids([WORD, f"{WORD}_1"]) == ids[3:5]  # two vectors, two ids
    rows = ours.text_encoder.get_input_embeddings().weight[ids[3:5]]
    assert torch.equal(rows, sd_files["vectors"])


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_a1111_embeddings_load_as_the_diffusers_file_of_the_same_vectors(sd_files, kind):
    reference, pipe = _sd(), _sd()
    reference.load_textual_inversion(sd_files["diffusers"])
    pipe.load_textual_inversion(sd_files[kind])  # the word: the .pt's name; the .safetensors' file name
    assert _equal(_embeds(pipe), _embeds(reference))


def test_the_word_works_in_negative_prompts_and_the_rest_of_the_vocabulary_is_unchanged(sd_files):
    pipe = _sd()
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    plain = _embeds(pipe, "a red circle", negative="blurry")
    pipe.load_textual_inversion(sd_files["pt"], token="<neg>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[: len(table)], table)
    assert _equal(_embeds(pipe, "a red circle", negative="blurry"), plain)  # other prompts: as before
    _, negative = _embeds(pipe, "a red circle", negative="<neg> blurry")
    assert torch.allclose(negative, _embeds(pipe, "<neg> blurry")[0])
    assert not torch.allclose(negative, plain[1], atol=1e-3)
    images = pipe(
        "a red circle", negative_prompt="<neg>", num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0), progress=False,
    ).images  # fmt: skip
    assert images.shape[0] == 1 and torch.isfinite(torch.from_numpy(images)).all()


def test_an_sdxl_embedding_loads_clip_l_and_clip_g_into_both_encoders_as_diffusers_does(tmp_path):
    clip_l, clip_g = _vectors(32, 1), _vectors(64, 2)
    file = tmp_path / f"{WORD}.safetensors"
    safetensors.torch.save_file({"clip_l": clip_l, "clip_g": clip_g}, file)
    ours, theirs = _xl(), _xl(StableDiffusionXLPipeline)
    before = _embeds(ours, negative="")
    ours.load_textual_inversion(file)
    for vectors, encoder, tokenizer in ((clip_l, "text_encoder", "tokenizer"),
                                        (clip_g, "text_encoder_2", "tokenizer_2")):  # fmt: skip
        theirs.load_textual_inversion(
            vectors, token=WORD, text_encoder=getattr(theirs, encoder), tokenizer=getattr(theirs, tokenizer)
        )
    after = _embeds(ours, negative="")
    assert not torch.allclose(after[0], before[0], atol=1e-3)
    with torch.no_grad():
        expected = theirs.encode_prompt(PROMPT, device="cpu", negative_prompt="")
    assert _equal(after, [expected[0], expected[1], expected[2], expected[3]])


def test_embeddings_for_another_model_pickled_objects_and_known_words_are_refused_unchanged(
    sd_files, tmp_path
):
    sdxl_file = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": _vectors(32, 1), "clip_g": _vectors(64, 2)}, sdxl_file)
    sd, xl = _sd(), _xl()
    size = len(sd.tokenizer)
    with pytest.raises(EmbeddingFileError, match="an SDXL embedding"):
        sd.load_textual_inversion(sdxl_file)
    with pytest.raises(EmbeddingFileError, match="one set of vectors"):
        xl.load_textual_inversion(sd_files["diffusers"])
    wide = tmp_path / "wide.safetensors"
    safetensors.torch.save_file({"emb_params": _vectors(768, 3)}, wide)
    with pytest.raises(EmbeddingFileError, match="768-wide vectors where this text encoder reads 64"):
        sd.load_textual_inversion(wide)
    with pytest.raises(EmbeddingFileError, match="'circle' is a word the tokenizer knows"):
        sd.load_textual_inversion(sd_files["diffusers"], token="circle")
    torch.save({"string_to_param": {"*": Path("/")}}, tmp_path / "object.pt")  # a pickled object, not tensors
    with pytest.raises(EmbeddingFileError, match="weights_only"):
        sd.load_textual_inversion(tmp_path / "object.pt")
    assert len(sd.tokenizer) == size and sd.text_encoder.get_input_embeddings().weight.shape[0] >= size
    assert len(xl.tokenizer) == len(_xl().tokenizer)
