"""Sample images from a prompts file (training/sample_prompts.py): sd-scripts' format read line by line,
a bad file refused at start-up naming the file and the line, and each prompt's image written and logged."""

import pytest
from PIL import Image

from sdlite.data.shapes import write_dataset
from training import validation
from training.config import from_dict
from training.config.unet import TrainConfig
from training.sample_prompts import (
    PromptFileError,
    SamplePrompt,
    parse_line,
    read_prompts_file,
    run_prompts,
    sample_batches,
    save_samples,
)
from training.train import main


def test_a_line_reads_the_prompt_and_sd_scripts_options():
    line = "a red circle, on white --n blurry, dark --s 30 --l 4.5 --d 7 --w 64 --h 32"
    assert parse_line(line) == SamplePrompt(
        "a red circle, on white", negative_prompt="blurry, dark", steps=30, guidance=4.5, seed=7, width=64,
        height=32,
    )  # fmt: skip
    assert parse_line("  a blue square  ") == SamplePrompt("a blue square")
    assert parse_line("a blue--green square --L 2") == SamplePrompt("a blue--green square", guidance=2.0)
    assert parse_line("--n\tblurry\t--s 4") == SamplePrompt("", negative_prompt="blurry", steps=4)


def test_blank_lines_and_comments_are_skipped_and_the_order_kept(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my samples\n\na red circle --d 3\n   # indented comment\na blue square\n\n")
    assert read_prompts_file(path) == [SamplePrompt("a red circle", seed=3), SamplePrompt("a blue square")]
    assert run_prompts(["a cat"], str(path))[0] == SamplePrompt("a cat")  # the list's prompts come first


@pytest.mark.parametrize(
    "text, words",
    [
        ("# only a comment\n\n", "holds no prompt"),
        ("a circle\na square --x 3\n", r"line 2: unknown option --x; a line takes --n \(negative_prompt\)"),
        ("a circle --ss euler_a\n", "line 1: --ss is sd-scripts' option for the sampler"),
        ("a circle --s ten\n", "line 1: --s 'ten' is not a whole number of sampling steps from 1 to 1000"),
        ("a circle --s 0\n", "line 1: --s '0' is not a whole number"),
        ("a circle --l -1\n", "line 1: --l '-1' is not a guidance scale >= 0"),
        ("a circle --l nan\n", "line 1: --l 'nan' is not a guidance scale"),
        ("\n\na circle --w 30\n", "line 3: --w '30' is not a width in pixels, a multiple of 8"),
        ("a circle --d 1.5\n", "line 1: --d '1.5' is not a whole number >= 0"),
        ("a circle --n\n", "line 1: --n has no value"),
        ("a circle --s 2 --s 3\n", "line 1: --s is given twice"),
    ],
)
def test_a_bad_prompts_file_is_refused_naming_the_file_and_line(tmp_path, text, words):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=words) as error:
        read_prompts_file(path)
    assert str(path) in str(error.value)


def test_a_missing_or_non_text_prompts_file_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts_file(tmp_path / "nothing.txt")
    (tmp_path / "prompts.toml").write_text("[[prompt]]\n")
    with pytest.raises(PromptFileError, match="text format only"):
        read_prompts_file(tmp_path / "prompts.toml")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompts_file(tmp_path / "latin1.txt")


def test_a_bad_prompts_file_fails_the_run_before_anything_is_written(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a circle\na square --s many\n")
    assert any(
        "line 2" in p for p in from_dict(TrainConfig, {"validation_prompts_file": str(path)}).problems()
    )
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"prompts.txt', line 2: --s 'many'"):
        main(
            ["--validation_prompts_file", str(path), "--output_dir", str(out), "--train_data_dir", "nowhere"]
        )
    assert not out.exists()


def test_prompts_sharing_their_settings_sample_as_one_call_with_their_own_seeds():
    prompts = [SamplePrompt("a"), SamplePrompt("b", steps=9), SamplePrompt("c", negative_prompt="x"),
               SamplePrompt("d", seed=42, guidance=7.5), SamplePrompt("e", width=64)]  # fmt: skip
    calls = sample_batches(prompts, seed=10, steps=5, guidance=7.5)
    assert [places for places, _ in calls] == [[0, 2, 3], [1], [4]]  # d's --l 7.5 is the run's guidance
    first = calls[0][1]
    assert first["prompt"] == ["a", "c", "d"] and first["negative_prompt"] == ["", "x", ""]
    assert first["seeds"] == [10, 12, 42] and first["num_inference_steps"] == 5
    assert calls[1][1]["num_inference_steps"] == 9 and calls[2][1]["width"] == 64
    assert calls[2][1]["height"] is None and calls[2][1]["seeds"] == [14]


def test_each_prompts_image_is_saved_beside_a_grid_of_all(tmp_path):
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (64, 32), (0, 0, 255))]
    sheet = save_samples(images, tmp_path, step=7)
    assert sorted(p.name for p in (tmp_path / "step-7").iterdir()) == ["00.png", "01.png"]
    assert Image.open(tmp_path / "step-7" / "01.png").size == (64, 32)
    assert sheet.size == (128, 32) and Image.open(tmp_path / "step-7.png").size == (128, 32)
    assert sheet.getpixel((8, 16)) == (255, 255, 255)  # the small image centred in its cell, on white
    assert sheet.getpixel((32, 16)) == (255, 0, 0) and sheet.getpixel((100, 16)) == (0, 0, 255)


def test_a_run_samples_the_file_prompts_into_pngs_and_the_logs(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "shapes", count=4, seed=0)
    path = tmp_path / "prompts.txt"
    path.write_text("# samples\na red circle --d 5\na wide blue square --w 64 --h 32 --s 3 --n a circle\n")
    logged = []
    monkeypatch.setattr(validation, "log_image", lambda acc, tag, image, step: logged.append((tag, step)))
    out = tmp_path / "run"
    argv = dict(train_data_dir=data, output_dir=out, cache_dir=tmp_path / "cache", max_steps=1,
                train_batch_size=2, checkpoint_every=0, report_to="none", validation_prompts="a green square",
                validation_prompts_file=path, validation_inference_steps=2, ema_decay="none")  # fmt: skip
    main([text for key, value in argv.items() for text in (f"--{key}", str(value))])
    folder = out / "validation"
    sizes = [Image.open(folder / "step-1" / f"{i:02d}.png").size for i in range(3)]
    assert sizes == [(32, 32), (32, 32), (64, 32)]  # the list's prompt, then the file's two
    assert Image.open(folder / "step-1.png").size == (3 * 64, 32)
    assert logged == [("validation", 1), ("validation/00", 1), ("validation/01", 1), ("validation/02", 1)]


def test_the_help_texts_example_line_reads_as_it_says():
    from training.config import field_docs

    doc = field_docs(TrainConfig)["validation_prompts_file"][1]
    example = doc.split('"')[1]
    assert parse_line(example) == SamplePrompt("a red circle", "blurry", 30, 4.5, 7, 64, 32)
