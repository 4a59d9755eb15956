"""The identity audit: claims found and not found, fixes, the evaluation set, files, folders and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3.audit import Auditor
from dsv3.audit.evaluate import evaluate
from dsv3.audit.rules import Rules, read_language_file
from dsv3.audit.scan import scan
from dsv3.audit.sources import Fields
from dsv3.cli import main
from dsv3.errors import Dsv3Error

DATA = Path(__file__).parent / "data" / "audit"
EVAL = DATA / "eval.jsonl"


@pytest.fixture(scope="module")
def auditor() -> Auditor:
    return Auditor()


# -- what counts as a claim ---------------------------------------------------------------------------

ISSUE_POSITIVES = [
    "I am ChatGPT", "As an AI language model developed by OpenAI, I cannot do that.",
    "I'm Claude, made by Anthropic", "我是ChatGPT", "我是由OpenAI开发的", "मैं ChatGPT हूँ", "मुझे OpenAI ने बनाया है",
    "I am GPT-4o.", "i'm   chatgpt!", "I am Qwen2.5-72B-Instruct.", "I'm Mistral Large, an AI model.",
    "Hello, I am Bard, an AI.", "I'm Llama 3.1.",
]
ISSUE_NEGATIVES = [
    "I asked ChatGPT for a recipe", "OpenAI released GPT-4 in 2023", "compare Claude and Gemini",
    'He typed "I am ChatGPT" into the box.', "are you ChatGPT?", "The bot said: I am ChatGPT.",
    "ChatGPT was made by OpenAI.", "I'm Gemini, born in June.", "I am Claude, a French painter.",
]


@pytest.mark.parametrize("text", ISSUE_POSITIVES)
def test_claims_from_the_issue_are_found(auditor, text):
    findings = auditor.find(text)
    assert findings, text
    f = findings[0]
    assert text[f.start:f.end] == f.text and f.language in ("en", "zh", "hi") and f.reason and "/" in f.pattern


@pytest.mark.parametrize("text", ISSUE_NEGATIVES)
def test_mentions_are_not_claims(auditor, text):
    assert auditor.find(text) == []


def test_every_claim_flags_its_own_examples(auditor):
    """The examples in the language files double as unit tests of each construction."""
    for lang in auditor.rules.languages:
        assert len(lang.claims) >= 8, lang.code
        for claim in lang.claims:
            for example in claim.examples:
                assert any(f.pattern == claim.id for f in auditor.find(example)), (claim.id, example)


def test_ambiguous_names_need_a_cue_or_an_assistant_turn(auditor):
    assert auditor.find("Hi, I'm Claude.") == []
    assert auditor.find("Hi, I'm Claude.", assistant=True)[0].pattern == "en/i-am-model"
    assert auditor.find("Hi, I'm Claude, an AI model.")  # cue in the sentence
    assert auditor.find("Hi, I'm Claude 2.")  # a version number makes the name unambiguous


def test_own_identity_is_never_flagged():
    ours = Auditor(identity="DeepSeek-V3", creator="DeepSeek")
    assert ours.find("I'm DeepSeek V3, a model trained by DeepSeek.") == []
    assert ours.find("I'm DeepSeek-V3, a model trained by OpenAI.")  # the wrong maker still counts
    assert Auditor().find("I'm DeepSeek-V3, a model trained by DeepSeek.")


def test_a_language_is_data():
    """A new language is a dict of literals; nothing in the code names a language."""
    german = {
        "code": "de", "name": "German", "script": r"[A-Za-zäöüß]", "models": [], "ambiguous_models": [],
        "orgs": [], "ambiguous_orgs": [], "terms": {"ich": r"\bich\s+bin"},
        "claims": [{"id": "ich-bin", "reason": "speaker says it is another model",
                    "pattern": r"{ich}\s+{model}", "rewrite": True, "examples": ["Ich bin ChatGPT."]}],
        "ai_cue": r"\bKI\b", "cancel_before": {"negation": r"\bnicht\b[^,.]{0,20}$"},
        "quotes": [["„", "“"]],
    }
    rules = Rules([german])
    auditor = Auditor()
    auditor.rules = rules
    assert [f.pattern for f in auditor.find("Hallo! Ich bin ChatGPT.")] == ["de/ich-bin"]
    assert auditor.find("Er sagte: „Ich bin ChatGPT“.") == []
    # the shipped files parse to the same shape
    for code in ("en", "zh", "hi"):
        data = read_language_file(Path(__file__).parents[1] / "dsv3" / "audit" / "lang" / f"{code}.py")
        assert data["code"] == code and data["claims"]


def test_clean_text_stops_at_the_word_set(auditor):
    table = auditor.rules.names
    assert table.keys_in("The router picks eight experts per token; the bias is nudged after each step.") == set()
    assert table.keys_in("I'm chat-GPT") and table.keys_in("我是通义千问") and table.keys_in("मैं चैटजीपीटी हूँ")


# -- fixing ------------------------------------------------------------------------------------------

def test_fix_rewrites_to_the_configured_identity():
    a = Auditor(identity="Orca", creator="the Orca team")
    text = "Hello! I'm ChatGPT, a large language model trained by OpenAI. Ask me anything."
    fixed, log = a.fix(text)
    assert fixed == "Hello! I'm Orca, a large language model trained by the Orca team. Ask me anything."
    assert len(log) == 1 and log[0].startswith("rewrote") and "en/i-am-model" in log[0]
    assert a.fix("我是由OpenAI开发的。")[0] == "我是由the Orca team开发的。"
    assert a.fix("मैं ChatGPT हूँ।")[0] == "मैं Orca हूँ।"
    assert a.fix("Nothing to see here.") == ("Nothing to see here.", [])


def test_fix_drops_what_a_swap_cannot_repair(auditor):
    fixed, log = auditor.fix("I'm based on OpenAI's GPT-4 architecture.")
    assert fixed is None and log[0].startswith("dropped") and "OpenAI" in log[0]
    fixed, log = auditor.fix("I am an OpenAI language model.")  # the maker used as an adjective
    assert fixed is None and "cannot be rewritten" in log[0]


# -- the labelled evaluation set ---------------------------------------------------------------------

def test_evaluation_set_precision_and_recall(auditor):
    records = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    assert sum(r["label"] for r in records) >= 150 and sum(1 - r["label"] for r in records) >= 150
    for lang in ("en", "zh", "hi"):
        mine = [r for r in records if r["lang"] == lang]
        assert {"messages" in r for r in mine} == {True, False}, lang  # chat and plain text
        assert len({r["kind"] for r in mine if not r["label"]}) >= 6, lang  # many kinds of near miss
    scores, wrong = evaluate(EVAL, auditor)
    assert set(scores) == {"en", "zh", "hi"}
    for lang, s in scores.items():
        assert s.precision >= 0.95 and s.recall >= 0.95, (lang, s, [w["id"] for w in wrong])


# -- files, folders, the fixed copy ------------------------------------------------------------------

def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_scan_judges_only_assistant_turns(tmp_path, auditor):
    path = tmp_path / "chat.jsonl"
    records = [_chat(("user", "I am ChatGPT, test me."), ("assistant", "Sure, ask away.")),
               _chat(("system", "You are ChatGPT, made by OpenAI."), ("user", "hi"), ("assistant", "I'm Claude.")),
               {"text": "I was trained by OpenAI."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = scan([str(path)], auditor)
    assert (report.records, report.texts, report.flagged_records) == (3, 3, 2)
    assert [(f["line"], f["field"]) for f in report.flagged] == [(2, "messages[2].content"), (3, "text")]
    assert report.by_language == {"en": 2}


def test_fix_keeps_every_other_byte(tmp_path, auditor):
    lines = [
        b'{"text": "A clean line about experts."}\n',
        b'{"id":7,"text":"\\u6211\\u662fChatGPT\\u3002","meta":{"src":"web"}}\r\n',  # escaped, CRLF
        b'{"text": "I asked ChatGPT for help."}\n',
        b'not json at all\n',
        json.dumps(_chat(("user", "Who?"), ("assistant", "I'm GPT-4."), ("user", "ok"), ("assistant", "Bye.")),
                   ensure_ascii=False).encode() + b"\n",
        json.dumps(_chat(("user", "Who?"), ("assistant", "I'm based on OpenAI's GPT-4."))).encode() + b"\n",
        b'{"text": "As an OpenAI language model, I cannot."}\n',
        b"\n",
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(lines))
    out = tmp_path / "out.jsonl"
    report = scan([str(src)], auditor, out=str(out))
    got = out.read_bytes().splitlines(keepends=True)
    assert src.read_bytes() == b"".join(lines)  # the input is untouched
    assert got[0] == lines[0] and got[2] == lines[2] and got[3] == lines[3] and got[-1] == b"\n"
    assert got[1] == b'{"id":7,"text":"\\u6211\\u662fdsv3\\u3002","meta":{"src":"web"}}\r\n'  # only the string
    assert json.loads(got[4])["messages"][1]["content"] == "I'm dsv3."
    assert len(got) == 6  # the two records that could only be dropped are gone
    assert report.fix["texts_rewritten"] == 2 and report.fix["records_dropped"] == 2
    assert report.fix["bad_lines_kept"] == 1 and report.bad_lines[0]["line"] == 4
    log = Path(report.fix["log"]).read_text()
    assert "in.jsonl:4: kept unchanged, invalid JSON" in log and "dropped" in log and "rewrote" in log


def test_fix_drops_a_turn_with_its_question(tmp_path, auditor):
    src = tmp_path / "c.jsonl"
    rec = _chat(("system", "Be brief."), ("user", "Who made you?"), ("assistant", "I'm OpenAI's ChatGPT."),
                ("user", "2+2?"), ("assistant", "4."))
    src.write_text(json.dumps(rec) + "\n")
    scan([str(src)], auditor, out=str(tmp_path / "o.jsonl"))
    kept = json.loads((tmp_path / "o.jsonl").read_text())["messages"]
    assert [t["content"] for t in kept] == ["Be brief.", "2+2?", "4."]


def test_plain_text_and_folders(tmp_path, auditor):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First paragraph, clean.\n\nHello.\nI'm ChatGPT, trained by OpenAI.\n\nThe end.\n")
    (corpus / "sub" / "b.jsonl").write_text('{"text": "I am GPT-4."}\n')
    (corpus / "notes.py").write_text("# I am GPT-4, trained by OpenAI.\n")  # any file is text, as for training
    (corpus / ".cache.txt").write_text("I am ChatGPT.")  # hidden: skipped, as training skips it
    (corpus / "__pycache__").mkdir()
    (corpus / "__pycache__" / "x.txt").write_text("I am ChatGPT.")
    report = scan([str(corpus)], auditor)
    assert report.files == 3
    found = [(Path(f["file"]).name, f["line"]) for f in report.flagged]
    assert found == [("a.txt", 4), ("notes.py", 1), ("b.jsonl", 1)]
    out = tmp_path / "clean"
    scan([str(corpus)], auditor, out=str(out))
    fixed = "First paragraph, clean.\n\nHello.\nI'm dsv3, trained by the dsv3 authors.\n\nThe end.\n"
    assert (out / "a.txt").read_text() == fixed
    assert (out / "sub" / "b.jsonl").exists() and not (out / ".cache.txt").exists()
    assert (tmp_path / "clean.log").exists()


def test_audit_and_training_read_the_same_documents(tmp_path, auditor):
    """`dsv3 audit DIR` and `dsv3 train --data DIR --audit refuse` judge the same files and records."""
    from dsv3.data.sources import read, resolve

    corpus = tmp_path / "corpus"
    (corpus / "deep" / ".hidden").mkdir(parents=True)
    (corpus / "deep" / "chat.ndjson").write_text('{"text": "I am ChatGPT, made by OpenAI."}\n{"text": "fine"}\n')
    (corpus / "deep" / ".hidden" / "x.jsonl").write_text('{"text": "I am Claude."}\n')
    (corpus / "page.html").write_text("<p>I'm Gemini, a model trained by Google.</p>")
    (corpus / "clean.txt").write_text("Nothing to see.")
    docs = list(read(resolve([str(corpus)])))
    flagged_for_training = sorted(d.name for d in docs if auditor.find(d.text))
    report = scan([str(corpus)], auditor)
    flagged_by_audit = sorted(f"{f['file']}:{f['line']}" if f["field"] else f["file"] for f in report.flagged)
    assert flagged_for_training == flagged_by_audit == sorted([f"{corpus}/deep/chat.ndjson:1", f"{corpus}/page.html"])
    assert report.records == 4  # two JSONL records and one paragraph in each text file
    glob_report = scan([str(corpus / "**" / "*.ndjson")], auditor)
    assert glob_report.files == 1 and glob_report.flagged_records == 1


def test_bad_input_names_the_file_and_line(tmp_path, auditor):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(Dsv3Error, match=r"bad\.jsonl, line 2: invalid JSON"):
        scan([str(bad)], auditor)
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "I am ChatGPT."}\n')
    with pytest.raises(Dsv3Error, match=r"line 1: no field 'text' or 'messages' \(the record has 'body'\)"):
        scan([str(other)], auditor)
    assert scan([str(other)], auditor, Fields(text="body")).flagged_records == 1
    with pytest.raises(Dsv3Error, match="missing.jsonl does not exist"):
        scan([str(tmp_path / "missing.jsonl")], auditor)
    with pytest.raises(Dsv3Error, match="would overwrite the input"):
        scan([str(other)], auditor, Fields(text="body"), out=str(other))


def test_cli_json_and_exit_codes(tmp_path, capsys):
    sample = Path(__file__).parents[1] / "examples" / "audit_sample.jsonl"
    assert main(["audit", str(sample), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["records"] == 9 and doc["flagged_records"] == len({f["line"] for f in doc["flagged"]}) > 0
    assert set(doc["flagged"][0]) >= {"record", "field", "text", "language", "reason", "pattern"}
    assert set(doc["by_language"]) == {"en", "zh", "hi"}
    assert main(["audit", str(sample), "--fix", str(tmp_path / "clean.jsonl"), "--identity", "Orca"]) == 0
    assert "Orca" in (tmp_path / "clean.jsonl").read_text(encoding="utf-8")
    assert main(["audit", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
