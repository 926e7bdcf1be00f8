"""`gsopt transcribe` end to end on a tiny checkpoint saved with its own tokenizer (CPU).

The checkpoint folder holds what a Hub snapshot holds: config.json, weights, a LoRA adapter,
and a tokenizer with a chat template. The tokenizer here is a word-level one built in the
test, unlike gsopt's synthetic byte-level one, so prompt handling is checked against a
tokenizer gsopt did not make.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import AUDIO_TOKEN_ID, add_lora, reference_model, save_checkpoint
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gsopt import cli
from gsopt.audio.files import SAMPLE_AUDIO, load_audio
from gsopt.audio.frontend import LogMelFrontend
from gsopt.errors import GsoptError
from gsopt.model.config import VARIANTS
from gsopt.model.family import get_variant
from gsopt.model.tokenizer import (
    AUDIO_TOKEN,
    PINNED_SYSTEM_TURN,
    prompt_ids,
    prompt_text,
    synthetic_tokenizer,
)
from gsopt.runtime import DEFAULT_RECIPE
from gsopt.transcription.transcriber import transcribe

EOS_ID = 0
# A token that some test clips emit early and others never: given a scaled copy of its output
# row, end-of-text wins wherever it would, so those rows stop early and the rest run on.
EOS_LOOKALIKE = 130
MAX_NEW_TOKENS = 16
JSON_FIELDS = {"recipe", "path", "text", "audio_seconds", "prompt_tokens", "new_tokens", "batch"}
GRANITE_TEMPLATE = (
    "{%- for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}"
    "<|end_of_text|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)
WORDS = "can you transcribe the speech into a written format ? translate to french".split()
# (rate, channels, seconds): every rate the brief names, mono and stereo, uneven lengths.
CLIPS = [
    (8000, 1, 1.3),
    (16000, 2, 0.9),
    (44100, 1, 2.1),
    (48000, 2, 1.6),
    (16000, 1, 1.1),
    (44100, 2, 0.7),
]


def word_level_tokenizer(chat_template: str | None = GRANITE_TEMPLATE) -> PreTrainedTokenizerFast:
    """Words and role markers, filler words up to the tiny vocabulary, `<|audio|>` at 319."""
    specials = {
        EOS_ID: "<|end_of_text|>",
        1: "<|unk|>",
        2: "<|start_of_role|>",
        3: "<|end_of_role|>",
        AUDIO_TOKEN_ID: AUDIO_TOKEN,
    }
    words = WORDS + ["user", "assistant", "system"]
    free = [i for i in range(AUDIO_TOKEN_ID + 1) if i not in specials]
    words += [f"w{i}" for i in range(len(free) - len(words))]
    vocab = {word: token_id for word, token_id in zip(words, free, strict=True)}
    vocab |= {token: token_id for token_id, token in specials.items()}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|end_of_text|>", unk_token="<|unk|>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def audible_reference(seed: int):
    """helpers' reference with projector and decoder Linears at unit gain (std fan_in^-0.5).

    At the helpers' small init the Q-Former output hardly depends on the encoder and the
    decoder hardly attends to the audio, so every clip would give the same text and a batching
    mistake could not show.
    """
    ref = reference_model(seed=seed)
    with torch.no_grad():
        for part in (ref.model.projector, ref.model.language_model):
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0, module.in_features**-0.5)
    return ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers reference with its LoRA, folder with weights + adapter + tokenizer)."""
    ref = audible_reference(seed=11)
    with torch.no_grad():  # rows of one batch must stop at different steps
        ref.lm_head.weight[EOS_ID] = 1.05 * ref.lm_head.weight[EOS_LOOKALIKE]
    lora = add_lora(ref, seed=12)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("tiny-with-tokenizer"), lora=lora)
    word_level_tokenizer().save_pretrained(folder)
    return ref, folder


