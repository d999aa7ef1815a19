"""Formats not tied to one model family: plain instruction styles and early community chat formats."""

from tasks.templates.base import Template

TEMPLATES = [
    Template(
        name="empty",
        user="{content}",
        assistant="{content}",
        description="no formatting at all: turns are concatenated as they are",
    ),
    # LlamaFactory 0.9.3+: EOS closes every turn, the system's and the user's included.
    Template(
        name="default",
        system="System: {content}{eos_token}\n",
        user="Human: {content}{eos_token}\nAssistant:",
        assistant="{content}{eos_token}\n",
        description="plain 'Human: / Assistant:' turns, EOS after every turn (LlamaFactory 0.9.3+)",
    ),
    Template(
        name="alpaca",
        user="### Instruction:\n{content}\n\n### Response:\n",
        assistant="{content}{eos_token}\n\n",
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n",
        description="Stanford Alpaca's '### Instruction: / ### Response:' format",
    ),
    # FastChat's vicuna_v1.1: system, ' ', 'USER: ...', ' ', 'ASSISTANT:', ' reply</s>'.
    Template(
        name="vicuna",
        system="{content} ",
        user="USER: {content} ASSISTANT:",
        assistant=" {content}{eos_token}",
        default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions.",
        description="Vicuna v1.1 'USER: / ASSISTANT:' (also LLaVA-1.5)",
    ),
    # HuggingFaceH4/zephyr-7b-beta: each message is '<|role|>\n' + content + eos, then a newline.
    Template(
        name="zephyr",
        system="<|system|>\n{content}{eos_token}\n",
        user="<|user|>\n{content}{eos_token}\n<|assistant|>\n",
        assistant="{content}{eos_token}\n",
        description="Zephyr / TinyLlama-chat '<|user|>' turns closed by EOS",
    ),
    # Falcon-180B-chat: 'System: / User: / Falcon:' lines; replies end with a newline, so (LlamaFactory's
    # efficient_eos) EOS is labelled where each later prompt starts and closes the conversation.
    Template(
        name="falcon",
        system="System: {content}\n",
        user="User: {content}\nFalcon:",
        assistant=" {content}\n",
        suffix="{eos_token}",
        efficient_eos=True,
        description="Falcon chat 'User: / Falcon:' lines",
    ),
    # openchat/openchat-3.5-0106: 'GPT4 Correct <Role>: ' + content + '<|end_of_turn|>'.
    Template(
        name="openchat",
        prefix="{bos_token}",
        system="GPT4 Correct System: {content}<|end_of_turn|>",
        user="GPT4 Correct User: {content}<|end_of_turn|>GPT4 Correct Assistant:",
        assistant=" {content}<|end_of_turn|>",
        stop_words=("<|end_of_turn|>",),
        description="OpenChat 3.5 / Starling 'GPT4 Correct User:' turns",
    ),
]
