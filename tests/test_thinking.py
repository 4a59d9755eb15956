"""DeepSeek-V3.1's hybrid thinking mode: the chat format with its switch, checked against the model's own
Jinja template (tests/data/deepseek_v3_1_chat_template.jinja, a copy kept as reference data; its header says
where it comes from); the reasoning splitter, whole and streamed; the server's chat_template_kwargs and its
reasoning_content, streamed and not; and `dsv3 chat --thinking`.

The server and CLI tests run a tiny model trained for a few seconds on one V3.1 conversation in both modes:
asked in thinking mode it writes REASONING, `</think>` (three BPE pieces, so one token each in the stream),
then ANSWER; asked in non-thinking mode it writes ANSWER alone.
"""

import atexit
import contextlib
import copy
import functools
import http.client
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from infer_models import _train, one_thread

from dsv3 import DeepSeekV3, preset, save_pretrained
from dsv3.chat_template import ChatTemplate, deepseek_v3_format, deepseek_v31_format
from dsv3.cli import main
from dsv3.errors import InvalidValue
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.reasoning import ReasoningSplitter, split_reasoning
from dsv3.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer

try:
    from server_helpers import KEY, NAME, call, free_port
except ImportError:  # no server extra (uvicorn): the server tests skip, in thinking_server
    KEY = NAME = call = free_port = None

REFERENCE = (Path(__file__).parent / "data" / "deepseek_v3_1_chat_template.jinja").read_text(encoding="utf-8")

QUESTION = "why is the latent cache small?"
REASONING = "it keeps one compressed vector per token"
ANSWER = "because attention reads a latent of 576 numbers"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


# ----- the chat format -----------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "Adding two and two.</think>4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "system", "content": "one"}, {"role": "user", "content": "q1"}, {"role": "system", "content": "two"},
     {"role": "assistant", "content": "a1 with no marker"}, {"role": "user", "content": "q2\nsecond line"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
     {"role": "assistant", "content": "more</think>a2</think>still the answer"}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "thinking</think>done"}],
    [{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Grüße, 北京 <think>"}],
    [{"role": "system", "content": "only a system prompt"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_v31_format_renders_as_deepseeks_own_template(messages):
    ours, theirs = ChatTemplate(builtin="v3.1"), ChatTemplate(REFERENCE)
    for thinking in (None, False, True):
        for add_generation_prompt in (True, False):
            got = ours.render(messages, add_generation_prompt, thinking=thinking)
            assert got == theirs.render(messages, add_generation_prompt, thinking=thinking)
            assert got == deepseek_v31_format(messages, add_generation_prompt, thinking=bool(thinking))


def test_the_v31_format_in_both_modes_and_over_several_turns():
    """The prompts of DeepSeek-V3.1's model card: first turn, then a later turn whose history keeps the
    answer after `</think>` and drops the reasoning, in both modes."""
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    v31 = ChatTemplate(builtin="v3.1")
    assert v31.render(first) == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜></think>"
    assert v31.render(first, thinking=False) == v31.render(first)  # off is the default
    assert v31.render(first, thinking=True) == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜><think>"
    later = [*first, {"role": "assistant", "content": "Adding two and two.</think>4"},
             {"role": "user", "content": "and 3+3?"}]
    history = ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
               "<｜User｜>and 3+3?")
    assert v31.render(later, thinking=True) == history + "<｜Assistant｜><think>"
    assert v31.render(later, thinking=False) == history + "<｜Assistant｜></think>"
    assert "Adding" not in v31.render(later, thinking=True)
    # a system prompt anywhere joins the others after BOS, a blank line apart
    assert v31.render([{"role": "system", "content": "a"}, {"role": "user", "content": "q"},
                       {"role": "system", "content": "b"}]) == f"{BOS}a\n\nb{USER}q{ASSISTANT}</think>"


def test_v3_stays_the_default_and_has_no_thinking_mode():
    messages = [{"role": "user", "content": "Hi"}]
    v3 = ChatTemplate()
    assert v3.builtin == "v3" and not v3.has_thinking_switch and ChatTemplate(builtin="v3.1").has_thinking_switch
    assert v3.render(messages, thinking=False) == v3.render(messages) == deepseek_v3_format(messages)
    with pytest.raises(ValueError, match="^DeepSeek-V3's chat format has no thinking mode; DeepSeek-V3.1's format "
                                         r"\(builtin 'v3.1'\) has one$"):
        v3.render(messages, thinking=True)
    with pytest.raises(InvalidValue, match="builtin='v4' is not a built-in chat format; choose one of v3, v3.1"):
        ChatTemplate(builtin="v4")
    # a model's own template wins over the built-in format it would otherwise get
    assert ChatTemplate.from_config({"chat_template": "{{ messages[0]['content'] }}!"}, builtin="v3.1").render(
        messages) == "Hi!"
    assert ChatTemplate.from_config({}, builtin="v3.1").render(messages) == f"{BOS}{USER}Hi{ASSISTANT}</think>"


def test_a_jinja_template_gets_the_switch_under_both_names_and_the_other_variables():
    template = ChatTemplate("{{ thinking }}/{{ enable_thinking }}/{{ effort | default('none') }}")
    messages = [{"role": "user", "content": "Hi"}]
    assert template.render(messages) == "//none"  # nothing set: the template's own defaults
    assert template.render(messages, thinking=True, template_kwargs={"effort": "high"}) == "True/True/high"
    assert template.render(messages, thinking=False) == "False/False/none"
    with pytest.raises(ValueError, match="^the template variable 'messages' is the renderer's own"):
        template.render(messages, template_kwargs={"messages": []})


# ----- the reasoning splitter ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, reasoning, answer", [
    ("step one, step two</think>The answer.", "step one, step two", "The answer."),
    ("<think>\nstep</think>\n\nThe answer.", "\nstep", "\n\nThe answer."),  # the model opened it itself
    ("</think>Straight to it.", "", "Straight to it."),
    ("still thinking when the tokens ran out", "still thinking when the tokens ran out", ""),
    ("cut in the marker </thi", "cut in the marker </thi", ""),
    ("a</think>b</think>c", "a", "b</think>c"),  # the first marker ends the reasoning
    ("x <think> y</think>z", "x <think> y", "z"),  # an opening marker past the start is text
    ("<thin", "<thin", ""),
    ("", "", ""),
])
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)
    for cut in range(len(text) + 1):  # every way of cutting it in two pieces, markers included
        assert _stream([text[:cut], text[cut:]]) == ([reasoning], [answer])
    assert _stream(list(text)) == ([reasoning], [answer])  # one character per piece


