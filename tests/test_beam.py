"""Beam search on the static cache against transformers' generate(num_beams=K) on the same
weights (tiny and a 4.1-style decoder, CPU, fp32), batched and alone; one compiled graph per
beam count that writes the cache in place; the recipe key and its refusals; the relaxed
speculation's beam fallback."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from family_helpers import randomize_
from helpers import AUDIO_TOKEN_ID, allocations_of_at_least, hf_config, save_checkpoint
from torch._inductor.utils import run_and_get_code
from transformers import GraniteSpeechForConditionalGeneration

import gsopt
from gsopt.engine.beam import BeamState, beam_search, beam_step, reorder_cache
from gsopt.engine.generate import setup_cache, truncate_at_eos
from gsopt.engine.speculate import SpeculationStats, speculative_generate
from gsopt.recipe import apply, build_pipeline, load_recipe
from gsopt.recipe.compile import CompiledStage

N = 24
FRAMES = [37, 20, 9]
# granite-speech-4.1-2b's decoder shape, scaled down: GQA 4:1, attention multiplier
# 1 / head_dim, logits_scaling 8, rope theta 1e4, end-of-text apart from padding.
STYLE_41 = dict(
    num_key_value_heads=1,
    attention_multiplier=1 / 16,
    logits_scaling=8.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=2,
)


def audio_prompt(frames: int) -> torch.Tensor:
    return torch.tensor([5, 6, *[AUDIO_TOKEN_ID] * (-(-frames // 15) * 3), 7, 8, 9])


@pytest.fixture(scope="module", params=["tiny", "4.1-style"])
def pair(request, tmp_path_factory):
    """(transformers model, gsopt model) on one set of random weights of std 1 / sqrt(fan_in)
    (peaked distributions: beams part ways), with end-of-text moved to a token the beams emit
    early, so hypotheses finish at different lengths. transformers 5.x forgets
    Granite's logits_scaling: it is folded into its head, so both score the same logits."""
    text = STYLE_41 if request.param == "4.1-style" else {}
    torch.manual_seed(0)
    ref = randomize_(GraniteSpeechForConditionalGeneration(hf_config(**text)), unit_scale=True)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("beam"))
    model = gsopt.load_model(folder, lora="none")
    with torch.no_grad():
        ref.lm_head.weight /= model.config.decoder.logits_scaling
    features = [torch.randn(1, n, 160, generator=torch.Generator().manual_seed(n)) for n in FRAMES]
    with torch.no_grad():
        audio = [model.embed_audio(f) for f in features]
    first = beam_search(model, [audio_prompt(FRAMES[0])], audio[0], 8, 2, stop_at_eos=False)
    eos = int(first[0, 6])
    model.config = dataclasses.replace(model.config, eos_token_id=eos)
    return ref, model, features, audio, eos


def batched(audio: list[torch.Tensor]) -> torch.Tensor:
    width = max(a.shape[1] for a in audio)
    return torch.cat([torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[1])) for a in audio])


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_beam_search_equals_transformers_generate(pair, beams, stop_at_eos):
    """Batched (clips of three lengths) and each clip alone equal transformers' beam search
    on that clip; without stopping, end-of-text is suppressed as min_new_tokens does."""
    ref, model, features, audio, eos = pair
    prompts = [audio_prompt(n) for n in FRAMES]
    tokens = beam_search(model, prompts, batched(audio), N, beams, stop_at_eos=stop_at_eos)
    lengths = set()
    for row, (prompt, clip) in enumerate(zip(prompts, features, strict=True)):
        with torch.no_grad():
            expected = ref.generate(
                input_ids=prompt[None],
                input_features=clip,
                max_new_tokens=N,
                min_new_tokens=0 if stop_at_eos else N,
                num_beams=beams,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(prompt) :]
        expected = truncate_at_eos(expected[None], eos)
        alone = beam_search(model, [prompt], audio[row], N, beams, stop_at_eos=stop_at_eos)
        assert truncate_at_eos(tokens[row : row + 1], eos) == expected
        assert truncate_at_eos(alone, eos) == expected
        lengths.add(len(expected[0]))
    if stop_at_eos:
        assert min(lengths) < N, "no hypothesis finished: the test would prove little"


def test_beams_are_not_greedy(pair):
    _, model, _, audio, eos = pair
    prompt = [audio_prompt(FRAMES[0])]
    greedy = beam_search(model, prompt, audio[0], N, 1, stop_at_eos=False)
    wide = beam_search(model, prompt, audio[0], N, 4, stop_at_eos=False)
    assert not torch.equal(greedy, wide)


