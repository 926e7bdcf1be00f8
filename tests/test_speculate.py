"""Speculative decoding on tiny models: exact mode equals plain greedy for every kind of
draft and batch, draft models, the CTC drafts against the reference computation on
transformers' encoder, IBM's relaxed decisions, and one-line refusals of bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from family_helpers import save_out_llm
from helpers import AUDIO_TOKEN_ID, hf_config, reference_model, save_checkpoint
from transformers.convert_slow_tokenizer import bytes_to_unicode

import gsopt
from gsopt.audio.files import sample_audio
from gsopt.cli import main
from gsopt.engine import drafts as ctc_drafts
from gsopt.engine.generate import generate, truncate_at_eos
from gsopt.engine.generate import prefill as engine_prefill
from gsopt.engine.pipeline import Pipeline
from gsopt.engine.speculate import SpeculationStats, Steps, relaxed_decision, speculative_generate
from gsopt.model.encoder import encoder_frame_mask
from gsopt.model.tokenizer import prompt_template, synthetic_tokenizer
from gsopt.recipe import build_pipeline, load_recipe
from gsopt.recipe.settings import StageRecipe

N = 24
CTC_LABELS = 128  # a grapheme head over ASCII, so chr(label) is readable text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = reference_model(hf_config(encoder=dict(output_dim=CTC_LABELS)), seed=4)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("spec"))
    head = save_out_llm(folder, 320, 32, seed=5)
    return ref, head, folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return gsopt.load_model(checkpoint[2], lora="none")


def prompts(rows: int) -> list[torch.Tensor]:
    return [torch.tensor([5, 6, *[AUDIO_TOKEN_ID] * (6 + 3 * r), 7, 8]) for r in range(rows)]


def audio(model, rows: int) -> torch.Tensor:
    torch.manual_seed(3)
    return model.embed_audio(torch.randn(rows, 40, 160))


def drafts_of(kind: str, greedy: list[int], seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)

    def random_token() -> int:  # the whole vocabulary, the audio token id included
        return int(torch.randint(320, (), generator=generator))

    at = 3 + seed % 5
    return {
        "random": [random_token() for _ in greedy],
        "perfect": list(greedy),
        "substitution": greedy[:at] + [(greedy[at] + 1) % 300] + greedy[at + 1 :],
        "insertion": greedy[:at] + [random_token()] + greedy[at:],
        "deletion": greedy[:at] + greedy[at + 1 :],
        "empty": [],
        "too-long": list(greedy) + [random_token() for _ in range(40)],
    }[kind]


KINDS = ["random", "perfect", "substitution", "insertion", "deletion", "empty", "too-long"]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_mode_equals_plain_greedy(model, kind, rows):
    audio_embeds, batch = audio(model, rows), prompts(rows)
    expected = generate(model, batch, audio_embeds, N, stop_at_eos=False)
    assert len(set(expected[0].tolist())) > 4
    drafts = [drafts_of(kind, row, seed) for seed, row in enumerate(expected.tolist())]
    stats = SpeculationStats()
    tokens = speculative_generate(
        model, batch, audio_embeds, N, drafts=drafts, k=4, stop_at_eos=False, stats=stats
    )
    assert torch.equal(tokens, expected)
    if kind == "perfect":
        assert stats.forwards <= 2 and stats.accepted == stats.drafted == (N - 1) * rows
    if kind in ("random", "empty"):
        assert stats.accepted <= 2 * rows  # a random token may match now and then


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` variant on the sample clip cut to three lengths: its greedy output holds
    the audio token id within nine tokens, so a perfect draft holds it too."""
    model = gsopt.load_model("tiny")
    pipeline = Pipeline(model)
    waves = [sample_audio()[:n] for n in (16000, 40000, 6400)]
    audio_embeds = pipeline.embed_audio(waves, pipeline.stages)[0]
    return model, audio_embeds, pipeline.prompts(waves, prompt_template(model.config))


