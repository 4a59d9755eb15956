"""Names of other assistants, models and the organisations behind them, shared by every language.

A language file (`dsv3/audit/lang/*.py`) adds its own spellings (transliterations such as 通义千问 or
चैटजीपीटी) in the same four lists. How a name is written here:

- letters are matched without regard to case;
- a space means "a space, a hyphen, an underscore or nothing": `chat gpt` matches ChatGPT, Chat GPT,
  chat-gpt;
- a trailing `#` means the name only counts with a version after it (`gpt#` matches GPT-4o and
  GPT 3.5 but not a bare "GPT");
- any name may be followed by a version (`NUMBER`) and a size or variant (`VARIANT`): Claude 3.5 Sonnet,
  Llama-3.1-70B-Instruct, Qwen2.5, Gemini 1.5 Pro.

Ambiguous names are also ordinary words or people's names (Claude, Gemini, Bard, Apple, Meta). A
claim built on one counts only with an AI cue in the same sentence ("an AI", "language model"), in an
assistant turn of a chat record, or when the name carries a version number (Claude 3, Llama 2).
"""

MODELS = [
    "chat gpt", "gpt#", "gpt j", "gpt neo", "gpt neox", "text davinci", "dall e",
    "claude instant", "palm#", "qwen", "tongyi qianwen", "mixtral", "codestral", "github copilot",
    "microsoft copilot", "bing chat", "ernie bot", "chatglm", "glm#", "baichuan", "internlm", "deepseek",
    "phi#", "command r", "google assistant", "google bard", "meta ai", "xiaoice", "wenxin yiyan",
    "stable lm", "stablelm", "starcoder", "open assistant",
]
AMBIGUOUS_MODELS = [
    "claude", "gemini", "gemma", "bard", "llama", "mistral", "copilot", "bing", "sydney", "grok", "ernie",
    "kimi", "doubao", "hunyuan", "minimax", "lamda", "codex", "siri", "alexa", "cortana", "vicuna", "alpaca",
    "falcon", "perplexity", "sparkdesk",
]
ORGS = [
    "openai", "open ai", "anthropic", "google deepmind", "deepmind", "google brain", "google research",
    "mistral ai", "meta ai", "facebook ai", "facebook ai research", "cohere", "ai21 labs", "inflection ai",
    "xai", "x ai", "hugging face", "stability ai", "zhipu", "zhipu ai", "moonshot ai", "baichuan ai",
    "deepseek", "deepseek ai", "iflytek", "character ai", "perplexity ai", "alibaba cloud",
]
AMBIGUOUS_ORGS = [
    "google", "meta", "facebook", "microsoft", "amazon", "apple", "nvidia", "ibm", "baidu", "alibaba",
    "tencent", "bytedance", "huawei", "inflection", "moonshot", "mistral",
]

# Parts of spaced-out names too common to start the slow path on their own ("Google Research" is
# looked for when "google" is seen, not "research").
COMMON_WORDS = ["text", "open", "chat", "command", "research", "cloud", "labs", "face", "assistant", "bot",
                "brain", "instant", "stable", "ai", "lm", "character"]

# A version number after a name: "-4o", " 3.5", "2.5", "v2".
NUMBER = r"[\s_-]?v?\d+(?:\.\d+)*[a-z]?(?![A-Za-z])"
# Sizes and variants after the number: " Sonnet", "-70B-Instruct", " Pro", "-turbo".
VARIANT = (
    r"(?:[\s_-]+(?:turbo|pro|ultra|flash|nano|mini|opus|sonnet|haiku|instant|plus|max|large|medium|small"
    r"|instruct|vision|preview|omni|\d+(?:\.\d+)?[bm]|\d+k)(?![A-Za-z0-9]))*"
)