def test_the_splitter_holds_back_only_what_may_be_a_marker():
    splitter = ReasoningSplitter()
    assert splitter.feed("<th") == ("", "")  # may still be <think>
    assert splitter.feed("ink>Let me see. </") == ("Let me see. ", "")
    assert splitter.feed("b> and </th") == ("</b> and ", "")
    assert splitter.feed("ink>") == ("", "")
    assert splitter.feed(" Yes.") == ("", " Yes.")
    assert splitter.feed("</think>") == ("", "</think>")
    assert splitter.finish() == ("", "")


def _stream(pieces: list[str]) -> tuple[list[str], list[str]]:
    splitter, reasoning, answer = ReasoningSplitter(), [], []
    for piece in [*pieces, None]:
        r, a = splitter.feed(piece) if piece is not None else splitter.finish()
        reasoning.append(r)
        answer.append(a)
    return ["".join(reasoning)], ["".join(answer)]


# ----- a model that thinks -------------------------------------------------------------------------------
@functools.cache
def thinking_tiny() -> tuple[DeepSeekV3, Tokenizer, str]:
    """The tiny preset trained on one conversation in V3.1's format, in thinking and non-thinking mode."""
    conversation = [{"role": "user", "content": QUESTION}]
    think = deepseek_v31_format(conversation, thinking=True) + f"{REASONING}</think>{ANSWER}{EOS}"
    plain = deepseek_v31_format(conversation, thinking=False) + ANSWER + EOS
    text = (think + plain) * 8
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([text] * 8, vocab_size=300)
    model = DeepSeekV3(preset("tiny"))
    model.init_weights(std=0.02)
    with one_thread():
        _train(model, torch.tensor(tokenizer.encode(text * 2)), 64, 8)
    model.eval()
    directory = tempfile.mkdtemp(prefix="dsv3-thinking-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    save_pretrained(model, directory)
    tokenizer.save(directory)
    return model, tokenizer, directory


def test_the_model_thinks_only_when_asked():
    model, tok, _ = thinking_tiny()
    engine = Engine(model, tok, cache_dtype="fp32")
    params = SamplingParams(max_new_tokens=80, stop_token_ids=(tok.eos_id,))
    conversation = [{"role": "user", "content": QUESTION}]
    thought, plain = engine.generate([tok.encode(deepseek_v31_format(conversation, thinking=t)) for t in (True, False)],
                                     params)
    assert thought.text == f"{REASONING}</think>{ANSWER}" and plain.text == ANSWER
    assert len(tok.encode("</think>")) == 3  # the marker comes in pieces: the stream splits it


# ----- the server ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def thinking_server(builtin: str = "v3.1", thinking: bool | None = None):
    """The thinking model behind the real app (like server_helpers.live_server), with the built-in format
    `builtin` and the server-wide default `thinking`."""
    pytest.importorskip("uvicorn")
    from server_helpers import serve_app

    from dsv3.serve.app import ServerConfig, create_app

    model, tok, _ = thinking_tiny()
    engine = Engine(copy.deepcopy(model), tok, max_batch=4, cache_dtype="fp32")
    config = ServerConfig(model_name=NAME, api_key=KEY, thinking=thinking)
    app = create_app(engine, tok, config, ChatTemplate(builtin=builtin))
    with serve_app(app) as port:
        yield port


@pytest.fixture(scope="module")
def port():
    with thinking_server() as p:
        yield p


def ask(port, kwargs=None, **body):
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 80,
            "temperature": 0, **body}
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    return call(port, "POST", "/v1/chat/completions", body)