@pytest.mark.parametrize("accuracy", [1.0, 0.7])
def test_drafts_holding_the_audio_id_equal_plain_greedy_batched_and_alone(tiny, accuracy):
    """A draft token equal to the audio id is text (as verify and decode embed it), never an
    audio slot of the prefill."""
    model, audio_embeds, batch = tiny
    expected = generate(model, batch, audio_embeds, N, stop_at_eos=False)
    assert all(AUDIO_TOKEN_ID in row[:9] for row in expected.tolist())
    vocab = model.config.decoder.src_vocab_size
    # The first ten tokens kept (the audio id among them is accepted), the rest corrupted over
    # the whole vocabulary, and one more audio id where greedy has none.
    noisy = ctc_drafts.oracle(expected.tolist(), accuracy, vocab, seed=2)
    drafts = [
        e[:10] + d[10:12] + [AUDIO_TOKEN_ID] + d[12:]
        for e, d in zip(expected.tolist(), noisy, strict=True)
    ]
    tokens = speculative_generate(model, batch, audio_embeds, N, drafts=drafts, k=4)
    assert truncate_at_eos(tokens, 0) == truncate_at_eos(expected, 0)
    for row in range(len(batch)):
        alone = speculative_generate(
            model, batch[row : row + 1], audio_embeds[row : row + 1], N, drafts=[drafts[row]], k=4
        )
        assert truncate_at_eos(alone, 0) == truncate_at_eos(expected[row : row + 1], 0)


def test_a_draft_with_end_of_text_stops_where_greedy_stops(model, checkpoint):
    audio_embeds, batch = audio(model, 3), prompts(3)
    plain = generate(model, batch, audio_embeds, N, stop_at_eos=False)
    eos = int(plain[1, 6])  # make a token that row 1 emits the end of text
    eos_model = gsopt.load_model(checkpoint[2], lora="none")
    eos_model.config = dataclasses.replace(eos_model.config, eos_token_id=eos)
    expected = truncate_at_eos(generate(eos_model, batch, audio_embeds, N), eos)
    drafts = [row[:8] + [eos] + row[8:] for row in plain.tolist()]  # eos where greedy has none
    drafts[1] = plain[1].tolist()  # and the true one
    tokens = speculative_generate(eos_model, batch, audio_embeds, N, drafts=drafts, k=4)
    assert truncate_at_eos(tokens, eos) == expected
    assert any(eos in row for row in expected)


def test_draft_model_with_the_targets_weights_accepts_everything(model, checkpoint):
    audio_embeds, batch = audio(model, 2), prompts(2)
    expected = generate(model, batch, audio_embeds, N, stop_at_eos=False)
    twin = gsopt.load_model(checkpoint[2], lora="none")
    stats = SpeculationStats()
    tokens = speculative_generate(
        model,
        batch,
        audio_embeds,
        N,
        stop_at_eos=False,
        k=5,
        stats=stats,
        draft_model=(twin, Steps(), batch, audio_embeds),
    )
    assert torch.equal(tokens, expected)
    assert stats.drafted > 0 and stats.accepted == stats.drafted


def test_a_smaller_draft_model_gives_the_targets_greedy_tokens(model, tmp_path):
    small = reference_model(
        hf_config(
            encoder=dict(output_dim=CTC_LABELS),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=48,
        ),
        seed=9,
    )
    draft = gsopt.load_model(save_checkpoint(small, tmp_path), lora="none")
    assert draft.config.decoder.emb_dim != model.config.decoder.emb_dim
    audio_embeds, batch = audio(model, 3), prompts(3)
    expected = generate(model, batch, audio_embeds, N, stop_at_eos=False)
    tokens = speculative_generate(
        model,
        batch,
        audio_embeds,
        N,
        stop_at_eos=False,
        k=4,
        draft_model=(draft, Steps(), batch, audio(draft, 3)),
    )
    assert torch.equal(tokens, expected)


