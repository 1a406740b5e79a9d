"""The toolkit on real pretrained weights: SmolLM2-135M-Instruct converted to Llama 3's format (tests/realmodel.py).

The random built-in model proves the plumbing; these tests prove that the toolkit teaches a real model, that the fused
LoRA path learns what PEFT's plain path learns on it, what tuning costs the model's general knowledge, and that
replaying the base model's own answers shrinks that cost where replaying answers in our words does not. The domain
is invented (`data/skyloom_terms*.jsonl`: 30 made-up terms of a fictional trade, three training phrasings each, one
held-out question each in other words), so the base model cannot know it. Numbers and times: docs/real-model.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from toolkit import api
from toolkit.cli import main
from toolkit.data import replay
from toolkit.model import loading

ROOT = Path(__file__).resolve().parent.parent
DOMAIN_TRAIN = ROOT / "data" / "skyloom_terms.jsonl"
DOMAIN_EVAL = ROOT / "data" / "skyloom_terms_eval.jsonl"
GENERAL = Path(__file__).resolve().parent / "real_general.jsonl"  # questions the converted base answers right
# The converted base's own greedy answers to the shipped replay set's English questions (scripts/replay_experiment.py
# answers): replayed, they keep the model near the base where the shipped set's answers, in our words, do not.
OWN_ANSWERS = ROOT / "data" / "smollm2_replay_answers.jsonl"
OWN_REPLAY_SHARE = 0.25
# Measured KL(tuned || base) per general reference token with OWN_ANSWERS replayed: 0.44 (seed 1) and 0.37 (seed 2);
# without replay 1.59 and 1.69, with the shipped set 1.71 (share 0.25) and 1.79 (0.5), seed 1.
OWN_REPLAY_MAX_KL = 0.8
EVAL_OPTIONS = {"compare_base": True, "batch_size": 32, "max_new_tokens": 32}

# The learning setting: LoRA r=16 on every linear layer, 4 epochs of the 90 rows (48 steps of 8 rows). Measured with
# seeds 1 and 2 (docs/real-model.md): held-out domain term accuracy 0.000 -> 0.867 and 0.900; general questions
# 1.000 -> 0.789 and 0.632. The test runs seed 1.
LEARNED_AT_LEAST = 0.6  # a clear majority, with room below both seeds
LEARN = {
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
             "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "train": {"epochs": 4, "batch_size": 8, "learning_rate": 0.002, "logging_steps": 4, "save_steps": 1000,
              "seed": 1},
}


def real_recipe(folder: Path, model: Path, **sections) -> Path:
    recipe = {"model": {"name": str(model)}, "data": {"train": str(DOMAIN_TRAIN), "eval": str(DOMAIN_EVAL)},
              **{name: dict(values) for name, values in LEARN.items()}}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def trained(folder: Path, model: Path, name: str, **sections) -> Path:
    return api.train(real_recipe(folder, model, **sections), folder / name).path


def evaluated(run: Path) -> dict:
    """What `toolkit eval --compare-base --retention` writes to eval.json: base vs tuned on the held-out domain
    questions, and the retention check on the general questions the converted base answers right."""
    result = api.evaluate(run, retention_check=True, retention_data=str(GENERAL), **EVAL_OPTIONS)
    return json.loads(json.dumps(result.summary))


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory, real_model) -> dict:
    """One LoRA run on the invented domain (no replay), and its eval."""
    run = trained(tmp_path_factory.mktemp("real-run"), real_model, "plain")
    return {"run": run, "eval": evaluated(run)}


def test_converted_tokenizer_puts_llama3_names_on_the_models_own_ids(real_model):
    from transformers import AutoTokenizer

    from toolkit.data.encode import encode_prompt
    from toolkit.model import loading

    tokenizer = loading.load_tokenizer(str(real_model))
    names = ["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>", "<|end_header_id|>",
             "<|finetune_right_pad_id|>"]
    assert tokenizer.convert_tokens_to_ids(names) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 4)
    prompt = encode_prompt([{"role": "user", "content": "What is a fennet?"}], tokenizer, "26 Jul 2024")
    newline_pair = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    question = tokenizer("What is a fennet?", add_special_tokens=False)["input_ids"]
    user, assistant = (tokenizer(role, add_special_tokens=False)["input_ids"] for role in ("user", "assistant"))
    assert prompt.input_ids == [0, 1, *user, 3, *newline_pair, *question, 2, 1, *assistant, 3, *newline_pair]
    # the original GGUF tokenizer gives the same ids for the same text (the vocabulary itself is unchanged)
    assert AutoTokenizer.from_pretrained(real_model)("What is a fennet?", add_special_tokens=False)["input_ids"] \
        == question


def test_converted_model_reads_end_header_as_newline_and_predicts_as_before(real_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert model.config.tie_word_embeddings is False and embedding.data_ptr() != head.data_ptr()
    assert embedding.dtype == torch.float32
    newline = 198  # "\n" in SmolLM2's vocabulary
    assert torch.equal(embedding[3], embedding[newline])  # <|end_header_id|> reads as a newline
    others = torch.ones(len(embedding), dtype=torch.bool)
    others[3] = False
    assert torch.equal(head[others], embedding[others])  # every other row is the tied original
    assert not torch.equal(head[3], embedding[3])  # the head keeps <repo_name>'s row: it predicts as before


def test_validate_accepts_the_converted_model(tmp_path, real_model, capsys):
    assert main(["validate", str(real_recipe(tmp_path, real_model))]) == 0
    out = capsys.readouterr().out
    assert "is valid; LoRA wraps 210 modules (90 mlp, 120 self-attention)" in " ".join(out.split())


def test_converted_base_answers_general_questions(domain_run, capsys):
    general = domain_run["eval"]["retention"]
    assert general["n_examples"] == 19 and general["base"]["term_accuracy"] == 1.0
    capsys.readouterr()
    assert main(["generate", str(domain_run["run"]), "What is the capital of France?", "--base",
                 "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_lora_teaches_the_real_model_the_invented_domain(domain_run):
    domain = domain_run["eval"]
    assert domain["n_examples"] == 30
    assert domain["base"]["term_accuracy"] == 0.0
    assert domain["term_accuracy"] >= LEARNED_AT_LEAST


def test_retention_shows_what_tuning_cost_on_real_weights(domain_run):
    """Unlike the random built-in model, a real base has general answers to lose: measured 1.000 -> 0.789 (seed 1;
    0.632 with seed 2) with 1.59 nats of KL(tuned || base) per reference token."""
    general = domain_run["eval"]["retention"]
    assert general["tuned"]["term_accuracy"] <= 0.9 and general["kl_per_token"] > 0.5


def first_losses(folder: Path, model: Path, fused: bool, dropout: float) -> list[float]:
    """The 20 logged losses of a short run (the same rows in the same order whatever the path)."""
    run = folder / f"{'fused' if fused else 'plain'}-{dropout}"
    recipe = real_recipe(folder, model, lora={"dropout": dropout},
                         train={"max_steps": 20, "batch_size": 2, "logging_steps": 1, "fused_lora": fused})
    history = json.loads((api.train(recipe, run).path / "metrics.json").read_text(encoding="utf-8"))["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_and_plain_lora_learn_the_same_on_real_weights(tmp_path, real_model, dropout):
    """The first 20 losses of the fused LoRA path and PEFT's own layers agree within 1%, with dropout too (measured:
    at most 0.0001% apart either way; 103% apart with the fused path's dropout inverted)."""
    plain = first_losses(tmp_path, real_model, fused=False, dropout=dropout)
    fused = first_losses(tmp_path, real_model, fused=True, dropout=dropout)
    assert len(plain) == len(fused) == 20
    # The first step is the base model's loss on the first two rows (the adapters start at zero): a real model's
    # mean negative log-likelihood of the answers, measured 4.9921; a loss scaled or masked wrong moves it.
    assert plain[0] == pytest.approx(4.9921, abs=0.01) and fused[0] == pytest.approx(4.9921, abs=0.01)
    assert plain[-1] < 0.7 * plain[0]  # it learns, so a path that learned differently would drift apart
    gaps = [abs(f - p) / p for f, p in zip(fused, plain)]
    assert max(gaps) < 0.01, [f"{g:.2%}" for g in gaps]