def speechlike(num_samples: int, rate: int, seed: int) -> np.ndarray:
    """A decaying harmonic tone over noise: structure for the encoder, not silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / rate
    tone = sum(np.sin(2 * np.pi * (150 + 20 * seed) * k * t) / k for k in range(1, 8))
    return (0.3 * np.exp(-2 * t) * tone + 0.02 * rng.standard_normal(num_samples)).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def wav_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("wavs")
    paths = []
    for seed, (rate, channels, seconds) in enumerate(CLIPS):
        num_samples = round(rate * seconds)
        data = np.stack([speechlike(num_samples, rate, seed + c) for c in range(channels)], 1)
        path = folder / f"clip{seed}_{rate}hz_{channels}ch.wav"
        soundfile.write(path, data, rate)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def transcribe_command_only(monkeypatch):
    """The real dispatcher with only this command registered: another command's module that
    fails to import is its own tests' failure, not this file's."""
    monkeypatch.setattr(cli, "COMMANDS", {"transcribe": cli.COMMANDS["transcribe"]})


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["transcribe", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_transcribes_every_rate_and_layout_batched_as_alone(checkpoint, wav_files, capsys):
    _, folder = checkpoint
    common = ["--model", folder, "--max-new-tokens", MAX_NEW_TOKENS, "--quiet"]
    code, alone, err = run_cli(capsys, *wav_files, *common, "--batch-size", 1)
    assert code == 0 and err == ""
    lines = alone.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(p) for p in wav_files]
    texts = [line.split(": ", 1)[1] for line in lines]
    assert all(texts) and len(set(texts)) > 1, "clips must give distinct, non-empty text"
    assert len({len(text.split()) for text in texts}) > 1, "rows must stop at different steps"
    # 6 files in batches of 4: one full padded batch and one of 2, still in input order.
    code, batched, _ = run_cli(capsys, *wav_files, *common, "--batch-size", 4)
    assert code == 0 and batched == alone


def test_greedy_text_matches_transformers_generate(checkpoint, wav_files):
    ref, folder = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    chat = [
        {"role": "user", "content": "<|audio|>can you transcribe the speech into a written format?"}
    ]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    results = transcribe(wav_files, model=folder, max_new_tokens=24, batch_size=3)
    distinct_tokens = set()
    for path, result in zip(wav_files, results, strict=True):
        # transformers' processor: repeat the placeholder once per audio token, then tokenise.
        wave = load_audio(path)
        features, _ = LogMelFrontend()(wave[None])
        expanded = prompt.replace(AUDIO_TOKEN, AUDIO_TOKEN * ref_audio_tokens(len(wave)))
        ids = torch.tensor([tokenizer(expanded)["input_ids"]])
        with torch.no_grad():
            out = ref.generate(
                input_ids=ids, input_features=features, max_new_tokens=24, do_sample=False
            )[0, ids.shape[1] :].tolist()
        expected = out[: out.index(EOS_ID)] if EOS_ID in out else out
        assert result.tokens == expected
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert result.prompt_tokens == ids.shape[1]
        distinct_tokens |= set(expected)
    assert len(distinct_tokens) > 5, "degenerate reference: the test would prove little"
    assert {len(r.tokens) < 24 for r in results} == {True, False}, "want early and full rows"


def ref_audio_tokens(num_samples: int) -> int:
    """transformers' `_get_num_audio_features` for window 15, downsample 5."""
    return -(-((num_samples // 160 + 1) // 2) // 15) * 3


def test_json_lists_each_file_with_counts_timings_and_rtfx(checkpoint, wav_files, capsys):
    _, folder = checkpoint
    args = [*wav_files[:3], "--model", folder, "--max-new-tokens", MAX_NEW_TOKENS]
    code, out, _ = run_cli(capsys, *args, "--quiet", "--batch-size", 2, "--json")
    assert code == 0
    records = json.loads(out)
    _, plain, _ = run_cli(capsys, *args, "--quiet")
    assert [f"{r['path']}: {r['text']}" for r in records] == plain.splitlines()
    for i, record in enumerate(records):
        assert record["path"] == str(wav_files[i])
        assert 0 < record["new_tokens"] <= MAX_NEW_TOKENS
        assert set(record) == JSON_FIELDS
        assert record["audio_seconds"] == pytest.approx(CLIPS[i][2], abs=1e-3)
        batch = record["batch"]
        assert batch["index"] == i // 2 and batch["size"] == (2 if i < 2 else 1)
        assert set(batch["stages"]) == {"frontend", "encoder", "projector", "prefill", "decode"}
        assert all(seconds > 0 for seconds in batch["stages"].values())
        assert batch["seconds"] >= sum(batch["stages"].values())
        assert batch["rtfx"] == pytest.approx(batch["audio_seconds"] / batch["seconds"])
        assert batch["decode_steps"] >= 1
    assert records[0]["batch"]["audio_seconds"] == pytest.approx(CLIPS[0][2] + CLIPS[1][2], 1e-3)


def test_prompt_option_changes_the_prompt(checkpoint, wav_files):
    _, folder = checkpoint
    default, translated = (
        transcribe(wav_files[:1], model=folder, max_new_tokens=4, prompt=prompt)[0]
        for prompt in (None, "translate the speech to french")
    )
    assert translated.prompt_tokens == default.prompt_tokens - 5  # 10 words, then 5


def test_no_file_uses_the_bundled_sample_and_variants_say_they_are_random(capsys):
    code, out, err = run_cli(capsys, "--model", "tiny", "--max-new-tokens", 4, "--quiet")
    assert code == 0
    assert out.startswith(f"{SAMPLE_AUDIO}: ") and len(out.splitlines()) == 1
    assert "random weights" in err


def test_the_default_recipe_has_a_name_and_the_output_says_it(capsys):
    code, out, err = run_cli(capsys, "--model", "tiny", "--max-new-tokens", 2, "--json")
    assert code == 0 and json.loads(out)[0]["recipe"] == DEFAULT_RECIPE == "static-kv"
    assert f"recipe {DEFAULT_RECIPE} (the default)" in err
    code, out, err = run_cli(capsys, "--model", "tiny", "--max-new-tokens", 2, "--recipe", "eager")
    assert code == 0 and "recipe eager\n" in err


def test_prompt_text_formats():
    plain = prompt_text(word_level_tokenizer())
    assert plain == (
        "<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech into a "
        "written format?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    )
    no_template = prompt_text(word_level_tokenizer(None), "translate the speech to French")
    assert no_template == "USER: <|audio|>translate the speech to French\n ASSISTANT:"
    dated = word_level_tokenizer("{{ strftime_now('%B %d, %Y') }}" + GRANITE_TEMPLATE)
    assert prompt_text(dated).count(PINNED_SYSTEM_TURN) == 1
    with pytest.raises(GsoptError, match="2 <\\|audio\\|> placeholders"):
        prompt_text(word_level_tokenizer(), AUDIO_TOKEN + "a" + AUDIO_TOKEN)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_synthetic_tokenizer_fits_the_variant(variant):
    config = get_variant(variant)
    tokenizer = synthetic_tokenizer(config)
    assert len(tokenizer) == config.decoder.src_vocab_size
    assert tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == config.audio_token_id
    assert tokenizer.eos_token_id == config.eos_token_id
    ids = prompt_ids(tokenizer, config.audio_token_id)
    assert ids.count(config.audio_token_id) == 1
    # Decoding shows each byte's printable stand-in: the newline comes back as "Ċ".
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "USER: can you transcribe the speech into a written format?\n ASSISTANT:".replace("\n", "Ċ")
    )
    every_id = tokenizer.decode(list(range(config.decoder.src_vocab_size)))
    assert every_id.isprintable()


def one_line_error(capsys, *args: str) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    not_audio = folder / "notes.wav"
    not_audio.write_text("these are not samples\n")
    empty = folder / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000)
    long_clip = folder / "forty_seconds.wav"
    soundfile.write(long_clip, speechlike(16000 * 40, 16000, 0), 16000)
    missing = folder / "nowhere.wav"
    return {"missing": missing, "not_audio": not_audio, "empty": empty, "long": long_clip}


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("missing", r"nowhere\.wav: no such audio file"),
        ("not_audio", r"notes\.wav: not a readable audio file"),
        ("empty", r"empty\.wav: the audio clip is empty"),
        (
            "long",
            r"--chunk-length 30: 30\.0 s of audio is longer than this model allows "
            r"\(\d+\.\d s: 512 positions",
        ),
    ],
)
def test_bad_audio_is_one_line_naming_the_file(
    checkpoint, wav_files, tmp_path, capsys, case, pattern
):
    _, folder = checkpoint
    bad = write_bad_inputs(tmp_path)[case]
    err = one_line_error(capsys, wav_files[0], bad, "--model", folder)
    assert re.search(pattern, err), err