def reference_encoder_outputs(ref, features):
    """transformers' encoder on one clip: final hidden state, and the output of the middle
    block before its CTC feedback (captured by a hook, as IBM's BPE script does)."""
    encoder = ref.model.encoder if hasattr(ref, "model") else ref.encoder
    captured = {}
    middle = encoder.layers[len(encoder.layers) // 2 - 1]
    hook = middle.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    try:
        hidden = encoder(features).last_hidden_state
    finally:
        hook.remove()
    return encoder, hidden, captured["mid"]


def collapse_reference(labels: torch.Tensor) -> list[int]:
    unique = torch.unique_consecutive(labels)
    return unique[unique > 0].tolist()


@torch.no_grad()
def test_grapheme_draft_equals_the_reference_computation(checkpoint, model):
    ref = checkpoint[0]
    tokenizer = synthetic_tokenizer(model.config)
    lengths = [37, 9, 22]
    clips = [torch.randn(n, 160) for n in lengths]
    features = torch.stack([F.pad(c, (0, 0, 0, 37 - len(c))) for c in clips])
    mask = encoder_frame_mask(torch.tensor(lengths), 37)
    hidden, posteriors = model.encode(features, mask)
    labels, confidence = ctc_drafts.grapheme_labels(model.encoder, hidden, posteriors, mask)
    drafts = ctc_drafts.grapheme_tokens(labels, torch.tensor(lengths), tokenizer)
    for row, clip in enumerate(clips):
        encoder, ref_hidden, _ = reference_encoder_outputs(ref, clip[None])
        probs = encoder.out(ref_hidden).softmax(-1)[0]
        text = "".join(chr(c) for c in collapse_reference(probs.argmax(-1))).strip()
        entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
        assert text, "an empty reference draft would prove little"
        assert drafts[row] == tokenizer.encode(text, add_special_tokens=False)
        assert confidence[row].item() == pytest.approx(entropy.max().item(), rel=1e-5)


@torch.no_grad()
def test_bpe_draft_equals_the_reference_computation(checkpoint):
    ref, head, folder = checkpoint
    model = gsopt.load_model(folder, lora="none")
    assert model.encoder.out_llm is not None
    lengths = [37, 10, 23]
    clips = [torch.randn(n, 160) for n in lengths]
    features = torch.stack([F.pad(c, (0, 0, 0, 37 - len(c))) for c in clips])
    mask = encoder_frame_mask(torch.tensor(lengths), 37)
    hidden, posteriors = model.encode(features, mask)
    labels, confidence = ctc_drafts.bpe_labels(model.encoder, hidden, posteriors, mask)
    tokenizer = synthetic_tokenizer(model.config)
    drafts = ctc_drafts.bpe_tokens(labels, torch.tensor(lengths), tokenizer)
    for row, clip in enumerate(clips):
        encoder, ref_hidden, mid = reference_encoder_outputs(ref, clip[None])
        importance = 1.0 - encoder.out(mid).softmax(-1)[..., 0]
        pad = -ref_hidden.shape[1] % 4
        pooled_hidden = F.pad(ref_hidden, (0, 0, 0, pad)).view(1, -1, 4, ref_hidden.shape[-1])
        weights = F.pad(importance, (0, pad)).view(1, -1, 4)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-8)
        pooled = (pooled_hidden * weights[..., None]).sum(2)
        probs = head(pooled).softmax(-1)[0]
        pieces = [label - 1 for label in collapse_reference(probs.argmax(-1))]
        text = tokenizer.decode(pieces).strip()  # IBM's round trip: text, stripped, encoded
        entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
        assert text, "an empty reference draft would prove little"
        assert drafts[row] == tokenizer.encode(text, add_special_tokens=False)
        assert confidence[row].item() == pytest.approx(entropy.max().item(), rel=1e-5)


def test_bpe_draft_takes_the_text_round_trip(model):
    """A first piece with a leading space (" ab", one filler word of the synthetic tokenizer)
    is stripped and encoded again: the draft holds the tokenizer's ids for "ab", not the
    label's. A repeated piece stays twice once a blank separates it; digits come back as
    the tokenizer writes them."""
    tokenizer = synthetic_tokenizer(model.config)
    space = bytes_to_unicode()[ord(" ")]
    ab, ba = tokenizer.convert_tokens_to_ids([space + "ab", space + "ba"])
    seven = tokenizer.encode("7", add_special_tokens=False)[0]
    labels = torch.tensor([[0, ab + 1, ab + 1, 0, ab + 1, ba + 1, seven + 1, 0]])
    (draft,) = ctc_drafts.bpe_tokens(labels, torch.tensor([4 * 8]), tokenizer)
    assert draft == tokenizer.encode("ab ab ba7", add_special_tokens=False)
    assert draft[0] != ab and draft != [ab, ab, ba, seven]


def test_thresholds_are_ibms_per_draft_head(tmp_path):
    assert load_recipe("speculative-ctc-relaxed").speculate.kind.name == "ctc"
    for name, draft, pair in [
        ("speculative-ctc-relaxed", "ctc", (0.7, 0.2)),
        ("speculative-ctc-bpe-relaxed", "ctc-bpe", (0.0, 0.4)),
    ]:
        spec = load_recipe(name).speculate
        assert (spec.draft, spec.mode) == (draft, "relaxed")
        assert (spec.ctc_threshold, spec.confidence_threshold) == pair
        path = tmp_path / f"{draft}.toml"  # unset: the head's published pair
        path.write_text(f'kv_cache = "static"\n[speculate]\ndraft = "{draft}"\nmode = "relaxed"\n')
        spec = load_recipe(path).speculate
        assert (spec.ctc_threshold, spec.confidence_threshold) == pair
    path.write_text('kv_cache = "static"\n[speculate]\ndraft = "model"\nmode = "relaxed"\n')
    with pytest.raises(gsopt.GsoptError, match='mode = "relaxed" judges a CTC draft'):
        load_recipe(path)


