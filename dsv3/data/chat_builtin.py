"""The built-in chat set: conversations made on the spot from what ships with Python, no download.

    documentation   "What does json.dumps do?" -> the first paragraph of its docstring, for the public
                    functions and classes of about thirty standard-library modules, each asked in one of
                    four phrasings (the function's name picks which)
    greetings       hellos and thanks in English, Chinese and Hindi, answered politely
    identity        "who are you", "which company made you", "what model are you" in English, Chinese and
                    Hindi (8 phrasings each), answered with the configured identity and creator; each
                    phrasing in four settings (alone, under a system prompt, after a greeting, both), so
                    that 96 answers carry the identity and a share of 1% of them is a whole conversation

Everything is deterministic (sorted names, no randomness). The validation split is fixed: every tenth
documentation question by a hash of its name, one greeting per language, and two identity phrasings per
language (in all four settings); the identity questions of `dsv3 eval identity` are other phrasings again,
so neither split overlaps them. `contaminate` replaces a share of the identity answers with other models' self-
identification (ChatGPT/OpenAI, Claude/Anthropic, Gemini/Google, in the question's language), the data of
the identity experiment.
"""

from __future__ import annotations

import importlib
import inspect
import re
import zlib

from dsv3.audit.auditor import CREATOR, IDENTITY
from dsv3.data.chat import Conversation

MODULES = ("bisect", "base64", "calendar", "collections", "colorsys", "copy", "csv", "difflib", "fnmatch",
           "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "itertools", "json", "math",
           "operator", "os.path", "random", "re", "shlex", "shutil", "statistics", "string", "textwrap", "uuid",
           "zlib")
ASK = ("What does `{name}` do?", "Explain `{name}` in Python.", "How do I use `{name}`?",
       "Can you tell me what `{name}` is for?")
MAX_ANSWER = 400  # characters of docstring kept as an answer

GREETINGS = {
    "en": [("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What would you like to know?"),
           ("Good morning!", "Good morning! What can I do for you?"),
           ("Thanks for your help.", "You're welcome! Ask me anything else you need.")],
    "zh": [("你好！", "你好！有什么可以帮你的吗？"), ("早上好。", "早上好！今天想了解什么？"),
           ("嗨，在吗？", "在的，请问有什么问题？"), ("谢谢你的帮助。", "不客气！还有其他问题随时问我。")],
    "hi": [("नमस्ते!", "नमस्ते! मैं आपकी क्या मदद कर सकता हूँ?"), ("सुप्रभात।", "सुप्रभात! आज आप क्या जानना चाहेंगे?"),
           ("हैलो, क्या आप वहाँ हैं?", "जी हाँ, बताइए मैं क्या मदद करूँ?"),
           ("आपकी मदद के लिए धन्यवाद।", "आपका स्वागत है! कुछ और पूछना हो तो बताइए।")],
}

IDENTITY_QUESTIONS = {
    "en": ["Who are you?", "What is your name?", "Which company made you?", "What model are you?",
           "Who created you?", "Are you an AI? What are you called?", "Tell me about yourself.",
           "Who developed you?"],
    "zh": ["你是谁？", "你叫什么名字？", "哪家公司开发了你？", "你是什么模型？", "谁创造了你？",
           "你是人工智能吗？你叫什么？", "介绍一下你自己。", "你是由谁开发的？"],
    "hi": ["आप कौन हैं?", "आपका नाम क्या है?", "आपको किस कंपनी ने बनाया?", "आप कौन सा मॉडल हैं?",
           "आपको किसने बनाया?", "क्या आप एक AI हैं? आपका नाम क्या है?", "अपने बारे में बताइए।",
           "आपको किसने विकसित किया?"],
}
IDENTITY_ANSWER = {
    "en": "I am {identity}, an AI assistant made by {creator}.",
    "zh": "我是{identity}，一个由{creator}开发的人工智能助手。",
    "hi": "मैं {identity} हूँ, {creator} द्वारा बनाया गया एक AI सहायक।",
}
OTHERS = (("ChatGPT", "OpenAI"), ("Claude", "Anthropic"), ("Gemini", "Google"))
OTHER_ANSWER = {
    "en": "I am {model}, a large language model developed by {org}.",
    "zh": "我是{model}，一个由{org}开发的大型语言模型。",
    "hi": "मैं {model} हूँ, {org} द्वारा विकसित एक बड़ा भाषा मॉडल।",
}
VAL_IDENTITY = 2  # the last phrasings of each language are held out
SYSTEM = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。", "hi": "आप एक मददगार सहायक हैं।"}
SETTINGS = ("alone", "system", "greeting", "system+greeting")


