"""training/train.py with --textual_inversion_token: a new word's vectors are the only trained weights
(the U-Net and every other word's vectors bit-identical after), saved as files that our pipelines and
diffusers' load to the same text states, resumed exactly; settings it cannot take fail before training.

A tiny SD folder is the base; the shapes' captions say "<shade>" where they said "red".
"""

import json

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from test_train import flags, run_killed_at, trainers_kept

from pipelines import TextToImagePipeline
from sdlite.data.shapes import write_dataset
from sdlite.models import build_components, load_components
from training.train import main

WORD = "<shade>"
OPTIONS = dict(textual_inversion_token=WORD, textual_inversion_init="red", textual_inversion_vectors=2,
               learning_rate=5e-2, checkpoint_every=2)  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "model"
    build_components("tiny", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shade_data(tmp_path_factory):
    """The shapes with the word in place of "red" (train/ and its metadata rewritten)."""
    root = write_dataset(tmp_path_factory.mktemp("shade"), count=16, seed=0, holdout=4)
    metadata = root / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert any("red" in row["text"] for row in rows)
    lines = [json.dumps({**row, "text": row["text"].replace("red", WORD)}) for row in rows]
    metadata.write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def inverted(shade_data, base, cache, tmp_path_factory):
    """A 3-step textual-inversion run and its trainer."""
    out = tmp_path_factory.mktemp("ti")
    with trainers_kept() as runs:
        main(flags(shade_data, cache, out, pretrained=base, **OPTIONS))
    return out / "final", runs[0]


def test_only_the_words_vectors_train_and_every_other_weight_stays_bit_identical(inverted, base):
    final, run = inverted
    initial = load_components(str(base))
    unet = run.parts.unet.state_dict()
    assert all(torch.equal(v, unet[k]) for k, v in initial.unet.state_dict().items())
    table = initial.text_encoder.get_input_embeddings().weight
    word = run.parts.text_encoder.get_input_embeddings()
    assert torch.equal(word.table.weight, table)  # no other word's vector moved
    assert [p for p in run.params] == [word.vectors]
    init = table[run.parts.tokenizer("red", add_special_tokens=False).input_ids].mean(0)
    assert (word.vectors - init).abs().max() > 1e-3  # the vectors learnt from the captions
    assert run.ema is None


def test_the_saved_word_gives_the_trained_text_states_in_our_pipeline_and_diffusers(inverted, base):
    final, run = inverted
    diffusers_file, a1111_file = final / "learned_embeds.safetensors", final / "shade.safetensors"
    assert set(safetensors.torch.load_file(diffusers_file)) == {WORD}
    assert safetensors.torch.load_file(a1111_file)["emb_params"].shape == (2, 64)
    prompt = f"a {WORD} circle"
    spelt = prompt.replace(WORD, f"{WORD} {WORD}_1")  # two vectors, two tokens
    ids = run.parts.tokenizer(
        spelt,
        padding="max_length",
        max_length=run.parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        trained = run.parts.text_encoder(ids)[0]
    for pipe_class, file, token in ((TextToImagePipeline, diffusers_file, None),
                                    (TextToImagePipeline, a1111_file, WORD),
                                    (StableDiffusionPipeline, diffusers_file, None)):  # fmt: skip
        extra = (
            {"safety_checker": None, "requires_safety_checker": False}
            if pipe_class is StableDiffusionPipeline
            else {}
        )
        pipe = pipe_class.from_pretrained(str(base), local_files_only=True, **extra)
        pipe.load_textual_inversion(str(file), token=token)
        with torch.no_grad():
            embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        assert torch.allclose(embeds, trained, atol=1e-5), (pipe_class.__name__, file.name)


def test_an_interrupted_textual_inversion_run_resumed_from_its_checkpoint_ends_with_the_same_vectors(
    shade_data, base, cache, tmp_path, monkeypatch
):
    options = dict(OPTIONS, max_steps=4, lr_scheduler="cosine", caption_dropout=0.25, pretrained=base)
    main(flags(shade_data, cache, tmp_path / "whole", **options))
    run_killed_at(monkeypatch, 3, lambda: main(flags(shade_data, cache, tmp_path / "broken", **options)))
    main(flags(shade_data, cache, tmp_path / "broken", resume="latest", **options))
    whole, broken = (safetensors.torch.load_file(tmp_path / d / "final" / "learned_embeds.safetensors")
                     for d in ("whole", "broken"))  # fmt: skip
    assert torch.equal(whole[WORD], broken[WORD])


@pytest.mark.parametrize(
    "setting, words",
    [
        (dict(lora="true"), "textual_inversion_token with lora: it trains the new word alone"),
        (dict(textual_inversion_token="a b"), "one word without spaces"),
        (dict(textual_inversion_token="red"), "the tokenizer knows 'red</w>' already|knows 'red' already"),
        (dict(shuffle_caption="true"), "captions tokenized as they are drawn are not spelt out"),
    ],
)
def test_settings_textual_inversion_cannot_take_fail_before_training(
    shade_data, base, tmp_path, setting, words
):
    with pytest.raises(ValueError, match=words):
        main(
            flags(
                shade_data, tmp_path / "cache", tmp_path / "run", pretrained=base, **dict(OPTIONS, **setting)
            )
        )
    assert not (tmp_path / "cache").exists()


def test_an_sdxl_word_is_trained_in_both_encoders_and_saved_as_the_clip_l_clip_g_pair(
    shade_data, cache, tmp_path
):
    from accelerate.state import AcceleratorState

    from pipelines import TextToImageXLPipeline
    from sdlite.models_xl import build_components_xl

    base = tmp_path / "base"
    build_components_xl("tiny-sdxl", seed=0).save_pretrained(base)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with trainers_kept() as runs:
            main(flags(shade_data, cache, tmp_path / "run", pretrained=base, **OPTIONS))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    run, file = runs[0], tmp_path / "run" / "final" / "shade.safetensors"
    vectors = safetensors.torch.load_file(file)
    assert set(vectors) == {"clip_l", "clip_g"} and all(v.shape[0] == 2 for v in vectors.values())
    pipe = TextToImageXLPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.load_textual_inversion(str(file), token=WORD)
    spelt = f"a {WORD} {WORD}_1 circle"
    pairs = [(pipe.tokenizer, pipe.text_encoder, run.parts.text_encoder),
             (pipe.tokenizer_2, pipe.text_encoder_2, run.parts.text_encoder_2)]  # fmt: skip
    for tokenizer, ours, trained in pairs:
        ids = tokenizer(spelt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            assert torch.allclose(ours(ids)[0], trained(ids)[0], atol=1e-5)
        assert (
            trained.get_input_embeddings().vectors - ours.get_input_embeddings().weight[-2:]
        ).abs().max() < 1e-6
