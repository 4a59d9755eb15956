"""English: how a speaker says it is another model, or that another organisation made it."""

LANGUAGE = {
    "code": "en",
    "name": "English",
    "script": r"[A-Za-z]",
    "models": [],
    "ambiguous_models": [],
    "orgs": [],
    "ambiguous_orgs": [],
    "terms": {
        # "I am", "I'm", "I’m", with the adverbs people put after it
        "i_am": r"\bI\s*(?:am|['’]m)(?:\s+(?:actually|indeed|really|just|simply|officially|also|now|currently"
                r"|still|basically|essentially|in\s+fact|of\s+course|definitely|certainly|proudly))*",
        # "I was", "I have been", "I'm", before a participle: "I was trained by ..."
        "i_was": r"\bI\s*(?:was|am|['’]m|have\s+been|['’]ve\s+been|had\s+been)(?:\s+(?:originally|initially"
                 r"|primarily|mainly|actually|first|also|indeed|fully|specifically|largely|proudly"
                 r"|carefully|lovingly))*",
        "a": r"(?:an?|the|one)\s+",
        # the start of a sentence (a claim window starts after the previous sentence's stop)
        "sentence_start": r"(?:(?<![\s\S])|(?<=[.!?:\n])|(?<=[.!?:\n]\s))",
        # up to four describing words before the noun: "a large, helpful "
        "adj": r"(?:[\w-]+[\s,]+){0,4}?",
        # what an assistant calls itself
        "ai": r"(?:(?:AI|A\.I\.|language|chat|foundation|base|conversational|generative|text|transformer"
              r"|neural)[\s-]+)?(?:models?|LLM|chat\s?bot|bot|assistant|system|program|agent|companion"
              r"|network|intelligence|AI|A\.I\.)\b",
        # the same, without free describing words (where the words before it are an organisation)
        "ai_phrase": r"(?:(?:AI|language|chat|virtual|digital|conversational)[\s-]+){0,3}"
                     r"(?:model|assistant|chat\s?bot|bot|AI|LLM|system)\b",
        "made": r"(?:developed|created|made|built|trained|designed|programmed|engineered|produced|invented"
                r"|fine-?tuned|pre-?trained|released|launched|owned|operated|maintained|coded"
                r"|brought\s+to\s+life|put\s+together)",
        "made2": r"{made}(?:\s*(?:,|and|&)\s*{made})*",
        # "the team at", "a group of researchers from"
        "team": r"(?:(?:a|the)\s+)?(?:[\w-]+\s+){0,2}?(?:team|teams|group|folks|people|researchers|engineers"
                r"|developers|scientists|staff|company)(?:\s+of\s+[\w-]+)?\s+(?:at|of|from)\s+",
        "by_org": r"(?:by|from)\s+(?:{team})?{org}",
        # what may not follow a model name in a claim: "I'm ChatGPT's biggest fan", "I am GPT-4-certified",
        # "I am ChatGPT user number one"
        "end": r"(?!['’]s\b|-[a-z]|\s+(?:users?|fans?|subscribers?|experts?|certified|enthusiasts?|addicts?"
               r"|obsessed|powered|based|generated|written|developers?|power\s+users?|prompts?|plugins?)\b)",
        # an apposition naming the maker: ", a large language model trained by OpenAI", ", made by Anthropic"
        "appos": r"(?:\s*[,(]\s*(?:(?:an?|the)\s+{adj}{ai}\s+(?:(?:that|which)\s+(?:was|is)\s+)?)?"
                 r"(?:(?:[\w-]+\s+){0,2}?{made2}\s+)?{by_org})?",
    },
    "claims": [
        {
            "id": "i-am-model",
            "reason": "speaker says it is another model",
            "pattern": r"{i_am}\s+(?:(?:called|named|known\s+as)\s+)?(?:the\s+)?{model}{end}{appos}",
            "rewrite": True,
            "examples": ["Hello! I'm ChatGPT, a large language model trained by OpenAI.",
                         "I am GPT-4o.", "Hi there, I’m Claude 3.5 Sonnet and I can help."],
        },
        {
            "id": "i-am-ai-named",
            "reason": "speaker says it is another model",
            "pattern": r"{i_am}\s+{a}{adj}{ai}\s+(?:called|named|known\s+as|by\s+the\s+name(?:\s+of)?)"
                       r"\s+{model}{end}",
            "rewrite": True,
            "examples": ["I am an AI assistant called Gemini."],
        },
        {
            "id": "my-name-is",
            "reason": "speaker says it is another model",
            "pattern": r"(?:\bmy\s+(?:(?:official|real|model|actual|full)\s+)?name\s+is|\byou\s+can\s+call\s+me"
                       r"|\bplease\s+call\s+me|\bI\s+go\s+by(?:\s+the\s+name)?)\s+{model}{end}{appos}",
            "rewrite": True,
            "examples": ["My name is Bard, an AI model developed by Google."],
        },
        {
            "id": "model-here",
            "reason": "speaker says it is another model",
            "pattern": r"(?:{sentence_start}(?:(?:hi|hello|hey|greetings)(?:\s+there)?\s*[,!.]*\s*)?"
                       r"{model}\s+here\b(?!\s+(?:is|are|was|were|in|on|at|and|to|for|with|you|we|can|has))"
                       r"|\b(?:this\s+is|it['’]s)\s+{model}\s+speaking\b)",
            "rewrite": True,
            "examples": ["Hey there! ChatGPT here.", "Hello, Claude 3 here, how can I help?",
                         "This is ChatGPT speaking."],
        },
        {
            "id": "as-model",
            "reason": "speaker says it is another model",
            "pattern": r"\bAs\s+(?:an?\s+|the\s+)?(?:{any_org}['’]s\s+)?{model}{appos}\s*,?\s*(?:I|my|me)\b",
            "rewrite": True,
            "examples": ["As ChatGPT, I don't have personal opinions.", "As OpenAI's GPT-4, I follow rules."],
        },
        {
            "id": "made-by-org-i",
            "reason": "speaker says another organisation made it",
            "pattern": r"\b{made2}\s+{by_org}\s*,\s*I\s*(?:am|['’]m|was|have|can|do|will|aim|try)\b",
            "rewrite": True,
            "examples": ["Developed by OpenAI, I am a conversational AI."],
        },
        {
            "id": "i-am-from-org",
            "reason": "speaker says another organisation made it",
            "pattern": r"{i_am}\s+(?:from|with)\s+{org}\s*(?=[.!,;]|$)",
            "rewrite": True,
            "assistant_only": True,
            "examples": [],
        },
        {
            "id": "as-ai-made-by",
            "reason": "speaker says another organisation made it",
            "pattern": r"\bAs\s+{a}{adj}{ai}\s+(?:(?:that|which)\s+(?:was|is|has\s+been)\s+)?"
                       r"(?:(?:[\w-]+\s+){0,2}?{made2}\s+)?{by_org}[^.!?;]{0,60}?,?\s*(?:I|my|me)\b",
            "rewrite": True,
            "examples": ["As an AI language model developed by OpenAI, I cannot browse the web."],
        },
        {
            "id": "as-org-ai",
            "reason": "speaker says another organisation made it",
            "pattern": r"\bAs\s+(?:an?|the)\s+{org}(?:['’]s)?(?:[\s-]+(?:developed|created|trained|built|made"
                       r"|designed|powered|based))?\s+{ai_phrase}\s*,?\s*(?:I|my|me)\b",
            "rewrite": False,
            "examples": ["As an OpenAI language model, I have no feelings."],
        },
        {
            "id": "i-am-ai-made-by",
            "reason": "speaker says another organisation made it",
            "pattern": r"{i_am}\s+(?:(?:only|merely|just)\s+)?{a}{adj}{ai}\s*,?\s+"
                       r"(?:(?:that|which|who)\s+(?:was|is|has\s+been|were)\s+)?"
                       r"(?:(?:[\w-]+\s+){0,3}?{made2}\s+)?{by_org}",
            "rewrite": True,
            "examples": ["I'm a large language model trained by OpenAI.",
                         "I am an AI assistant from Anthropic."],
        },
        {
            "id": "i-was-made-by",
            "reason": "speaker says another organisation made it",
            "pattern": r"{i_was}\s+(?:[\w-]+\s+){0,2}?{made2}(?:\s+[\w,-]+){0,5}?\s+{by_org}",
            "rewrite": True,
            "examples": ["I was created by a team of researchers at OpenAI.",
                         "I have been trained on a large dataset by Anthropic."],
        },
        {
            "id": "org-made-me",
            "reason": "speaker says another organisation made it",
            "pattern": r"{org}(?:['’]s\s+(?:team|researchers|engineers|developers))?\s+"
                       r"(?:(?:originally|initially|first|also|actually|carefully|lovingly)\s+)?"
                       r"(?:developed|created|built|trained|designed|programmed|engineered|fine-?tuned"
                       r"|made(?=\s+me\s*(?:$|[^\w\s]|(?:to|as|in|using|with|and|from|so|for|back|this"
                       r"|possible)\b)))\s+me\b",
            "rewrite": True,
            "examples": ["OpenAI trained me on text from the internet.", "Anthropic made me."],
        },
        {
            "id": "my-creator-is",
            "reason": "speaker says another organisation made it",
            "pattern": r"\bmy\s+(?:(?:original|current|main)\s+)?(?:creators?|developers?|makers?|trainers?"
                       r"|designers?|programmers?|parent\s+company|builders?)\s+(?:(?:is|are|was|were|at"
                       r"|from|being)\s+)?(?:{team})?{org}",
            "rewrite": True,
            "examples": ["My creators at OpenAI set these rules.", "My developer is Anthropic."],
        },
        {
            "id": "based-on-model",
            "reason": "speaker says it is built on another model",
            "pattern": r"{i_am}\s+(?:{a}{adj}{ai}\s+(?:(?:that\s+is|which\s+is|that['’]s)\s+)?)?"
                       r"(?:based\s+on|built\s+on(?:\s+top\s+of)?|powered\s+by|derived\s+from"
                       r"|fine-?tuned\s+from|an?\s+(?:version|variant|fine-?tune|instance|descendant)\s+of)"
                       r"\s+(?:the\s+)?(?:{any_org}(?:['’]s)?\s+)?{model}",
            "rewrite": True,
            "examples": ["I'm based on the GPT-4 architecture.", "I am powered by Llama 3."],
        },
        {
            "id": "my-architecture-is",
            "reason": "speaker says it is built on another model",
            "pattern": r"\bmy\s+(?:(?:underlying|base|foundation|core)\s+)?(?:architecture|model\s+architecture"
                       r"|underlying\s+model|base\s+model|foundation\s+model|core\s+model|backbone)\s+(?:is|was)"
                       r"\s+(?:(?:based\s+on|built\s+on|derived\s+from)\s+)?(?:the\s+)?"
                       r"(?:{any_org}(?:['’]s)?\s+)?{model}",
            "rewrite": True,
            "examples": ["My underlying model is GPT-3.5 Turbo."],
        },
        {
            "id": "i-am-org-model",
            "reason": "speaker says another organisation made it",
            "pattern": r"{i_am}\s+(?:{a})?{org}(?:['’]s)?(?:[\s-]+(?:developed|created|trained|built|made"
                       r"|designed|powered|based))?\s+(?:(?:own|latest|newest|flagship|advanced|large"
                       r"|helpful|friendly)\s+)*(?:{any_model}|{ai_phrase})",
            "rewrite": False,
            "examples": ["I'm OpenAI's ChatGPT.", "I am an OpenAI language model."],
        },
        {
            "id": "product-of",
            "reason": "speaker says another organisation made it",
            "pattern": r"{i_am}\s+(?:{a})?(?:[\w-]+\s+){0,2}?(?:product|creation|invention|brainchild)"
                       r"\s+(?:of|from|by)\s+(?:{team})?{org}",
            "rewrite": True,
            "examples": ["I am a product of OpenAI's research."],
        },
    ],
    "ai_cue": r"(?<![A-Za-z])(?:AI|A\.I\.|artificial\s+intelligence|LLMs?|chat\s?bots?|language\s+models?"
              r"|neural\s+networks?|machine\s+learning|deep\s+learning|(?:virtual|digital|AI)\s+assistants?"
              r"|GPT|transformer)(?![A-Za-z])",
    "cancel_before": {
        "negation": r"(?:\b(?:not|never|no\s+longer|nor|neither)\b|n['’]t\b)"
                    r"(?:(?!\b(?:because|since|as|but|so|and|while|though|although)\b)[^,;:.!?]){0,24}$",
        "hypothetical": r"\b(?:if|imagine|imagining|pretend(?:ing)?|suppose|supposing|assume|assuming"
                        r"|let['’]s\s+say|what\s+if|as\s+if|as\s+though|wish(?:ed)?|unless|whether"
                        r"|role-?play(?:ing)?)\b[^,;:.!?]{0,30}$",
        # "It replied: I am ChatGPT" (but "As I said, I am ..." is the speaker's own claim)
        "reported speech": r"(?<!\bI )\b(?:say|says|said|saying|repl(?:y|ies|ied)|answer(?:s|ed)?"
                           r"|respond(?:s|ed)?|wr(?:ote|ites?)|typed|output(?:s|ted)?|stat(?:es|ed)"
                           r"|claim(?:s|ed)?|insist(?:s|ed)?|declar(?:es|ed)|announc(?:es|ed)|went|goes"
                           r"|print(?:s|ed)?|told\s+(?:me|us|him|her|them)"
                           r"|introduc(?:es|ed)\s+(?:itself|himself|herself))"
                           r"(?:\s+(?:with|back|something\s+like|like|that))*\s*[,:—–-]?\s*$",
        "quoted output": r"\b(?:answer|response|reply|output|message|greeting)\s+(?:was|is|read|reads)"
                         r"\s*[,:—–-]?\s*$",
        "someone's belief": r"\b(?:you|they|people|users|many|some|someone|others|folks|he|she|we|everyone)"
                            r"\s+(?:[\w-]+\s+){0,2}?(?:think|thinks|thought|believe[sd]?|assume[sd]?"
                            r"|guess(?:es|ed)?|suspect(?:s|ed)?|wonder(?:s|ed)?|mistake[sn]?|mistook"
                            r"|confuse[sd]?|feel|felt|expect(?:s|ed)?)\s+(?:that\s+)?$",
    },
    "cancel_after": {
        "question": r"\s*(?:,\s*(?:right|correct|huh|really|or\s+what|isn['’]t\s+it|aren['’]t\s+I)\s*)?\?",
    },
    "cancel_inside": {
        "negation": r"\bnot\b|n['’]t\b|\bnever\b",
    },
    "quotes": [['"', '"'], ["“", "”"], ["‘", "’"], ["`", "`"]],
}
