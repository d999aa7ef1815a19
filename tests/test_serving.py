"""Chat and the OpenAI-compatible API: the official `openai` client against a real uvicorn server on localhost,
the terminal chat through the CLI, engines built from a recipe's store artifacts."""

import io
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn

from flows.api import Limits, create_app
from flows.chat import chat_loop
from flows.cli import main
from flows.serving import engine_for
from tasks.inference import (
    ChatEngine,
    HuggingFaceEngine,
    MessageError,
    ReplyStream,
    conversation,
    held_back,
    parse_tool_calls,
)

QUESTION = [{"role": "user", "content": "What does os.path.join do?"}]
KEY = "sk-test-key"
LIMITS = Limits(max_tokens=64, max_request_bytes=20_000, max_concurrency=1, max_n=4)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HuggingFaceEngine(tiny_model_dir, "chatml", name="tiny")


@pytest.fixture(scope="module")
def server(engine):
    """The API on a free localhost port, served by uvicorn on a thread for the module's tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(engine, api_key=KEY, limits=LIMITS), host="127.0.0.1", port=port,
                            log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_a_completion_is_the_engines_greedy_reply_with_usage(client, engine):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    expected = engine.generate(QUESTION, max_tokens=8)[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(engine.prompt(QUESTION)) and reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_a_stop_string_ends_the_reply_before_it(client):
    free = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert free.choices[0].message.content.startswith("\n")  # the tiny model's greedy reply is newlines
    stopped = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                             stop=["\n"])
    assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 8


def test_n_samples_several_choices(client):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=1.0,
                                           top_p=0.9, n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(6 for _ in reply.choices)  # a random model rarely stops early


def test_streaming_sends_the_same_text_as_deltas_then_usage(client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


class WordTokenizer:
    """Decodes ids as words of VOCAB; "<...>" words are special."""

    VOCAB = ["<p>", "Paris", " is", " sunny", ".", "\n", "User", ":", " hi", "<eos>"]

    def decode(self, ids, skip_special_tokens=True, **kwargs):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and self.VOCAB[i].startswith("<")))


class ScriptedModel:
    """Streams a fixed reply a token at a time, as generate does with a streamer."""

    device, reply = "cpu", [1, 2, 3, 4, 5, 6, 7, 8, 9]

    def generate(self, input_ids, streamer, **kwargs):
        streamer.put(input_ids[0])  # the prompt, which the streamer skips
        for token in self.reply:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return torch.tensor([input_ids[0].tolist() + self.reply])


def test_a_streamed_reply_never_sends_part_of_a_stop_string():
    """The newline that starts the stop "\nUser:" arrives (and is flushed) before the rest of it: it is held
    back until the stop shows, so the streamed text is the whole reply's, cut before its stop."""
    engine = SimpleNamespace(tokenizer=WordTokenizer(), model=ScriptedModel(), lock=threading.Lock(), stops=[9],
                             pad_id=None, finish=lambda *args: ChatEngine.finish(engine, *args))
    stream = ReplyStream(engine, [0], {}, 100, ["\nUser:"])
    assert "".join(stream) == stream.result.text == "Paris is sunny."
    assert held_back("Paris.\nUs", ["\nUser:"]) == 3 and held_back("Paris.", ["\nUser:"]) == 0


def test_a_stop_string_is_matched_in_the_reply_not_across_the_prompts_end(client):
    """The chatml prompt ends "assistant\n" and the greedy reply is newlines: "t\n\n" is in prompt + reply but
    never in the reply. generate's stop_strings matched it there and ended the reply after one token."""
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                           stop=["t\n\n"])
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
    streamed = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                              stop=["t\n\n"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


def test_padding_after_a_finished_choice_is_not_counted():
    """n > 1: a choice a stop string ended is padded to the others' length; with a pad token apart from EOS
    (Qwen2.5's) the padding was counted as reply tokens and the choice reported 'length'."""
    engine = SimpleNamespace(tokenizer=WordTokenizer(), stops=[9], pad_id=0, template=SimpleNamespace())
    finish = lambda tokens, stop=(): ChatEngine.finish(engine, tokens, 5, 5, list(stop), None)  # noqa: E731
    assert finish([1, 2, 3, 0, 0], [" sunny"]) == finish([1, 2, 3], [" sunny"])
    assert (finish([1, 2, 3, 0, 0], [" sunny"]).text, finish([1, 2, 3, 0, 0], [" sunny"]).completion_tokens,
            finish([1, 2, 3, 0, 0], [" sunny"]).finish_reason) == ("Paris is", 3, "stop")
    assert (finish([1, 2, 9, 0, 0]).completion_tokens, finish([1, 2, 9, 0, 0]).finish_reason) == (3, "stop")
    assert (finish([1, 2, 3, 4, 5]).completion_tokens, finish([1, 2, 3, 4, 5]).finish_reason) == (5, "length")
    engine.pad_id = 9  # no pad token of its own: generate pads with EOS, which follows no stop string
    assert finish([1, 2, 3, 9, 9], [" sunny"]).completion_tokens == 3


def test_a_reply_gets_the_room_the_context_leaves_and_a_prompt_that_fills_it_is_a_400(client, engine):
    assert engine.context == 512  # the tiny model's max_position_embeddings
    assert engine.reply_budget([0] * 509, 8) == 3 and engine.reply_budget([0] * 10, 8) == 8
    with pytest.raises(MessageError, match="this model's context is 512 tokens"):
        engine.reply_budget([0] * 512, 8)
    long = [{"role": "user", "content": "What does os.path.join do? " * 100}]
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens"):
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4)