def stream(port, kwargs=None, **body) -> list[dict]:
    """The chunks of a streamed chat answer, [DONE] checked and left out."""
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 80,
            "temperature": 0, "stream": True, **body}
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = [line.removeprefix("data: ") for line in resp.read().decode().split("\n\n") if line]
    conn.close()
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("kwargs", [{"thinking": True}, {"enable_thinking": True},
                                    {"thinking": True, "enable_thinking": True, "unused_variable": [1, 2]}])
def test_thinking_answers_the_reasoning_apart(port, kwargs):
    status, out = ask(port, kwargs)
    assert status == 200
    assert out["choices"][0]["message"] == {"role": "assistant", "reasoning_content": REASONING, "content": ANSWER}
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kwargs", [None, {}, {"thinking": False}, {"enable_thinking": False}])
def test_without_thinking_the_answer_is_as_before(port, kwargs):
    status, out = ask(port, kwargs)
    assert status == 200 and out["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    deltas = [c["choices"][0]["delta"] for c in stream(port, kwargs) if c["choices"]]
    assert all(set(d) <= {"role", "content"} for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == ANSWER


def test_streamed_reasoning_comes_in_its_own_deltas_before_the_answer(port):
    chunks = stream(port, {"thinking": True}, stream_options={"include_usage": True})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] > 10
    kinds = [next(iter(d)) for d in deltas[1:-1]]
    assert all(len(d) == 1 for d in deltas[1:-1])  # each delta is reasoning or answer, never both
    split = kinds.index("content")
    assert set(kinds[:split]) == {"reasoning_content"} and set(kinds[split:]) == {"content"} and split > 3
    assert "".join(d["reasoning_content"] for d in deltas[1 : 1 + split]) == REASONING
    assert "".join(d["content"] for d in deltas[1 + split : -1]) == ANSWER


def test_streamed_logprobs_cover_every_token_once_in_thinking_mode(port):
    whole = ask(port, {"thinking": True}, logprobs=True)[1]["choices"][0]["logprobs"]["content"]
    chunks = stream(port, {"thinking": True}, logprobs=True)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert "".join(e["token"] for e in whole) == f"{REASONING}</think>{ANSWER}"


def test_the_openai_client_reads_reasoning_content(port):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    kw = dict(model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=80, temperature=0,
              extra_body={"chat_template_kwargs": {"thinking": True}})
    message = client.chat.completions.create(**kw).choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER


def test_tokenize_renders_with_the_switch(port):
    _, tok, _ = thinking_tiny()
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}]}
    for thinking, end in ((True, "<｜Assistant｜><think>"), (False, "<｜Assistant｜></think>")):
        status, out = call(port, "POST", "/tokenize", {**body, "chat_template_kwargs": {"thinking": thinking}})
        assert status == 200 and tok.decode(out["tokens"]) == f"{BOS}{USER}{QUESTION}{end}"


