"""Fork: ask for three tips in parallel branches, then combine them in the main conversation.

.venv/bin/python examples/frontend/parallel_tips.py [--url http://127.0.0.1:30000]
"""

import argparse

import sglang as sgl

TOPICS = ["sleep", "exercise", "food"]


@sgl.function
def tips(s, goal):
    s += sgl.system("You give short, practical advice.")
    forks = s.fork(len(TOPICS))  # the text so far is prefilled once and shared by the branches
    for branch, topic in zip(forks, TOPICS):
        branch += sgl.user(f"Give one tip about {topic} to {goal}, in one sentence.")
        branch += sgl.assistant(sgl.gen("tip", max_tokens=48, stop="\n", temperature=0))
    # Reading a branch's variable waits for it; the three gens above run concurrently.
    bullets = "\n".join(f"- {branch['tip']}" for branch in forks)
    s += sgl.user(f"Turn these tips into a three-step plan to {goal}:\n{bullets}")
    s += sgl.assistant(sgl.gen("plan", max_tokens=128, temperature=0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    sgl.set_default_backend(sgl.RuntimeEndpoint(parser.parse_args().url))
    state = tips.run(goal="stay healthy")
    for message in state.messages():
        print(f"[{message['role']}]\n{message['content']}\n")


if __name__ == "__main__":
    main()
