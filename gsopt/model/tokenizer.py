"""Tokenizers and prompts: a checkpoint's own tokenizer, or a synthetic one for named variants.

A checkpoint folder carries its tokenizer and chat template; they are loaded with
transformers' `AutoTokenizer` from local files only. Named variants have random weights and no
tokenizer, so gsopt builds a byte-level one that fits the variant: every id the model can emit
decodes to something, `<|audio|>` sits at `audio_token_id` and `<|end_of_text|>` at
`eos_token_id`. Its text is gibberish, as random weights make it; it exists so that demos and
benchmarks run the same code path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gsopt.errors import GsoptError
from gsopt.model.config import GraniteSpeechConfig, GraniteSpeechCTCConfig
from gsopt.model.family import family_of, is_variant

AUDIO_TOKEN = "<|audio|>"
END_OF_TEXT = "<|end_of_text|>"
TRANSCRIBE_INSTRUCTION = "can you transcribe the speech into a written format?"
# Granite 3.x chat templates stamp today's date into a default system turn, which would make
# the prompt (and so the transcript) change from day to day. The model cards pass this fixed
# system turn instead; gsopt does the same whenever a template reads the clock.
PINNED_SYSTEM_TURN = (
    "Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
    "You are Granite, developed by IBM. You are a helpful AI assistant"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(source: str | Path, config: GraniteSpeechConfig) -> PreTrainedTokenizerBase:
    """The checkpoint folder's tokenizer, or a synthetic one when `source` names a variant."""
    prompted = family_of(config).decoder
    if is_variant(source):
        return synthetic_tokenizer(config) if prompted else synthetic_ctc_tokenizer(config)
    folder = Path(source)
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise GsoptError(
            f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files from the model's snapshot into the folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GsoptError(f"{folder}: the tokenizer does not load ({first_line})") from None
    if not prompted:  # CTC labels are the tokenizer's ids; no prompt, no audio placeholder
        return tokenizer
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if audio_id != config.audio_token_id:
        raise GsoptError(
            f"{folder}: the tokenizer maps {AUDIO_TOKEN} to {audio_id}, but config.json says "
            f"audio_token_id {config.audio_token_id}"
        )
    return tokenizer


def _filler_word(index: int) -> str:
    """a, b, ..., z, aa, ab, ...: distinct word pieces for ids past the 256 bytes."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def synthetic_tokenizer(config: GraniteSpeechConfig) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer covering exactly the variant's vocabulary.

    The 256 bytes take the lowest ids not used by the two special tokens, so any text encodes;
    every other id is a space-prefixed filler word, so random weights still print words.
    Decoding keeps each byte's printable stand-in (only the space becomes a space): random ids
    must not put control characters or broken UTF-8 on a terminal.
    """
    vocab_size = config.decoder.src_vocab_size
    specials = {config.eos_token_id: END_OF_TEXT, config.audio_token_id: AUDIO_TOKEN}
    if vocab_size < 256 + len(specials) or max(specials) >= vocab_size:
        raise GsoptError(
            f"a synthetic byte-level tokenizer needs 256 ids besides {AUDIO_TOKEN} and "
            f"{END_OF_TEXT} within the vocabulary of {vocab_size}"
        )
    free_ids = [i for i in range(vocab_size) if i not in specials]
    byte_chars = bytes_to_unicode()  # byte -> the printable stand-in byte-level BPE uses
    space = byte_chars[ord(" ")]
    vocab = {byte_chars[byte]: free_ids[byte] for byte in range(256)}
    vocab |= {space + _filler_word(n): token_id for n, token_id in enumerate(free_ids[256:])}
    vocab |= {token: token_id for token_id, token in specials.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.Replace(space, " ")
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials.values()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT)


def synthetic_ctc_tokenizer(config: GraniteSpeechCTCConfig) -> PreTrainedTokenizerFast:
    """A word-level stand-in for a CTC variant's BPE units: the blank, then one filler word
    per label (random weights print words, not bytes)."""
    space = bytes_to_unicode()[ord(" ")]
    blank = "<blank>"
    vocab = {blank: config.blank_id}
    labels = [i for i in range(config.vocab_size) if i != config.blank_id]
    vocab |= {space + _filler_word(n): label for n, label in enumerate(labels)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.Replace(space, " ")
    backend.add_special_tokens([AddedToken(blank, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def prompt_text(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str | None = None,
    prefix_text: str | None = None,
) -> str:
    """The prompt for one clip, with a single `<|audio|>` placeholder.

    `instruction` defaults to the transcription request; `<|audio|>` is put in front when the
    instruction lacks it. With a chat template the instruction is the user turn (plus the
    pinned system turn for templates that read the clock); without one, the 4.0-1b format.
    `prefix_text` goes to a chat template that takes it (Granite Speech 4.1 Plus's), as the
    start of the answer.
    """
    content = instruction if instruction is not None else TRANSCRIBE_INSTRUCTION
    placeholders = content.count(AUDIO_TOKEN)
    if placeholders > 1:
        raise GsoptError(
            f"the prompt holds {placeholders} {AUDIO_TOKEN} placeholders; one clip fills one"
        )
    if placeholders == 0:
        content = AUDIO_TOKEN + content
    if prefix_text is not None and "prefix_text" not in (tokenizer.chat_template or ""):
        raise GsoptError(
            "--prefix-text: this model's chat template takes no prefix text (Granite Speech "
            "4.1 Plus's does)"
        )
    if not tokenizer.chat_template:
        return f"USER: {content}\n ASSISTANT:"
    messages = [{"role": "user", "content": content}]
    if "strftime_now" in tokenizer.chat_template:
        messages.insert(0, {"role": "system", "content": PINNED_SYSTEM_TURN})
    extra = {"prefix_text": prefix_text} if prefix_text is not None else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **extra
    )


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    audio_token_id: int,
    instruction: str | None = None,
    prefix_text: str | None = None,
) -> list[int]:
    """Token ids of `prompt_text`, tokenised as transformers' GraniteSpeechProcessor does."""
    ids = tokenizer(prompt_text(tokenizer, instruction, prefix_text))["input_ids"]
    if ids.count(audio_token_id) != 1:
        raise GsoptError(
            f"the prompt tokenises to {ids.count(audio_token_id)} audio tokens (id "
            f"{audio_token_id}); the tokenizer must keep {AUDIO_TOKEN} as one special token"
        )
    return ids


def decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """Generated ids to text, special tokens dropped, outer whitespace trimmed."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def prompt_template(config, source: str | Path | None = None) -> list[int]:
    """The default transcription prompt's ids (one audio placeholder): through the checkpoint's
    own tokenizer and chat template when `source` is a folder that has one, else through
    gsopt's synthetic tokenizer, so timings see a prompt of realistic length."""
    tokenizer = synthetic_tokenizer(config)
    if source is not None and any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        tokenizer = load_tokenizer(source, config)
    return prompt_ids(tokenizer, config.audio_token_id)