def test_request_fields_openai_allows_as_null_take_their_defaults(client, server):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, temperature=None,
                                           top_p=None, n=None, stream=None)
    assert len(reply.choices) == 1 and reply.usage.completion_tokens <= 2
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize(("fields", "message"), [
    ({"tools": [{"type": "function", "function": "x"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content"),
    ({"stop": [""]}, "empty stop string"),
    ({"presence_penalty": 1.5}, "presence_penalty is not supported"),
])
def test_malformed_tools_content_and_unsupported_options_are_400s(server, fields, message):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2, **fields}
    answer = httpx.post(f"{server}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text


def test_a_chat_template_that_refuses_the_messages_is_a_message_error(tiny_model_dir):
    """template: auto renders through the tokenizer's own chat_template; its refusal (Mistral's wants 9-character
    tool call ids) was a 500 from the API, where the request is what it refuses (a MessageError is a 400)."""
    from tasks.templates.auto import AUTO

    engine = HuggingFaceEngine(tiny_model_dir, "chatml", name="tiny")
    engine.tokenizer.chat_template = "{{ raise_exception('Tool call IDs should be alphanumeric strings') }}"
    engine.template = AUTO
    with pytest.raises(MessageError, match="chat_template rejected a conversation .*Tool call IDs"):
        engine.prompt(QUESTION)


def test_a_json_answer_is_no_tool_call_unless_it_names_an_offered_tool(engine):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for answer in ('{"name": "Bob", "age": 3}', '<tool_call>{"name": "Bob", "arguments": {}}</tool_call>'):
        tokens = engine.tokenizer.encode(answer, add_special_tokens=False) + engine.stops[:1]
        reply = engine.finish(tokens, 10, 64, [], tools)
        assert reply.finish_reason == "stop" and reply.tool_calls is None and reply.text == answer
    assert parse_tool_calls('{"name": "Bob", "age": 3}', "qwen") is not None  # with no names given, as before


def test_the_recipes_top_k_and_repetition_penalty_reach_chat_and_the_api(tiny_model_dir, engine):
    """Set in the recipe (or --set), as LlamaFactory's chat and API take its generating arguments; they were used
    by evaluation only."""
    from tasks.inference import Generation

    built = engine_for(str(tiny_model_dir), ["top_k=7", "repetition_penalty=10.0"], None)
    assert built.generation == Generation(top_k=7, repetition_penalty=10.0)
    sampled = built.options([0], 8, 0.7, 0.9, [])
    assert sampled["top_k"] == 7 and sampled["repetition_penalty"] == 10.0
    assert "top_k" not in built.options([0], 8, 0.0, 1.0, [])  # greedy: no sampling settings
    plain, penalised = engine.generate(QUESTION, max_tokens=8)[0], built.generate(QUESTION, max_tokens=8)[0]
    assert plain.text.count("\n") == 8 and penalised.text != plain.text  # the greedy newlines are penalised


def test_a_seed_makes_a_sampled_reply_repeatable(client):
    """seed was accepted and ignored: two requests with the same seed sampled different replies."""
    def sampled(seed: int, stream: bool = False) -> str:
        reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=1.0,
                                               seed=seed, stream=stream)
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
        return reply.choices[0].message.content

    assert sampled(7, stream=True) == sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in (1, 2, 3, 4)}) > 1  # the seed, not something else, fixes the reply


def test_a_streams_slot_is_free_once_its_last_chunk_is_read(client):
    """The slot came back after [DONE] was sent: a client asking again at once could get a 429 (one slot here)."""
    for _ in range(5):
        stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, stream=True)
        assert [chunk for chunk in stream]
        assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).choices


