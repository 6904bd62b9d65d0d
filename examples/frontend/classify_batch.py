"""select() as a classifier over a batch of inputs, run concurrently with run_batch.

.venv/bin/python examples/frontend/classify_batch.py [--url http://127.0.0.1:30000]
"""

import argparse

import sglang as sgl

REVIEWS = [
    "I loved this film, the best thing I have seen all year.",
    "Terrible. I walked out after twenty minutes.",
    "The acting was wonderful and the music beautiful.",
    "Boring, too long, and the plot made no sense.",
]


@sgl.function
def sentiment(s, review):
    # A constant prefix: run_batch caches it on the server once for the whole batch.
    s += "Classify the sentiment of each movie review as positive or negative.\n\n"
    s += "Review: What a great movie!\nSentiment: positive\n\n"
    s += "Review: I hated every minute.\nSentiment: negative\n\n"
    s += "Review: " + review + "\nSentiment:"
    s += sgl.select("label", choices=[" positive", " negative"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    sgl.set_default_backend(sgl.RuntimeEndpoint(parser.parse_args().url))
    states = sentiment.run_batch([{"review": r} for r in REVIEWS], num_threads=4, progress_bar=True)
    for review, state in zip(REVIEWS, states):
        scores = state.get_meta_info("label")["normalized_prompt_logprobs"]
        print(f"{state['label'].strip():>8}  {scores[0]:7.3f} {scores[1]:7.3f}  {review}")


if __name__ == "__main__":
    main()