def test_one_compiled_graph_per_beam_count_writing_the_cache_in_place():
    """The step (forward, selection, reorder) compiles to one graph per beam count, as the
    attended span and reordered window grow; no buffer the size of a cache appears in it."""
    torch._dynamo.reset()
    model = gsopt.load_model("tiny", lora="none")
    torch.manual_seed(3)
    prompts = [audio_prompt(n) for n in FRAMES]
    audio = batched([model.embed_audio(torch.randn(1, n, 160)) for n in FRAMES])
    step = CompiledStage(beam_step, fullgraph=True)
    for beams in (2, 4, 2):
        expected = beam_search(model, prompts, audio, N, beams, stop_at_eos=False)
        tokens = beam_search(model, prompts, audio, N, beams, stop_at_eos=False, step=step)
        assert torch.equal(tokens, expected)
    assert (step.graphs, step.graph_breaks) == (2, 0)
    # One prompt: every beam's window starts where all prompts end (no size-1 window).
    alone = beam_search(model, prompts[:1], audio[:1], N, 2, stop_at_eos=False, step=step)
    assert torch.equal(alone, beam_search(model, prompts[:1], audio[:1], N, 2, stop_at_eos=False))
    torch._dynamo.reset()  # shapes seen above made some dynamic: sizes would be symbols
    cache = setup_cache(model, 2, 64, max_seq_len=512)
    state = BeamState.new(1, 2, 8, model.config.decoder.src_vocab_size, 0, "cpu", True)
    state.step.fill_(1)
    positions = torch.tensor([20, 20])
    with torch.no_grad():
        _, codes = run_and_get_code(
            torch.compile(beam_step, fullgraph=True),
            model,
            state,
            positions,
            cache.layers,
            cache.span(21, False),
            cache.kv_index[18:21],
        )
    assert codes and all(
        allocations_of_at_least(c, cache.layers[0][0].numel()) == [] for c in codes
    )


def test_reorder_cache_takes_each_parents_rows_in_window_only():
    buffer = torch.arange(4 * 1 * 6 * 2, dtype=torch.float32).view(4, 1, 6, 2)
    layers = [(buffer, buffer.clone())]
    before = buffer.clone()
    reorder_cache(layers, torch.tensor([1, 1, 3, 2]), torch.tensor([2, 3, 4]))
    expected = before.clone()
    expected[:, :, 2:5] = before[[1, 1, 3, 2], :, 2:5]
    assert torch.equal(layers[0][0], expected)


def test_num_beams_recipe_runs_beam_search_and_refusals(tmp_path):
    model = gsopt.load_model("tiny", lora="none")
    waves = [torch.randn(8000), torch.randn(12000)]
    path = tmp_path / "beams.toml"
    path.write_text('kv_cache = "static"\nnum_beams = 3\n')
    pipeline = build_pipeline(model, load_recipe(path))
    template = [5, AUDIO_TOKEN_ID, 7]
    tokens = pipeline(waves, template, 12, stop_at_eos=False)
    audio = pipeline.embed_audio(waves, pipeline.stages)[0]
    expected = beam_search(
        model, pipeline.prompts(waves, template), audio, 12, 3, stop_at_eos=False
    )
    assert torch.equal(tokens, expected)
    assert any(
        "num_beams = 3" in r
        for r in gsopt.recipe.settings.lossy_reasons(load_recipe(path), torch.float32, "cpu")
    )
    for text, message in {
        "num_beams = 0\n": "num_beams = 0 must be at least 1",
        'num_beams = 2\nkv_cache = "dynamic"\n': 'needs kv_cache = "static"',
        'num_beams = 2\nkv_cache = "static"\n[decode]\ncudagraph = true\n': "never captured",
        'num_beams = 2\nkv_cache = "static"\n[cuda.decode]\ncudagraph = true\n': r"\[cuda\].*never",
        'num_beams = 2\nkv_cache = "static"\n[speculate]\nmode = "exact"\n': "exact speculation",
    }.items():
        path.write_text(text)
        with pytest.raises(gsopt.GsoptError, match=message):
            load_recipe(path)


def test_relaxed_fallback_by_beam_search(pair):
    """A row that falls back is decoded afresh by beam search from its prompt (IBM's
    generate(num_beams=2)); a confident row is its draft; a verified row its draft."""
    _, model, _, audio, eos = pair
    prompts = [audio_prompt(n) for n in FRAMES]
    drafts = [[11, 12], [21, 22, 23], [31]]
    stats = SpeculationStats()
    tokens = speculative_generate(
        model,
        prompts,
        batched(audio),
        N,
        drafts=drafts,
        mode="relaxed",
        confidences=[0.1, 5.0, 5.0],
        ctc_threshold=0.5,
        confidence_threshold=1.0,  # nothing passes the verifying forward: rows 1, 2 fall back
        fallback_beams=2,
        stats=stats,
    )
    assert truncate_at_eos(tokens[:1], eos) == [[11, 12, eos]]
    for row in (1, 2):
        alone = beam_search(model, [prompts[row]], audio[row], N, 2)
        assert truncate_at_eos(tokens[row : row + 1], eos) == truncate_at_eos(alone, eos)
    decisions = [r.decision for r in stats.rows]
    assert decisions == ["accepted", "fallback", "fallback"]
    assert stats.rows[0].forwards == 0 and stats.rows[1].forwards == stats.rows[2].forwards > 2


def test_num_beams_on_the_ctc_model_is_noted_as_ignored(tmp_path):
    path = tmp_path / "beams.toml"
    path.write_text('kv_cache = "static"\nnum_beams = 2\n')
    stages = apply(gsopt.load_model("tiny-ctc"), load_recipe(path))
    notes = stages.report.notes
    assert any(note.startswith("num_beams:") and "no decoder" in note for note in notes)
