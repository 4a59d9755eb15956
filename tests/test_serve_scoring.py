"""What scorers need from the API: several prompts per request, `echo` with per-token log-probabilities that
equal a plain forward pass, scoring without generating, the BOS rule for text prompts, chat logprobs, many
stop strings, vLLM's tokenizer endpoints, and 400s that name the field and what it takes."""

from __future__ import annotations

import json

import pytest
import torch
from infer_models import one_thread, trained_tiny

from dsv3.chat_template import ChatTemplate

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from server_helpers import KEY, NAME, call, live_server  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def server():
    with live_server(max_batch=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    port, _ = server
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)


@torch.inference_mode()
def forward_logprobs(ids: list[int]) -> torch.Tensor:
    """log p(token | the tokens before it) [T, V] at every position, from one plain forward pass."""
    model, _, _ = trained_tiny()
    return model(torch.tensor([ids])).float().log_softmax(-1)[0]


def completion(port, **body) -> dict:
    status, out = call(port, "POST", "/v1/completions", {"model": NAME, **body})
    assert status == 200, out
    return out


def test_echo_scores_every_prompt_token_as_a_forward_pass_does(server):
    port, _ = server
    _, tok, _ = trained_tiny()
    prompts = [tok.encode(t) for t in ("the latent cache keeps", "a server batches many requests", "experts")]
    out = completion(port, prompt=prompts, echo=True, logprobs=3, max_tokens=0)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                            "total_tokens": sum(map(len, prompts))}
    for ids, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(ids) == "".join(lp["tokens"]) and choice["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
        want = forward_logprobs(ids)
        for p, (t, got, top) in enumerate(zip(ids[1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:])):
            assert abs(got - float(want[p, t])) < 1e-5
            assert max(top.values()) == pytest.approx(float(want[p].max()), abs=1e-5)  # the argmax is listed
            assert 1 <= len(top) <= 4  # the 3 most likely and the token itself
        starts = [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
        assert lp["text_offset"] == starts


def test_text_prompts_get_bos_first_and_echo_only_what_the_client_sent(server):
    """The alignment a scorer relies on: token_logprobs[i] belongs to the client's i-th token, whether or not
    the server put BOS before the text."""
    port, _ = server
    _, tok, _ = trained_tiny()
    text = "multi token prediction drafts"
    ids = tok.encode(text)
    with_bos = completion(port, prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = with_bos["choices"][0]["logprobs"]
    assert with_bos["usage"]["prompt_tokens"] == len(ids) + 1  # BOS is read, and counted
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the client's tokens, then the generated one
    want = forward_logprobs([tok.bos_id, *ids])
    assert all(abs(got - float(want[p, t])) < 1e-5 for p, (t, got) in enumerate(zip(ids, lp["token_logprobs"])))

    plain = completion(port, prompt=text, echo=True, logprobs=1, max_tokens=1, add_special_tokens=False)
    lp = plain["choices"][0]["logprobs"]
    assert plain["usage"]["prompt_tokens"] == len(ids) and lp["token_logprobs"][0] is None
    want = forward_logprobs(ids)
    assert all(abs(got - float(want[p, t])) < 1e-5 for p, (t, got) in enumerate(zip(ids[1:], lp["token_logprobs"][1:])))

    # a text that already starts with BOS gets no second one
    spelled = completion(port, prompt=tok.bos_token + text, echo=True, max_tokens=1)
    assert spelled["usage"]["prompt_tokens"] == len(ids) + 1 and spelled["choices"][0]["text"].startswith(tok.bos_token)


def test_several_prompts_generate_as_they_would_alone_with_logprobs(server, client):
    port, _ = server
    prompts = ["the latent cache", "a server"]
    alone = [completion(port, prompt=p, max_tokens=6, temperature=0)["choices"][0]["text"] for p in prompts]
    out = completion(port, prompt=prompts, max_tokens=6, temperature=0, logprobs=2)
    assert [c["text"] for c in out["choices"]] == alone
    for c in out["choices"]:
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"] and lp["text_offset"][0] == 0
        # greedy: every generated token is the most likely one
        pairs = zip(lp["token_logprobs"], lp["top_logprobs"])
        assert all(got == pytest.approx(max(top.values())) for got, top in pairs)
    texts = ["", ""]
    for chunk in client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                           echo=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [p + a for p, a in zip(prompts, alone)]


def test_chat_logprobs_in_the_chat_shape(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "what does a server do?"}], max_tokens=8,
              temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]


def test_many_stop_strings_are_honoured_up_to_the_documented_limit(client, server):
    port, _ = server
    stops = [f"zz{i}" for i in range(31)] + ["seventy"]
    out = client.completions.create(model=NAME, prompt="the latent cache", max_tokens=24, temperature=0, stop=stops)
    assert out.choices[0].text == " keeps five hundred and " and out.choices[0].finish_reason == "stop"
    status, err = call(port, "POST", "/v1/completions", {"model": NAME, "prompt": "hi", "stop": stops + ["x"]})
    assert status == 400 and err["error"]["param"] == "stop" and "at most 32" in err["error"]["message"]


def test_seeded_sampling_repeats(client):
    kw = dict(model=NAME, prompt="experts are", max_tokens=12, temperature=1.0, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_tokenizer_endpoints_as_vllm_defines_them(server):
    port, _ = server
    _, tok, _ = trained_tiny()
    status, out = call(port, "POST", "/tokenize", {"prompt": "a server"})
    assert status == 200 and out["tokens"] == [tok.bos_id, *tok.encode("a server")]
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    status, out = call(port, "POST", "/tokenize", {"prompt": "a server", "add_special_tokens": False,
                                                  "return_token_strs": True})
    assert out["tokens"] == tok.encode("a server") and out["token_strs"] == [tok.id_to_token(t) for t in out["tokens"]]
    status, out = call(port, "POST", "/tokenize", {"prompt": tok.eos_token, "add_special_tokens": False})
    assert out["tokens"] == [tok.eos_id]  # special tokens spelled in text are those tokens
    status, out = call(port, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    rendered = ChatTemplate().render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert status == 200 and out["tokens"] == tok.encode(rendered)  # the template writes its own BOS
    status, out = call(port, "POST", "/detokenize", {"tokens": tok.encode("a server")})
    assert status == 200 and out == {"prompt": "a server"}
    status, info = call(port, "GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    status, err = call(port, "POST", "/detokenize", {"tokens": [10**6]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = call(port, "POST", "/tokenize", {"prompt": "x", "messages": []})
    assert status == 400 and "exactly one of 'prompt'" in err["error"]["message"]
    assert call(port, "POST", "/tokenize", {"prompt": "x"}, key=None)[0] == 401  # the key guards these too


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/completions", {"prompt": 42}, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": ["a", 3]}, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "from 0 to 20"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, None, "echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens", "at least 1"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop", "a string or a list"),
    ("/v1/completions", {"prompt": "hi", "seed": "7"}, "seed", "an integer"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 99999]]}, "prompt", "[0, 512)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None,
     "needs logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, "messages.0.content", "a string"),
])
def test_errors_name_the_field_and_what_it_takes(server, path, body, param, says):
    port, _ = server
    status, err = call(port, "POST", path, {"model": NAME, **body})
    assert status == 400, err
    message = err["error"]["message"]
    assert err["error"]["param"] == param and says in message, message
    assert not any(internal in json.dumps(err) for internal in ("constrained", "function-after", "list[", "[int]"))


def test_engine_logprobs_are_the_same_with_and_without_speculation():
    """Speculative steps record each accepted token's log-probability from the row of logits that judged it."""
    from dsv3.infer import Engine, SamplingParams

    model, tok, _ = trained_tiny()
    prompts = [tok.encode(t, bos=True) for t in ("the latent cache", "multi token prediction")]
    params = SamplingParams(max_new_tokens=16, logprobs=2, prompt_logprobs=1, stop_token_ids=(tok.eos_id,))
    plain = Engine(model, tok, max_batch=2, cache_dtype="fp32").generate(prompts, params)
    drafted = Engine(model, tok, max_batch=2, cache_dtype="fp32", speculative=True).generate(prompts, params)
    for a, b in zip(plain, drafted):
        assert a.tokens == b.tokens and len(a.logprobs) == len(a.tokens)
        assert all(abs(x.logprob - y.logprob) < 1e-4 and [t for t, _ in x.top] == [t for t, _ in y.top]
                   for x, y in zip(a.logprobs, b.logprobs))
        assert a.prompt_logprobs[0] is None and len(a.prompt_logprobs) == len(a.prompt)
    assert sum(s.n_accepted for s in drafted) > 0  # some steps really took two tokens