def test_a_wrong_api_key_is_refused(server):
    stranger = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        stranger.chat.completions.create(model="tiny", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_max_tokens_over_the_limit_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens 65 is more than this server's limit of 64") as err:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=65)
    assert err.value.body["param"] == "max_tokens"


def test_malformed_requests_are_400s_that_say_why(client, server):
    raw = httpx.post(f"{server}/chat/completions", content=b'{"model": "tiny", "messages": [',
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=QUESTION, temperature=7)
    with pytest.raises(openai.BadRequestError, match="last message must be a user"):
        client.chat.completions.create(model="tiny", messages=[*QUESTION, {"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="stream with n > 1"):
        client.chat.completions.create(model="tiny", messages=QUESTION, n=2, stream=True)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)


def test_a_malformed_tool_call_is_a_400_and_gives_its_slot_back(client, server):
    broken = [*QUESTION, {"role": "assistant", "tool_calls": [{"id": "c0", "type": "function",
                                                               "function": {"name": "f", "arguments": "{oops"}}]},
              {"role": "tool", "tool_call_id": "c0", "content": "x"}]
    for stream in (True, True, False):  # one slot: a second streamed request would get a 429 if it leaked
        with pytest.raises(openai.BadRequestError, match="message 1: tool call arguments are not valid JSON"):
            client.chat.completions.create(model="tiny", messages=broken, max_tokens=2, stream=stream)
    assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).choices
    for method, path, status in (("GET", "/nothing", 404), ("GET", "/chat/completions", 405)):
        answer = httpx.request(method, f"{server}{path}", headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == status and answer.json()["error"]["message"]  # OpenAI's error shape


def test_bare_tool_definitions_are_taken_as_wrapped_ones(client, engine, monkeypatch):
    """Bare definitions (as datasets hold them) were accepted before the request model was typed."""
    offered = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *args, **kwargs: offered.append(kwargs["tools"]) or
                        generate(*args, **kwargs))
    bare = {"name": "get_weather", "parameters": {"type": "object"}}
    client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, tools=[bare])
    assert offered == [[{"type": "function", "function": bare}]]


def test_tool_choice_none_reads_no_tool_calls(client, engine, monkeypatch):
    offered = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *args, **kwargs: offered.append(kwargs["tools"]) or
                        generate(*args, **kwargs))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for choice in ("auto", "none"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, tools=tools,
                                       tool_choice=choice)
    assert offered == [tools, None]


def test_an_oversized_body_is_a_413(server):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 30_000}]}
    answer = httpx.post(f"{server}/chat/completions", json=big, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 413 and "at most 20000" in answer.json()["error"]["message"]


def test_generations_past_the_concurrency_limit_are_a_429(client):
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=64, temperature=0,
                                            stream=True)
    next(iter(stream))  # the stream holds the only slot until it is read to the end or closed
    with pytest.raises(openai.RateLimitError, match="already running or waiting"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4)
    stream.close()  # the client goes: its slot comes back once the server notices
    deadline = time.monotonic() + 10
    while True:
        try:
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed stream's slot was never given back"
            time.sleep(0.2)


