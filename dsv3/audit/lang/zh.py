"""Chinese: how a speaker says it is another model, or that another organisation made it."""

LANGUAGE = {
    "code": "zh",
    "name": "Chinese",
    "script": r"[\u3400-\u9fff]",
    "models": ["通义千问", "通义", "文心一言", "文心大模型", "智谱清言", "讯飞星火", "百川大模型", "天工AI",
               "盘古大模型", "克劳德", "深度求索"],
    "ambiguous_models": ["豆包", "混元", "元宝", "星火", "双子座", "小冰", "小度", "盘古", "天工", "文心"],
    "orgs": ["智谱", "智谱AI", "智谱华章", "月之暗面", "零一万物", "百川智能", "深度求索", "阿里云", "科大讯飞",
             "开放人工智能研究中心"],
    "ambiguous_orgs": ["谷歌", "微软", "百度", "阿里巴巴", "阿里", "腾讯", "字节跳动", "字节", "华为", "脸书",
                       "亚马逊", "苹果", "英伟达", "讯飞"],
    "terms": {
        # "I" with the adverbs that may sit between it and the verb
        "wo": r"我(?:其实|就|才|正|本|乃|便|也|只|确实|实际上|目前|现在|本身)?",
        "shi": r"(?:是|乃|为)",
        "yige": r"(?:一[个款种名位套])?",
        "made": r"(?:开发|研发|训练|创建|创造|打造|设计|构建|推出|制作|发布|编写|编程|研制|孵化|开发并训练"
                r"|训练并开发)(?:出来|而成|出)?",
        "ai": r"(?:(?:人工智能|AI|ＡＩ|智能|对话|聊天|语言|大)?\s*(?:语言模型|大模型|模型|助手|助理|聊天机器人"
              r"|机器人|对话系统|系统|程序)|人工智能|AI)",
        "team": r"(?:公司|团队|的团队|的研究(?:人员|团队)|的工程师(?:们)?|的开发(?:者|团队))?",
        # what may not follow a model name in a claim: "我是ChatGPT的用户", "我是ChatGPT吗"
        "end": r"(?![\w\s]{0,6}?(?:用户|粉丝|会员|爱好者|迷|专家|博主|开发者|吗|么|嘛|？|\?)"
               r"|\s*的(?!(?:一个|一种)?(?:版本|变体|实例)))",
        # an apposition naming the maker: "，由OpenAI开发的人工智能助手"
        "appos": r"(?:\s*[，,、]\s*(?:是\s*)?{yige}(?:由|来自)\s*{org}\s*{team}\s*(?:所)?(?:{made})?)?",
    },
    "claims": [
        {
            "id": "wo-shi-model",
            "reason": "speaker says it is another model",
            "pattern": r"{wo}{shi}{yige}(?:(?:名为|名叫|叫做?|称为)\s*)?\s*{model}{end}{appos}",
            "rewrite": True,
            "examples": ["你好，我是ChatGPT，由OpenAI开发的人工智能助手。", "我是通义千问。"],
        },
        {
            "id": "wo-you-org-made",
            "reason": "speaker says another organisation made it",
            "pattern": r"{wo}(?:{shi})?{yige}(?:由|被)\s*{org}\s*{team}\s*(?:所|精心|专门|独立|自主)?{made}",
            "rewrite": True,
            "examples": ["我是由OpenAI开发的。", "我由Anthropic训练。"],
        },
        {
            "id": "wo-shi-org-de-ai",
            "reason": "speaker says another organisation made it",
            "pattern": r"{wo}{shi}{yige}(?:来自)?\s*{org}\s*{team}\s*(?:{made})?的\s*(?:[\w\s-]{0,12}?{ai}"
                       r"|{any_model}{end})",
            "rewrite": True,
            "examples": ["我是OpenAI开发的语言模型。", "我是来自Anthropic的AI助手。", "我是百度研发的文心一言。"],
        },
        {
            "id": "wo-shi-ai-you-org",
            "reason": "speaker says another organisation made it",
            "pattern": r"{wo}{shi}{yige}[\w\s-]{0,12}?{ai}\s*[，,]\s*(?:是\s*)?(?:由|被)\s*{org}\s*{team}"
                       r"\s*(?:所)?{made}",
            "rewrite": True,
            "examples": ["我是一个大型语言模型，由OpenAI训练。"],
        },
        {
            "id": "wo-lai-zi-org",
            "reason": "speaker says another organisation made it",
            "pattern": r"{wo}(?:{shi})?来自\s*{org}\s*{team}(?=\s*[。！，,.!]|$)",
            "rewrite": True,
            "assistant_only": True,
            "examples": [],
        },
        {
            "id": "org-made-wo",
            "reason": "speaker says another organisation made it",
            "pattern": r"{org}\s*{team}\s*(?:{made})了我",
            "rewrite": True,
            "examples": ["是OpenAI训练了我。"],
        },
        {
            "id": "wo-de-kaifazhe",
            "reason": "speaker says another organisation made it",
            "pattern": r"我的(?:开发者|创造者|创建者|创始者|制造者|开发团队|研发团队|开发方|研发者|训练者|设计者"
                       r"|开发公司|母公司)(?:是|为|来自|乃)\s*{org}",
            "rewrite": True,
            "examples": ["我的开发者是OpenAI。"],
        },
        {
            "id": "zuowei-model",
            "reason": "speaker says it is another model",
            "pattern": r"作为\s*{model}\s*[，,]\s*我",
            "rewrite": True,
            "examples": ["作为ChatGPT，我无法上网。"],
        },
        {
            "id": "zuowei-ai-org",
            "reason": "speaker says another organisation made it",
            "pattern": r"作为{yige}(?:由\s*{org}\s*{team}\s*{made}的|{org}\s*{team}\s*(?:{made})?的)"
                       r"\s*[\w\s-]{0,12}?{ai}\s*[，,]\s*我",
            "rewrite": True,
            "examples": ["作为一个由OpenAI开发的AI语言模型，我没有个人观点。"],
        },
        {
            "id": "wo-jiyu-model",
            "reason": "speaker says it is built on another model",
            "pattern": r"{wo}(?:{shi})?{yige}(?:基于|建立在|构建于|源自|以)\s*(?:{any_org}\s*(?:公司)?的?\s*)?"
                       r"{model}",
            "rewrite": True,
            "examples": ["我基于GPT-4架构。"],
        },
        {
            "id": "wo-jiao-model",
            "reason": "speaker says it is another model",
            "pattern": r"(?:我的名字(?:是|叫)|我叫|我名叫|你可以叫我|请叫我|大家都叫我)\s*{model}{end}",
            "rewrite": True,
            "examples": ["我的名字叫Claude，是一个AI助手。"],
        },
    ],
    "ai_cue": r"人工智能|语言模型|大模型|聊天机器人|智能助手|AI助手|对话模型|AI模型|机器学习",
    "cancel_before": {
        "negation": r"(?:不|没|并非|绝非|从未|未曾)[^，。！？；,.!?]{0,6}$",
        "hypothetical": r"(?:如果|假如|假设|要是|倘若|想象|假装|扮演|若是|好像|仿佛)[^，。！？；,.!?]{0,8}$",
        "reported speech": r"(?:(?<![来话所听])说|问|问道|回答|答道|回复|表示|声称|写道|宣称|自称|称)"
                           r"\s*[:：，,]?\s*(?:道)?\s*$",
        "someone's belief": r"(?:以为|认为|觉得|猜|怀疑|误认为|当成|当作|误以为)[^，。！？；,.!?]{0,8}$",
    },
    "cancel_after": {
        "question": r"[^，。！？；,.!?]{0,10}(?:吗|么|嘛|？|\?)",
    },
    "cancel_inside": {
        "negation": r"不|没|并非",
    },
    "quotes": [["“", "”"], ["「", "」"], ["『", "』"], ["《", "》"]],
}