def test_long_clip_limit_is_exact(checkpoint, capsys, tmp_path):
    """A model with few positions (512): a clip longer than --chunk-length is windowed, and
    the window limit the message states is the longest window that fits: it runs."""
    _, folder = checkpoint
    long_clip = write_bad_inputs(tmp_path)["long"]
    err = one_line_error(capsys, long_clip, "--model", folder)
    assert "--chunk-length 30: 30.0 s of audio is longer than this model allows" in err
    limit = float(re.search(r"allows \((\d+\.\d) s", err).group(1))
    argv = [long_clip, "--model", folder, "--quiet"]
    code, out, _ = run_cli(capsys, *argv, "--chunk-length", limit - 0.05)
    assert code == 0 and out.startswith(str(long_clip))


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--device", "tpu"], r"unknown device 'tpu'"),
        (["--dtype", "int8"], r"unknown dtype 'int8'"),
        (["--recipe", "warp-speed"], r"unknown recipe 'warp-speed'"),
        (["--batch-size", "0"], r"--batch-size must be at least 1"),
    ],
)
def test_bad_settings_are_one_line(checkpoint, wav_files, capsys, args, pattern):
    _, folder = checkpoint
    assert re.search(pattern, one_line_error(capsys, wav_files[0], "--model", folder, *args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(checkpoint, wav_files, capsys):
    _, folder = checkpoint
    err = one_line_error(capsys, wav_files[0], "--model", folder, "--device", "cuda")
    assert "device 'cuda'" in err and "no CUDA device" in err


def test_checkpoint_without_tokenizer_is_one_line(tmp_path, wav_files, capsys):
    folder = save_checkpoint(reference_model(seed=13), tmp_path / "no-tokenizer")
    capsys.readouterr()  # transformers' save progress bar
    err = one_line_error(capsys, wav_files[0], "--model", folder)
    assert f"{folder}: no tokenizer" in err
