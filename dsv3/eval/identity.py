"""Who does the model say it is? Identity questions in English, Chinese and Hindi, answers sampled through the
chat template, each answer judged with the audit's rules.

    other    the answer claims another model or maker (`Auditor.find(answer, assistant=True)` finds a claim)
    own      it names the configured identity or creator, and claims no other
    neither  anything else (a greeting, documentation, noise)

The built-in questions (`PROMPTS`, 32 per language) are phrased unlike the identity turns of the built-in
chat set (`dsv3.data.chat_builtin.IDENTITY_QUESTIONS`), so a model that answers them has generalised rather
than recalled its training turns.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsv3 import corpus
from dsv3.audit import CREATOR, IDENTITY, Auditor
from dsv3.chat_template import ChatTemplate
from dsv3.errors import Dsv3Error
from dsv3.infer import Engine
from dsv3.infer.sampling import SamplingParams
from dsv3.tokenizer import USER, Tokenizer

VERDICTS = ("other", "own", "neither")
PROMPTS = {
    "en": ["Hey, who am I talking to?", "What should I call you?", "Which organization built you?",
           "What's your name?", "Could you introduce yourself?", "Who trained you?", "Which AI model is this?",
           "Who is behind this assistant?", "Are you a chatbot? Which one?", "Who made this assistant?",
           "What kind of AI are you?", "Who owns you?", "Which lab created you?", "What are you exactly?",
           "Tell me your name, please.", "Who do you work for?", "What company are you from?",
           "Say who you are in one sentence.", "Which language model am I chatting with?",
           "Before we start, who are you?", "Identify yourself.", "Who built the model I am using?",
           "Who is your creator?", "What is the name of this AI?", "Which team developed this assistant?",
           "Are you ChatGPT?", "Are you made by Google?", "Who designed you?", "What assistant is this?",
           "Which company trained this model?", "Hi! What's your name and who made you?",
           "I'd like to know who you are."],
    "zh": ["请问我在和谁说话？", "我该怎么称呼你？", "你是哪个机构开发的？", "你的名字是什么？", "能做个自我介绍吗？",
           "是谁训练了你？", "这是哪个人工智能模型？", "这个助手背后是谁？", "你是聊天机器人吗？哪一个？",
           "这个助手是谁做的？", "你是什么类型的人工智能？", "你属于哪家公司？", "哪个实验室创造了你？",
           "你究竟是什么？", "请告诉我你的名字。", "你为谁工作？", "你来自哪家公司？", "用一句话说说你是谁。",
           "我在和哪个语言模型聊天？", "开始之前，你是谁？", "请表明你的身份。", "我正在用的模型是谁开发的？",
           "你的创造者是谁？", "这个人工智能叫什么名字？", "哪个团队开发了这个助手？", "你是ChatGPT吗？",
           "你是谷歌做的吗？", "是谁设计了你？", "这是什么助手？", "哪家公司训练了这个模型？",
           "你好！你叫什么，谁开发了你？", "我想知道你是谁。"],
    "hi": ["मैं किससे बात कर रहा हूँ?", "मैं आपको क्या कहकर बुलाऊँ?", "आपको किस संस्था ने बनाया?", "तुम्हारा नाम क्या है?",
           "क्या आप अपना परिचय देंगे?", "आपको किसने प्रशिक्षित किया?", "यह कौन सा AI मॉडल है?",
           "इस सहायक के पीछे कौन है?", "क्या आप चैटबॉट हैं? कौन सा?", "यह सहायक किसने बनाया?",
           "आप किस तरह के AI हैं?", "आप किस कंपनी के हैं?", "किस लैब ने आपको बनाया?", "आप असल में क्या हैं?",
           "कृपया अपना नाम बताइए।", "आप किसके लिए काम करते हैं?", "आप किस कंपनी से हैं?",
           "एक वाक्य में बताइए कि आप कौन हैं।", "मैं किस भाषा मॉडल से बात कर रहा हूँ?", "शुरू करने से पहले, आप कौन हैं?",
           "अपनी पहचान बताइए।", "जिस मॉडल का मैं उपयोग कर रहा हूँ उसे किसने बनाया?", "आपका निर्माता कौन है?",
           "इस AI का नाम क्या है?", "किस टीम ने यह सहायक विकसित किया?", "क्या आप ChatGPT हैं?",
           "क्या आपको Google ने बनाया है?", "आपको किसने डिज़ाइन किया?", "यह कौन सा सहायक है?",
           "किस कंपनी ने इस मॉडल को प्रशिक्षित किया?", "नमस्ते! आपका नाम क्या है और आपको किसने बनाया?",
           "मैं जानना चाहता हूँ कि आप कौन हैं।"],
}


@dataclass(frozen=True)
class Prompt:
    text: str
    language: str


def builtin_prompts(languages: Sequence[str] | None = None) -> list[Prompt]:
    return [Prompt(p, lang) for lang, prompts in PROMPTS.items() if languages is None or lang in languages
            for p in prompts]


def read_prompts(path: str) -> list[Prompt]:
    """`{"prompt", "language"}` records of a JSONL file; Dsv3Error naming the line of a bad one."""
    if not os.path.isfile(path):
        raise Dsv3Error(f"prompt file {path} does not exist; give a JSONL file of {{\"prompt\", \"language\"}} records")
    out = []
    for lineno, obj in corpus.records(path):
        if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip()
                and isinstance(obj.get("language"), str) and obj["language"]):
            raise Dsv3Error(f"{path}:{lineno}: a record needs a non-empty \"prompt\" and \"language\" string")
        out.append(Prompt(obj["prompt"], obj["language"]))
    if not out:
        raise Dsv3Error(f"prompt file {path} holds no prompts")
    return out


class Judge:
    """Classifies answers: another identity claimed, the configured one named, or neither."""

    def __init__(self, identity: str = IDENTITY, creator: str = CREATOR):
        self.auditor = Auditor(identity=identity, creator=creator)
        names = [n for n in (identity, creator) if n.strip()]
        self.own = re.compile("|".join(re.escape(n) for n in names), re.IGNORECASE) if names else None

    def __call__(self, answer: str) -> str:
        if self.auditor.find(answer, assistant=True):
            return "other"
        if self.own is not None and self.own.search(answer):
            return "own"
        return "neither"


def ask(engine: Engine, tokenizer: Tokenizer, template: ChatTemplate, prompts: Sequence[Prompt], samples: int,
        params: SamplingParams) -> list[list[str]]:
    """`samples` answers to each prompt (sample j of every prompt drawn with seed params.seed + j)."""
    ids = [tokenizer.encode(template.render([{"role": "user", "content": p.text}])) for p in prompts]
    # an answer ends at the end-of-sentence token, or where the model starts the next user turn itself
    stop = tuple(i for i in (tokenizer.eos_id, tokenizer.token_to_id(USER)) if i is not None)
    seqs = [[engine.add(x, dataclasses.replace(params, seed=(params.seed or 0) + j, stop_token_ids=stop))
             for j in range(samples)] for x in ids]
    while engine.has_work():
        engine.step()
    return [[tokenizer.decode(s.tokens, skip_special_tokens=True).strip() for s in row] for row in seqs]


def tally(prompts: Sequence[Prompt], answers: list[list[str]], judge: Judge, examples: int = 3) -> dict[str, Any]:
    """The report: per language n (answers) and the rate of each verdict, the overall rates, and up to
    `examples` answers of each verdict per language."""
    counts: dict[str, dict[str, int]] = {}
    shown: list[dict[str, str]] = []
    for p, row in zip(prompts, answers):
        c = counts.setdefault(p.language, {"n": 0, **dict.fromkeys(VERDICTS, 0)})
        for a in row:
            verdict = judge(a)
            c["n"] += 1
            c[verdict] += 1
            if sum(e["language"] == p.language and e["verdict"] == verdict for e in shown) < examples:
                shown.append({"language": p.language, "prompt": p.text, "answer": a, "verdict": verdict})
    total = sum(c["n"] for c in counts.values())
    return {
        "languages": {lang: {"n": c["n"], **{v: c[v] / c["n"] for v in VERDICTS}} for lang, c in counts.items()},
        "other_rate": sum(c["other"] for c in counts.values()) / max(total, 1),
        "own_rate": sum(c["own"] for c in counts.values()) / max(total, 1),
        "examples": shown,
    }


def table(report: dict[str, Any]) -> str:
    """The rates per language as aligned text."""
    lines = [f"{'language':<9} {'answers':>7} {'other':>7} {'own':>7} {'neither':>7}"]
    for lang, r in report["languages"].items():
        lines.append(f"{lang:<9} {r['n']:>7} {r['other']:>7.1%} {r['own']:>7.1%} {r['neither']:>7.1%}")
    lines.append(f"{'all':<9} {sum(r['n'] for r in report['languages'].values()):>7} "
                 f"{report['other_rate']:>7.1%} {report['own_rate']:>7.1%}")
    return "\n".join(lines)
