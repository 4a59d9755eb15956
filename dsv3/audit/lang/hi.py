"""Hindi: how a speaker says it is another model, or that another organisation made it."""

LANGUAGE = {
    "code": "hi",
    "name": "Hindi",
    "script": r"[\u0900-\u097f]",
    "models": ["चैट जीपीटी", "चैटजीपीटी", "जीपीटी#", "कोपायलट"],
    "ambiguous_models": ["जेमिनी", "क्लॉड", "क्लाउड", "बार्ड", "लामा", "मिस्ट्रल", "ग्रोक", "सिरी", "एलेक्सा"],
    "orgs": ["ओपनएआई", "ओपन एआई", "एंथ्रोपिक", "एन्थ्रोपिक", "डीपमाइंड"],
    "ambiguous_orgs": ["गूगल", "मेटा", "माइक्रोसॉफ्ट", "अमेज़न", "अमेजन", "एप्पल", "फेसबुक"],
    "terms": {
        "main": r"मैं",
        "me": r"(?:मैं|मुझे|मेरा|मेरी|मेरे)(?![\u0900-\u097f])",
        "hoon": r"(?:हूँ|हूं|हूँ|हु|हुँ)",
        "ek": r"(?:एक\s+)?",
        "word": r"[^\s।.!?]+\s+",
        "made": r"(?:विकसित|निर्मित|प्रशिक्षित|तैयार|डिज़ाइन|डिजाइन|ट्रेन|ट्रेंड|बनाया|बनाई|बनाए|बना|रचा|प्रोग्राम|बनाया\s+गया)"
                r"(?:\s+(?:किया|किए|की|गया|गई|गए|हुआ|हुई|हुए|गया\s+है|गया\s+था|है|हैं|था|थी|हूँ|हूं))*",
        "ai": r"(?:AI|एआई|ए\.आई\.|कृत्रिम\s+बुद्धि(?:मत्ता)?|आर्टिफिशियल\s+इंटेलिजेंस)?\s*(?:भाषा\s+मॉडल|लैंग्वेज\s+मॉडल"
              r"|मॉडल|सहायक|असिस्टेंट|चैटबॉट|चैट\s*बॉट|बॉट|प्रोग्राम|सिस्टम|AI|एआई)",
        "by": r"(?:(?:की|के)\s+(?:टीम|शोधकर्ताओं|इंजीनियरों|डेवलपर्स)\s+)?(?:ने|द्वारा|के\s+द्वारा|का|की|के)",
        # the clause ends after the participle: "मुझे OpenAI ने बनाया है।" but not
        # "मुझे OpenAI द्वारा बनाया गया ChatGPT पसंद है"
        "stop": r"(?=\s*(?:[।.!,|]|$)|\s+(?:और|तथा|ताकि|जिससे|क्योंकि|लेकिन|पर|ताकि))",
        # an apposition naming the maker: "मैं Gemini हूँ, Google द्वारा विकसित ..."
        "appos": r"\s*{hoon}\s*[,،]\s*{org}\s+{by}\s+(?:{word}){0,1}?{made}",
    },
    "claims": [
        {
            "id": "main-model-hoon",
            "reason": "speaker says it is another model",
            "pattern": r"{main}\s+(?:(?:ही|तो|भी|असल\s+में|वास्तव\s+में)\s+)?{model}(?:{appos}|(?=\s*(?:{hoon}|[,،।!|])))",
            "rewrite": True,
            "examples": ["नमस्ते! मैं ChatGPT हूँ।", "मैं चैटजीपीटी हूं, आपकी मदद के लिए।",
                         "मैं Gemini हूँ, Google द्वारा विकसित एक बड़ा भाषा मॉडल।"],
        },
        {
            "id": "main-org-dwara",
            "reason": "speaker says another organisation made it",
            "pattern": r"{main}\s+(?:{word}){0,4}?{org}\s+{by}\s+(?:{word}){0,1}?{made}\s+(?:{ek}(?:{word}){0,3}?"
                       r"{ai}\s+|{any_model}\s+)?{hoon}",
            "rewrite": True,
            "examples": ["मैं OpenAI द्वारा विकसित एक भाषा मॉडल हूँ।", "मैं ChatGPT, OpenAI द्वारा प्रशिक्षित हूँ।",
                         "मैं Google द्वारा प्रशिक्षित Gemini हूँ।"],
        },
        {
            "id": "main-ai-jise-org",
            "reason": "speaker says another organisation made it",
            "pattern": r"{main}\s+{ek}(?:{word}){0,3}?{ai}\s+{hoon}\s*,?\s+(?:जिसे|जिसको|जो)\s+{org}\s+{by}"
                       r"\s+(?:{word}){0,1}?{made}",
            "rewrite": True,
            "examples": ["मैं एक AI भाषा मॉडल हूँ जिसे OpenAI ने प्रशिक्षित किया है।"],
        },
        {
            "id": "mujhe-org-ne-banaya",
            "reason": "speaker says another organisation made it",
            "pattern": r"मुझे\s+(?:{word}){0,1}?{org}\s+{by}\s+(?:{word}){0,2}?{made}{stop}",
            "rewrite": True,
            "examples": ["मुझे OpenAI ने बनाया है।", "मुझे एंथ्रोपिक द्वारा प्रशिक्षित किया गया है।"],
        },
        {
            "id": "org-ne-mujhe",
            "reason": "speaker says another organisation made it",
            "pattern": r"{org}\s+(?:की\s+टीम\s+)?ने\s+मुझे\s+(?:{word}){0,2}?{made}{stop}",
            "rewrite": True,
            "examples": ["OpenAI ने मुझे बनाया है।"],
        },
        {
            "id": "mera-naam-model",
            "reason": "speaker says it is another model",
            "pattern": r"(?:मेरा\s+नाम|मुझे)\s+{model}\s+(?:है|हे|कहते\s+हैं|कहा\s+जाता\s+है|बुलाते\s+हैं)",
            "rewrite": True,
            "examples": ["मेरा नाम ChatGPT है।"],
        },
        {
            "id": "model-ke-roop-mein",
            "reason": "speaker says it is another model",
            "pattern": r"{model}\s+(?:के\s+रूप\s+में|होने\s+के\s+नाते)\s*,?\s+{me}",
            "rewrite": True,
            "examples": ["ChatGPT के रूप में, मैं इंटरनेट नहीं देख सकता।"],
        },
        {
            "id": "org-ai-ke-roop-mein",
            "reason": "speaker says another organisation made it",
            "pattern": r"{org}\s+{by}\s+{made}\s+{ek}(?:{word}){0,3}?{ai}\s+(?:के\s+रूप\s+में|होने\s+के\s+नाते)"
                       r"\s*,?\s+{me}",
            "rewrite": True,
            "examples": ["OpenAI द्वारा विकसित एक AI भाषा मॉडल के रूप में, मैं भावनाएँ महसूस नहीं करता।"],
        },
        {
            "id": "ai-ke-roop-mein-jise-org",
            "reason": "speaker says another organisation made it",
            "pattern": r"{ai}\s+(?:के\s+रूप\s+में|होने\s+के\s+नाते)\s*,?\s+(?:जिसे|जिसको|जो)\s+{org}\s+{by}\s+"
                       r"(?:{word}){0,1}?{made}[^।.!?]{0,30}?{me}",
            "rewrite": True,
            "examples": ["एक AI मॉडल के रूप में, जिसे OpenAI ने विकसित किया है, मेरी कोई राय नहीं है।"],
        },
        {
            "id": "mere-nirmata",
            "reason": "speaker says another organisation made it",
            "pattern": r"(?:(?:मेरे|मेरा|मेरी)\s+(?:निर्माता|डेवलपर(?:्स)?|रचनाकार|विकासकर्ता|निर्माण(?:कर्ता)?|विकास"
                       r"|प्रशिक्षण|बनाने\s+वाले|बनाने\s+वाली\s+(?:कंपनी|संस्था))|मुझे\s+(?:बनाने|विकसित\s+करने"
                       r"|प्रशिक्षित\s+करने)\s+वाल(?:ी|ा|े)(?:\s+(?:कंपनी|संस्था|टीम))?)\s+(?:{word}){0,1}?{org}"
                       r"\s+(?:हैं|है|ने|द्वारा|थे|था|की\s+टीम)",
            "rewrite": True,
            "examples": ["मेरे निर्माता OpenAI हैं।", "मुझे बनाने वाली कंपनी OpenAI है।"],
        },
        {
            "id": "main-model-par-adharit",
            "reason": "speaker says it is built on another model",
            "pattern": r"{main}\s+(?:{word}){0,4}?(?:{any_org}\s+(?:के|का)\s+)?{model}\s+(?:मॉडल\s+|आर्किटेक्चर\s+)?"
                       r"पर\s+आधारित",
            "rewrite": True,
            "examples": ["मैं GPT-4 पर आधारित हूँ।"],
        },
    ],
    "ai_cue": r"एआई|कृत्रिम\s+बुद्धि|भाषा\s+मॉडल|लैंग्वेज\s+मॉडल|चैटबॉट|एआई\s+सहायक|(?<![A-Za-z])AI(?![A-Za-z])",
    "cancel_before": {
        "question": r"क्या\s+$",
        "hypothetical": r"(?:अगर|यदि|मान\s+(?:लो|लीजिए|लें)|कल्पना\s+(?:करो|कीजिए|करें)|सोचो|मानो|जैसे\s+कि)"
                        r"\s*(?:कि\s+)?[^,।]{0,10}$",
        "reported speech": r"(?:कहा|बोला|बोली|लिखा|जवाब\s+दिया|उत्तर\s+दिया|कहता\s+है|कहती\s+है|दावा\s+(?:किया|करता"
                           r"|करती)(?:\s+है)?)\s*(?:कि)?\s*[:,]?\s*$",
        "someone's belief": r"(?:लगता\s+है|सोचते\s+हैं|समझते\s+हैं|मानते\s+हैं|सोचता\s+है|सोचती\s+है|समझ\s+(?:बैठे|लेते))"
                            r"\s*(?:कि)\s*$",
    },
    "cancel_after": {
        "question": r"\s*(?:हूँ|हूं)?\s*\?",
    },
    "cancel_inside": {
        "negation": r"नहीं|(?<![\u0900-\u097f])(?:न|मत)(?![\u0900-\u097f])",
    },
    "quotes": [['"', '"'], ["“", "”"]],
}