@pytest.mark.parametrize("kwargs, param, message", [
    ("thinking", "chat_template_kwargs", "invalid value for 'chat_template_kwargs': must be an object of chat "
                                         "template variables, such as {\"thinking\": true}"),
    ([True], "chat_template_kwargs", None),
    ({"thinking": "yes"}, "chat_template_kwargs.thinking",
     "invalid value for 'chat_template_kwargs.thinking': must be true or false"),
    ({"enable_thinking": 1}, "chat_template_kwargs.enable_thinking",
     "invalid value for 'chat_template_kwargs.enable_thinking': must be true or false"),
    ({"thinking": True, "enable_thinking": False}, "chat_template_kwargs",
     "invalid value for 'chat_template_kwargs': thinking and enable_thinking are two names of one switch and "
     "disagree; send one"),
    ({"messages": []}, "chat_template_kwargs",
     "invalid value for 'chat_template_kwargs': 'messages' is set by the server itself, not by a template variable"),
])
def test_bad_chat_template_kwargs_get_a_400_naming_the_field(port, kwargs, param, message):
    status, out = ask(port, kwargs)
    assert status == 400 and out["error"]["param"] == param and out["error"]["code"] == "invalid_value"
    if message is not None:
        assert out["error"]["message"] == message
    assert ask(port, {"thinking": True})[0] == 200  # the server goes on serving


def test_the_server_wide_default_and_a_format_without_thinking():
    with thinking_server(thinking=True) as p:
        assert ask(p)[1]["choices"][0]["message"]["reasoning_content"] == REASONING  # the server's default
        assert ask(p, {"thinking": False})[1]["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    with thinking_server(builtin="v3") as p:
        status, out = ask(p, {"thinking": True})
        assert status == 400 and out["error"]["param"] == "chat_template_kwargs.thinking"
        assert out["error"]["message"] == ("this model renders chats with DeepSeek-V3's chat format, which has no "
                                           "thinking mode; send thinking: false, or serve the model with "
                                           "--chat-format v3.1 (DeepSeek-V3.1's)")
        assert ask(p, {"thinking": False})[0] == 200


# ----- the command line ----------------------------------------------------------------------------------
def test_chat_thinking_shows_the_reasoning_apart_and_keeps_only_answers(monkeypatch, capsys):
    model, tok, directory = thinking_tiny()
    rendered = []
    render = ChatTemplate.render

    def recording(self, messages, *args, **kwargs):
        rendered.append((copy.deepcopy(list(messages)), kwargs.get("thinking")))
        return render(self, messages, *args, **kwargs)

    monkeypatch.setattr(ChatTemplate, "render", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n{QUESTION}\n"))
    assert main(["chat", "--model", directory, "--chat-format", "v3.1", "--thinking", "--max-new-tokens", "80",
                 "--temperature", "0", "--cache-dtype", "fp32", "--dtype", "fp32"]) == 0
    out = capsys.readouterr()
    # the second turn's history holds the first answer alone, and both turns were rendered in thinking mode
    turns = [m for m, _ in rendered[1:]]
    assert turns[1] == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
                        {"role": "user", "content": QUESTION}]
    assert all(thinking is True for _, thinking in rendered)
    engine = Engine(model, tok, cache_dtype="fp32")
    params = SamplingParams(max_new_tokens=80, stop_token_ids=(tok.eos_id,))
    second = split_reasoning(engine.generate([tok.encode(deepseek_v31_format(turns[1], thinking=True))],
                                             params)[0].text)
    assert out.out.splitlines() == [ANSWER, second[1]]  # stdout: the answers only
    assert out.err.splitlines()[0] == REASONING and "</think>" not in out.err + out.out


def test_thinking_needs_a_format_with_the_switch(monkeypatch, capsys):
    _, _, directory = thinking_tiny()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--model", directory, "--thinking"]) == 2
    err = capsys.readouterr().err
    assert ("--thinking needs a chat format with a thinking mode, and this model has no chat template "
            "(DeepSeek-V3's chat format has none); add --chat-format v3.1") in err
    pytest.importorskip("uvicorn")
    assert main(["serve", "--model", directory, "--thinking", "--port", str(free_port())]) == 2
    assert "add --chat-format v3.1" in capsys.readouterr().err
