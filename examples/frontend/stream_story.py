"""Streaming: print a story as the server generates it.

.venv/bin/python examples/frontend/stream_story.py [--url http://127.0.0.1:30000]
"""

import argparse

import sglang as sgl


@sgl.function
def story(s, hero):
    s += sgl.user(f"Write a very short story about {hero}.")
    s += sgl.assistant(sgl.gen("story", max_tokens=96, temperature=0.7))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    sgl.set_default_backend(sgl.RuntimeEndpoint(parser.parse_args().url))
    state = story.run(hero="a brave little robot", stream=True)
    for piece in state.text_iter("story"):
        print(piece, end="", flush=True)
    print()
    print("finish:", state.get_meta_info("story")["finish_reason"])


if __name__ == "__main__":
    main()
