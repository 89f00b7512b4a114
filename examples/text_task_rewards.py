"""The reward of examples/text-task.yaml: a user reward on decoded text, as `module:function`.

A text task calls it as ``fn(prompt, output_ids, text)``: ``text`` is the decoded answer (up to
the first stop token, special tokens skipped), ``prompt.answer`` the dataset's answer field.
Partial credit, as the demo's ``reverse`` task gives it: the fraction of the answer's
characters that the text has at the same position. That is what lets a random-init model learn
with GRPO: an all-or-nothing match of a 2-character answer is almost never hit at random, and a
group of equal rewards teaches nothing. (A length penalty, the right characters over the longer
of answer and text, stalled the tiny model at ~0.5: it must also find the stop token, which it
rarely samples.)
"""


def partial_match(prompt, output_ids, text):
    answer = str(prompt.answer)
    got = text.strip()
    right = sum(1 for a, b in zip(answer, got, strict=False) if a == b)
    return right / max(len(answer), 1)
