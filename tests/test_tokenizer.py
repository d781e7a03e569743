"""The offline CLIP tokenizer gives CLIP's own token ids, with no hub."""

from sdlite.tokenizer import VOCAB_SIZE, clip_tokenizer, load_tokenizer


def test_ids_match_openai_clip():
    # Ids of openai/clip-vit-large-patch14 for this prompt (BOS 49406, EOS 49407).
    ids = clip_tokenizer()("A photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_vocabulary_is_clips():
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407


def test_pads_and_truncates_to_model_max_length():
    tok = clip_tokenizer(model_max_length=8)
    long = tok("a " * 40, padding="max_length", truncation=True, max_length=tok.model_max_length)
    short = tok("a red circle", padding="max_length", truncation=True, max_length=tok.model_max_length)
    assert len(long.input_ids) == len(short.input_ids) == 8
    assert long.input_ids[-1] == 49407  # truncation keeps the end-of-text token
    assert short.input_ids[:5] == [49406, 320, 736, 7117, 49407]


def test_folder_tokenizer_wins_over_the_built_in_one(tmp_path):
    clip_tokenizer(model_max_length=12).save_pretrained(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path)
    assert tok.model_max_length == 12
    assert tok("a red circle").input_ids == clip_tokenizer()("a red circle").input_ids
    assert load_tokenizer(tmp_path / "nothing-here", model_max_length=20).model_max_length == 20