def test_fp8_matmuls_on_real_weights_learn_near_bf16(tmp_path, real_model, monkeypatch):
    """What FP8 costs on real weights, where the 11B random-weight bench cannot tell (its losses sit near ln(vocab)
    whatever the matmuls do): the first 20 losses of `fp8_matmuls: all` against plain bf16 on the same rows.

    `validate` refuses FP8 off a GPU of compute capability 8.9+; PyTorch's `_scaled_mm` runs the same e4m3 arithmetic
    on the CPU, so the refusal is lifted here and only here. Measured: the first loss (the base model's, adapters at
    zero) 1.44% apart (4.9866 -> 5.0584), at most 3.73% over 20 steps, and both runs learn alike (last/first 0.477
    and 0.466); with the input gradients in bf16 (`forward`) 1.44% and 7.04%."""
    from toolkit.training import prepare

    monkeypatch.setattr(prepare, "check_fp8", lambda *args: None)
    losses = {}
    for mode in ("none", "all"):
        recipe = real_recipe(tmp_path, real_model, lora={"dropout": 0.1},
                             train={"max_steps": 20, "batch_size": 2, "logging_steps": 1, "precision": "bf16",
                                    "fp8_matmuls": mode})
        history = json.loads((api.train(recipe, tmp_path / mode).path / "metrics.json").read_text())["log_history"]
        losses[mode] = [entry["loss"] for entry in history if "loss" in entry]
    plain, fp8 = losses["none"], losses["all"]
    assert len(plain) == len(fp8) == 20
    assert plain[0] == pytest.approx(4.9866, abs=0.01)  # bf16's base loss (fp32's is 4.9921)
    assert 0.005 < abs(fp8[0] - plain[0]) / plain[0] < 0.025  # FP8 moves it, a little
    assert max(abs(f - p) / p for f, p in zip(fp8, plain)) < 0.06
    assert fp8[-1] < 0.6 * fp8[0] and plain[-1] < 0.6 * plain[0]


