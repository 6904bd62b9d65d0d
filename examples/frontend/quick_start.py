"""A chat program, run once, then a multi-turn conversation.

make serve                                   # in another terminal
.venv/bin/python examples/frontend/quick_start.py [--url http://127.0.0.1:30000]
"""

import argparse

import sglang as sgl


@sgl.function
def qa(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=64, temperature=0))


@sgl.function
def multi_turn(s, questions):
    s += sgl.system("You are a helpful assistant. Answer in one sentence.")
    for i, question in enumerate(questions):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=48, temperature=0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    sgl.set_default_backend(sgl.RuntimeEndpoint(parser.parse_args().url))

    state = qa.run(question="What is the capital of France?")
    print("answer:", state["answer"])
    print("tokens:", state.get_meta_info("answer")["completion_tokens"])

    state = multi_turn.run(questions=["Name a large planet.", "How far is it from the Sun?"])
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']}")


if __name__ == "__main__":
    main()