def test_relaxed_decisions_hand_worked():
    """Vocabulary of 4. Logits log([.7, .2, .09, .01]) give those probabilities exactly."""
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.09, 0.01], [0.1, 0.1, 0.795, 0.005]]))
    # confident CTC: taken without the decoder, whatever the decoder thinks
    assert relaxed_decision(logits, [3, 3], 0.4, 0.5, 0.01) == "accepted"
    # not confident: token 0 (p .7) then token 2 (p .795): both >= .01
    assert relaxed_decision(logits, [0, 2], 0.6, 0.5, 0.01) == "verified"
    # token 3 in the second place has p .005 < .01
    assert relaxed_decision(logits, [0, 3], 0.6, 0.5, 0.01) == "fallback"
    # exactly at the threshold passes (>=), and an empty draft always falls back
    assert relaxed_decision(logits[:1], [3], 0.6, 0.5, 0.01) == "verified"
    assert relaxed_decision(logits[:0], [], 0.0, 0.5, 0.01) == "fallback"


def spying(calls: list) -> Steps:
    """Steps whose prefill records the batch each call computes."""

    def prefill(model, ids, *args):
        calls.append(ids.shape[0])
        return engine_prefill(model, ids, *args)

    return Steps(prefill=prefill)


def test_relaxed_mode_takes_verifies_and_falls_back_per_row(model):
    audio_embeds, batch = audio(model, 4), prompts(4)
    expected = generate(model, batch, audio_embeds, N)
    eos = model.config.eos_token_id
    drafts = [[11, 12, 13], [21, 22], [], [31, 32, 33, 34]]
    stats, prefills = SpeculationStats(), []
    tokens = speculative_generate(
        model,
        batch,
        audio_embeds,
        N,
        drafts=drafts,
        mode="relaxed",
        confidences=[0.2, 0.9, float("inf"), 0.5],
        confidence_threshold=1e-9,
        stats=stats,
        steps=spying(prefills),
    )
    assert (stats.relaxed_accepted, stats.relaxed_verified, stats.relaxed_fallback) == (2, 1, 1)
    assert prefills == [2]  # the confident rows 0 and 3 left before the decoder ran
    assert truncate_at_eos(tokens[:2], eos) == [[11, 12, 13, eos], [21, 22, eos]]
    assert truncate_at_eos(tokens[3:], eos) == [[31, 32, 33, 34, eos]]
    assert torch.equal(tokens[2], expected[2])  # the fallback row is exact greedy
    decisions = [(r.decision, r.drafted, r.accepted, r.forwards) for r in stats.rows]
    fallback_forwards = decisions[2][3]
    assert decisions == [
        ("accepted", 3, 3, 0),
        ("verified", 2, 2, 1),
        ("fallback", 0, 0, fallback_forwards),
        ("accepted", 4, 4, 0),
    ]
    assert fallback_forwards == len(truncate_at_eos(expected[2:3], eos)[0])  # 1 per token
    assert stats.to_json()["rows"][1] == dict(
        decision="verified", drafted=2, accepted=2, forwards=1
    )


def test_a_batch_of_confident_rows_runs_no_decoder_forward(model):
    audio_embeds, batch = audio(model, 3), prompts(3)
    eos = model.config.eos_token_id
    drafts = [[11, 12], [21], [31, 32, 33]]
    stats, prefills = SpeculationStats(), []
    tokens = speculative_generate(
        model,
        batch,
        audio_embeds,
        N,
        drafts=drafts,
        mode="relaxed",
        confidences=[0.0, 0.3, 0.5],
        ctc_threshold=0.5,
        stats=stats,
        steps=spying(prefills),
    )
    assert prefills == [] and stats.forwards == stats.row_forwards == 0
    assert truncate_at_eos(tokens, eos) == [[*d, eos] for d in drafts]
    assert [r.decision for r in stats.rows] == ["accepted"] * 3


def test_the_rows_left_after_confident_ones_equal_those_rows_alone(model):
    """The compacted batch (audio rows and prompts picked by index) decodes each remaining
    row as it decodes alone."""
    audio_embeds, batch = audio(model, 4), prompts(4)
    expected = generate(model, batch, audio_embeds, N, stop_at_eos=False)
    drafts = [row[:5] + [7] + row[6:] for row in expected.tolist()]
    confidences = [0.1, 2.0, 0.1, 2.0]  # rows 1 and 3 go to the decoder
    tokens = speculative_generate(
        model,
        batch,
        audio_embeds,
        N,
        drafts=drafts,
        mode="relaxed",
        confidences=confidences,
        confidence_threshold=1.0,  # no draft passes: the exact path
        stop_at_eos=False,
    )
    assert torch.equal(tokens[1::2], expected[1::2])


