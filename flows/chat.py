"""`tunefactory chat`: a terminal conversation that keeps its history, streamed as the model writes."""

from __future__ import annotations

from typing import TextIO

from tasks.inference import ChatEngine, MessageError

HELP = "Type a message; /clear starts over, /exit leaves."


def chat_loop(engine: ChatEngine, reader: TextIO, writer: TextIO, system: str = "", max_tokens: int = 512,
              temperature: float = 0.0, top_p: float = 1.0) -> list[dict[str, str]]:
    """Read user lines until /exit or end of input, answering each with the whole conversation so far;
    returns the conversation since the last /clear."""
    history: list[dict[str, str]] = []
    writer.write(f"{engine.name}: {HELP}\n")
    while True:
        writer.write("user> ")
        writer.flush()
        line = reader.readline()
        if not line or line.strip() == "/exit":
            writer.write("\n")
            return history
        text = line.rstrip("\n")
        if text.strip() == "/clear":
            history = []
            writer.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        writer.write("assistant> ")
        reply = ""
        try:
            for piece in engine.stream(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p):
                reply += piece
                writer.write(piece)
                writer.flush()
        except MessageError as exc:
            writer.write(f"(cannot answer: {exc})")
        writer.write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