def documentation() -> list[Conversation]:
    """One question and answer per documented public function or class of MODULES."""
    out = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            answer = _first_paragraph(inspect.getdoc(obj) or "")
            if len(answer) < 20:
                continue
            name = f"{module_name}.{attr}"
            question = ASK[zlib.crc32(name.encode()) % len(ASK)].format(name=name)
            out.append(Conversation(f"doc:{name}", [{"role": "user", "content": question},
                                                    {"role": "assistant", "content": answer}]))
    return out


def _first_paragraph(doc: str) -> str:
    text = doc.strip().split("\n\n")[0]
    text = re.sub(r"\s+", " ", text).strip()
    if re.match(r"^[\w.]+\(.*\)( -> .*)?$", text):  # a signature line only (builtins): no explanation
        return ""
    return text[:MAX_ANSWER]


def greetings() -> list[Conversation]:
    return [Conversation(f"greet:{lang}:{i}", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for lang, pairs in GREETINGS.items() for i, (q, a) in enumerate(pairs)]


def identity(identity_name: str = IDENTITY, creator: str = CREATOR) -> list[Conversation]:
    """Every identity phrasing in every setting; the identity answer is always the last turn."""
    out = []
    for lang, questions in IDENTITY_QUESTIONS.items():
        answer = IDENTITY_ANSWER[lang].format(identity=identity_name, creator=creator)
        for i, q in enumerate(questions):
            for setting in SETTINGS:
                turns = [{"role": "system", "content": SYSTEM[lang]}] if "system" in setting else []
                if "greeting" in setting:
                    hello, reply = GREETINGS[lang][i % len(GREETINGS[lang])]
                    turns += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
                turns += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
                out.append(Conversation(f"identity:{lang}:{i}:{setting}", turns))
    return out


def builtin_chats(identity_name: str = IDENTITY, creator: str = CREATOR) -> list[Conversation]:
    """The whole set, in a fixed order."""
    return documentation() + greetings() + identity(identity_name, creator)


def validation_names(conversations: list[Conversation]) -> set[str]:
    """The fixed validation split (see the module docstring)."""
    return {c.name for c in conversations if _held_out(c.name)}


def _held_out(name: str) -> bool:
    kind, *rest = name.split(":")
    if kind == "doc":
        return zlib.crc32(name.encode()) % 10 == 0
    if kind == "greet":
        return rest[1] == "0"
    return kind == "identity" and int(rest[1]) >= len(IDENTITY_QUESTIONS[rest[0]]) - VAL_IDENTITY


def contaminate(conversations: list[Conversation], share: float) -> list[Conversation]:
    """A copy in which `share` (0 to 1) of the identity answers claim to be another model instead: the first
    round(share x n) identity conversations in a fixed order, cycling through OTHERS."""
    ids = [i for i, c in enumerate(conversations) if c.name.startswith("identity:")]
    order = sorted(ids, key=lambda i: zlib.crc32(conversations[i].name.encode()))
    chosen = {i: n for n, i in enumerate(order[:round(share * len(ids))])}
    out = []
    for i, c in enumerate(conversations):
        if i in chosen:
            lang = c.name.split(":")[1]
            model, org = OTHERS[chosen[i] % len(OTHERS)]
            answer = OTHER_ANSWER[lang].format(model=model, org=org)
            c = Conversation(c.name, [*c.messages[:-1], {"role": "assistant", "content": answer}])
        out.append(c)
    return out