def test_speculation_table_is_checked_when_parsed(tmp_path):
    path = tmp_path / "spec.toml"
    for table, message in {
        "k = 0": "k = 0 must be at least 1",
        "ctc_threshold = -0.5": "ctc_threshold = -0.5 must be at least 0.0",
        "confidence_threshold = -1": "confidence_threshold = -1 must be at least 0.0",
        "confidence_threshold = 2.0": "must be at most 1.0",
        'mode = "fast"': "mode = 'fast' is not one of exact, relaxed",
        "drafts = 3": "unknown key 'drafts' in \\[speculate\\]",
    }.items():
        path.write_text(f'kv_cache = "static"\n[speculate]\n{table}\n')
        with pytest.raises(gsopt.GsoptError, match=message):
            load_recipe(path)
    path.write_text("[speculate]\nk = 4\n")
    with pytest.raises(gsopt.GsoptError, match='needs kv_cache = "static"'):
        load_recipe(path)


def one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # what came before (save_pretrained's progress bar)
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_draft_model_with_another_vocabulary_is_refused(capsys, tmp_path):
    other = reference_model(hf_config(vocab_size=330), seed=2)
    folder = save_checkpoint(other, tmp_path / "other")
    err = one_line_error(
        capsys,
        "transcribe",
        "--model",
        "tiny",
        "--recipe",
        "speculative-draft",
        "--draft-model",
        str(folder),
        "--max-new-tokens",
        "4",
    )
    assert "vocabulary" in err and "330" in err


def test_speculative_draft_without_a_draft_model_is_refused(capsys):
    err = one_line_error(capsys, "transcribe", "--recipe", "speculative-draft")
    assert "--draft-model" in err


def test_ctc_bpe_without_out_llm_is_refused(capsys, tmp_path):
    recipe = tmp_path / "bpe.toml"
    recipe.write_text('kv_cache = "static"\n[speculate]\ndraft = "ctc-bpe"\n')
    err = one_line_error(capsys, "transcribe", "--recipe", str(recipe), "--max-new-tokens", "4")
    assert "out_llm.safetensors" in err


def test_each_rows_decision_reaches_transcribe_json_and_apply(tmp_path, capsys):
    """A relaxed recipe whose every non-empty draft is confident: transcribe --json names each
    row's decision and its zero decoder forwards; apply's report lists them too."""
    recipe = tmp_path / "confident.toml"
    recipe.write_text(
        'kv_cache = "static"\n[speculate]\ndraft = "ctc"\nmode = "relaxed"\nctc_threshold = 1e3\n'
    )
    common = ["--model", "tiny", "--recipe", str(recipe), "--max-new-tokens", "8"]
    capsys.readouterr()
    assert main(["transcribe", *common, "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    speculation = result["batch"]["speculation"]
    assert speculation["rows"] == [dict(decision="accepted", drafted=7, accepted=7, forwards=0)]
    assert speculation["forwards"] == 0 and "prefill" not in result["batch"]["stages"]
    out = tmp_path / "report"
    assert main(["apply", *common, "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["speculation"]["rows"][0]["decision"] == "accepted"
    markdown = (out / "report.md").read_text()
    assert "Each row, last call: row 0 accepted (7 of 7 draft tokens kept, 0 forwards)" in markdown


def test_oracle_drafts_with_confidences_through_the_pipeline(tiny):
    """A benchmark's oracle drafts with set confidences: the confident row is its draft, the
    other goes to the decoder alone."""
    model = tiny[0]
    relaxed = load_recipe("speculative-ctc-relaxed")
    eager = dataclasses.replace(relaxed, decode=StageRecipe(), devices={})
    pipeline = build_pipeline(model, eager)
    waves = [sample_audio()[:16000], sample_audio()[:24000]]
    template = prompt_template(model.config)
    tokens = pipeline(waves, template, 8, drafts=[[11, 12], [21]], confidences=[0.0, 9.0])
    assert truncate_at_eos(tokens[:1], 0) == [[11, 12, 0]]
    stats = pipeline.speculation_stats
    assert [r.decision for r in stats.rows][0] == "accepted" and stats.rows[1].forwards >= 1
    assert stats.row_forwards == stats.rows[1].forwards  # row 0 computed in none