def greedy_share(model_path: Path, replay_file: Path) -> tuple[float, int]:
    """How many of a replay file's answer tokens, encoded exactly as training encodes them, are the base model's
    own greedy choice given the tokens before them (end of turn left out: an answer cut at a whole line ends
    where the model would have gone on). Returns the share and the number of answer tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.config.recipe import recipe_from_dict
    from toolkit.evaluation import retention

    recipe = recipe_from_dict({"model": {"name": str(model_path)},
                               "data": {"train": str(DOMAIN_TRAIN), "replay": {"share": 0.25, "data": str(replay_file)}}})
    rows, section, _ = replay.general_rows(recipe.data)
    tokenizer = loading.load_tokenizer(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    same = total = 0
    for example in retention.teacher_forced(rows, section, tokenizer):
        positions = retention.answer_positions(example.completion_mask)[:-1]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
        greedy = logits[positions].argmax(-1).tolist()
        same += sum(g == example.input_ids[p + 1] for g, p in zip(greedy, positions))
        total += len(positions)
    return same / total, total


def test_replay_file_holds_the_converted_bases_own_answers(tmp_path, real_model):
    """The replay file is in the base's own words: teacher-forced, 98.6% of its 2,145 answer tokens (38 rows) are
    the base's greedy choice (not all: greedy decoding ran left-padded in batches, and the text was decoded and
    encoded again), where the shipped set's English answers, in our words, reach 68.5%."""
    own, tokens = greedy_share(real_model, OWN_ANSWERS)
    assert own >= 0.95 and tokens > 2000
    shipped = [json.loads(line) for line in replay.shipped_set().read_text(encoding="utf-8").splitlines()]
    ours = write_jsonl(tmp_path / "ours.jsonl", [row for row in shipped if row["instruction"].isascii()])
    assert greedy_share(real_model, ours)[0] < 0.8


@pytest.fixture(scope="module")
def own_replay_run(tmp_path_factory, real_model) -> dict:
    """The same LoRA run as `domain_run`, with a quarter of its rows replaying the base's own answers."""
    run = trained(tmp_path_factory.mktemp("real-replay"), real_model, "own-replay",
                  data={"replay": {"share": OWN_REPLAY_SHARE, "data": str(OWN_ANSWERS)}})
    return {"run": run, "eval": evaluated(run)}


def test_replaying_the_bases_own_answers_shrinks_the_drift(domain_run, own_replay_run):
    """Replaying the base's own answers keeps the tuned model's next-token distributions on the general references
    near the base's: KL(tuned || base) 0.44 nats per token against 1.59 without replay (seed 1; 0.37 against 1.69
    with seed 2), while the domain is learned about as well (0.933 and 0.900). The greedy general answers are not
    reliably better kept: general term accuracy 0.737 against 0.789 without replay (seed 1), 0.789 against 0.632
    (seed 2); docs/real-model.md. One more sft of 60 steps and its eval: about 7 minutes on one CPU thread."""
    plain, replayed = domain_run["eval"], own_replay_run["eval"]
    assert replayed["term_accuracy"] >= LEARNED_AT_LEAST
    assert replayed["retention"]["kl_per_token"] < OWN_REPLAY_MAX_KL
    assert replayed["retention"]["kl_per_token"] < 0.5 * plain["retention"]["kl_per_token"]
