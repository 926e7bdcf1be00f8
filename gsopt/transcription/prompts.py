"""What the model is asked: transcription or translation, the language, keywords to favour,
and Granite Speech 4.1 Plus's modes, in the model cards' prompt forms.

Without any of these the prompt is gsopt's default request (the 3.3 card's
`can you transcribe the speech into a written format?`), so a plain run asks what it always
asked. Keyword biasing appends `Keywords: a, b` to the instruction, as IBM's library does.
"""

from __future__ import annotations

from dataclasses import dataclass

from gsopt.errors import GsoptError

TASKS = ("transcribe", "translate")
PROMPT_MODES = ("default", "speaker_attributed", "word_timestamps")
LANGUAGES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "it": "Italian",
    "ja": "Japanese",
    "zh": "Chinese",
}
PLUS_SPEAKERS = (
    "Speaker attribution: Transcribe and denote who is speaking by adding [Speaker 1]: and "
    "[Speaker 2]: tags before speaker turns."
)
PLUS_TIMESTAMPS = (
    "Timestamps: Transcribe the speech. After each word, add a timestamp tag showing the end "
    "time in centiseconds, e.g. hello [T:45] world [T:82]"
)
PUNCTUATED = "with proper punctuation and capitalization."


def language_code(name: str | None, flag: str) -> str | None:
    """A language code from a code or an English name (`fr`, `French`), or None."""
    if name is None:
        return None
    key = name.strip().lower()
    by_name = {label.lower(): code for code, label in LANGUAGES.items()}
    code = key if key in LANGUAGES else by_name.get(key)
    if code is None:
        choices = ", ".join(f"{c} ({label})" for c, label in LANGUAGES.items())
        raise GsoptError(f"{flag} {name!r}: unknown language; choose one of {choices}")
    return code


@dataclass(frozen=True)
class Ask:
    """One request's settings; `instruction` renders them."""

    task: str = "transcribe"
    language: str | None = None
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    prompt_mode: str = "default"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise GsoptError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.prompt_mode not in PROMPT_MODES:
            raise GsoptError(
                f"--prompt-mode {self.prompt_mode!r}: choose one of {', '.join(PROMPT_MODES)}"
            )
        if self.task == "translate" and self.target_language is None:
            raise GsoptError("--task translate needs --target-language (e.g. fr)")
        if self.task == "transcribe" and self.target_language is not None:
            raise GsoptError("--target-language applies to --task translate")
        if any(not k.strip() for k in self.keywords):
            raise GsoptError("--keyword: an empty keyword; give words")

    @property
    def asks_anything(self) -> bool:
        return self != Ask()

    def instruction(self, plus: bool) -> str | None:
        """The user turn's text (None: gsopt's default request). `plus`: the model is
        Granite Speech 4.1 Plus, whose modes and phrasing differ."""
        if self.prompt_mode != "default" and not plus:
            raise GsoptError(
                f"--prompt-mode {self.prompt_mode}: only Granite Speech 4.1 Plus has modes "
                "(model_type granite_speech_plus)"
            )
        if not self.asks_anything:
            return None
        language = LANGUAGES.get(self.language or "")
        if self.task == "translate":
            text = f"translate the speech to {LANGUAGES[self.target_language]}"
            text += "." if self.keywords else f" {PUNCTUATED}"
        elif self.prompt_mode == "speaker_attributed":
            text = PLUS_SPEAKERS
        elif self.prompt_mode == "word_timestamps":
            text = PLUS_TIMESTAMPS
        elif plus:
            spoken = f"{language} speech" if language else "speech"
            text = f"can you transcribe the {spoken} into a written format?"
        elif self.keywords:
            text = "transcribe the speech to text."
        else:
            spoken = f"the {language} speech" if language else "the speech"
            text = f"transcribe {spoken} {PUNCTUATED}"
        if self.keywords:
            words = ", ".join(" ".join(k.split()) for k in self.keywords)
            text = f"{text.rstrip()} Keywords: {words}"
        return text
