"""Query a running ``bitnet-torch serve`` with the official ``openai`` client (chat, streaming, completion).

Start a server first, e.g.::

    BITNET_TORCH_API_KEY=sk-local bitnet-torch serve path/to/bitnet-checkpoint --port 8000

then ``BITNET_TORCH_API_KEY=sk-local python examples/serve.py --base-url http://127.0.0.1:8000/v1``.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="What is a ternary weight?")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("BITNET_TORCH_API_KEY", "none"))
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                           max_tokens=64, temperature=0)
    print(reply.choices[0].message.content, f"\n[{reply.usage.completion_tokens} tokens]")
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                                max_tokens=64, temperature=0.7, seed=1, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    completion = client.completions.create(model=model, prompt="In the beginning", max_tokens=32, stop=["."])
    print(completion.choices[0].text)


if __name__ == "__main__":
    main()
