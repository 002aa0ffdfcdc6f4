"""A varied set of real sentences for parity tests: punctuation, unicode, accents, lengths."""

LONG = (
    "Late interaction keeps one vector per token and scores a document by summing, over the query "
    "tokens, the best match among the document tokens. " * 40
)

QUERIES = [
    "what is the capital of france",
    "Which planet is known as the Red Planet?",
    "fruits are healthy.",
    "",
    "?!",
    "Ça va? Crème brûlée, naïve café — résumé",
    "东京是日本的首都吗",
    "ColBERT vs. BM25: which is better for long-tail queries in e-commerce search engines today, really?",
    "a",
    LONG,
    "tokens like [MASK] and [unused0] inside text",
    "emoji 🙂 and tabs\tand\nnewlines",
]

DOCUMENTS = [
    "paris is the capital of france",
    "Venus is often called Earth's twin because of its similar size and proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
    "fruits are healthy.",
    "fruits are good for health.",
    "",
    "...!!!???",
    "Ça va? Crème brûlée, naïve café — résumé",
    "東京は日本の首都です。Tokyo is the capital of Japan.",
    "x",
    LONG,
    "Prices rose 3.5% in Q3 (year-over-year); see https://example.com/report?id=42&lang=en.",
    "The quick brown fox jumps over the lazy dog",
    "The quick brown fox jumps over the lazy dog",
]

# Longer documents (up to the 300-token cut), for token pooling: hundreds of merges each.
_SENTENCES = [d for d in DOCUMENTS if d is not LONG]
LONG_DOCUMENTS = [" ".join(_SENTENCES[(7 * k + j) % len(_SENTENCES)] for j in range(k)) for k in (4, 8, 13, 25, 60)]
