"""The text corpus the tokenizer tests compare expertmesh with HF tokenizers on.

Hand-written cases for each hard spot (scripts, code with tabs and CRLF,
numbers, 4-byte UTF-8, special tokens inside text, whitespace runs,
normalization) plus seeded random mixes of the same character classes.
"""
import os
import random
import unicodedata

HAND = [
    "",
    "Hello world",
    "Hello, world! How are you doing today? I'm fine; you're great, aren't you? WE'LL SEE, DON'T WORRY.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX. tHe QuIcK bRoWn FoX.",
    " leading space", "trailing space ", "  two leading", "double  space", "tab\there", "\n\nnewlines\n\n\n",
    "a\r\nb\r\n\r\nc\rd", "   \t  \n \r\n\t\t  x", " " * 50, "\n" * 10, "\t" * 7 + "x", " \u00a0 \u3000 \u2003 nbsp",
    "trailing whitespace \t \n", "x" + " " * 17 + "y", "mixed \n\n  \t indentation\n    deeper\n\tback",
    # Numbers: digit groups of 1-3 (DeepSeek), single digits (Qwen).
    "1", "12", "123", "1234", "1234567890", "3.14159265358979", "1,000,000.00", "-42 +7 0x1F 1e-9 2^64",
    "v1.2.3-rc4 2024-12-31T23:59:59Z 10:30am", "١٢٣٤ ४५६ ⅷ ½ ² ①②", "phone: +1 (555) 123-4567",
    # CJK and others.
    "你好，世界！今天天气很好。我们去公园散步吧。", "深度求索（DeepSeek）发布了V3模型，参数量为6710亿。",
    "日本語のテキストです。カタカナとひらがな、漢字が混ざっています。", "ｶﾀｶﾅ 半角 ＡＢＣ 全角１２３",
    "한국어 텍스트입니다. 안녕하세요!", "Привет, мир! Ёжик в тумане.", "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?", "Γειά σου Κόσμε", "שלום עולם", "ภาษาไทยไม่มีช่องว่าง", "Tiếng Việt có dấu: ắ ằ ẳ ẵ ặ",
    "mixed 中文English日本語123한국어", "𠀀𠀁𠀂 CJK extension B", "㐀㐁 extension A", "〇〆〜",
    # Emoji and other 4-byte UTF-8.
    "😀😃😄 emoji", "👍🏽 skin tone", "👨‍👩‍👧‍👦 family ZWJ", "🇫🇷🇯🇵 flags", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛", "🤖🚀✨🔥💯",
    "a😀b😀c", "\U0001F600" * 20, "♠♣♥♦ ☃ ★ ✓ ✗ → ⇒ ∀∃∈∑∫ ≤≥≠",
    # Combining marks and normalization (NFC for Qwen).
    "e\u0301 vs \u00e9", "A\u030a vs \u00c5 vs \u212b", "n\u0303o\u0308", "\u1100\u1161\u11a8 jamo", "ﬁ ligature",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom", "soft\u00adhyphen", "\u202eright-to-left override",
    # Code.
    "def f(x):\n\treturn x * 2  # comment\n\nclass A:\n    pass\n",
    "int main() {\r\n\tprintf(\"%d\\n\", 42);\r\n\treturn 0;\r\n}\r\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }",
    "<html><body><div class=\"x\">Hi &amp; bye</div></body></html>", "SELECT * FROM t WHERE a >= 10 AND b != 'x';",
    "x=1;y=2;z=x+y", "foo_bar_baz = FooBar.baz_qux(1,2,3)", "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | tr a-z A-Z\n",
    "{\"key\": [1, 2, {\"nested\": null}], \"b\": true}", "path/to/file.txt C:\\Windows\\System32 ~/.bashrc",
    "https://example.com/a?b=c&d=e#frag user@example.com", "<<<>>> ((( ))) [[[ ]]] {{{ }}}", "!!!??? ... --- ___ ***",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D", "it's they're we've I'm you'll he'd",
    # Special tokens inside text (DeepSeek, Llama-3, Qwen spellings).
    "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜>",
    "You are helpful.<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{}\n```<｜tool▁call▁end｜>",
    "text<｜User｜><｜User｜>text <｜Assistant｜> spaced", "<｜User｜", "｜User｜>", "<｜fim▁begin｜>code<｜fim▁hole｜>x<｜fim▁end｜>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>", "<|endoftext|>tail", "<think>\nreasoning\n</think>\n\nanswer",
    "<|EOT|> and <|im_end|> and <|eot_id|> in the middle",
    # Long runs.
    "a" * 500, "ab" * 300, "!" * 100, "1" * 100, "中" * 200, "あ" * 100, " " * 300 + "x", "\n" * 100, "😀" * 64,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
]

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r  \u00a0\u3000",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "你好世界中文汉字测试深度求索模型",
    "ひらがなカタカナ日本語",
    "한국어텍스트",
    "АБВГДабвгдёЁ",
    "éèêëàâäôöûüçñÅß",
    "😀👍🏽🚀✨🔥💯𠀀𝔘\u200d",
    "\u0301\u0308\u0303",
    "٠١٢٣٤٥",
    "'s't're",
]


def random_cases(n, seed=20251202):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 60)
        s = []
        for _ in range(k):
            pool = POOLS[rng.randrange(len(POOLS))]
            run = rng.randint(1, 6)
            s.append("".join(rng.choice(pool) for _ in range(run)))
        out.append("".join(s))
    return out


def codepoint_cases(n, seed=2):
    """Random code points from the whole range (ASCII, controls, BMP, astral).

    Only code points assigned in Python's Unicode database (14.0 on Debian 12,
    the version of its PCRE2) are drawn: HF's Oniguruma has newer tables, so
    a character assigned later (CJK Extension H, Egyptian Hieroglyphs
    Extended-A, ...) is \p{Cn} for PCRE2 and may split differently
    (docs/TEXT.md, "Known differences").
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.3:
                cp = rng.randint(0x20, 0x7E)
            elif r < 0.5:
                cp = rng.randint(0x80, 0x2FFF)
            elif r < 0.7:
                cp = rng.randint(0x3000, 0xFFFF)
            elif r < 0.8:
                cp = rng.randint(0, 0x20)
            else:
                cp = rng.randint(0x10000, 0x10FFFF)
            if 0xD800 <= cp <= 0xDFFF or (cp > 0x20 and unicodedata.category(chr(cp)) == "Cn"):
                cp = 0x41 + rng.randint(0, 25)
            s.append(chr(cp))
        out.append("".join(s))
    return out


def docs_cases(root):
    """The repository's own English docs, one case per file (long texts)."""
    out = []
    for rel in ["README.md", "docs/MODEL.md", "docs/CLUSTER.md"]:
        p = os.path.join(root, rel)
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                out.append(f.read())
    return out


def corpus(root, n_random=400):
    return HAND + random_cases(n_random) + codepoint_cases(600) + docs_cases(root)