def test_tools_are_offered_in_the_prompt_and_tool_calls_read_back(engine):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    # the engine's chatml template lists tools and writes calls in LlamaFactory's default format
    assert "> Tool Name: get_weather\n" in engine.tokenizer.decode(engine.prompt(QUESTION, tools))
    for call in ('Action: get_weather\nAction Input: {"city": "Paris"}',  # as the template writes a call
                 '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'):  # Qwen's, too
        tokens = engine.tokenizer.encode(call, add_special_tokens=False) + engine.stops[:1]
        reply = engine.finish(tokens, 10, 64, [], tools)
        assert reply.finish_reason == "tool_calls" and reply.text == ""
        assert reply.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # A tool call made earlier and its result are written back into the conversation.
    system, turns = conversation([*QUESTION, {"role": "assistant", "tool_calls": reply.tool_calls},
                                  {"role": "tool", "content": "sunny"}])
    assert [t["role"] for t in turns] == ["user", "function", "observation"]
    assert json.loads(turns[1]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    with pytest.raises(MessageError, match="alternate"):
        conversation([*QUESTION, *QUESTION])


def test_parallel_tool_calls_their_results_and_malformed_calls():
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}
             for i, name in enumerate(("get_weather", "get_time"))]
    system, turns = conversation([{"role": "developer", "content": "Be brief."}, *QUESTION,
                                  {"role": "assistant", "tool_calls": calls},
                                  {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"}])
    assert system == "Be brief." and [t["role"] for t in turns] == ["user", "function", "observation"]
    assert json.loads(turns[1]["content"]) == [{"name": "get_weather", "arguments": {}},
                                              {"name": "get_time", "arguments": {}}]
    # as the openai dataset format merges them (Qwen's template: one <tool_response> block each)
    assert turns[2]["content"] == "sunny\n</tool_response>\n<tool_response>\nnoon"
    blocks = ('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    llama3 = '[{"name": "get_weather", "parameters": {}}, {"name": "get_time", "parameters": {}}]'
    for written, tool_format in ((blocks, "qwen"), (llama3, "llama3")):
        assert [c["function"]["name"] for c in parse_tool_calls(written, tool_format)] == ["get_weather", "get_time"]
    assert parse_tool_calls("Action: get_weather\nAction Input: {oops", "default") is None
    for broken, message in (({"function": {"name": "f", "arguments": "{oops"}}, "not valid JSON"),
                            ({"id": "c0"}, "without function.name")):
        with pytest.raises(MessageError, match=f"message 1: .*{message}"):
            conversation([*QUESTION, {"role": "assistant", "tool_calls": [broken]}, {"role": "tool", "content": "x"}])


def test_chat_keeps_history_until_cleared(engine):
    typed = io.StringIO("What is os?\nAnd sys?\n/clear\nHello\n/exit\n")
    shown = io.StringIO()
    history = chat_loop(engine, typed, shown, system="Be brief.", max_tokens=4)
    assert [turn["content"] for turn in history if turn["role"] == "user"] == ["Hello"]
    assert shown.getvalue().count("assistant> ") == 3 and "(history cleared)" in shown.getvalue()


def test_chat_command_on_a_model_folder(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))  # end of input leaves like /exit
    assert main(["chat", str(tiny_model_dir), "--template", "chatml", "--max-tokens", "3"]) == 0
    assert "user> assistant> " in capsys.readouterr().out


def test_a_recipes_engine_is_its_trained_adapter_unmerged_built_once(write_recipe, workdir):
    from peft import PeftModel

    recipe = write_recipe(max_samples=8, eval_dataset=None)
    engine = engine_for(str(recipe), [], None)
    assert isinstance(engine.model, PeftModel) and engine.name == "recipe"
    built = sorted(path.name for path in (workdir / "artifacts" / "train").iterdir())
    assert len(built) == 1
    again = engine_for(str(recipe), [], None)  # the store answers: nothing is trained twice
    assert sorted(path.name for path in (workdir / "artifacts" / "train").iterdir()) == built
    assert again.generate(QUESTION, max_tokens=4) == engine.generate(QUESTION, max_tokens=4)


def test_a_missing_inference_backend_is_refused_in_one_line(write_recipe, capsys):
    recipe = write_recipe(infer_backend="vllm")
    assert main(["api", str(recipe)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "vllm needs the vllm package" in error


def test_a_reward_model_recipe_does_not_chat(write_recipe, workdir, capsys):
    recipe = write_recipe(stage="rm", dataset="pydoc_preferences", eval_dataset=None)
    assert main(["chat", str(recipe)]) == 1
    assert "a reward model (stage rm) scores replies; it does not chat" in capsys.readouterr().err
    assert not (workdir / "artifacts" / "reward").exists()  # refused before anything was built


def test_eval_command_scores_a_model_folder_on_an_exam(tiny_model_dir, workdir, capsys):
    assert main(["eval", str(tiny_model_dir), "--set", "task=pystdlib_test", "--set", "template=chatml",
                 "--set", "n_shot=0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exam[base]\n# pystdlib (test, 0-shot)") and "exam_average" in out
    assert main(["eval", str(tiny_model_dir)]) == 1
    assert "needs an exam: --set task=" in capsys.readouterr().err



def test_vllm_gets_a_max_lora_rank_of_its_own():
    """vLLM accepts only its own max_lora_rank values: a rank-24 adapter (or a PiSSA one converted to 2r) asked
    for 24, which vLLM refuses."""
    import pytest

    from tasks.core.errors import RecipeError
    from tasks.inference_vllm import max_lora_rank

    assert [max_lora_rank(r) for r in (4, 16, 24, 64, 300)] == [16, 16, 32, 64, 320]
    with pytest.raises(RecipeError, match="rank 1024 is above vLLM's largest, 512"):
        max_lora_rank(1024)
