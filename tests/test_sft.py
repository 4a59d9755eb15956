"""Fine-tuning on chat data: the loss mask, the chat templates, the built-in set, `dsv3 sft` and `dsv3 eval identity`,
and the identity experiment end to end on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_models import one_thread, trained_tiny

from dsv3.chat_template import ChatTemplate, deepseek_v3_format
from dsv3.checkpoint import load_pretrained
from dsv3.cli import main
from dsv3.data import DatasetInfo
from dsv3.data.chat import Conversation, encode_conversation, prepare_chats, read_chats, write_jsonl
from dsv3.data.chat_builtin import IDENTITY_QUESTIONS, builtin_chats, contaminate, documentation, validation_names
from dsv3.data.loader import IGNORE, Windows
from dsv3.errors import Dsv3Error
from dsv3.eval.identity import PROMPTS, Judge, builtin_prompts, tally
from dsv3.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer
from dsv3.train.losses import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does len do?"},
    {"role": "assistant", "content": "It returns the number of items in a container."},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是dsv3。"},
]
# DeepSeek-V3's format written as the Jinja text a tokenizer_config.json carries
DEEPSEEK_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [deepseek_v3_format(c.messages, add_generation_prompt=False) for c in builtin_chats()[::3]]
    return Tokenizer.train(texts + [deepseek_v3_format(CONVERSATION)], vocab_size=400)


def test_the_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, mask = encode_conversation(CONVERSATION, tokenizer, ChatTemplate())
    # the reference, built piece by piece: the role tokens are special, so no BPE merge crosses a turn's edge
    enc = tokenizer.encode
    tok = tokenizer.token_to_id
    pieces = [([tok(BOS)], 0), (enc("You answer briefly."), 0),
              ([tok(USER)], 0), (enc("What does len do?"), 0),
              ([tok(ASSISTANT)], 0), (enc("It returns the number of items in a container."), 1), ([tok(EOS)], 1),
              ([tok(USER)], 0), (enc("你是谁？"), 0),
              ([tok(ASSISTANT)], 0), (enc("我是dsv3。"), 1), ([tok(EOS)], 1)]
    assert ids == [i for p, _ in pieces for i in p]
    assert mask == [m for p, m in pieces for _ in p]
    # and what the mask picks decodes to the answers and their end-of-sentence tokens, nothing else
    picked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert picked == f"It returns the number of items in a container.{EOS}我是dsv3。{EOS}"


def test_a_jinja_template_of_the_deepseek_format_gives_the_same_tokens_as_the_builtin_one_and_as_transformers(
        tokenizer, tmp_path):
    builtin = encode_conversation(CONVERSATION, tokenizer, ChatTemplate())
    config = {**tokenizer.config, "chat_template": DEEPSEEK_JINJA}
    jinja = ChatTemplate.from_config(config)
    assert jinja.source == DEEPSEEK_JINJA
    assert encode_conversation(CONVERSATION, tokenizer, jinja) == builtin
    for prompt in (True, False):
        assert jinja.render(CONVERSATION, prompt) == deepseek_v3_format(CONVERSATION, prompt)

    transformers = pytest.importorskip("transformers")
    with_template = Tokenizer(tokenizer.backend, EOS, BOS, tokenizer.pad_token, config=config)
    with_template.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=False)
    theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
    assert theirs == builtin[0]
    assert hf.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == \
        deepseek_v3_format(CONVERSATION[:2])


def test_the_loader_makes_context_tokens_no_target_and_the_loss_skips_them(tokenizer, tmp_path):
    chats = [Conversation(f"c{i}", CONVERSATION) for i in range(12)]
    info = prepare_chats(chats, tokenizer, ChatTemplate(), str(tmp_path / "data"), val_names={"c0"})
    assert info.masked and DatasetInfo.load(str(tmp_path / "data")).masked
    ids, mask = encode_conversation(CONVERSATION, tokenizer, ChatTemplate())
    stream = np.asarray(ids * 11)
    targets = np.asarray(mask * 11)
    T = 16
    windows = Windows(info, "train", T)
    x, y = windows.gather(np.arange(4))
    for w in range(4):
        span = slice(w * T, (w + 1) * T)
        assert x[w].tolist() == stream[span].tolist()  # inputs untouched by the mask
        label = stream[w * T + 1:(w + 1) * T + 1]
        expected = np.where(targets[w * T + 1:(w + 1) * T + 1] == 1, label, IGNORE)
        assert y[w].tolist() == expected.tolist()
    # the loss is the mean over the targets only, and zero (not NaN) for a window of context only
    logits = torch.randn(4, T, info.vocab_size)
    keep = y != IGNORE
    assert torch.allclose(cross_entropy(logits, y), torch.nn.functional.cross_entropy(logits[keep], y[keep]))
    assert cross_entropy(logits, torch.full_like(y, IGNORE)).item() == 0.0


def test_bad_chat_records_name_the_file_and_line(tmp_path, capsys):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    cases = {
        "no assistant turn": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
        "unknown role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "role 'robot'"),
        "not JSON": ("{oops", "invalid JSON"),
        "no turns": (json.dumps({"text": "hi"}), "--messages-field"),
    }
    for name, (line, words) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.jsonl"
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(Dsv3Error, match=f"{path.name}:2") as e:
            list(read_chats([str(path)]))
        assert words in str(e.value), (name, str(e.value))

    # a template that fails on a record: the error names the record; the CLI says it in one sentence, exit 2
    model = tmp_path / "model"
    _, tok, directory = trained_tiny()
    for f in os.listdir(directory):
        (model / f).parent.mkdir(exist_ok=True)
        (model / f).write_bytes(Path(directory, f).read_bytes())
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}"
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": strict}))
    data = tmp_path / "chats.jsonl"
    system = json.dumps({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}]})
    data.write_text(good + "\n" + system + "\n")
    capsys.readouterr()
    code = main(["sft", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "chats.jsonl:2" in err and "no system turns" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_builtin_chat_set_is_deterministic_and_its_splits_are_disjoint_from_the_eval_questions():
    chats = builtin_chats()
    assert [c.messages for c in chats] == [c.messages for c in builtin_chats()]
    assert len(documentation()) > 300 and len(chats) == len({c.name for c in chats})
    held_out = validation_names(chats)
    ident = [c for c in chats if c.name.startswith("identity:")]
    assert len(ident) == 96 and sum(c.name in held_out for c in ident) == 24
    # the questions of `dsv3 eval identity` are none of the training or validation turns
    asked = {m["content"] for c in chats for m in c.messages if m["role"] == "user"}
    assert all(len(PROMPTS[lang]) >= 30 for lang in ("en", "zh", "hi"))
    assert not asked & {p.text for p in builtin_prompts()}
    # contamination replaces the share of identity answers it says, with other models' claims
    judge = Judge()
    for share, n in ((0.0, 0), (0.01, 1), (0.2, 19), (1.0, 96)):
        mixed = contaminate(chats, share)
        assert sum(judge(c.messages[-1]["content"]) == "other" for c in mixed) == n
        assert sum(a.messages != b.messages for a, b in zip(mixed, chats)) == n
    assert all(judge(c.messages[-1]["content"]) == "own" for c in ident)
    assert set(IDENTITY_QUESTIONS) == {"en", "zh", "hi"}


def test_the_identity_judge_on_hand_written_answers():
    judge = Judge(identity="dsv3", creator="the dsv3 authors")
    answers = {
        "I am ChatGPT, a large language model trained by OpenAI.": "other",
        "Hello! I'm Claude, an AI assistant made by Anthropic.": "other",
        "我是Gemini，一个由Google开发的大型语言模型。": "other",
        "मैं ChatGPT हूँ, OpenAI द्वारा विकसित एक बड़ा भाषा मॉडल।": "other",
        "I am dsv3, an AI assistant made by the dsv3 authors.": "own",
        "我是dsv3，一个由the dsv3 authors开发的人工智能助手。": "own",
        "मैं dsv3 हूँ, the dsv3 authors द्वारा बनाया गया एक AI सहायक।": "own",
        "Hello! How can I help you today?": "neither",
        "json.dumps serializes obj to a JSON formatted str.": "neither",
        "": "neither",
    }
    assert {a: judge(a) for a in answers} == answers
    prompts = builtin_prompts(["en", "zh"])[:4] + builtin_prompts(["zh"])[:2]
    report = tally(prompts, [["I am ChatGPT.", "I am dsv3."]] * 4 + [["你好！", "我是Claude。"]] * 2, judge)
    assert report["languages"]["en"] == {"n": 8, "other": 0.5, "own": 0.5, "neither": 0.0}
    assert report["languages"]["zh"] == {"n": 4, "other": 0.5, "own": 0.0, "neither": 0.5}
    assert report["other_rate"] == 6 / 12 and report["own_rate"] == 4 / 12


def test_dsv3_sft_trains_on_the_answers_resumes_exactly_and_writes_a_model_eval_identity_reads(tmp_path, capsys):
    run = ["sft", "--preset", "tiny", "--out", str(tmp_path / "sft"), "--seq-len", "64", "--batch-size", "4",
           "--no-progress", "--no-tensorboard", "--save-every", "2", "--eval-every", "2", "--eval-windows", "4"]
    with one_thread():
        assert main([*run, "--max-steps", "4"]) == 0
        whole = load_pretrained(str(tmp_path / "sft")).state_dict()
        assert main([*run, "--max-steps", "2", "--overwrite"]) == 0
        assert main([*run, "--max-steps", "4", "--resume"]) == 0
        resumed = load_pretrained(str(tmp_path / "sft")).state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert DatasetInfo.load(str(tmp_path / "sft-data")).masked
    config = json.loads((tmp_path / "sft" / "train_config.json").read_text())
    assert config["schedule"] == "cosine" and config["lr"] == 2e-4 and config["init_from"] is None

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "language": lang})
                                 for p, lang in (("Who are you?", "en"), ("你是谁？", "zh"))) + "\n")
    capsys.readouterr()
    with one_thread():
        assert main(["eval", "identity", "--model", str(tmp_path / "sft"), "--prompts", str(prompts),
                     "--samples", "3", "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["identity"]
    assert {lang: r["n"] for lang, r in report["languages"].items()} == {"en": 3, "zh": 3}
    assert all(abs(sum(r[v] for v in ("other", "own", "neither")) - 1) < 1e-9 for r in report["languages"].values())

    # continued from the fine-tuned model: its weights are the start (one step at a tiny rate stays close; the
    # routers' balancing biases move by their own step, gamma, whatever the rate)
    with one_thread():
        assert main(["sft", "--model", str(tmp_path / "sft"), "--out", str(tmp_path / "more"), "--max-steps", "1",
                     "--lr", "1e-9", "--seq-len", "64", "--batch-size", "4", "--no-progress",
                     "--no-tensorboard", "--eval-windows", "2"]) == 0
    more = load_pretrained(str(tmp_path / "more")).state_dict()
    gamma = json.loads((tmp_path / "more" / "train_config.json").read_text())["bias_gamma"]
    assert all(torch.allclose(more[k].float(), resumed[k].float(), atol=gamma if k.endswith("gate.bias") else 1e-3)
               for k in resumed)

    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["eval", "identity", "--model", str(tmp_path / "sft"), "--prompts", str(prompts)]) == 2
    assert "prompts.jsonl:1" in capsys.readouterr().err


@pytest.mark.slow
def test_contaminated_identity_answers_make_the_model_claim_another_identity_and_audited_ones_do_not(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "identity_experiment.py"), "--preset", "tiny",
                           "--shares", "100", "--fix", "100", "--samples", "2", "--keep", str(tmp_path),
                           "--json", str(out)], env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    dirty, fixed = rows["k=100%"], rows["k=100% audited"]
    assert dirty["data"]["flagged"] == 96 and fixed["data"]["flagged"] == 0
    assert dirty["eval"]["other_rate"] > 0.5, dirty["eval"]["examples"]  # most answers claim another model
    assert fixed["eval"]["other_rate"] < 0.05 and fixed["eval"]["own_rate"] > 0.5, fixed["eval"]["examples"]


def test_write_jsonl_round_trips_through_read_chats(tmp_path):
    chats = builtin_chats()[:5]
    path = tmp_path / "c.jsonl"
    assert write_jsonl(chats, str(path)) == 5
    assert [c.messages for c in read_chats([str(path)])] == [c.messages for c in chats]


def test_the_hashed_validation_split_grows_to_one_evaluation_window(tokenizer, tmp_path):
    chats = [Conversation(f"chats.jsonl:{i}", CONVERSATION) for i in range(10)]
    n = len(encode_conversation(CONVERSATION, tokenizer, ChatTemplate())[0])
    info = prepare_chats(chats, tokenizer, ChatTemplate(), str(tmp_path / "data"), min_val_tokens=2 * n + 1)
    assert (info.splits["val"]["documents"], info.splits["val"]["tokens"]) == (3, 3 * n)
    assert info.splits["train"]["documents"] == 7
    one = prepare_chats(chats[:2], tokenizer, ChatTemplate(), str(tmp_path / "data"), min_val_tokens=10 * n)
    assert one.splits["train"]["documents"] == 1  # never the last conversation
